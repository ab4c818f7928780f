"""FRePo end to end on scikit-learn's digits, and its pure pieces against NumPy."""

import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import frepo as frepo_config
from distill_jax import io as io_lib
from distill_jax import pipeline
from distill_jax.methods import frepo, get_method

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = "digits,smoke"


class _Linear(nn.Module):
  """A linear classifier on flattened pixels, following the models' call convention."""

  num_classes: int

  @nn.compact
  def __call__(self, x, train=False, return_features=False):
    features = x.reshape((x.shape[0], -1))
    logits = nn.Dense(self.num_classes)(features)
    return (logits, {"penultimate": features, "blocks": ()}) if return_features else logits


def _numpy_krr(feat_target, feat_support, y_support, reg):
  """FRePo Eq. 2 in float64: K_ts (K_ss + reg * tr(K_ss) / n I)^-1 Y_s."""
  k_ss = feat_support @ feat_support.T
  n = k_ss.shape[0]
  alpha = np.linalg.solve(k_ss + reg * np.trace(k_ss) / n * np.eye(n), y_support)
  return feat_target @ feat_support.T @ alpha


def _numpy_margin(y):
  top2 = np.sort(y, axis=-1)[:, -2:]
  return np.mean(-np.minimum(top2[:, 1] - top2[:, 0], 1.0 / y.shape[-1]))


# ----------------------------------------------------------------------------------------------
# Pure pieces.


def test_labels_match_numpy():
  labels = np.array([0, 3, 1])
  for num_classes in (4, 40):
    one_hot = np.eye(num_classes)[labels]
    np.testing.assert_allclose(
        jax.jit(frepo.centered_one_hot, static_argnums=1)(labels, num_classes),
        one_hot - 1 / num_classes, rtol=1e-6,
    )
    np.testing.assert_allclose(
        jax.jit(frepo.initial_labels, static_argnums=1)(labels, num_classes),
        (one_hot - 1 / num_classes) / np.sqrt(num_classes / 10), rtol=1e-6,
    )
  # Rows sum to zero: the labels are mean-centred.
  np.testing.assert_allclose(frepo.initial_labels(labels, 7).sum(-1), 0, atol=1e-6)


def test_initial_images_modes():
  x_real = jnp.ones((4, 3, 3, 1))
  key = jax.random.key(0)
  make = jax.jit(frepo.initial_images, static_argnames=("init", "noise_std"))
  np.testing.assert_array_equal(make(key, x_real, init="real", noise_std=0.5), x_real)
  noise = make(key, x_real, init="noise", noise_std=0.5)
  real_noise = make(key, x_real, init="real_noise", noise_std=0.5)
  # The same key draws the same noise: real_noise = real + noise.
  np.testing.assert_allclose(real_noise, x_real + noise, rtol=1e-6)
  np.testing.assert_allclose(noise, 0.5 * jax.random.normal(key, x_real.shape), rtol=1e-6)
  with pytest.raises(ValueError, match="unknown init 'zeros'; use one of real, noise, real_noise"):
    frepo.initial_images(key, x_real, init="zeros", noise_std=0.5)


@pytest.mark.parametrize("use_flip", [False, True])
def test_frepo_loss_matches_numpy(use_flip):
  rng = np.random.default_rng(0)
  x_syn = rng.normal(size=(6, 3, 4, 1)).astype(np.float32)
  y_syn = rng.normal(size=(6, 3)).astype(np.float32)
  feat_real = rng.normal(size=(20, 12)).astype(np.float32)
  y_real = np.eye(3)[rng.integers(0, 3, 20)] - 1 / 3
  reg = 1e-3  # Above krr_predict's float32 floor, so NumPy's float64 solve is comparable.

  def flatten(x):
    return x.reshape((x.shape[0], -1))

  loss_fn = jax.jit(lambda x, y: frepo.frepo_loss(
      x, y, feat_real, y_real, flatten, kernel_reg=reg, use_flip=use_flip,
      label_margin_weight=0.5,
  ))
  loss, aux = loss_fn(x_syn, y_syn)

  x_support, y_support = x_syn, y_syn
  if use_flip:
    x_support = np.concatenate([x_syn, x_syn[:, :, ::-1]])
    y_support = np.concatenate([y_syn, y_syn])
  pred = _numpy_krr(
      feat_real.astype(np.float64), flatten(x_support).astype(np.float64), y_support, reg
  )
  kernel_loss = 0.5 * np.mean(np.sum((pred - y_real) ** 2, -1))
  np.testing.assert_allclose(aux["kernel_loss"], kernel_loss, rtol=1e-3)
  np.testing.assert_allclose(aux["label_loss"], _numpy_margin(y_syn), rtol=1e-5)
  np.testing.assert_allclose(loss, kernel_loss + 0.5 * _numpy_margin(y_syn), rtol=1e-3)
  np.testing.assert_allclose(aux["accuracy"], np.mean(pred.argmax(-1) == y_real.argmax(-1)))


