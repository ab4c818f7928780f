"""Tests for DC gradient matching and DM mean-embedding matching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from distill_jax.objectives import gradient_matching_loss
from distill_jax.objectives import mean_embedding_loss


def _dc_distance_wb(grad_real, grad_syn):
  """DC's distance_wb (VICO-UoE/DatasetCondensation utils.py) on PyTorch-layout arrays."""
  shape = grad_real.shape
  if len(shape) == 1:
    return 0.0
  grad_real = grad_real.reshape(shape[0], -1)
  grad_syn = grad_syn.reshape(shape[0], -1)
  dots = np.sum(grad_real * grad_syn, axis=-1)
  norms = np.linalg.norm(grad_real, axis=-1) * np.linalg.norm(grad_syn, axis=-1)
  return np.sum(1 - dots / (norms + 1e-6))


def _to_torch_layout(leaf):
  """Flax conv (h, w, in, out) -> torch (out, in, h, w); dense (in, out) -> (out, in)."""
  if leaf.ndim == 4:
    return leaf.transpose(3, 2, 0, 1)
  if leaf.ndim == 2:
    return leaf.T
  return leaf


def _random_grads(rng):
  return {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)), "bias": rng.normal(size=4)},
          "norm": {"scale": rng.normal(size=4)},
          "dense": {"kernel": rng.normal(size=(36, 5)), "bias": rng.normal(size=5)}}


def test_mse_and_cosine_match_numpy_and_dc_reference():
  rng = np.random.default_rng(0)
  grads_a, grads_b = _random_grads(rng), _random_grads(rng)
  to_f32 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)
  leaves_a, leaves_b = jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)
  want_mse = sum(np.sum((a - b) ** 2) for a, b in zip(leaves_a, leaves_b))
  want_cos = sum(_dc_distance_wb(_to_torch_layout(b), _to_torch_layout(a))
                 for a, b in zip(leaves_a, leaves_b))
  for distance, want in (("mse", want_mse), ("cosine", want_cos)):
    got = jax.jit(lambda a, b: gradient_matching_loss(a, b, distance=distance))(
        to_f32(grads_a), to_f32(grads_b))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_cosine_ignores_one_dimensional_leaves_and_is_zero_for_parallel_gradients():
  rng = np.random.default_rng(1)
  grads = jax.tree.map(jnp.asarray, _random_grads(rng))
  scaled = jax.tree.map(lambda g: 3.0 * g if g.ndim > 1 else -g, grads)
  loss = jax.jit(lambda a, b: gradient_matching_loss(a, b, distance="cosine"))
  np.testing.assert_allclose(loss(grads, scaled), 0.0, atol=1e-5)


def test_gradient_matching_gradients_match_finite_differences_x64():
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    grads_a, grads_b = _random_grads(rng), _random_grads(rng)
    for distance in ("mse", "cosine"):
      loss = jax.jit(lambda a: gradient_matching_loss(a, grads_b, distance=distance))
      check_grads(loss, (grads_a,), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_gradient_matching_rejects_unknown_distance_and_mismatched_trees():
  tree = {"w": jnp.ones((2, 2))}
  with pytest.raises(ValueError, match="valid names: mse, cosine"):
    gradient_matching_loss(tree, tree, distance="l1")
  with pytest.raises(ValueError, match="same pytree structure"):
    gradient_matching_loss(tree, {"v": jnp.ones((2, 2))})
  with pytest.raises(ValueError, match="shape"):
    gradient_matching_loss(tree, {"w": jnp.ones((2, 3))})


def test_mean_embedding_loss_matches_numpy_and_gradients():
  rng = np.random.default_rng(3)
  feat_real, feat_syn = rng.normal(size=(8, 5)), rng.normal(size=(3, 5))
  got = jax.jit(mean_embedding_loss)(jnp.asarray(feat_real, jnp.float32),
                                     jnp.asarray(feat_syn, jnp.float32))
  np.testing.assert_allclose(got, np.sum((feat_real.mean(0) - feat_syn.mean(0)) ** 2), rtol=1e-5)
  with jax.enable_x64(True):
    check_grads(jax.jit(lambda s: mean_embedding_loss(feat_real, s)), (feat_syn,), order=1,
                modes=("rev",))
  with pytest.raises(ValueError, match="same size"):
    mean_embedding_loss(jnp.ones((2, 3)), jnp.ones((2, 4)))


def _numpy_cosine_grads(a, b, eps=1e-6):
  """Gradients of `sum_j 1 - a_j.b_j / (|a_j| |b_j| + eps)` over columns j (float64), with
  PyTorch's subgradient 0 for the norm of an all-zero column."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  n_a, n_b = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
  unit_a = np.divide(a, n_a, out=np.zeros_like(a), where=n_a > 0)
  unit_b = np.divide(b, n_b, out=np.zeros_like(b), where=n_b > 0)
  dots, denom = np.sum(a * b, axis=0), n_a * n_b + eps
  grad_a = -b / denom + dots * n_b * unit_a / denom**2
  grad_b = -a / denom + dots * n_a * unit_b / denom**2
  return grad_a, grad_b


def test_cosine_gradient_of_all_zero_columns_is_finite_like_pytorch():
  """A unit that received no gradient (all-zero column, e.g. a dead ReLU) has a finite
  gradient: torch.norm's subgradient 0 at zero, not NaN."""
  rng = np.random.default_rng(4)
  a = rng.normal(size=(6, 4)).astype(np.float32)
  b = rng.normal(size=(6, 4)).astype(np.float32)
  a[:, 1] = 0.0  # Zero in a only, in b only, and in both.
  b[:, 2] = 0.0
  a[:, 3] = b[:, 3] = 0.0
  loss_and_grads = jax.jit(jax.value_and_grad(
      lambda u, v: gradient_matching_loss({"k": u}, {"k": v}, distance="cosine"),
      argnums=(0, 1)))
  loss, (grad_a, grad_b) = loss_and_grads(jnp.asarray(a), jnp.asarray(b))
  assert np.all(np.isfinite(grad_a)) and np.all(np.isfinite(grad_b))
  want_a, want_b = _numpy_cosine_grads(a, b)
  # Columns 1..3 have zero norm products: cos = 0 there, and the loss counts 1 each.
  cos0 = a[:, 0] @ b[:, 0] / (np.linalg.norm(a[:, 0]) * np.linalg.norm(b[:, 0]) + 1e-6)
  np.testing.assert_allclose(loss, 1 - cos0 + 3, rtol=1e-5)
  np.testing.assert_allclose(grad_a, want_a, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(grad_b, want_b, rtol=1e-4, atol=1e-3)
  # A zero column pulls its partner towards nothing, and is pulled towards it by -partner / eps.
  np.testing.assert_array_equal(grad_b[:, 1], 0.0)
  np.testing.assert_array_equal(grad_a[:, 2], 0.0)
  np.testing.assert_array_equal(grad_a[:, 3], 0.0)
  np.testing.assert_allclose(grad_a[:, 1], -b[:, 1] / 1e-6, rtol=1e-5)
