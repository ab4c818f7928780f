"""D3S: Eq. 1 with ISU against NumPy, the running statistics against their closed form, ENS's
teacher choice, the curriculum, the relabelled result and its baselines."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import d3s as d3s_config
from distill_jax import data as data_lib
from distill_jax import methods
from distill_jax.distilled import RelabelledSet

ITERATIONS = 3


@pytest.fixture(scope="module")
def method(tmp_path_factory):
  """D3S on digits (smoke preset, 3 iterations per batch, 2 batches) with its teachers trained
  into a temporary folder, and its states after every iteration."""
  folder = tmp_path_factory.mktemp("teachers")
  config = d3s_config.get_config(f"smoke,num_steps={ITERATIONS},teachers.dir='{folder}'")
  data = data_lib.load_real(config.dataset, config.preprocessing)
  d3s = methods.get_method("d3s")(config, data)
  d3s.prepare()
  states = [jax.jit(d3s.init)(jax.random.key(config.seed))]
  step = jax.jit(d3s.step)
  for _ in range(d3s.num_steps):
    states.append(step(states[-1], d3s.inputs(0))[0])
  return d3s, states


def numpy_kl(mean_p, cov_p, mean_q, cov_q):
  """KL(N_p || N_q) in float64 from the textbook formula (slogdet, solve)."""
  mean_p, cov_p, mean_q, cov_q = (np.asarray(a, np.float64) for a in (mean_p, cov_p, mean_q, cov_q))
  dim = len(mean_p)
  diff = mean_q - mean_p
  return 0.5 * (np.linalg.slogdet(cov_q)[1] - np.linalg.slogdet(cov_p)[1]
                + np.trace(np.linalg.solve(cov_q, cov_p)) + diff @ np.linalg.solve(cov_q, diff)
                - dim)


def numpy_moments(block):
  flat = np.asarray(block, np.float64).reshape(-1, block.shape[-1])
  return flat.mean(0), np.cov(flat, rowvar=False, bias=True)


def test_the_loss_is_eq1_with_isu_mixing(method, monkeypatch):
  """`alpha * CE + sum_l KL(N(hat mu, hat Sigma) || N(mu^T, Sigma^T))` with `hat s = s_b / b +
  (1 - 1/b) * running` (Eq. 2) at b = 2, computed in NumPy from the teacher's conv outputs."""
  d3s, _ = method
  monkeypatch.setattr(d3s, "augment", lambda key, x, min_scale: x)
  teachers, real = d3s.inputs(0)
  variables = jax.tree.map(lambda a: a[1], teachers)
  real_1 = [(mean[1], cov[1]) for mean, cov in real]
  rng = np.random.default_rng(0)
  x = rng.normal(size=(10, 8, 8, 1)).astype(np.float32)
  y = np.arange(10)
  running = [(m + 0.1 * rng.normal(size=m.shape), c + 0.05 * np.eye(len(m)))
             for m, c in real_1]
  loss, (ce, matching) = jax.jit(d3s.loss)(x, y, variables, real_1, running, 2,
                                           jax.random.key(0), 1.0)
  logits, features = d3s.model.apply(variables, x, train=False, return_features=True)
  log_p = np.asarray(logits, np.float64) - np.log(np.sum(np.exp(np.asarray(logits, np.float64)),
                                                          axis=1, keepdims=True))
  expected_ce = -np.mean(log_p[np.arange(10), y])
  expected_kl = 0.0
  for block, (run_mean, run_cov), (real_mean, real_cov) in zip(features["blocks"], running,
                                                               real_1):
    mean, cov = numpy_moments(block)
    expected_kl += numpy_kl(0.5 * mean + 0.5 * np.asarray(run_mean),
                            0.5 * cov + 0.5 * np.asarray(run_cov), real_mean, real_cov)
  # float32 Cholesky factors of trained teachers' covariances: ~1e-3 relative on the KL.
  assert float(ce) == pytest.approx(expected_ce, rel=1e-5)
  assert float(matching) == pytest.approx(expected_kl, rel=3e-3)
  alpha = d3s.config.outer.alpha
  assert float(loss) == pytest.approx(alpha * float(ce) + float(matching), rel=1e-6)
  assert float(loss) == pytest.approx(alpha * expected_ce + expected_kl, rel=3e-3)


