"""FRePo's conjugate-kernel kernel-ridge-regression (KRR) meta-objective.

FRePo (Zhou et al., 2022; paper 004, Eq. 2-3 and Appendix A.1 "Hyperparameters") trains the
distilled data so that KRR on the features of a pool network, fitted on the distilled set,
predicts the labels of a real batch. The conjugate kernel is the inner product of network
features, `K(a, b) = f(a) f(b)^T`.
"""

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

# The Gram matrices feed a Cholesky factorisation whose rounding floor is set by float32's
# epsilon; reduced-precision matmuls (TF32 / bf16 passes on accelerators) would break it.
_PRECISION = jax.lax.Precision.HIGHEST


def _check_features(feat_target: jax.Array, feat_support: jax.Array,
                    y_support: jax.Array) -> None:
  if feat_target.ndim != 2 or feat_support.ndim != 2:
    raise ValueError(
        f"krr features must be 2-D (rows, features), got feat_target {feat_target.shape} and "
        f"feat_support {feat_support.shape}; flatten the feature maps first.")
  if feat_target.shape[1] != feat_support.shape[1]:
    raise ValueError(
        f"feat_target has {feat_target.shape[1]} features but feat_support has "
        f"{feat_support.shape[1]}; compute both with the same network.")
  if y_support.ndim != 2 or y_support.shape[0] != feat_support.shape[0]:
    raise ValueError(
        f"y_support must be (n_support, num_classes) = ({feat_support.shape[0]}, C), got "
        f"{y_support.shape}; one-hot encode integer labels first.")


def _check_ridge(reg, reg_floor) -> None:
  # Concrete values only (traced ones pass): a negative ridge makes K_ss + lam I indefinite, and
  # the Cholesky solve then returns NaN instead of failing.
  for name, value in (("reg", reg), ("reg_floor", reg_floor)):
    if isinstance(value, (int, float)) and value < 0:
      raise ValueError(f"{name}={value} is negative; the ridge must be >= 0 (FRePo: reg=1e-6)")


