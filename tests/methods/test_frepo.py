"""FRePo: its pure pieces against NumPy, its step on digits, and its smoke run (conftest.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import frepo as frepo_config
from distill_jax import data as data_lib
from distill_jax import evaluation
from distill_jax import io as io_lib
from distill_jax import methods
from distill_jax.methods import frepo
from tests.references import numpy_krr

# The smoke preset with a smaller pool and real batch: the in-process steps compile faster.
TINY = "smoke,pool.width=4,pool.size=3,outer.real_batch_size=32"


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
@pytest.mark.parametrize("reg_floor", [0.0, 1e5])
def test_frepo_loss_matches_numpy(use_flip, reg_floor):
  rng = np.random.default_rng(0)
  x_syn = rng.normal(size=(6, 3, 4, 1)).astype(np.float32)
  y_syn = rng.normal(size=(6, 3)).astype(np.float32)
  feat_real = rng.normal(size=(20, 12)).astype(np.float32)
  y_real = np.eye(3)[rng.integers(0, 3, 20)] - 1 / 3
  reg = 1e-3  # Above krr_predict's float32 floor at reg_floor=0: NumPy's float64 solve compares.

  def flatten(x):
    return x.reshape((x.shape[0], -1))

  loss_fn = jax.jit(lambda x, y: frepo.frepo_loss(
      x, y, feat_real, y_real, flatten, kernel_reg=reg, kernel_reg_floor=reg_floor,
      use_flip=use_flip, label_margin_weight=0.5,
  ))
  loss, aux = loss_fn(x_syn, y_syn)

  x_support, y_support = x_syn, y_syn
  if use_flip:
    x_support = np.concatenate([x_syn, x_syn[:, :, ::-1]])
    y_support = np.concatenate([y_syn, y_syn])
  # The ridge is floored at reg_floor * n_s * float32 eps (1e5 * 6 * 1.2e-7 = 0.07 > reg).
  reg_effective = max(reg, reg_floor * len(x_support) * np.finfo(np.float32).eps)
  pred = numpy_krr(
      feat_real.astype(np.float64), flatten(x_support).astype(np.float64), y_support,
      reg_effective,
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


# ----------------------------------------------------------------------------------------------
# The config.


def test_config_presets_and_defaults():
  config = frepo_config.get_config("cifar10,ipc=10")
  # Paper / released defaults.
  pool, outer = config.pool, config.outer
  assert (pool.width, pool.depth, pool.norm, pool.model) == (128, 3, "batch", "convnet")
  assert outer.real_batch_size == 1024 and outer.optimizer == "lamb"
  assert (outer.lr, outer.final_lr_fraction) == (3e-4, 0.1)
  assert (pool.size, pool.max_online_updates, pool.online_lr) == (10, 100, 3e-4)
  assert outer.kernel_reg == 1e-6 and outer.kernel_reg_floor == 1.0
  assert outer.learn_label and outer.order == "v2" and outer.label_margin_weight == 1.0
  assert outer.use_flip and config.preprocessing == "zca_frepo"
  assert config.eval.protocols == "frepo,standard" and config.num_steps == 500_000
  assert (config.eval.krr.norm, config.eval.krr.batch_size) == ("none", 500)
  grey = frepo_config.get_config("fashion_mnist,ipc=1,cpu")
  assert not grey.outer.use_flip and grey.preprocessing == "standardize" and grey.ipc == 1
  assert (grey.pool.width, grey.outer.real_batch_size, grey.pool.norm) == (32, 256, "batch")
  assert (grey.num_steps, grey.outer.lr, grey.eval.protocols) == (2000, 3e-3, "frepo")
  smoke = frepo_config.get_config("smoke")
  assert (smoke.dataset, smoke.pool.depth, smoke.pool.width, smoke.ipc) == ("digits", 2, 8, 2)
  switched = frepo_config.get_config("smoke,fashion_mnist")
  assert (switched.dataset, switched.pool.depth, switched.pool.width) == ("fashion_mnist", 3, 8)
  with pytest.raises(ValueError, match="unknown preset"):
    frepo_config.get_config("imagenet")
  with pytest.raises(ValueError, match="unknown config key 'outer.lrr'"):
    frepo_config.get_config("outer.lrr=1")


def test_the_frepo_protocol_evaluates_with_the_pool_depth():
  """The released eval.py evaluates with the depth it distilled with: every preset, alone and
  after or before every other preset."""
  names = list(frepo_config.PRESETS)
  for arg in [None, *names, *(f"{a},{b}" for a in names for b in names if a != b)]:
    config = frepo_config.get_config(arg)
    protocol = evaluation.get_protocol("frepo", **config.eval.overrides.get("frepo", {}))
    assert protocol.model_kwargs["depth"] == config.pool.depth, arg


@pytest.mark.parametrize("dataset", ["cifar100", "tiny_imagenet"])
def test_the_flipped_copy_is_off_at_ipc_10_and_above_for_many_classes(dataset):
  # Released script/distill.py: use_flip off for CIFAR-100 and Tiny ImageNet at ipc >= 10.
  for ipc, flip in ((1, True), (5, True), (10, False), (50, False)):
    assert frepo_config.get_config(f"{dataset},ipc={ipc}").outer.use_flip is flip, ipc
  # Unless the user sets it.
  assert frepo_config.get_config(f"{dataset},ipc=10,outer.use_flip=True").outer.use_flip
  assert not frepo_config.get_config(f"{dataset},ipc=1,outer.use_flip=False").outer.use_flip
  # Other RGB datasets keep it at every ipc.
  assert frepo_config.get_config("cifar10,ipc=50").outer.use_flip


def test_bad_config_values_are_one_line_errors(digits):
  for arg, message in [
      ("outer.order=v3", "unknown config.outer.order 'v3'; use one of v1, v2"),
      ("outer.optimizer=sgd", "unknown config.outer.optimizer 'sgd'"),
      ("init=zeros", "unknown config.init 'zeros'"),
      ("outer.real_batch_size=0", "config.outer.real_batch_size must be a positive int"),
      ("pool.size=0", "config.pool.size must be a positive int"),
      ("outer.kernel_reg=-1.0", "config.outer.kernel_reg must be >= 0"),
      ("outer.kernel_reg_floor=-1.0", "config.outer.kernel_reg_floor must be >= 0"),
      ("outer.final_lr_fraction=2.0", r"config.outer.final_lr_fraction must be in \[0, 1\]"),
  ]:
    with pytest.raises(ValueError, match=message):
      frepo.FRePo(frepo_config.get_config(f"smoke,{arg}"), digits)


# ----------------------------------------------------------------------------------------------
# The step on digits (one compiled step shared by the module's tests).


@pytest.fixture(scope="module")
def digits():
  config = frepo_config.get_config("smoke")
  return data_lib.load_real(config.dataset, config.preprocessing)


@pytest.fixture(scope="module")
def tiny(digits):
  """A small FRePo on digits, its jitted step (counting traces) and the step inputs."""
  method = frepo.FRePo(frepo_config.get_config(TINY), digits)
  traces = []

  def step(state, inputs):
    traces.append(None)
    return method.step(state, inputs)

  return method, jax.jit(step), traces, method.inputs(1)


def _leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_step_is_deterministic_and_traced_once(tiny, digits):
  method, step, traces, inputs = tiny
  init = jax.jit(method.init)(jax.random.key(0))
  np.testing.assert_array_equal(
      init.x_syn, data_lib.random_subset(digits.x_train, digits.y_train, ipc=2, num_classes=10,
                                         seed=0)[0])  # init="real": seeded real images.

  def run(num_steps):
    state = jax.jit(method.init)(jax.random.key(0))
    for _ in range(num_steps):
      state, metrics = step(state, inputs)
    return state, metrics

  state_a, metrics = run(6)
  state_b, _ = run(6)
  np.testing.assert_array_equal(jax.random.key_data(state_a.key), jax.random.key_data(state_b.key))
  np.testing.assert_array_equal(state_a.x_syn, state_b.x_syn)
  np.testing.assert_array_equal(state_a.y_syn, state_b.y_syn)
  assert _leaves_equal(state_a.pool, state_b.pool)
  assert len(traces) == 1
  assert int(state_a.step) == 6 and np.isfinite(float(metrics["loss"]))
  assert not np.array_equal(state_a.x_syn, init.x_syn)  # The images moved.


def test_a_member_past_max_online_updates_is_reset_from_the_key(tiny):
  method, step, _, inputs = tiny
  limit = method.config.pool.max_online_updates
  state = jax.jit(method.init)(jax.random.key(1))
  reset_key = jax.random.split(state.key, 5)[4]  # FRePo.step: key, member, real, online, reset.

  # Every counter past K: the chosen member is replaced by a fresh one from the reset key.
  over = state.replace(pool=state.pool.replace(step=jnp.full_like(state.pool.step, limit + 1)))
  after, metrics = step(over, inputs)
  chosen = int(metrics["member"])
  assert float(metrics["reset"]) == 1.0 and float(metrics["online_loss"]) == 0.0
  member = method.pool.member(after.pool, chosen)
  fresh = method.pool.init_member(reset_key)
  assert int(member.step) == 0
  for got, want in zip(jax.tree.leaves(member.params), jax.tree.leaves(fresh.params)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert not _leaves_equal(member.params, method.pool.member(over.pool, chosen).params)
  for other in set(range(method.config.pool.size)) - {chosen}:  # Untouched.
    assert _leaves_equal(method.pool.member(after.pool, other),
                         method.pool.member(over.pool, other))

  # A counter of exactly K is still trained (the released code resets when step > K).
  at = state.replace(pool=state.pool.replace(step=jnp.full_like(state.pool.step, limit)))
  after, metrics = step(at, inputs)
  chosen = int(metrics["member"])
  assert float(metrics["reset"]) == 0.0 and float(metrics["online_loss"]) > 0.0
  member, before = method.pool.member(after.pool, chosen), method.pool.member(at.pool, chosen)
  assert int(member.step) == limit + 1
  for got, old, fresh in zip(jax.tree.leaves(member.params), jax.tree.leaves(before.params),
                             jax.tree.leaves(method.pool.init_member(reset_key).params)):
    assert not np.array_equal(got, fresh)
  assert not _leaves_equal(member.params, before.params)  # Trained one step.


def test_v1_order_with_fixed_labels(digits):
  # One extra compiled step covers both switches: online update first (v1), labels kept fixed.
  method = frepo.FRePo(
      frepo_config.get_config(f"{TINY},outer.order=v1,outer.learn_label=False"), digits)
  state = jax.jit(method.init)(jax.random.key(0))
  x_start, y_start = np.asarray(state.x_syn), np.asarray(state.y_syn)
  np.testing.assert_array_equal(
      y_start, frepo.initial_labels(jnp.repeat(jnp.arange(10), 2), digits.num_classes))
  step = jax.jit(method.step)
  for _ in range(3):
    state, metrics = step(state, method.inputs(1))
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm_y"]) == 0.0
  np.testing.assert_array_equal(state.y_syn, y_start)
  assert not np.array_equal(state.x_syn, x_start)
  # v1 trains the chosen member before the meta-gradient: its online loss is already reported.
  assert float(metrics["online_loss"]) > 0 or float(metrics["reset"]) == 1.0


def test_nan_loss_stops_with_the_fix(digits, tmp_path):
  broken = digits.replace(x_train=np.full_like(digits.x_train, np.nan))
  method = frepo.FRePo(frepo_config.get_config(f"{TINY},num_steps=3"), broken)
  with pytest.raises(methods.DivergenceError,
                     match=r"frepo diverged at step 1 \(.*loss=nan.*\); lower outer\.lr \(now "
                           r"0\.01\) or pool\.online_lr .*no checkpoint was written yet"):
    methods.run(method, io_lib.Workdir(tmp_path))


# ----------------------------------------------------------------------------------------------
# The smoke run (digits, run in a child process by conftest.py).


def test_smoke_distillation_raises_krr_accuracy(smoke_runs):
  with open(smoke_runs.reference / "frepo_extras.json") as f:
    extras = json.load(f)
  before, after = extras["krr_accuracy_of_the_initial_set"], extras["krr_accuracy"]
  assert after["n"] == before["n"] == 2 and len(after["accuracies"]) == 2
  assert after["mean"] > before["mean"] + 0.03, (before, after)
  assert 0.5 < after["mean"] <= 1.0
  records = io_lib.read_metrics(smoke_runs.reference / "frepo" / "metrics.jsonl")
  assert [r["step"] for r in records] == [20, 40, 60]
  assert all(r["step_traces"] == 1 for r in records)
  assert records[-1]["loss"] < records[0]["loss"]


def test_report_extras_writes_the_label_heatmap(smoke_runs):
  heatmap = smoke_runs.reference / "frepo" / "images" / "labels.png"
  assert os.path.getsize(heatmap) > 0


def test_rerun_of_a_finished_run_returns_the_same_set(smoke_runs, digits):
  method = frepo.FRePo(frepo_config.get_config("smoke"), digits)
  again = methods.run(method, io_lib.Workdir(smoke_runs.reference / "frepo"))
  expected = np.load(smoke_runs.reference / "frepo.npz")
  assert again.distilled_set.meta.method == "frepo" and again.distilled_set.label_kind == "learned"
  assert again.distilled_set.x.shape == (20, 8, 8, 1) and again.distilled_set.y.shape == (20, 10)
  np.testing.assert_array_equal(again.distilled_set.x, expected["x"])
  np.testing.assert_array_equal(again.distilled_set.y, expected["y"])
  assert again.compile_seconds == 0.0  # Nothing was left to run.
