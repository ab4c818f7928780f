"""D3S's Gaussian feature statistics, their KL divergence and incremental statistic updating.

D3S (paper 001, Section 4.1-4.2, Eq. 1-2, Appendix A) approximates the distribution of every
convolution layer's outputs by a multivariate normal over channels, on the real set (once) and
on each distilled batch, and minimises the KL divergence between them.
"""

from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

PyTree = Any

# Covariances feed Cholesky factorisations; see krr.py for why matmuls run at full precision.
_PRECISION = jax.lax.Precision.HIGHEST


def feature_gaussian(features: jax.Array) -> tuple[jax.Array, jax.Array]:
  r"""Channel mean and covariance of a feature map, D3S paper 001, Appendix A.

  The last axis is channels and every other axis indexes samples: a `(B, H, W, C)` conv output
  gives `B * H * W` samples of dimension `C` (D3S: "we treat the output as B x H_l x W_l samples
  of dimensions C_l"). Returns `mu = mean_z z` and `Sigma = mean_z (z - mu)(z - mu)^T`, divided
  by the sample count `N` (not `N - 1`). The covariance is computed from centred features, so it
  does not lose precision to a large mean.

  Args:
    features: `(..., C)` array with at least one sample axis.

  Returns:
    `(mean (C,), cov (C, C))`.

  Example:
    >>> import jax.numpy as jnp
    >>> mean, cov = feature_gaussian(jnp.array([[[1., 0.], [3., 0.]]]))  # (1, 2, 2)
    >>> print(mean, cov.tolist())
    [2. 0.] [[1.0, 0.0], [0.0, 0.0]]
  """
  if features.ndim < 2:
    raise ValueError(
        f"features must have channels last and at least one sample axis, got shape "
        f"{features.shape}; add a batch axis.")
  flat = features.reshape(-1, features.shape[-1])
  mean = jnp.mean(flat, axis=0)
  centred = flat - mean
  cov = jnp.matmul(centred.T, centred, precision=_PRECISION) / flat.shape[0]
  return mean, cov


def _jittered_cholesky(cov: jax.Array, jitter: float | jax.Array) -> jax.Array:
  dim = cov.shape[-1]
  floor = dim * jnp.finfo(cov.dtype).eps
  scale = jnp.maximum(jnp.asarray(jitter, cov.dtype), floor) * jnp.trace(cov) / dim
  return jnp.linalg.cholesky(cov + scale * jnp.eye(dim, dtype=cov.dtype))


def gaussian_kl(mean_p: jax.Array, cov_p: jax.Array, mean_q: jax.Array, cov_q: jax.Array, *,
                jitter: float | jax.Array = 0.0) -> jax.Array:
  r"""`KL(N(mean_p, cov_p) || N(mean_q, cov_q))`, the per-layer term of D3S Eq. 1 (paper 001).

  `0.5 (log|cov_q| / |cov_p| + tr(cov_q^-1 cov_p) + (mean_q - mean_p)^T cov_q^-1
  (mean_q - mean_p) - C)`. D3S's Eq. 1 is this with `p` = the distilled batch statistics
  (`mu^S`, `Sigma^S`) and `q` = the real-set statistics (`mu^T`, `Sigma^T`).

  Numerics. With Cholesky factors `cov_p = L_p L_p^T`, `cov_q = L_q L_q^T`, the lower-triangular
  `M = L_q^-1 L_p` (one triangular solve) gives `tr(cov_q^-1 cov_p) = ||M||_F^2` and
  `log|cov_q|/|cov_p| = -sum_i log M_ii^2`, so

  `KL = 0.5 (sum_i (M_ii^2 - 1 - log M_ii^2) + sum_{i>j} M_ij^2 + ||L_q^-1 (mean_q - mean_p)||^2)`,

  a sum of non-negative terms: no cancellation between two large log-determinants, KL >= 0
  always (the diagonal terms are clamped at 0 against rounding in `log1p`; their true gradient
  vanishes there), and `KL(p, p)` is 0 up to the rounding of one triangular solve (`M ~ I`;
  ~1e-14 for small float32 examples). No explicit inverse is formed.
  Jitter: each covariance gets `max(jitter, C * eps(dtype)) * tr(cov) / C` added to its diagonal
  before factorisation (relative to its mean variance, so the KL stays scale-invariant). The
  floor `C * eps` (6.1e-5 for 512 float32 channels, 1.1e-13 in float64) keeps the Cholesky
  factorisation finite for singular covariances, e.g. a distilled batch with fewer samples than
  channels, for which the unjittered KL is infinite. (An all-zero covariance has no scale to
  jitter and gives NaN.) A matrix that is not positive semi-definite (a negative eigenvalue
  larger than the jitter, e.g. a covariance assembled by hand) fails its Cholesky factorisation
  and gives NaN; it is not checked, as the values are traced.

  The real side's factor is the constant part of the D3S loss; this function refactorises it on
  each call (`C^3 / 3` flops, small next to the network's forward pass).

  Args:
    mean_p: `(C,)` mean of `p` (D3S: distilled batch, after ISU).
    cov_p: `(C, C)` covariance of `p`.
    mean_q: `(C,)` mean of `q` (D3S: real set).
    cov_q: `(C, C)` covariance of `q`.
    jitter: relative diagonal jitter (keyword-only), floored at `C * eps(dtype)`.

  Returns:
    Scalar KL divergence (nats).

  Raises:
    ValueError: if the shapes are inconsistent.

  Example:
    >>> import jax.numpy as jnp
    >>> eye = jnp.eye(2)
    >>> print(float(gaussian_kl(jnp.zeros(2), eye, jnp.zeros(2), eye)))
    0.0
    >>> kl = gaussian_kl(jnp.zeros(2), eye, jnp.ones(2), 2 * eye)  # 0.5 (2 log 2 + 1 + 1 - 2)
    >>> print(round(float(kl), 4))
    0.6931
  """
  dim = mean_p.shape[-1]
  if (mean_p.shape != (dim,) or mean_q.shape != (dim,) or cov_p.shape != (dim, dim)
      or cov_q.shape != (dim, dim)):
    raise ValueError(
        f"gaussian_kl needs means (C,) and covariances (C, C) of one C, got mean_p "
        f"{mean_p.shape}, cov_p {cov_p.shape}, mean_q {mean_q.shape}, cov_q {cov_q.shape}.")
  dtype = jnp.result_type(mean_p, cov_p, mean_q, cov_q)
  chol_p = _jittered_cholesky(cov_p.astype(dtype), jitter)
  chol_q = _jittered_cholesky(cov_q.astype(dtype), jitter)
  m = jsl.solve_triangular(chol_q, chol_p, lower=True)
  white_diff = jsl.solve_triangular(chol_q, (mean_q - mean_p).astype(dtype), lower=True)
  diag_sq = jnp.square(jnp.diagonal(m))
  strictly_lower = jnp.tril(m, k=-1)
  # x - 1 - log x >= 0 for the squared diagonal; log1p keeps accuracy near x = 1.
  diag_terms = jnp.maximum((diag_sq - 1.0) - jnp.log1p(diag_sq - 1.0), 0.0)
  return 0.5 * (jnp.sum(diag_terms) + jnp.sum(jnp.square(strictly_lower))
                + jnp.sum(jnp.square(white_diff)))