def test_running_statistics_are_the_mean_of_each_finished_batch(method):
  """ISU's closed form (Eq. 2 from zero): after b batches every teacher's running statistics
  are the mean of the b batches' statistics of their final images under that teacher."""
  d3s, states = method
  teachers, _ = d3s.inputs(0)
  final = states[-1]
  size = d3s.batch_size
  for m in range(d3s.config.teachers.num_teachers):
    variables = jax.tree.map(lambda a: a[m], teachers)
    per_batch = []
    for b in range(d3s.num_batches):
      x_b = np.asarray(final.x_syn[b * size:(b + 1) * size])
      blocks = d3s.model.apply(variables, x_b, train=False, return_features=True)[1]["blocks"]
      per_batch.append([numpy_moments(block) for block in blocks])
    for layer, (mean, cov) in enumerate(final.running):
      np.testing.assert_allclose(mean[m], np.mean([s[layer][0] for s in per_batch], axis=0),
                                 rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(cov[m], np.mean([s[layer][1] for s in per_batch], axis=0),
                                 rtol=1e-3, atol=1e-5)


def test_batches_are_optimised_in_order_and_later_ones_stay_untouched(method):
  d3s, states = method
  size, first, after_batch_0 = d3s.batch_size, states[0], states[ITERATIONS]
  assert not np.array_equal(after_batch_0.x_syn[:size], first.x_syn[:size])
  np.testing.assert_array_equal(after_batch_0.x_syn[size:], first.x_syn[size:])
  # Running statistics change only when a batch ends.
  for (m0, _), (m1, _) in zip(states[1].running, first.running):
    np.testing.assert_array_equal(m0, m1)
  assert int(states[-1].step) == d3s.num_steps == d3s.num_batches * ITERATIONS


def test_ens_picks_teacher_b_mod_m(method, monkeypatch):
  """The first iteration of batch 1 optimises against teacher 1 (ENS), of teacher 0 without ENS."""
  d3s, states = method
  state = states[ITERATIONS]
  teachers, real = d3s.inputs(0)
  key = jax.random.split(state.key)[1]
  for ens, teacher in ((True, 1), (False, 0)):
    monkeypatch.setattr(d3s.config, "ens", ens)
    _, metrics = jax.jit(d3s.step)(state, (teachers, real))
    pick = lambda tree, m=teacher: jax.tree.map(lambda a: a[m], tree)  # noqa: E731
    x_b = state.x_syn[d3s.batch_size:2 * d3s.batch_size]
    y_b = (d3s.batch_size + jnp.arange(d3s.batch_size)) % 10
    loss, _ = d3s.loss(x_b, y_b, pick(teachers), pick(real), pick(state.running), 2, key, 1.0)
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-5)


def test_the_crop_curriculum_falls_from_1_to_the_minimum_scale(method):
  d3s, _ = method
  assert float(d3s.min_scale(0)) == 1.0
  assert float(d3s.min_scale(ITERATIONS)) == pytest.approx(0.08)
  assert 0.08 < float(d3s.min_scale(1)) < 1.0


def test_the_result_is_relabelled_by_the_ensemble_with_the_baselines_crops(method):
  d3s, states = method
  result = d3s.result(states[-1])
  assert isinstance(result, RelabelledSet)
  assert result.logits.shape == (3, 20, 10)
  np.testing.assert_array_equal(result.y, np.arange(20) % 10)
  np.testing.assert_array_equal(result.x, states[-1].x_syn)
  views, logits = result.draw(np.arange(20), epoch=1)
  np.testing.assert_allclose(logits, d3s.pool.ensemble_logits(np.asarray(views)), rtol=1e-5,
                             atol=1e-5)
  baseline = d3s.baselines()["random_relabelled"]
  np.testing.assert_array_equal(baseline.crops, result.crops)
  assert baseline.meta.method == "random" and baseline.label_kind == "logits"
  # Images stay in the valid pixel range.
  pixels = d3s.data.preprocessor.invert(np.asarray(result.x))
  assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_a_batch_size_that_does_not_divide_the_classes_is_refused():
  config = d3s_config.get_config("smoke,outer.batch_size=4")
  data = data_lib.load_real(config.dataset, config.preprocessing)
  with pytest.raises(ValueError, match="batch_size=4 does not divide the 10 classes.*set it to 2"):
    methods.get_method("d3s")(config, data)


def test_the_adam_state_restarts_with_each_batch(method):
  d3s, states = method
  count = optax.tree_utils.tree_get(states[ITERATIONS + 1].opt_state, "count")
  assert int(count) == 1
