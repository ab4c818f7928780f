"""MTT: one outer step against a hand-written reference, the learned lr, planning, config, resume."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import mtt as mtt_config
from distill_jax import data as data_lib
from distill_jax import io as io_lib
from distill_jax.methods import get_method, mtt
from distill_jax.methods.base import RealData
from distill_jax.training import experts

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def toy_data(n=48, seed=0) -> RealData:
  rng = np.random.default_rng(seed)
  y = (np.arange(n) % 3).astype(np.int32)
  x = (rng.normal(size=(n, 8, 8, 1)) + y[:, None, None, None]).astype(np.float32)
  return RealData("toy", 3, (8, 8, 1), ("a", "b", "c"), x, y, x[:12], y[:12],
                  data_lib.fit_preprocessor(x, "none"))


def toy_config(buffer_dir: str = "", **overrides):
  """The smoke preset shrunk to a 4-wide ConvNet on 8x8 images (3 classes, ipc 2)."""
  config = mtt_config.get_config(
      "smoke,ipc=2,syn_steps=3,expert_epochs=1,max_start_epoch=2,lr_img=10,lr_lr=1e-4,"
      "num_steps=12,log_every=2,checkpoint_every=3,dsa_strategy=flip_crop,"
      "experts.num_epochs=3,experts.batch_size=16,experts.dsa_strategy=flip_crop,"
      "experts.model_kwargs.width=4"
  )
  config.preprocessing = "none"
  config.experts.buffer_dir = buffer_dir
  for key, value in overrides.items():
    config[key] = value
  return config


def random_params(model, key, scale=0.0):
  params = model.init(key, jnp.zeros((1, 8, 8, 1)))["params"]
  if scale:
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    leaves = [a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
    params = jax.tree.unflatten(treedef, leaves)
  return params


def test_two_outer_steps_match_a_hand_written_reference():
  """No DSA and the whole set per step, so the minibatch order cannot matter."""
  config = toy_config(dsa=False, batch_syn=0, syn_steps=2, lr_img=10.0, lr_lr=1e-3,
                      lr_teacher=0.02)
  method = mtt.MTT(config, num_classes=3, image_shape=(8, 8, 1), num_experts=2)
  model = method.model
  start = random_params(model, jax.random.key(1))
  target = random_params(model, jax.random.key(1), scale=0.05)
  data = toy_data()
  x0, y_syn = mtt.initial_images(config, data, jax.random.key(0))
  assert x0.shape == (6, 8, 8, 1) and y_syn.tolist() == [0, 0, 1, 1, 2, 2]

  def reference_objective(x, lr):
    params = start
    for _ in range(config.syn_steps):  # Plain SGD, unrolled by Python.
      def ce(p):
        logits = model.apply({"params": p}, x, train=True)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y_syn))
      grads = jax.grad(ce)(params)
      params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    num = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(target)))
    den = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(target)))
    return num / den

  reference = jax.jit(jax.value_and_grad(reference_objective, argnums=(0, 1)))
  x, lr = np.asarray(x0, np.float64), 0.02
  buf_x, buf_lr = np.zeros_like(x), 0.0
  state = method.init(jax.random.key(5), x0)
  for _ in range(2):
    loss, (g_x, g_lr) = reference(jnp.asarray(x, jnp.float32), jnp.float32(lr))
    # torch.optim.SGD(momentum=0.5): buf = 0.5 * buf + g; p -= lr * buf.
    buf_x = 0.5 * buf_x + np.asarray(g_x)
    buf_lr = 0.5 * buf_lr + float(g_lr)
    x, lr = x - config.lr_img * buf_x, lr - config.lr_lr * buf_lr
    state, metrics = method.step(state, jnp.asarray(y_syn), start, target)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_lr"]), float(g_lr), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(state.x_syn), x, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(state.lr), lr, rtol=1e-6)
  assert float(state.lr) != 0.02  # The lr moved.
  assert int(state.step) == 2 and method.num_traces == 1  # No retracing.


def test_learned_lr_gets_a_finite_gradient_and_the_student_loops_agree():
  """DSA and minibatches on: the unrolled student loop (unroll=True, no remat) equals the rolled
  scan with remat, in the loss and in the gradients w.r.t. the images and the learned lr."""
  grads = {}
  for loop, remat in (("unrolled", False), ("scan", True)):
    config = toy_config(remat=remat, student_loop=loop, dsa=True,
                        dsa_strategy="color_crop_cutout_flip_scale_rotate", batch_syn=4)
    method = mtt.MTT(config, num_classes=3, image_shape=(8, 8, 1), num_experts=2)
    assert method.student_loop == loop
    start = random_params(method.model, jax.random.key(1))
    target = random_params(method.model, jax.random.key(1), scale=0.05)
    x0, y_syn = mtt.initial_images(config, toy_data(), jax.random.key(0))
    value_and_grad = jax.jit(jax.value_and_grad(method.matching_loss, argnums=(0, 1)))
    loss, (g_x, g_lr) = value_and_grad(jnp.asarray(x0), jnp.float32(0.01), jnp.asarray(y_syn),
                                       start, target, jax.random.key(3))
    assert np.isfinite(float(g_lr)) and float(g_lr) != 0.0
    assert np.all(np.isfinite(np.asarray(g_x))) and float(jnp.abs(g_x).max()) > 0
    assert 0 < float(loss) < 10
    grads[loop] = (float(loss), np.asarray(g_x), float(g_lr))
  np.testing.assert_allclose(grads["scan"][0], grads["unrolled"][0], rtol=1e-5)
  np.testing.assert_allclose(grads["scan"][1], grads["unrolled"][1], rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(grads["scan"][2], grads["unrolled"][2], rtol=1e-3)


def test_plan_draws_experts_and_start_epochs_from_the_key():
  config = toy_config(max_start_epoch=4)
  method = mtt.MTT(config, num_classes=3, image_shape=(8, 8, 1), num_experts=3)
  key, seen = jax.random.key(0), set()
  for _ in range(200):
    next_key, expert, start_epoch = method.choose(key)
    assert method.choose(key)[1:] == (expert, start_epoch)  # Deterministic.
    seen.add((expert, start_epoch))
    key = next_key
  # Uniform over experts 0..2 and start epochs 0..T+-1 (distill.py's randint(0, T+)).
  assert seen == {(e, t) for e in range(3) for t in range(4)}


def test_config_table_presets_and_checks():
  c10 = mtt_config.get_config("cifar10,ipc=10")
  assert (c10.syn_steps, c10.expert_epochs, c10.max_start_epoch) == (30, 2, 20)
  assert (c10.lr_img, c10.lr_lr, c10.lr_teacher, c10.preprocessing) == (1000.0, 1e-4, 0.01, "zca_kornia")
  assert c10.experts.model_kwargs.to_dict() == {"width": 128, "depth": 3, "norm": "instance"}
  assert (c10.experts.lr, c10.experts.momentum, c10.experts.batch_size) == (0.01, 0.0, 256)
  # An override changes one field and keeps the rest of the row; ipc between rows takes the lower.
  c = mtt_config.get_config("cifar100,ipc=20,syn_steps=7")
  assert (c.syn_steps, c.expert_epochs, c.preprocessing) == (7, 2, "standardize")
  assert mtt_config.get_config("cifar100,ipc=50").batch_syn == 125
  tiny = mtt_config.get_config("tiny_imagenet,ipc=1")
  assert tiny.experts.model_kwargs.depth == 4 and tiny.eval.overrides.mtt.depth == 4
  cpu = mtt_config.get_config("fashion_mnist,ipc=10,cpu")
  assert (cpu.syn_steps, cpu.experts.model_kwargs.width, cpu.dataset) == (10, 16, "fashion_mnist")
  assert (cpu.expert_epochs, cpu.max_start_epoch, cpu.preprocessing) == (1, 3, "zca_kornia")
  mtt.check_config(cpu)
  mtt.check_buffer(cpu, cpu.experts.num_epochs)
  with pytest.raises(ValueError, match="needs expert epochs up to 3 but the experts train 2"):
    mtt.check_buffer(cpu, 2)
  with pytest.raises(ValueError, match="remat=True needs student_loop='scan'"):
    mtt.check_config(mtt_config.get_config("remat=True,student_loop=unrolled"))
  with pytest.raises(ValueError, match="unknown student_loop 'loop'"):
    mtt.check_config(mtt_config.get_config("student_loop=loop"))
  with pytest.raises(ValueError, match="unknown init 'zeros'"):
    mtt.check_config(mtt_config.get_config("init=zeros"))
  with pytest.raises(ValueError, match="config.syn_steps must be a positive int"):
    mtt.check_config(mtt_config.get_config("syn_steps=0"))
  assert get_method("mtt").distill is mtt.distill


@pytest.fixture(scope="module")
def toy_buffer(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("mtt_buffer"))
  buffer = experts.ensure_buffer(toy_config(path), toy_data())
  assert buffer.num_experts == 2 and buffer.num_epochs == 3
  return path


def test_divergence_is_a_clear_error(toy_buffer, tmp_path):
  config = toy_config(toy_buffer, lr_lr=1e8, num_steps=6)
  with pytest.raises(mtt.DivergenceError, match="MTT diverged at iteration .* lower lr_img"):
    mtt.distill(config, toy_data(), io_lib.Workdir(str(tmp_path)))


RUNNER = """
import sys, time
import numpy as np
from distill_jax import io as io_lib
from distill_jax.methods import mtt
from tests.methods import test_mtt as t