def test_frepo_loss_label_learning_switch():
  rng = np.random.default_rng(1)
  x_syn = jnp.asarray(rng.normal(size=(4, 2, 2, 1)), jnp.float32)
  y_syn = jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)
  feat_real = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  y_real = frepo.centered_one_hot(jnp.arange(8) % 2, 2)

  def grads(learn_label):
    return jax.jit(jax.grad(
        lambda x, y: frepo.frepo_loss(
            x, y, feat_real, y_real, lambda v: v.reshape((v.shape[0], -1)) ** 2,
            kernel_reg=1e-3, use_flip=False, learn_label=learn_label,
        )[0],
        argnums=(0, 1),
    ))(x_syn, y_syn)

  grad_x, grad_y = grads(True)
  assert float(jnp.abs(grad_x).sum()) > 0 and float(jnp.abs(grad_y).sum()) > 0
  grad_x_fixed, grad_y_fixed = grads(False)
  np.testing.assert_array_equal(grad_y_fixed, 0)
  np.testing.assert_allclose(grad_x_fixed, grad_x, rtol=1e-5)


def test_krr_accuracy_matches_numpy():
  rng = np.random.default_rng(2)
  model = _Linear(3)
  x_support = rng.normal(size=(9, 2, 3, 1)).astype(np.float32)
  y_support = rng.integers(0, 3, 9)
  x_test = rng.normal(size=(25, 2, 3, 1)).astype(np.float32)
  y_test = rng.integers(0, 3, 25)
  variables = model.init(jax.random.key(0), x_test[:1])
  accuracy = frepo.krr_accuracy(
      x_support, y_support, x_test, y_test, model, variables, kernel_reg=1e-3, use_flip=True,
      chunk_size=10,  # 25 = 2 full chunks + a padded one.
  )
  features = lambda x: x.reshape(len(x), -1).astype(np.float64)
  x_all = np.concatenate([x_support, x_support[:, :, ::-1]])
  y_all = np.concatenate([np.eye(3)[y_support]] * 2) - 1 / 3
  pred = _numpy_krr(features(x_test), features(x_all), y_all, 1e-3)
  assert accuracy == pytest.approx(np.mean(pred.argmax(-1) == y_test))


def test_config_presets_and_defaults():
  config = frepo_config.get_config("cifar10,ipc=10")
  # Paper / released defaults.
  assert (config.width, config.depth, config.norm) == (128, 3, "batch")
  assert config.real_batch_size == 1024 and config.outer_optimizer == "lamb"
  assert (config.outer_lr, config.outer_final_lr_fraction) == (3e-4, 0.1)
  assert (config.pool_size, config.max_online_updates, config.online_lr) == (10, 100, 3e-4)
  assert config.kernel_reg == 1e-6 and config.learn_label and config.order == "v2"
  assert config.use_flip and config.preprocessing == "zca_frepo"
  assert config.eval.protocols == "frepo,standard"
  grey = frepo_config.get_config("fashion_mnist,ipc=1,cpu")
  assert not grey.use_flip and grey.preprocessing == "standardize" and grey.ipc == 1
  assert (grey.width, grey.real_batch_size, grey.norm) == (32, 256, "batch")
  assert (grey.num_steps, grey.outer_lr) == (2000, 3e-3)
  assert frepo_config.get_config("smoke,fashion_mnist").dataset == "fashion_mnist"
  with pytest.raises(ValueError, match="unknown preset"):
    frepo_config.get_config("imagenet")


