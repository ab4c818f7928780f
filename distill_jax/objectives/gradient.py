"""Gradient matching (DC / LatentDC) and mean-embedding matching (DM / LatentDM)."""

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

_DISTANCES = ("mse", "cosine")
# DC's distance_wb adds this to the product of norms so all-zero gradients give cos = 0.
_COSINE_EPS = 1e-6


def _layer_cosine_distance(grad_a: jax.Array, grad_b: jax.Array) -> jax.Array:
  """DC's per-layer `sum over output units (1 - cos)`; 0 for leaves with fewer than 2 axes."""
  if grad_a.ndim < 2:
    # DC's distance_wb returns 0 for 1-D tensors (biases, norm scales/offsets): they are not
    # matched by the cosine distance at all.
    return jnp.zeros((), jnp.result_type(grad_a, grad_b))
  # Flax kernels keep output units on the last axis ((h, w, in, out) conv, (in, out) dense);
  # DC (PyTorch, output units first) flattens everything else per output unit.
  units_a = grad_a.reshape(-1, grad_a.shape[-1])
  units_b = grad_b.reshape(-1, grad_b.shape[-1])
  dots = jnp.sum(units_a * units_b, axis=0)
  norms = _safe_norm(units_a) * _safe_norm(units_b)
  return jnp.sum(1.0 - dots / (norms + _COSINE_EPS))


def _safe_norm(units: jax.Array) -> jax.Array:
  """Column norms whose gradient at an all-zero column is 0, as PyTorch's `torch.norm` (a
  unit that received no gradient, e.g. a dead ReLU), instead of `jnp.linalg.norm`'s NaN."""
  squares = jnp.sum(jnp.square(units), axis=0)
  positive = squares > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)


def gradient_matching_loss(grads_a: PyTree, grads_b: PyTree, *, distance: str = "mse") -> jax.Array:
  r"""Distance between two gradient pytrees: DC / LatentDC's matching loss `D` (paper 002 Eq. 4-5).

  * `"mse"`: `sum over all leaves and elements (a - b)^2` (DC's `dis_metric="mse"`; LatentDC
    uses this MSE-like distance, following IDC). Every leaf counts, biases included.
  * `"cosine"`: DC's layer-wise distance (`distance_wb` in VICO-UoE/DatasetCondensation
    `utils.py`, `dis_metric="ours"`): for every leaf with >= 2 axes, flatten all axes but the
    output-unit axis and sum `1 - <a_u, b_u> / (||a_u|| ||b_u|| + 1e-6)` over output units `u`;
    summed over leaves. Leaves with fewer than 2 axes (biases, batch/instance/group-norm scales
    and offsets) contribute 0, exactly as DC's `distance_wb` returns 0 for 1-D tensors. Output
    units are the LAST axis (Flax layout: conv kernel `(h, w, in, out)`, dense `(in, out)`),
    where PyTorch, and DC's code, has them first.

  Args:
    grads_a: gradient pytree (e.g. on the synthetic batch).
    grads_b: gradient pytree of the same structure and shapes (e.g. on the real batch).
    distance: `"mse"` or `"cosine"` (keyword-only).

  Returns:
    Scalar distance; the caller sums it over classes as DC does.

  Raises:
    ValueError: on an unknown `distance` or mismatched pytrees.

  Example:
    >>> import jax.numpy as jnp
    >>> g_a = {"kernel": jnp.array([[1., 0.], [0., 1.]]), "bias": jnp.array([1., 1.])}
    >>> g_b = {"kernel": jnp.array([[2., 0.], [0., -1.]]), "bias": jnp.array([0., 1.])}
    >>> print(float(gradient_matching_loss(g_a, g_b)))  # 1 + 4 from the kernel, 1 from the bias
    6.0
    >>> print(round(float(gradient_matching_loss(g_a, g_b, distance="cosine")), 4))  # 0 + 2
    2.0
  """
  if distance not in _DISTANCES:
    raise ValueError(f"unknown gradient-matching distance {distance!r}; valid names: "
                     f"{', '.join(_DISTANCES)}.")
  if jax.tree.structure(grads_a) != jax.tree.structure(grads_b):
    raise ValueError(
        f"grads_a and grads_b must have the same pytree structure, got "
        f"{jax.tree.structure(grads_a)} and {jax.tree.structure(grads_b)}.")
  leaves_a, leaves_b = jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)
  for leaf_a, leaf_b in zip(leaves_a, leaves_b):
    if leaf_a.shape != leaf_b.shape:
      raise ValueError(f"gradient leaves differ in shape: {leaf_a.shape} vs {leaf_b.shape}; "
                       "compute both gradients with the same model.")
  if distance == "mse":
    terms = [jnp.sum(jnp.square(a - b)) for a, b in zip(leaves_a, leaves_b)]
  else:
    terms = [_layer_cosine_distance(a, b) for a, b in zip(leaves_a, leaves_b)]
  return sum(terms, jnp.zeros((), jnp.result_type(*leaves_a, *leaves_b)))


def mean_embedding_loss(feat_real: jax.Array, feat_syn: jax.Array) -> jax.Array:
  r"""DM / LatentDM's mean-embedding distance, paper 002 Eq. 6-7 (one class).

  `||mean_i feat_real[i] - mean_j feat_syn[j]||^2`, the squared Euclidean distance between the
  mean embeddings (sum over feature dimensions). DM sums it over classes; call it per class.

  Args:
    feat_real: `(n, d)` embeddings of real samples of one class.
    feat_syn: `(m, d)` embeddings of synthetic samples of the same class.

  Returns:
    Scalar loss.

  Example:
    >>> import jax.numpy as jnp
    >>> print(float(mean_embedding_loss(jnp.array([[0., 0.], [2., 2.]]), jnp.ones((3, 2)) * 3)))
    8.0
  """
  if feat_real.ndim != 2 or feat_syn.ndim != 2 or feat_real.shape[1] != feat_syn.shape[1]:
    raise ValueError(
        f"mean_embedding_loss needs 2-D embeddings with the same size, got {feat_real.shape} "
        f"and {feat_syn.shape}; flatten them to (rows, d).")
  return jnp.sum(jnp.square(jnp.mean(feat_real, axis=0) - jnp.mean(feat_syn, axis=0)))
