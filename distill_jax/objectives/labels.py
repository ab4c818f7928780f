"""Label losses: FRePo's label-margin regulariser, knowledge distillation and evaluation losses."""

import jax
import jax.numpy as jnp


def label_margin_loss(y_support: jax.Array) -> jax.Array:
  r"""FRePo's label regulariser: `mean_i -min(top1_i - top2_i, 1/C)` (paper 004, App. D).

  FRePo learns the distilled labels and adds "a small regularization to ensure the
  class-balanced distillation where we force the margin between the target label and any other
  label is greater than 1/C" (paper 004, Appendix D, "Label Regularization"). Here the margin
  of row `i` is its largest minus its second-largest entry; while a row's margin is below `1/C`
  the loss decreases as the margin grows (gradient `-1/n` on the top entry, `+1/n` on the
  runner-up), and rows with margin `>= 1/C` contribute the constant `-1/C` and no gradient.
  When a learned label's largest entry is its own class, the top1 - top2 margin is exactly the
  paper's target-vs-any-other margin. This is the authors' released expression
  (yongchaoz/FRePo `lib/datadistillation/frepo.py` `lb_margin_th`: `-min(top1 - top2, 1/C)`
  from `jax.lax.top_k`, averaged over rows in `proto_train_step`).

  Args:
    y_support: `(n, C)` learned labels, `C >= 2`.

  Returns:
    Scalar in `[-1/C, 0]` (margins are >= 0).

  Example:
    >>> import jax.numpy as jnp
    >>> y = jnp.array([[1.0, 0.0, 0.0, 0.0], [0.3, 0.2, 0.0, 0.0]])  # margins 1.0 and 0.1
    >>> print(round(float(label_margin_loss(y)), 4))  # mean(-0.25, -0.1)
    -0.175
  """
  if y_support.ndim != 2 or y_support.shape[-1] < 2:
    raise ValueError(
        f"y_support must be (n, C) with C >= 2 classes, got {y_support.shape}.")
  num_classes = y_support.shape[-1]
  top2 = jax.lax.top_k(y_support, 2)[0]
  margin = top2[:, 0] - top2[:, 1]
  return jnp.mean(-jnp.minimum(margin, 1.0 / num_classes))


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, *,
            temperature: float | jax.Array) -> jax.Array:
  r"""Knowledge-distillation loss `T^2 * KL(softmax(t/T) || softmax(s/T))`, mean over the batch.

  D3S paper 001, Appendix A (evaluation / relabelling: `T^2 D_KL(softmax(Y_b/T) ||
  softmax(hat Y_b/T))`, `T = 20`), the SRe2L-style evaluation loss (PyTorch's
  `KLDivLoss(reduction="batchmean")` scaled by `T^2`). The `T^2` factor keeps gradient
  magnitudes comparable across temperatures (Hinton et al., 2015).

  Args:
    student_logits: `(B, C)` logits of the network being trained.
    teacher_logits: `(B, C)` stored teacher logits (soft labels).
    temperature: softmax temperature `T > 0` (keyword-only).

  Returns:
    Scalar loss, `sum` over classes and `mean` over the batch.

  Example:
    >>> import jax.numpy as jnp
    >>> logits = jnp.array([[1.0, 2.0, 3.0]])
    >>> print(float(kd_loss(logits, logits, temperature=4.0)))
    0.0
  """
  if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
    raise ValueError(
        f"student_logits and teacher_logits must both be (B, C), got {student_logits.shape} "
        f"and {teacher_logits.shape}.")
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  log_p_teacher = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  log_p_student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
  return jnp.square(temperature) * jnp.mean(kl)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  r"""Cross-entropy with soft targets, `mean_i -sum_c targets[i, c] * log_softmax(logits)[i, c]`.

  The evaluation loss for soft or learned labels (distilled sets with label distributions);
  with one-hot targets it is the usual cross-entropy.

  Args:
    logits: `(B, C)` logits.
    targets: `(B, C)` target distributions (rows normally sum to 1; not checked).

  Returns:
    Scalar loss, sum over classes and mean over the batch.

  Example:
    >>> import jax.numpy as jnp
    >>> print(round(float(soft_cross_entropy(jnp.zeros((1, 4)), jnp.array([[1., 0, 0, 0]]))), 4))
    1.3863
  """
  if logits.shape != targets.shape:
    raise ValueError(f"logits {logits.shape} and targets {targets.shape} must have the same "
                     "shape (B, C); one-hot encode integer labels first.")
  return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def mse_loss(pred: jax.Array, targets: jax.Array) -> jax.Array:
  r"""Squared-error loss `mean_i 0.5 * sum_c (pred[i, c] - targets[i, c])^2`.

  FRePo's evaluation loss (networks trained with MSE on the learned labels, paper 004,
  Appendix D "Soft Cross Entropy Loss": "we train models ... using MSE loss in all our
  experiments"); the same reduction as `krr_loss`.

  Args:
    pred: `(B, C)` predictions (logits used as regression outputs).
    targets: `(B, C)` targets.

  Returns:
    Scalar loss, sum over classes and mean over the batch.

  Example:
    >>> import jax.numpy as jnp
    >>> print(float(mse_loss(jnp.array([[1., 2.]]), jnp.array([[0., 0.]]))))
    2.5
  """
  if pred.shape != targets.shape:
    raise ValueError(f"pred {pred.shape} and targets {targets.shape} must have the same shape.")
  return 0.5 * jnp.mean(jnp.sum(jnp.square(pred - targets), axis=-1))
