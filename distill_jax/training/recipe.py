"""Training recipes: the network, optimiser, schedule, loss and augmentation networks train with.

A `Recipe` is a frozen description shared by everything that trains networks: evaluation
protocols (`distill_jax.evaluation.Protocol` adds a name and test settings), expert trajectories,
teacher pools. `distill_jax.training.Trainer` runs one. The pure pieces a step needs come from
here: the optimiser direction (`direction`), the lr multiplier over steps (`lr_multiplier`), the
per-example loss (`per_example_loss`, optax's losses) and the targets a set's labels become under
that loss (`targets_fn`, by the set's `label_kind`, never guessed from values).

>>> r = Recipe(epochs=2, batch_size=4)
>>> r.num_steps(10), r.steps_per_epoch(10)  # ceil(10 / 4) batches per epoch, the last partial
(6, 3)
"""

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from distill_jax import models
from distill_jax.models.common import check_choice as _check_choice
from distill_jax.models.common import check_positive as _check_positive_int

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine", "warmup_cosine")
LOSSES = ("ce", "mse", "kd", "l1")
AUGMENTATIONS = ("none", "dsa", "frepo", "rrc")

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How networks are trained from scratch on a training set.

  Attributes:
    model: a `distill_jax.models.MODELS` name.
    model_kwargs: keyword arguments of `get_model` besides `num_classes`.
    optimizer: "sgd" (PyTorch SGD: L2 added to the gradient, then heavy-ball momentum), "adam"
      (PyTorch Adam: L2 added to the gradient) or "adamw" (decoupled decay, scaled by the lr).
    lr: base learning rate.
    momentum: SGD momentum (unused by Adam/AdamW).
    weight_decay: L2 / decoupled weight decay coefficient on every parameter.
    schedule: lr multiplier over steps: "constant"; "step" (x0.1 from step
      `max(num_steps // 2, 1)` on, MTT/DC's E/2); "cosine" (1 -> `final_lr_fraction`);
      "warmup_cosine" (linear 0 -> 1 over `warmup_steps`, then cosine to `final_lr_fraction`,
      FRePo's).
    warmup_steps: warm-up length of "warmup_cosine".
    final_lr_fraction: the cosine schedules' final multiplier (optax's `alpha`).
    epochs: training length in passes over the training set, or None.
    steps: training length in optimiser steps, or None (at most one of `epochs`/`steps`).
    steps_by_set_size: ((set size, steps), ...) used when both `epochs` and `steps` are None
      (FRePo's table); a size between entries takes the next larger entry's steps.
    batch_size: training batch size; a smaller set is used whole in every step.
    loss: "ce" (cross-entropy), "mse" (FRePo's `0.5 * sum_c` squared error), "kd"
      (knowledge distillation from teacher logits at `temperature`) or "l1" (APM's
      `F.l1_loss` to teacher logits: `mean_c |logits - targets|`).
    temperature: KD temperature for "kd"; for "ce" on learned labels or logits the targets are
      `softmax(y / temperature)` (FRePo's "softxent" convention).
    augmentation: on every training batch: "dsa" (`distill_jax.data.augment.dsa`), "frepo"
      (FRePo's augmax ops, one op per batch), "rrc" (torchvision's RandomResizedCrop, scale
      0.08-1, back to the input size, + RandomHorizontalFlip: `distill_jax.data.rrc_params`;
      D3S/SRe2L teachers) or "none".
    aug_strategy: ops joined by "_", e.g. DSA's "color_crop_cutout_flip_scale_rotate".
    aug_mode: DSA mode ("single" picks one op per batch, "multiple" applies all); "frepo"
      always picks one.
    no_flip_grayscale: drop "flip" from the strategy for 1-channel images (FRePo flips only
      RGB datasets).
  """

  model: str = "convnet"
  model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  optimizer: str = "sgd"
  lr: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  schedule: str = "step"
  warmup_steps: int = 0
  final_lr_fraction: float = 0.0
  epochs: int | None = None
  steps: int | None = None
  steps_by_set_size: tuple[tuple[int, int], ...] | None = None
  batch_size: int = 256
  loss: str = "ce"
  temperature: float = 1.0
  augmentation: str = "dsa"
  aug_strategy: str = "color_crop_cutout_flip_scale_rotate"
  aug_mode: str = "single"
  no_flip_grayscale: bool = False

  def __post_init__(self):
    # A private copy: a caller mutating its dict must not change a frozen recipe.
    object.__setattr__(self, "model_kwargs", dict(self.model_kwargs))
    if self.steps_by_set_size is not None:
      object.__setattr__(
          self, "steps_by_set_size", tuple(tuple(pair) for pair in self.steps_by_set_size)
      )
    _check_choice(self.optimizer, OPTIMIZERS, "optimizer")
    _check_choice(self.schedule, SCHEDULES, "schedule")
    _check_choice(self.loss, LOSSES, "loss")
    _check_choice(self.augmentation, AUGMENTATIONS, "augmentation")
    _check_positive_int(self.batch_size, "batch_size")
    for field in ("epochs", "steps"):
      if getattr(self, field) is not None:
        _check_positive_int(getattr(self, field), field)
    if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or (
        self.warmup_steps < 0):
      raise ValueError(f"warmup_steps must be a non-negative int, got {self.warmup_steps!r}")
    if self.epochs is not None and self.steps is not None:
      raise ValueError(f"set only one of epochs={self.epochs} and steps={self.steps}")
    if self.epochs is None and self.steps is None and not self.steps_by_set_size:
      raise ValueError("a recipe needs epochs, steps or steps_by_set_size")
    for field in ("lr", "temperature"):
      value = getattr(self, field)
      if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{field} must be a positive finite number, got {value!r}")
    for field in ("momentum", "final_lr_fraction"):
      value = getattr(self, field)
      if not (isinstance(value, (int, float)) and 0 <= value <= 1):
        raise ValueError(f"{field} must be in [0, 1], got {value!r}")
    if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
      raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
    if self.augmentation in ("dsa", "frepo") and not self.aug_strategy:
      raise ValueError(
          f"augmentation={self.augmentation!r} needs a non-empty aug_strategy; or use 'none'"
      )
    models.get_model(self.model, num_classes=2, **self.model_kwargs)  # Bad names fail here.

  def __hash__(self) -> int:
    return hash(repr(sorted(self.to_dict().items())))

  def make_model(self, num_classes: int):
    """The recipe's (unbound) Flax module with `num_classes` outputs."""
    return models.get_model(self.model, num_classes=num_classes, **self.model_kwargs)

  def effective_batch_size(self, num_train: int) -> int:
    """The batch size used on `num_train` examples: `min(batch_size, num_train)`."""
    return min(self.batch_size, num_train)

  def steps_per_epoch(self, num_train: int) -> int:
    """Batches per pass over `num_train` examples, the last one partial (drop_last=False)."""
    return -(-num_train // self.effective_batch_size(num_train))

  def num_steps(self, num_train: int) -> int:
    """Optimiser steps on a training set of `num_train` examples.

    `steps` if set; else `epochs * steps_per_epoch`; else FRePo's table, where a size between
    two entries takes the larger entry's steps and a size above the largest entry takes the
    largest entry's steps.
    """
    if num_train < 1:
      raise ValueError(f"the training set is empty (num_train={num_train}); pass some examples")
    if self.steps is not None:
      return self.steps
    if self.epochs is not None:
      return self.epochs * self.steps_per_epoch(num_train)
    table = sorted(self.steps_by_set_size)
    for size, steps in table:
      if num_train <= size:
        return steps
    return table[-1][1]

  def strategy_for(self, channels: int) -> str:
    """The augmentation strategy used on images with `channels` channels."""
    if self.no_flip_grayscale and channels == 1:
      return "_".join(op for op in self.aug_strategy.split("_") if op != "flip")
    return self.aug_strategy

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready dict of every field (for reports and config records)."""
    out = dataclasses.asdict(self)
    out["model_kwargs"] = dict(self.model_kwargs)
    if self.steps_by_set_size is not None:
      out["steps_by_set_size"] = [list(pair) for pair in self.steps_by_set_size]
    return out

  # --------------------------------------------------------------------------------------------
  # The pure pieces of a step.

  def direction(self) -> optax.GradientTransformation:
    """The optimiser without its learning rate: updates are `params -= lr_t * direction`."""
    if self.optimizer == "sgd":
      # torch.optim.SGD: g += wd * p; buf = momentum * buf + g; p -= lr * buf.
      return optax.chain(
          optax.add_decayed_weights(self.weight_decay), optax.trace(decay=self.momentum)
      )
    if self.optimizer == "adam":
      # torch.optim.Adam: L2 added to the gradient before the moments.
      return optax.chain(optax.add_decayed_weights(self.weight_decay), optax.scale_by_adam())
    # adamw (optax.adamw / torch.optim.AdamW): decay added after Adam's scaling, times the lr.
    return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(self.weight_decay))

  def lr_multiplier(self, num_steps: int) -> Callable[[Array], Array]:
    """Step -> lr multiplier of `schedule` over `num_steps` steps."""
    if self.schedule == "constant":
      return optax.constant_schedule(1.0)
    if self.schedule == "step":
      decay_step = max(num_steps // 2, 1)  # A 1-step run never decays.
      return lambda t: jnp.where(t < decay_step, 1.0, 0.1)
    if self.schedule == "cosine":
      return optax.cosine_decay_schedule(1.0, max(num_steps, 1), alpha=self.final_lr_fraction)
    warmup = self.warmup_steps
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, 1.0, transition_steps=warmup),
            optax.cosine_decay_schedule(
                1.0, max(num_steps - warmup, 1), alpha=self.final_lr_fraction
            ),
        ],
        boundaries=[warmup],
    )

  def per_example_loss(self, logits: Array, targets: Array) -> Array:
    """`(B, C)` logits and `(B, C)` targets -> `(B,)` losses (optax's losses).

    "ce": `optax.softmax_cross_entropy`; "mse": `sum_c optax.l2_loss` (= `0.5 * sum_c (p -
    t)^2`, `objectives.mse_loss` per example); "kd": `T^2 * optax.kl_divergence(log_softmax(s /
    T), softmax(t / T))` (`objectives.kd_loss` per example); "l1": `mean_c |s - t|` (PyTorch's
    `F.l1_loss` per example, APM's student and evaluation loss).
    """
    if self.loss == "ce":
      return optax.softmax_cross_entropy(logits, targets)
    if self.loss == "mse":
      return jnp.sum(optax.l2_loss(logits, targets), axis=-1)
    if self.loss == "l1":
      return jnp.mean(jnp.abs(logits - targets), axis=-1)
    t = self.temperature
    return t**2 * optax.kl_divergence(
        jax.nn.log_softmax(logits / t, axis=-1), jax.nn.softmax(targets / t, axis=-1)
    )

  def can_train(self, label_kind: str) -> bool:
    """Whether this recipe's loss can use labels of `label_kind` (KD needs teacher outputs, L1
    regresses teacher logits)."""
    if self.loss == "l1":
      return label_kind in ("logits", "learned")
    return not (self.loss == "kd" and label_kind == "class_ids")

  def targets_fn(self, label_kind: str, num_classes: int) -> Callable[[Array], Array]:
    """Labels of kind `label_kind` -> `(B, C)` float targets of this recipe's loss (jittable).

    - "ce": class ids -> one-hot; probabilities -> unchanged; learned labels and logits ->
      `softmax(y / temperature)` (FRePo's "softxent").
    - "mse": class ids -> FRePo's centred one-hot `one_hot - 1/C`; float labels -> unchanged.
    - "kd": logits and learned labels -> unchanged; probabilities -> `log(p)` (logits with the
      same softmax at any temperature); class ids raise (KD needs teacher outputs).
    - "l1": logits and learned labels -> unchanged; class ids and probabilities raise (APM
      regresses teacher logits; hard labels train with "ce").

    Raises:
      ValueError: "kd" on class ids; "l1" on class ids or probabilities.

    >>> f = Recipe(epochs=1, loss="mse").targets_fn("class_ids", 2)
    >>> f(jnp.array([1])).tolist()
    [[-0.5, 0.5]]
    """
    if self.loss == "l1" and not self.can_train(label_kind):
      raise ValueError(
          f"the l1 loss regresses teacher logits (N, C), got {label_kind} labels; use a protocol "
          "with loss 'ce' (e.g. 'dsa' or 'mtt') for them"
      )
    if label_kind == "class_ids":
      if self.loss == "kd":
        raise ValueError(
            "the kd loss needs teacher logits or probabilities (N, C), got class ids; use a "
            "protocol with loss 'ce' (e.g. 'mtt' or 'standard') for hard labels"
        )
      shift = 1.0 / num_classes if self.loss == "mse" else 0.0
      return lambda y: jax.nn.one_hot(y, num_classes, dtype=jnp.float32) - shift
    if self.loss == "ce" and label_kind != "probabilities":
      return lambda y: jax.nn.softmax(y.astype(jnp.float32) / self.temperature, axis=-1)
    if self.loss == "kd" and label_kind == "probabilities":
      return lambda y: jnp.log(y.astype(jnp.float32))
    return lambda y: y.astype(jnp.float32)


