"""MTT: outer steps against a hand-written reference, the learned lr, the host-side choice of
experts, the config, divergence, and its smoke run's report extras (conftest.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import mtt as mtt_config
from distill_jax import data as data_lib
from distill_jax import io as io_lib
from distill_jax import methods
from distill_jax.methods import mtt

# The smoke preset (digits, depth 2) shrunk to a 4-wide ConvNet and one image per class.
TINY = ("smoke,ipc=1,experts.model_kwargs.width=4,inner.steps=2,inner.expert_epochs=1,"
        "inner.max_start_epoch=3,experts.num_experts=3,experts.experts_per_shard=3")


@pytest.fixture(scope="module")
def digits():
  config = mtt_config.get_config("smoke")
  return data_lib.load_real(config.dataset, config.preprocessing)


def tiny_config(extra=""):
  return mtt_config.get_config(f"{TINY},{extra}" if extra else TINY)


def random_params(model, key, scale=0.0):
  params = model.init(key, jnp.zeros((1, 8, 8, 1)))["params"]
  if scale:
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    leaves = [a + scale * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
    params = jax.tree.unflatten(treedef, leaves)
  return jax.tree.map(np.asarray, params)


class FakeBuffer:
  """A trajectory buffer of made-up parameters that records which checkpoints are read."""

  def __init__(self, model, num_experts, num_epochs):
    self.model, self.num_experts, self.num_epochs = model, num_experts, num_epochs
    self.reads = []

  def params(self, expert, epoch):
    self.reads.append((expert, epoch))
    return random_params(self.model, jax.random.key(100 * expert), scale=0.01 * epoch)


def test_two_outer_steps_match_a_hand_written_reference(digits):
  """No DSA and the whole set per student step, so the minibatch order cannot matter."""
  config = tiny_config("inner.dsa_strategy='',inner.batch_size=0,outer.lr_img=10.0,"
                       "outer.lr_lr=1e-3,inner.lr=0.02")
  method = mtt.MTT(config, digits)
  model = method.model
  start = random_params(model, jax.random.key(1))
  target = random_params(model, jax.random.key(1), scale=0.05)
  inputs = {"start": start, "target": target, "expert": np.int32(0), "start_epoch": np.int32(0)}
  state = jax.jit(method.init)(jax.random.key(5))
  x0, y_syn = np.asarray(state.x_syn), jnp.asarray(method.y_syn)
  assert x0.shape == (10, 8, 8, 1) and y_syn.tolist() == list(range(10))
  np.testing.assert_array_equal(  # init="real": the seeded real subset.
      x0, data_lib.random_subset(digits.x_train, digits.y_train, ipc=1, num_classes=10,
                                 seed=config.seed)[0])

  def reference_objective(x, lr):
    params = start
    for _ in range(config.inner.steps):  # Plain SGD, unrolled by Python.
      def ce(p):
        logits = model.apply({"params": p}, x, train=True)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y_syn))
      grads = jax.grad(ce)(params)
      params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    def distance(a, b):
      return sum(jnp.sum((u - v) ** 2) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    return distance(params, target) / distance(start, target)

  reference = jax.jit(jax.value_and_grad(reference_objective, argnums=(0, 1)))
  traces = []

  def step(state, inputs):
    traces.append(None)
    return method.step(state, inputs)

  step = jax.jit(step)
  x, lr = x0.astype(np.float64), 0.02
  buf_x, buf_lr = np.zeros_like(x), 0.0
  for _ in range(2):
    loss, (g_x, g_lr) = reference(jnp.asarray(x, jnp.float32), jnp.float32(lr))
    # torch.optim.SGD(momentum=0.5): buf = 0.5 * buf + g; p -= lr * buf.
    buf_x = 0.5 * buf_x + np.asarray(g_x)
    buf_lr = 0.5 * buf_lr + float(g_lr)
    x, lr = x - config.outer.lr_img * buf_x, lr - config.outer.lr_lr * buf_lr
    state, metrics = step(state, inputs)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["grad_lr"]), float(g_lr), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(state.x_syn), x, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(state.lr), lr, rtol=1e-6)
  assert float(state.lr) != 0.02  # The lr moved.
  assert len(traces) == 1  # No retracing.


def test_learned_lr_gets_a_finite_gradient_and_the_student_loops_agree(digits):
  """DSA and minibatches on: the unrolled student loop (no remat) equals the rolled scan with
  remat, in the loss and in the gradients w.r.t. the images and the learned lr."""
  grads = {}
  for loop, remat in (("unrolled", False), ("scan", True)):
    config = tiny_config(f"ipc=2,inner.batch_size=4,inner.loop={loop},inner.remat={remat}")
    method = mtt.MTT(config, digits)
    assert method.student_loop == loop and config.inner.dsa_strategy
    start = random_params(method.model, jax.random.key(1))
    target = random_params(method.model, jax.random.key(1), scale=0.05)
    x0 = jax.jit(method.init)(jax.random.key(0)).x_syn
    value_and_grad = jax.jit(jax.value_and_grad(method.matching_loss, argnums=(0, 1)))
    loss, (g_x, g_lr) = value_and_grad(x0, jnp.float32(0.01), start, target, jax.random.key(3))
    assert np.isfinite(float(g_lr)) and float(g_lr) != 0.0
    assert np.all(np.isfinite(np.asarray(g_x))) and float(jnp.abs(g_x).max()) > 0
    assert 0 < float(loss) < 10
    grads[loop] = (float(loss), np.asarray(g_x), float(g_lr))
  np.testing.assert_allclose(grads["scan"][0], grads["unrolled"][0], rtol=1e-5)
  np.testing.assert_allclose(grads["scan"][1], grads["unrolled"][1], rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(grads["scan"][2], grads["unrolled"][2], rtol=1e-3)


def test_choose_draws_experts_and_start_epochs_from_seed_and_step(digits):
  config = tiny_config("inner.max_start_epoch=4")
  method = mtt.MTT(config, digits)
  chosen = [method.choose(step) for step in range(1, 301)]
  # Uniform over experts 0..2 and start epochs 0..T+-1 (distill.py's randint(0, T+)).
  assert set(chosen) == {(e, t) for e in range(3) for t in range(4)}
  # A function of (seed, step) alone: any order, any instance with the same seed.
  again = mtt.MTT(config, digits)
  assert [again.choose(step) for step in reversed(range(1, 301))] == chosen[::-1]
  other_seed = mtt.MTT(tiny_config("inner.max_start_epoch=4,seed=1"), digits)
  assert [other_seed.choose(step) for step in range(1, 301)] != chosen


def test_inputs_read_the_chosen_expert_at_t_and_t_plus_m(digits):
  config = tiny_config("inner.expert_epochs=2")
  method = mtt.MTT(config, digits)
  method.buffer = FakeBuffer(method.model, 3, 4)
  for step in (1, 2, 9):
    expert, start = method.choose(step)
    method.buffer.reads.clear()
    inputs = method.inputs(step)
    assert method.buffer.reads == [(expert, start), (expert, start + 2)]
    assert (int(inputs["expert"]), int(inputs["start_epoch"])) == (expert, start)
    for got, want in zip(jax.tree.leaves(inputs["target"]),
                         jax.tree.leaves(method.buffer.params(expert, start + 2))):
      np.testing.assert_array_equal(got, want)


def test_config_table_presets_and_checks():
  c10 = mtt_config.get_config("cifar10,ipc=10")
  inner, outer = c10.inner, c10.outer
  assert (inner.steps, inner.expert_epochs, inner.max_start_epoch) == (30, 2, 20)
  assert (outer.lr_img, outer.lr_lr, inner.lr, c10.preprocessing) == (
      1000.0, 1e-4, 0.01, "zca_kornia")
  assert (outer.momentum, inner.batch_size, inner.loop, inner.remat) == (0.5, 0, "auto", False)
  assert c10.experts.model_kwargs.to_dict() == {"width": 128, "depth": 3, "norm": "instance"}
  assert (c10.experts.lr, c10.experts.momentum, c10.experts.batch_size) == (0.01, 0.0, 256)
  assert c10.eval.protocols == "mtt,standard" and c10.eval.overrides.mtt.depth == 3
  # An override changes one field and keeps the rest of the row; ipc between rows takes the lower.
  c = mtt_config.get_config("cifar100,ipc=20,inner.steps=7")
  assert (c.inner.steps, c.inner.expert_epochs, c.preprocessing) == (7, 2, "standardize")
  assert mtt_config.get_config("cifar100,ipc=50").inner.batch_size == 125
  tiny = mtt_config.get_config("tiny_imagenet,ipc=1")
  assert tiny.experts.model_kwargs.depth == 4 and tiny.eval.overrides.mtt.depth == 4
  cpu = mtt_config.get_config("fashion_mnist,ipc=10,cpu")
  assert (cpu.inner.steps, cpu.experts.model_kwargs.width, cpu.dataset) == (10, 16, "fashion_mnist")
  assert (cpu.inner.expert_epochs, cpu.inner.max_start_epoch, cpu.preprocessing) == (
      1, 3, "zca_kornia")
  smoke = mtt_config.get_config("smoke")
  assert smoke.experts.model_kwargs.depth == smoke.eval.overrides.mtt.depth == 2
  mtt.check_config(cpu)
  mtt.check_buffer(cpu, cpu.experts.num_epochs)
  with pytest.raises(ValueError, match="needs expert epochs up to 3 but the experts train 2"):
    mtt.check_buffer(cpu, 2)
  for arg, message in [
      ("inner.remat=True,inner.loop=unrolled", "remat=True needs loop='scan'"),
      ("inner.loop=loop", "unknown loop 'loop'"),
      ("init=zeros", "unknown config.init 'zeros'"),
      ("inner.steps=0", "config.inner.steps must be a positive int"),
      ("inner.batch_size=-1", "config.inner.batch_size must be 0 .whole set. or a positive int"),
      ("ipc=2,inner.batch_size=21", "config.inner.batch_size=21 exceeds the 2 x classes"),
      ("outer.lr_lr=0.0", "config.outer.lr_lr must be a positive finite number"),
      ("outer.momentum=1.0", r"config.outer.momentum must be in \[0, 1\)"),
  ]:
    with pytest.raises(ValueError, match=message):
      mtt.check_config(mtt_config.get_config(f"digits,{arg}"))
  assert methods.get_method("mtt") is mtt.MTT


def test_divergence_is_a_clear_error(digits, tmp_path, monkeypatch):
  config = tiny_config("outer.lr_lr=1e8,num_steps=6,log_every=1,checkpoint_every=2")
  monkeypatch.setattr(mtt.experts_lib, "ensure_buffer",
                      lambda config, data: FakeBuffer(method.model, 3, 4))
  method = mtt.MTT(config, digits)
  with pytest.raises(methods.DivergenceError,
                     match=r"mtt diverged at step \d \(.*\); lower outer\.lr_img \(now 100\.0\) or "
                           r"outer\.lr_lr \(now 100000000\.0\)"):
    methods.run(method, io_lib.Workdir(tmp_path))


def test_smoke_report_extras_describe_the_expert_buffer(smoke_runs):
  with open(smoke_runs.reference / "mtt_extras.json") as f:
    experts = json.load(f)["experts"]
  assert (experts["num_experts"], experts["num_epochs"]) == (2, 4)
  assert str(smoke_runs.cache) in experts["buffer_dir"]
  assert 0.0 < experts["final_test_accuracy"]["mean"] <= 1.0
  lr = np.load(smoke_runs.reference / "mtt.npz")["lr"]
  assert lr.shape == () and np.isfinite(lr) and lr != 0.01  # The learned lr moved.