def test_bad_config_values_are_one_line_errors():
  for arg, message in [
      ("order=v3", "unknown order 'v3'; use one of v1, v2"),
      ("outer_optimizer=sgd", "unknown outer_optimizer 'sgd'"),
      ("real_batch_size=0", "config.real_batch_size must be a positive int"),
      ("kernel_reg=-1.0", "config.kernel_reg must be >= 0"),
  ]:
    with pytest.raises(ValueError, match=message):
      frepo.FRePo(frepo_config.get_config(f"{SMOKE},{arg}"), num_classes=10, image_shape=(8, 8, 1))


# ----------------------------------------------------------------------------------------------
# The distillation loop on digits (compiled once for the module: equal configs share programs).


@pytest.fixture(scope="module")
def digits():
  config = frepo_config.get_config(SMOKE)
  return pipeline.load_real_data(config.dataset, config.preprocessing)


@pytest.fixture(scope="module")
def smoke_run(digits, tmp_path_factory):
  config = frepo_config.get_config(SMOKE)
  workdir = io_lib.Workdir(tmp_path_factory.mktemp("frepo_smoke"))
  distilled = get_method("frepo").distill(config, digits, workdir)
  return config, workdir, distilled


def test_step_is_deterministic_and_compiles_once(digits):
  config = frepo_config.get_config(SMOKE)
  model = frepo.FRePo(config, num_classes=digits.num_classes, image_shape=digits.image_shape)
  x_train, y_train = jnp.asarray(digits.x_train), jnp.asarray(digits.y_train)

  def run(num_steps):
    state = model.initial_state(jax.random.key(0), digits.x_train[:20], digits.y_train[:20])
    for _ in range(num_steps):
      state, metrics = model.step(state, x_train, y_train)
    return state, metrics

  state_a, metrics = run(12)
  # Another instance with an equal config shares the compiled step and gives the same bits.
  model = frepo.FRePo(config, num_classes=digits.num_classes, image_shape=digits.image_shape)
  state_b, _ = run(12)
  np.testing.assert_array_equal(jax.random.key_data(state_a.key), jax.random.key_data(state_b.key))
  np.testing.assert_array_equal(state_a.x_syn, state_b.x_syn)
  np.testing.assert_array_equal(state_a.y_syn, state_b.y_syn)
  assert model.num_traces == 1
  assert int(state_a.step) == 12 and np.isfinite(float(metrics["loss"]))
  # max_online_updates=10 with 4 members: some member was reset within 12 steps.
  assert int(jnp.max(state_a.pool.step)) <= config.max_online_updates + 1


def test_v1_order_with_fixed_labels(digits):
  # One extra compiled step covers both switches: online update first (v1), labels kept fixed.
  config = frepo_config.get_config(f"{SMOKE},order=v1,learn_label=False")
  model = frepo.FRePo(config, num_classes=digits.num_classes, image_shape=digits.image_shape)
  x_real, y_real = digits.x_train[:20], digits.y_train[:20]
  state = model.initial_state(jax.random.key(0), x_real, y_real)
  x_start = np.asarray(state.x_syn)
  np.testing.assert_array_equal(x_start, x_real)  # init="real"
  x_train, y_train = jnp.asarray(digits.x_train), jnp.asarray(digits.y_train)
  for _ in range(3):
    state, metrics = model.step(state, x_train, y_train)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm_y"]) == 0.0
  np.testing.assert_array_equal(state.y_syn, frepo.initial_labels(y_real, digits.num_classes))
  assert not np.array_equal(state.x_syn, x_start)
  # v1 trains the chosen member before the meta-gradient: its online loss is already reported.
  assert float(metrics["online_loss"]) > 0 or float(metrics["reset"]) == 1.0


def test_smoke_distillation_raises_krr_accuracy(smoke_run, digits):
  config, workdir, distilled = smoke_run
  assert distilled.x.shape == (20, 8, 8, 1) and distilled.y.shape == (20, 10)
  assert distilled.meta.method == "frepo" and distilled.meta.dataset == "digits"
  model = frepo.FRePo(config, num_classes=digits.num_classes, image_shape=digits.image_shape)
  start = frepo._start_state(model, config, digits)
  evaluate = lambda x, y: frepo.krr_evaluation(
      config, x, y, digits.x_test, digits.y_test, num_classes=digits.num_classes, seed=0
  )["mean"]
  before, after = evaluate(start.x_syn, start.y_syn), evaluate(distilled.x, distilled.y)
  assert after > before + 0.03, (before, after)
  # The loop logged and compiled its step once.
  records = io_lib.read_metrics(workdir.metrics_path)
  assert [r["step"] for r in records] == [20, 40, 60]
  assert all(r["step_traces"] == 1 for r in records)
  assert records[-1]["loss"] < records[0]["loss"]