def krr_predict(feat_target: jax.Array, feat_support: jax.Array, y_support: jax.Array, *,
                reg: float | jax.Array = 1e-6, reg_floor: float | jax.Array = 1.0) -> jax.Array:
  r"""KRR prediction with the conjugate (feature inner-product) kernel, FRePo Eq. 2.

  Computes `K_ts (K_ss + lam * I)^-1 Y_s` with `K_ts = F_t F_s^T`, `K_ss = F_s F_s^T` and the
  trace-scaled ridge `lam = reg * tr(K_ss) / n_s` of FRePo's released code (the paper,
  Appendix A.1, writes `lam = reg * tr(K_ss)`; the code also divides by `n_s`, as KIP does).

  Numerics. The system is solved by a Cholesky factorisation, never an explicit inverse, on the
  smaller of the two equivalent Gram matrices: the dual `n_s x n_s` matrix `F_s F_s^T` when
  `n_s <= d`, else the primal `d x d` matrix `F_s^T F_s`, using the push-through identity
  `F_s^T (F_s F_s^T + lam I)^-1 = (F_s^T F_s + lam I)^-1 F_s^T`. The smaller Gram matrix is
  generically full rank, so the solve stays accurate when the support set outnumbers the
  feature dimension (the `n_s x n_s` matrix then has rank `d < n_s`). The relative ridge is
  floored at `reg_floor * n_s * eps(dtype)` (with the default `reg_floor = 1`: 1.2e-5 for 100
  float32 rows, ~2e-14 in float64; `reg_floor = 0` uses `reg` as given): with a single
  dominant eigenvalue (ReLU features share a large mean direction) `lam_max ~ tr(K_ss)`, and a
  ridge below `eps * lam_max` makes the float32 Cholesky fail (NaN) or be dominated by rounding.
  FRePo's default `reg = 1e-6` is therefore raised to the floor in float32 once `n_s > 8`; in
  float64 the floor never binds at these sizes. The Gram matmuls run at `Precision.HIGHEST`.

  Args:
    feat_target: `(n_t, d)` features of the target (real) batch.
    feat_support: `(n_s, d)` features of the support (distilled) set.
    y_support: `(n_s, C)` support labels (one-hot or learned, float).
    reg: relative ridge `lambda_0` (keyword-only; may be traced).
    reg_floor: the ridge floor in units of `n_s * eps(dtype)` (may be traced); 0 disables it.

  Returns:
    `(n_t, C)` predicted targets.

  Raises:
    ValueError: if the shapes do not match, or a concrete `reg` or `reg_floor` is negative.

  NaN on degenerate input (not checked: the values are traced): all-zero support features give
  `tr(K_ss) = 0`, hence a zero ridge and a singular system; with `reg_floor = 0` and `reg = 0`,
  fewer feature dimensions than support rows do the same.

  Example:
    >>> import jax.numpy as jnp
    >>> feat_support = jnp.array([[1., 0.], [0., 1.]])
    >>> y_support = jnp.array([[1., 0.], [0., 1.]])
    >>> pred = krr_predict(jnp.array([[2., 0.]]), feat_support, y_support, reg=0.0)
    >>> print(jnp.round(pred, 4))
    [[2. 0.]]
  """
  _check_features(feat_target, feat_support, y_support)
  _check_ridge(reg, reg_floor)
  n_s, d = feat_support.shape
  dtype = jnp.result_type(feat_target, feat_support, y_support)
  eps = jnp.finfo(dtype).eps
  reg_eff = jnp.maximum(jnp.asarray(reg, dtype), jnp.asarray(reg_floor, dtype) * n_s * eps)
  if n_s <= d:
    gram = jnp.matmul(feat_support, feat_support.T, precision=_PRECISION)
  else:
    gram = jnp.matmul(feat_support.T, feat_support, precision=_PRECISION)
  # tr(F F^T) == tr(F^T F), so both forms use the same ridge.
  ridge = reg_eff * jnp.trace(gram) / n_s
  factor = jsl.cho_factor(gram + ridge * jnp.eye(gram.shape[0], dtype=gram.dtype), lower=True)
  if n_s <= d:
    alpha = jsl.cho_solve(factor, y_support)
    k_ts = jnp.matmul(feat_target, feat_support.T, precision=_PRECISION)
    return jnp.matmul(k_ts, alpha, precision=_PRECISION)
  weights = jsl.cho_solve(factor, jnp.matmul(feat_support.T, y_support, precision=_PRECISION))
  return jnp.matmul(feat_target, weights, precision=_PRECISION)


def krr_loss(feat_target: jax.Array, y_target: jax.Array, feat_support: jax.Array,
             y_support: jax.Array, *, reg: float | jax.Array = 1e-6,
             reg_floor: float | jax.Array = 1.0) -> jax.Array:
  r"""FRePo's meta-loss, paper 004 Eq. 3: squared error of the KRR prediction on real data.

  `mean_i 0.5 * sum_c (y_target[i, c] - krr_predict(...)[i, c])^2`, i.e. a sum over classes
  and a mean over the `n_t` target rows.

  Args:
    feat_target: `(n_t, d)` features of the real batch.
    y_target: `(n_t, C)` real targets (FRePo: one-hot minus `1/C`, scaled like `y_support`).
    feat_support: `(n_s, d)` features of the distilled set.
    y_support: `(n_s, C)` distilled labels.
    reg: relative ridge, see `krr_predict`.
    reg_floor: ridge floor, see `krr_predict`.

  Returns:
    Scalar loss.

  Example:
    >>> import jax.numpy as jnp
    >>> eye = jnp.eye(2)
    >>> print(round(float(krr_loss(eye, eye, eye, eye, reg=0.0)), 6))
    0.0
  """
  _check_features(feat_target, feat_support, y_support)  # Before y_target: name the real culprit.
  if y_target.shape != (feat_target.shape[0], y_support.shape[-1]):
    raise ValueError(
        f"y_target must be (n_target, num_classes) = ({feat_target.shape[0]}, "
        f"{y_support.shape[-1]}), got {y_target.shape}.")
  pred = krr_predict(feat_target, feat_support, y_support, reg=reg, reg_floor=reg_floor)
  return 0.5 * jnp.mean(jnp.sum((y_target - pred) ** 2, axis=-1))
