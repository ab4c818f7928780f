"""Tests for D3's mixture-of-RBF MMD^2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from distill_jax.objectives import mmd2
from tests.references import numpy_mmd2 as _numpy_mmd2

BANDWIDTHS = (1.0, 2.0, 4.0, 8.0, 16.0)


@pytest.mark.parametrize("unbiased", [True, False])
def test_mmd2_matches_numpy(unbiased):
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(7, 5)) * 2, rng.normal(size=(9, 5)) * 2 + 0.5
  got = jax.jit(lambda a, b: mmd2(a, b, unbiased=unbiased))(
      jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  np.testing.assert_allclose(got, _numpy_mmd2(x, y, unbiased=unbiased), rtol=1e-4, atol=1e-6)


def test_mmd2_float32_accurate_for_large_feature_norms():
  """A shared offset of 1e4 (norms ~1e5) would wipe out distances of ~10 in the plain expansion."""
  rng = np.random.default_rng(1)
  offset = 1e4 * rng.uniform(size=(1, 64))
  x = offset + rng.normal(size=(20, 64)) * 0.5
  y = offset + rng.normal(size=(24, 64)) * 0.5 + 0.2
  got = jax.jit(lambda a, b: mmd2(a, b, bandwidths=(4.0, 8.0)))(
      jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  # The reference sees the float32-rounded inputs, so only the computation's error is measured.
  want = _numpy_mmd2(np.float32(x), np.float32(y), bandwidths=(4.0, 8.0))
  # The uncentred expansion gives 0.0166 here instead of 0.0937.
  np.testing.assert_allclose(got, want, rtol=1e-3)
  assert abs(want) > 1e-2


def test_unbiased_mmd2_averages_to_zero_but_biased_does_not():
  """Two samples of one distribution: E[unbiased] = 0 while the V-statistic is biased upward."""
  keys = jax.random.split(jax.random.key(0), 400)

  def both(key):
    key_x, key_y = jax.random.split(key)
    x, y = jax.random.normal(key_x, (6, 3)), jax.random.normal(key_y, (6, 3))
    return mmd2(x, y, bandwidths=(1.0, 2.0)), mmd2(x, y, bandwidths=(1.0, 2.0), unbiased=False)

  unbiased, biased = (np.asarray(v) for v in jax.jit(jax.vmap(both))(keys))
  stderr = unbiased.std() / np.sqrt(len(keys))
  assert abs(unbiased.mean()) < 3 * stderr
  assert (biased > 0).all()
  assert biased.mean() > 10 * biased.std() / np.sqrt(len(keys))
  assert unbiased.min() < 0  # the unbiased estimator is not clamped


def test_mmd2_gradients_match_finite_differences_x64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(4, 3)), rng.normal(size=(5, 3)) + 1.0
    for unbiased in (True, False):
      check_grads(jax.jit(lambda a, b: mmd2(a, b, unbiased=unbiased)), (x, y), order=1,
                  modes=("rev",), atol=1e-6, rtol=1e-6)


def test_mmd2_x64_matches_numpy():
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 4)) * 3, rng.normal(size=(5, 4)) * 3
    got = jax.jit(mmd2)(x, y)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, _numpy_mmd2(x, y), rtol=1e-10)


def test_mmd2_rejects_bad_inputs():
  with pytest.raises(ValueError, match="same feature size"):
    mmd2(jnp.ones((3, 2)), jnp.ones((3, 4)))
  with pytest.raises(ValueError, match="at least 2 rows"):
    mmd2(jnp.ones((1, 2)), jnp.ones((3, 2)))
  with pytest.raises(ValueError, match="bandwidths"):
    mmd2(jnp.ones((3, 2)), jnp.ones((3, 2)), bandwidths=())