def test_report_extras_writes_krr_accuracy_and_label_heatmap(smoke_run, digits):
  config, workdir, distilled = smoke_run
  extras = frepo.report_extras(config, digits, distilled, workdir)
  result = extras["krr_accuracy"]
  assert result["n"] == config.krr_eval.num_models and 0.5 < result["mean"] <= 1.0
  assert os.path.getsize(os.path.join(workdir.images_dir, "labels.png")) > 0


def test_rerun_of_a_finished_run_returns_the_same_set(smoke_run, digits):
  config, workdir, distilled = smoke_run
  again = frepo.distill(config, digits, workdir)
  np.testing.assert_array_equal(again.x, distilled.x)
  np.testing.assert_array_equal(again.y, distilled.y)


def test_nan_loss_stops_with_the_fix(digits, tmp_path):
  config = frepo_config.get_config(SMOKE)
  x_train = digits.x_train.copy()
  x_train[:] = np.nan
  broken = pipeline.RealData(**{**digits.__dict__, "x_train": x_train})
  with pytest.raises(frepo.DivergenceError, match="non-finite at step 1 .*lower outer_lr"):
    frepo.distill(config, broken, io_lib.Workdir(tmp_path))


_CHILD = """
import sys, time
import numpy as np
from configs import frepo as frepo_config
from distill_jax import io as io_lib, pipeline
from distill_jax.methods import frepo

arg, workdir, out, marker = sys.argv[1:5]
if marker != "-":
  save = io_lib.Checkpointer.save

  def save_then_stall(self, step, state):
    save(self, step, state)
    self.wait()
    with open(marker, "w") as f:
      f.write(str(step))
    time.sleep(600)  # Killed here, after the first checkpoint is on disk.

  io_lib.Checkpointer.save = save_then_stall
config = frepo_config.get_config(arg)
data = pipeline.load_real_data(config.dataset, config.preprocessing)
result = frepo.distill(config, data, io_lib.Workdir(workdir))
np.savez(out, x=result.x, y=result.y)
"""


def test_resume_after_sigkill_is_bit_identical(tmp_path):
  env = {
      **os.environ,
      "PYTHONPATH": ROOT,
      # All three runs share one compilation (the first run's, through the persistent cache);
      # LLVM -O0 code generation compiles several times faster on CPU, and every run uses it.
      "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
      "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0",
  }

  def command(name, marker="-"):
    out = tmp_path / f"{name}.npz"
    return [sys.executable, "-c", _CHILD, SMOKE, str(tmp_path / name), str(out), marker]

  def run(name):
    return subprocess.run(
        command(name), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )

  reference = run("reference")
  assert reference.returncode == 0, reference.stderr[-3000:]

  marker = tmp_path / "saved"
  log_path = tmp_path / "killed.log"  # A file, not a pipe: a full pipe would block the child.
  with open(log_path, "w") as log:
    child = subprocess.Popen(command("run", str(marker)), cwd=ROOT, env=env, stderr=log)
    try:
      deadline = time.time() + 300
      while not marker.exists():
        assert child.poll() is None, log_path.read_text()[-3000:]
        assert time.time() < deadline, "the child never wrote its first checkpoint"
        time.sleep(0.1)
    finally:
      child.send_signal(signal.SIGKILL)  # kill -9; a no-op if the child already ended.
      child.wait()
  run_dir = io_lib.Workdir(tmp_path / "run")
  with io_lib.Checkpointer(run_dir.checkpoint_dir) as checkpointer:
    assert checkpointer.latest_step() == 30
  assert not (tmp_path / "run.npz").exists()

  resumed = run("run")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  expected, result = np.load(tmp_path / "reference.npz"), np.load(tmp_path / "run.npz")
  np.testing.assert_array_equal(result["x"], expected["x"])
  np.testing.assert_array_equal(result["y"], expected["y"])
  # The killed run logged step 20; the resumed one steps 40 and 60, each compiled once.
  records = io_lib.read_metrics(run_dir.metrics_path)
  assert [r["step"] for r in records] == [20, 40, 60]
  assert all(r["step_traces"] == 1 for r in records)
