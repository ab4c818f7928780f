"""APM: Eq. 4 in both scales against NumPy, segmented = unsegmented gradients, the K student
checkpoints against a plain loop of the shared trainer's steps, the refresh schedule, and the
teacher-labelled result and baseline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import apm as apm_config
from distill_jax import data as data_lib
from distill_jax import distilled
from distill_jax import methods

STEPS = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """APM on digits (smoke preset, B = 20 images) with its teachers trained into a temporary
  folder, and its states after every iteration."""
  folder = tmp_path_factory.mktemp("teachers")
  config = apm_config.get_config(f"smoke,num_steps={STEPS},teachers.dir='{folder}'")
  data = data_lib.load_real(config.dataset, config.preprocessing)
  apm = methods.get_method("apm")(config, data)
  apm.prepare()
  states = [jax.jit(apm.init)(jax.random.key(config.seed))]
  step = jax.jit(apm.step)
  for _ in range(STEPS):
    states.append(step(states[-1], apm.inputs(0))[0])
  return apm, states, folder


def _variant(setup, overrides):
  apm, _, folder = setup
  config = apm_config.get_config(f"smoke,teachers.dir='{folder}',{overrides}")
  return methods.get_method("apm")(config, apm.data)


def _numpy_loss(t, s, y, *, alpha, released):
  """Eq. 4 in float64: `mean_b [sum_k -log d_kb] + alpha * mean_b CE` with the summed L1
  distance, or the released `-(1/(B C)) sum |t - s| + alpha * mean_b CE`."""
  t, s = np.asarray(t, np.float64), np.asarray(s, np.float64)
  log_p = t - np.log(np.sum(np.exp(t), axis=1, keepdims=True))
  ce = -np.mean(log_p[np.arange(len(y)), y])
  if released:
    return -np.sum(np.abs(t[None] - s)) / (t.shape[0] * t.shape[1]) + alpha * ce
  d = np.sum(np.abs(t[None] - s), axis=-1)  # (K, B)
  return np.mean(np.sum(-np.log(d), axis=0)) + alpha * ce


@pytest.mark.parametrize("objective", ["released", "paper"])
def test_the_loss_is_eq4_in_the_chosen_scale(setup, objective):
  apm, states, _ = setup
  method = _variant(setup, f"outer.objective='{objective}'") if objective == "paper" else apm
  state = states[1]
  teacher = jax.tree.map(lambda a: a[state.teacher], apm.inputs(0))
  x = state.x_syn[:8]
  y = jnp.asarray(apm.labels[:8])
  loss, (distance, ce) = jax.jit(method.loss)(x, y, teacher, state.checkpoints)
  t = apm.model.apply(teacher, x, train=False)
  s = np.stack([apm.model.apply({"params": jax.tree.map(lambda a: a[k], state.checkpoints[0]),
                                  **jax.tree.map(lambda a: a[k], state.checkpoints[1])},
                                 x, train=False)
                for k in range(apm.config.inner.checkpoints)])
  expected = _numpy_loss(t, s, np.asarray(y), alpha=apm.config.outer.alpha,
                         released=objective == "released")
  assert float(loss) == pytest.approx(expected, rel=1e-5)
  assert float(distance) == pytest.approx(np.mean(np.abs(np.asarray(t)[None] - s)), rel=1e-5)
  assert float(ce) > 0


def test_segments_accumulate_the_unsegmented_gradient(setup):
  apm, states, _ = setup
  segmented = _variant(setup, "outer.segments=4")
  state = states[2]
  teacher = jax.tree.map(lambda a: a[state.teacher], apm.inputs(0))
  y = jnp.asarray(apm.labels)
  whole, whole_metrics = jax.jit(apm.minibatch_gradient)(state.x_syn, y, teacher,
                                                         state.checkpoints)
  parts, part_metrics = jax.jit(segmented.minibatch_gradient)(state.x_syn, y, teacher,
                                                              state.checkpoints)
  scale = float(jnp.max(jnp.abs(whole)))
  assert scale > 0
  np.testing.assert_allclose(np.asarray(parts), np.asarray(whole), rtol=0, atol=1e-5 * scale)
  for name in ("loss", "distance", "ce"):
    assert float(part_metrics[name]) == pytest.approx(float(whole_metrics[name]), rel=1e-5)
  # The gradient of the mean is the mean of per-image gradients: image i's alone, times 1/B.
  grad_one = jax.grad(lambda x: apm.loss(x, y[:1], teacher, state.checkpoints)[0])(
      state.x_syn[:1])
  np.testing.assert_allclose(np.asarray(whole[:1]), np.asarray(grad_one) / len(y), rtol=0,
                             atol=1e-5 * scale)


def test_checkpoints_are_the_students_after_e_over_k_epochs(setup):
  """`train_student`'s scans equal a plain loop of the shared trainer's jitted step: checkpoint
  k holds the student after (k + 1) E / K epochs."""
  apm, states, _ = setup
  x = states[0].x_syn
  teacher = jax.tree.map(lambda a: a[1], apm.inputs(0))
  targets = apm.model.apply(teacher, x, train=False)
  key = jax.random.key(7)
  params, _ = jax.jit(apm.train_student)(key, x, targets)
  trainer = apm.trainer
  inner = apm.config.inner
  training_set = distilled.PixelSet(x, targets, meta=apm.data.set_meta("apm", 2,
                                                                        label_kind="logits"))
  step = jax.jit(lambda s, t: trainer.step(s, t, training_set, jnp.float32(inner.lr))[0])
  state = trainer.init(key, x[:1])
  per_checkpoint = inner.epochs // inner.checkpoints * trainer.steps_per_epoch
  for k in range(inner.checkpoints):
    for t in range(k * per_checkpoint, (k + 1) * per_checkpoint):
      state = step(state, jnp.int32(t))
    for got, want in zip(jax.tree.leaves(jax.tree.map(lambda a: a[k], params)),
                         jax.tree.leaves(state.params)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  # The checkpoints differ from each other: the student moved between them.
  moved = [float(jnp.max(jnp.abs(leaf[-1] - leaf[0]))) for leaf in jax.tree.leaves(params)]
  assert max(moved) > 1e-3


def test_teacher_and_students_refresh_every_refresh_every_iterations(setup):
  apm, states, _ = setup
  assert apm.config.inner.refresh_every == 3
  same = lambda a, b: all(np.array_equal(np.asarray(u), np.asarray(v))  # noqa: E731
                          for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  # Iterations 0 and 3 (states 1 and 4) train new students; 1, 2 and 4 reuse them.
  assert same(states[1].checkpoints, states[2].checkpoints)
  assert same(states[2].checkpoints, states[3].checkpoints)
  assert not same(states[3].checkpoints, states[4].checkpoints)
  assert same(states[4].checkpoints, states[5].checkpoints)
  assert [int(s.step) for s in states] == list(range(STEPS + 1))
  # The image lr falls by outer.lr_decay from iteration R // 2 on.
  _, metrics = jax.jit(apm.step)(states[STEPS // 2], apm.inputs(0))
  assert float(metrics["lr"]) == pytest.approx(apm.config.outer.lr * apm.config.outer.lr_decay)


def test_a_step_moves_only_its_minibatch(setup):
  half = _variant(setup, "outer.batch_size=10")
  start = jax.jit(half.init)(jax.random.key(0))
  after, _ = jax.jit(half.step)(start, half.inputs(0))
  moved = np.any(np.asarray(after.x_syn) != np.asarray(start.x_syn), axis=(1, 2, 3))
  assert moved.sum() == 10
  _, batch_key, _, _ = jax.random.split(start.key, 4)
  expected = np.zeros(20, bool)
  expected[np.asarray(jax.random.permutation(batch_key, 20)[:10])] = True
  np.testing.assert_array_equal(moved, expected)


def test_the_set_and_the_baseline_carry_one_teachers_logits(setup):
  apm, states, _ = setup
  result = apm.result(states[-1])
  assert result.label_kind == "logits" and result.y.shape == (20, 10)
  np.testing.assert_allclose(result.y, apm.pool.logits(apm.label_teacher, result.x), rtol=1e-6)
  np.testing.assert_array_equal(result.x, np.asarray(states[-1].x_syn))
  baseline = apm.baselines()["random_teacher_labels"]
  x_random, _ = data_lib.random_subset(apm.data.x_train, apm.data.y_train, ipc=2,
                                       num_classes=10, seed=apm.config.seed)
  np.testing.assert_array_equal(baseline.x, x_random)
  np.testing.assert_allclose(baseline.y, apm.pool.logits(apm.label_teacher, x_random), rtol=1e-6)
  assert 0 <= apm.label_teacher < apm.config.teachers.num_teachers


@pytest.mark.parametrize("override, message", [
    ("outer.segments=3", "outer.segments=3 does not divide the minibatch of 20 images"),
    ("inner.checkpoints=3", "inner.checkpoints=3 does not divide config.inner.epochs=4"),
    ("outer.batch_size=21", "outer.batch_size=21 exceeds the 20 synthetic images"),
    ("outer.objective='log'", "unknown config.outer.objective 'log'"),
    ("inner.refresh_every=0", "inner.refresh_every must be a positive int"),
])
def test_bad_settings_fail_with_one_line(setup, override, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
    _variant(setup, override)
