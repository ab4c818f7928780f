"""Real-set feature statistics: per-layer channel mean and covariance, streamed in chunks.

D3S (paper 001, Section 4.1 and Appendix A.1) summarises the real training set, for each teacher
and each convolution layer l, by the mean `mu_l (C_l,)` and the covariance `Sigma_l (C_l, C_l)`
of the layer's outputs, treating a `(N, H_l, W_l, C_l)` output as `N * H_l * W_l` samples of
dimension `C_l`. The whole training set never fits in one forward pass, so each chunk's count,
mean and centred scatter `M2 = sum_z (z - mean)(z - mean)^T` are computed on the device (float32,
full-precision matmuls) and merged on the host in float64 with Chan et al.'s pairwise formula:

  n = n_a + n_b,  delta = mean_b - mean_a,  mean = mean_a + delta * n_b / n,
  M2 = M2_a + M2_b + delta delta^T * n_a * n_b / n,

and finally `Sigma = M2 / n` (the population covariance, like `objectives.feature_gaussian`).
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_PRECISION = jax.lax.Precision.HIGHEST


def chunk_moments(blocks: Sequence[Array]) -> list[tuple[Array, Array, Array]]:
  """`(count, mean (C,), M2 (C, C))` of each `(..., C)` feature map of one chunk (jittable)."""
  out = []
  for block in blocks:
    flat = block.reshape(-1, block.shape[-1]).astype(jnp.float32)
    mean = jnp.mean(flat, axis=0)
    centred = flat - mean
    out.append((jnp.asarray(flat.shape[0], jnp.float32), mean,
                jnp.matmul(centred.T, centred, precision=_PRECISION)))
  return out


def merge_moments(a: tuple[float, np.ndarray, np.ndarray],
                  b: tuple[float, np.ndarray, np.ndarray]) -> tuple[float, np.ndarray, np.ndarray]:
  """Chan's pairwise merge of two `(count, mean, M2)` triples, in float64 (see the module doc).

  >>> a = (2.0, np.array([1.0]), np.array([[2.0]]))   # samples 0, 2
  >>> b = (1.0, np.array([4.0]), np.array([[0.0]]))   # sample 4
  >>> n, mean, m2 = merge_moments(a, b)               # samples 0, 2, 4
  >>> n, mean.tolist(), m2.tolist()
  (3.0, [2.0], [[8.0]])
  """
  n_a, mean_a, m2_a = float(a[0]), np.asarray(a[1], np.float64), np.asarray(a[2], np.float64)
  n_b, mean_b, m2_b = float(b[0]), np.asarray(b[1], np.float64), np.asarray(b[2], np.float64)
  n = n_a + n_b
  delta = mean_b - mean_a
  return n, mean_a + delta * (n_b / n), m2_a + m2_b + np.outer(delta, delta) * (n_a * n_b / n)


def layer_statistics(blocks_fn: Callable[[Array], Sequence[Array]], x: Any, *,
                     chunk_size: int = 1000) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per-layer `(mean (C_l,), cov (C_l, C_l))` float64 of `blocks_fn` over all of `x`.

  Args:
    blocks_fn: jitted `x (B, H, W, ch) -> [feature maps (B, H_l, W_l, C_l)]`, e.g. a teacher's
      `return_features=True` forward in inference mode, `features["blocks"]`.
    x: `(N, H, W, ch)` images (host or device).
    chunk_size: images per forward pass (the last chunk may be smaller).

  Returns:
    One `(mean, cov)` pair per layer, float64, `cov = M2 / (N * H_l * W_l)`.
  """
  moments_fn = jax.jit(lambda xb: chunk_moments(blocks_fn(xb)))
  total = None
  for start in range(0, len(x), chunk_size):
    chunk = [tuple(np.asarray(v, np.float64) for v in layer)
             for layer in jax.device_get(moments_fn(jnp.asarray(x[start:start + chunk_size])))]
    total = chunk if total is None else [merge_moments(t, c) for t, c in zip(total, chunk)]
  if total is None:
    raise ValueError("layer_statistics needs at least one image; x is empty")
  return [(mean, m2 / n) for n, mean, m2 in total]