buffer_dir, workdir, out, slow = sys.argv[1:5]
if slow == "1":  # Slow the loop down so the test can kill it between checkpoints.
  check = mtt._check_finite
  mtt._check_finite = lambda *a, **k: (time.sleep(0.25), check(*a, **k))[1]
result = mtt.distill(t.toy_config(buffer_dir), t.toy_data(), io_lib.Workdir(workdir))
np.savez(out, x=result.x, y=result.y, lr=result.lr)
"""


def test_resume_after_sigkill_gives_the_identical_set(toy_buffer, tmp_path):
  runner = tmp_path / "run_mtt.py"
  runner.write_text(RUNNER)
  env = {
      **os.environ,
      "PYTHONPATH": REPO,
      "JAX_PLATFORMS": "cpu",
      # The three runs compile the same program once.
      "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  }

  def run(workdir, out, slow="0"):
    return subprocess.Popen(
        [sys.executable, str(runner), toy_buffer, str(workdir), str(out), slow],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )

  straight = run(tmp_path / "straight", tmp_path / "straight.npz")
  assert straight.wait(timeout=120) == 0, straight.stderr.read().decode()[-3000:]

  killed_dir = tmp_path / "killed"
  victim = run(killed_dir, tmp_path / "never.npz", slow="1")
  checkpoints = killed_dir / "checkpoints"
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline and victim.poll() is None:
    if checkpoints.is_dir() and any(d.isdigit() for d in os.listdir(checkpoints)):
      break
    time.sleep(0.05)
  victim.send_signal(signal.SIGKILL)
  assert victim.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed"
  assert not (tmp_path / "never.npz").exists()
  saved = sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit())
  assert saved and saved[-1] < 12

  resumed = run(killed_dir, tmp_path / "resumed.npz")
  assert resumed.wait(timeout=120) == 0, resumed.stderr.read().decode()[-3000:]
  a, b = np.load(tmp_path / "straight.npz"), np.load(tmp_path / "resumed.npz")
  for name in ("x", "y", "lr"):
    np.testing.assert_array_equal(a[name], b[name])
  assert not np.array_equal(a["x"], mtt.initial_images(toy_config(), toy_data(), None)[0])
  # Each logged step appears once, even the ones the killed run logged after its checkpoint.
  steps = [r["step"] for r in io_lib.read_metrics(str(killed_dir / "metrics.jsonl"))]
  assert steps == list(range(2, 13, 2))