def incremental_stats(batch_stats: PyTree, running_stats: PyTree, *,
                      batch_index: int | jax.Array) -> PyTree:
  r"""D3S incremental statistic updating (ISU), paper 001 Eq. 2.

  `hat_s = (1/b) * batch + (1 - 1/b) * running`, leaf by leaf, for `b = batch_index >= 1`.
  Starting from `running = 0` and feeding each result back as `running`, after `b` batches the
  running value is the arithmetic mean of the `b` per-batch statistics. For the mean this equals
  the mean of the concatenated batches when the batches are equally large. For covariances it is
  the mean of the within-batch covariances (each about its own batch mean), which is NOT the
  covariance of the concatenation: by the law of total covariance that also contains the
  covariance of the batch means, `Sigma_pooled = mean_b Sigma_b + mean_b (mu_b - mu)(mu_b - mu)^T`.
  This is what D3S averages (Algorithm 1-3 mix `Sigma^{S,b}` directly); to track the pooled
  covariance, average second moments `Sigma_b + mu_b mu_b^T` instead and subtract `mu mu^T`.

  Args:
    batch_stats: pytree of this batch's statistics (e.g. `(mean, cov)` per layer).
    running_stats: pytree of the same structure, the running statistics before batch `b`
      (zeros for `b = 1`; their value is then multiplied by 0).
    batch_index: 1-based batch counter `b` (keyword-only; may be traced).

  Returns:
    The mixed statistics `hat_s`, same structure as `batch_stats`.

  Raises:
    ValueError: if the pytree structures differ or a concrete `batch_index < 1`.

  Example:
    >>> import jax.numpy as jnp
    >>> running = jnp.zeros(2)
    >>> for b, batch_mean in enumerate([jnp.array([1., 0.]), jnp.array([3., 2.])], start=1):
    ...   running = incremental_stats(batch_mean, running, batch_index=b)
    >>> print(running)
    [2. 1.]
  """
  if jax.tree.structure(batch_stats) != jax.tree.structure(running_stats):
    raise ValueError(
        f"batch_stats and running_stats must have the same structure, got "
        f"{jax.tree.structure(batch_stats)} and {jax.tree.structure(running_stats)}.")
  if isinstance(batch_index, int) and batch_index < 1:
    raise ValueError(f"batch_index is 1-based (b >= 1), got {batch_index}.")

  def mix(batch: jax.Array, running: jax.Array) -> jax.Array:
    weight = 1.0 / jnp.asarray(batch_index, jnp.result_type(batch, running))
    return weight * batch + (1.0 - weight) * running

  return jax.tree.map(mix, batch_stats, running_stats)
