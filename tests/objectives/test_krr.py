"""Tests for FRePo's KRR objective against NumPy float64 computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from distill_jax.objectives import krr_loss
from distill_jax.objectives import krr_predict
from tests.references import numpy_krr


def _relu_features(rng: np.random.Generator, n: int, d: int, rank: int = 8) -> np.ndarray:
  """Low-rank ReLU features with a shared positive offset, like a network's penultimate layer."""
  weights = rng.normal(size=(rank, d)) / np.sqrt(rank)
  return np.maximum(rng.normal(size=(n, rank)) @ weights, 0.0) + 0.5


@pytest.mark.parametrize("n_support,dim", [(12, 40), (40, 12)])  # dual and primal forms
def test_krr_predict_matches_numpy_float32(n_support, dim):
  rng = np.random.default_rng(0)
  feat_target = rng.normal(size=(9, dim))
  feat_support = rng.normal(size=(n_support, dim))
  y_support = rng.normal(size=(n_support, 3))
  got = jax.jit(lambda *a: krr_predict(*a, reg=1e-2))(
      *(jnp.asarray(a, jnp.float32) for a in (feat_target, feat_support, y_support)))
  assert got.dtype == jnp.float32 and got.shape == (9, 3)
  np.testing.assert_allclose(got, numpy_krr(feat_target, feat_support, y_support, 1e-2),
                             rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("n_support,dim", [(10, 30), (30, 10)])
def test_krr_predict_equals_ridge_least_squares_x64(n_support, dim):
  """KRR prediction == F_t w with w the ridge least-squares solution of F_s w ~ Y_s."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    feat_target = rng.normal(size=(7, dim))
    feat_support = rng.normal(size=(n_support, dim))
    y_support = rng.normal(size=(n_support, 4))
    reg = 1e-3
    ridge = reg * np.sum(feat_support ** 2) / n_support  # reg * tr(K_ss) / n_s
    # argmin_w ||F_s w - Y||^2 + ridge ||w||^2 as an augmented ordinary least-squares problem.
    design = np.concatenate([feat_support, np.sqrt(ridge) * np.eye(dim)])
    rhs = np.concatenate([y_support, np.zeros((dim, 4))])
    weights = np.linalg.lstsq(design, rhs, rcond=None)[0]
    got = jax.jit(lambda *a: krr_predict(*a, reg=reg))(feat_target, feat_support, y_support)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, feat_target @ weights, rtol=1e-9, atol=1e-10)


def test_krr_float32_finite_and_accurate_when_support_outnumbers_features():
  rng = np.random.default_rng(2)
  feat_support = _relu_features(rng, 300, 16)
  feat_target = _relu_features(rng, 50, 16)
  y_support = rng.normal(size=(300, 10))
  got = jax.jit(lambda *a: krr_predict(*a, reg=1e-6))(
      *(jnp.asarray(a, jnp.float32) for a in (feat_target, feat_support, y_support)))
  assert np.all(np.isfinite(got))
  # float32 raises the ridge to the documented floor n_s * eps; compare with that exact solve.
  reg_eff = 300 * np.finfo(np.float32).eps
  want = numpy_krr(feat_target, feat_support, y_support, reg_eff)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())


def test_krr_float32_finite_for_rank_deficient_support():
  """Duplicated support rows and rank-8 features make K_ss singular; the solve stays finite."""
  rng = np.random.default_rng(3)
  feat_support = _relu_features(rng, 64, 256, rank=2) * 100.0
  feat_support[32:] = feat_support[:32]
  y_support = rng.normal(size=(64, 10))
  got = krr_predict(jnp.asarray(feat_support[:5], jnp.float32),
                    jnp.asarray(feat_support, jnp.float32),
                    jnp.asarray(y_support, jnp.float32), reg=1e-6)
  assert np.all(np.isfinite(got))


def test_krr_loss_matches_numpy():
  rng = np.random.default_rng(4)
  feat_target, feat_support = rng.normal(size=(8, 20)), rng.normal(size=(6, 20))
  y_target, y_support = rng.normal(size=(8, 3)), rng.normal(size=(6, 3))
  got = jax.jit(lambda *a: krr_loss(*a, reg=1e-2))(
      *(jnp.asarray(a, jnp.float32) for a in (feat_target, y_target, feat_support, y_support)))
  pred = numpy_krr(feat_target, feat_support, y_support, 1e-2)
  want = np.mean(0.5 * np.sum((y_target - pred) ** 2, axis=1))
  np.testing.assert_allclose(got, want, rtol=1e-4)


@pytest.mark.parametrize("n_support,dim", [(4, 7), (7, 4)])
def test_krr_loss_gradients_match_finite_differences_x64(n_support, dim):
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    feat_target, y_target = rng.normal(size=(5, dim)), rng.normal(size=(5, 3))
    feat_support, y_support = rng.normal(size=(n_support, dim)), rng.normal(size=(n_support, 3))
    loss = jax.jit(lambda fs, ys: krr_loss(feat_target, y_target, fs, ys, reg=1e-2))
    check_grads(loss, (feat_support, y_support), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


def test_krr_vmaps_over_support_sets():
  rng = np.random.default_rng(6)
  feat_target = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
  feat_support = jnp.asarray(rng.normal(size=(3, 4, 8)), jnp.float32)
  y_support = jnp.asarray(rng.normal(size=(3, 4, 2)), jnp.float32)
  batched = jax.vmap(lambda fs, ys: krr_predict(feat_target, fs, ys, reg=1e-2))(
      feat_support, y_support)
  for i in range(3):
    np.testing.assert_allclose(batched[i], krr_predict(feat_target, feat_support[i],
                                                       y_support[i], reg=1e-2), rtol=1e-5)


def test_krr_rejects_bad_shapes():
  with pytest.raises(ValueError, match="same network"):
    krr_predict(jnp.ones((2, 3)), jnp.ones((4, 5)), jnp.ones((4, 2)))
  with pytest.raises(ValueError, match="one-hot"):
    krr_predict(jnp.ones((2, 3)), jnp.ones((4, 3)), jnp.ones((4,)))
  with pytest.raises(ValueError, match="y_target"):
    krr_loss(jnp.ones((2, 3)), jnp.ones((3, 2)), jnp.ones((4, 3)), jnp.ones((4, 2)))


def test_reg_floor_scales_the_ridge_floor_and_zero_disables_it():
  """The relative ridge is max(reg, reg_floor * n_s * eps(dtype)); reg_floor may be traced."""
  rng = np.random.default_rng(7)
  feat_target, feat_support = rng.normal(size=(5, 30)), rng.normal(size=(12, 30))
  y_support = rng.normal(size=(12, 3))
  args = [jnp.asarray(a, jnp.float32) for a in (feat_target, feat_support, y_support)]
  predict = jax.jit(lambda floor, *a: krr_predict(*a, reg=1e-6, reg_floor=floor))
  floor_ridge = 1e4 * 12 * np.finfo(np.float32).eps  # 0.014, far above reg = 1e-6.
  high = predict(1e4, *args)
  np.testing.assert_allclose(high, numpy_krr(feat_target, feat_support, y_support, floor_ridge),
                             rtol=1e-4, atol=1e-4)
  none = predict(0.0, *args)  # The same compiled program: the floor is a traced value.
  np.testing.assert_allclose(none, numpy_krr(feat_target, feat_support, y_support, 1e-6),
                             rtol=1e-3, atol=1e-3)
  assert not np.allclose(high, none, atol=1e-2)
  # The default floor is 1.
  np.testing.assert_allclose(krr_predict(*args, reg=1e-6), predict(1.0, *args), rtol=1e-6)
  with jax.enable_x64(True):
    got = krr_predict(feat_target, feat_support, y_support, reg=0.0, reg_floor=1e12)
    ridge = 1e12 * 12 * np.finfo(np.float64).eps  # 2.7e-3 in float64.
    np.testing.assert_allclose(got, numpy_krr(feat_target, feat_support, y_support, ridge),
                               rtol=1e-9, atol=1e-10)
    loss = krr_loss(feat_target, feat_target @ np.ones((30, 3)), feat_support, y_support,
                    reg=0.0, reg_floor=1e12)
    pred = numpy_krr(feat_target, feat_support, y_support, ridge)
    want = 0.5 * np.mean(np.sum((feat_target @ np.ones((30, 3)) - pred) ** 2, axis=1))
    np.testing.assert_allclose(loss, want, rtol=1e-9)
