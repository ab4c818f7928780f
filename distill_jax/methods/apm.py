"""APM: dataset distillation via adversarial prediction matching (Chen et al., paper 003).

The images start as `ipc` real images per class (Algorithm 1 line 1) and are updated by SGD with
momentum 0.5 (lr gamma, x0.3 from iteration R/2 on; the released `optimizer_img`). Iteration `r`:

  1. a minibatch of B images (`randperm(N)[:B]`; B = N by default);
  2. every `refresh_every` iterations (the released `--mid_gap 2`: iterations 0, 3, 6, ...) a
     random teacher `m` of the pool and a fresh student: the student trains E epochs on the
     minibatch's un-augmented images against teacher m's logits of them (SGD momentum 0.9,
     wd 5e-4, x0.1 after E/2, batch 256, DSA, `F.l1_loss`; the shared `training.Trainer` step
     in a `lax.scan`), and its parameters after E/K, 2E/K, ..., E epochs are the K checkpoints;
     between refreshes the checkpoints are reused on the new minibatches;
  3. the image gradient of Eq. 4 over the K checkpoints, with gradients through the teacher's
     logits: `objectives.prediction_matching_loss` in the released code's scale by default
     (`-(1/C) mean_b sum_k sum_c |t - s_k| + alpha * mean_b CE`, i.e. the loss with the L1
     distance averaged over classes, `alpha = C * 0.1`, no log) or the paper's (`-log d`,
     `objective="paper"`). The minibatch splits into `segments` parts whose gradients
     accumulate in a `lax.scan` (Section 4.3's memory/time trade-off; each image's loss is its
     own, so the gradient is unchanged), and one SGD step moves the minibatch's images.

Deviations from the released loop, all off-by-ones of `range(n + 1)`: it runs R + 1 iterations,
trains each student E + 1 epochs with the x0.1 from epoch E/2 + 1 and keeps it after epochs
E/K + 1, ..., E + 1; here R iterations, E epochs (x0.1 from E/2, the shared trainer's "step"
schedule) and checkpoints after E/K, ..., E epochs, as Algorithm 1 states. K must divide E (the
released `arange(0, E, E // K)` keeps K + 1 checkpoints otherwise).

The final labels are one random teacher's logits of the final images (Algorithm 1 line 12). The
state (images, momentum, the K stacked checkpoints, the teacher index, the step and the key) is
one pytree, so a killed run resumes bit-identically. Evaluation: the `apm` protocol (L1 to the
stored logits); the random subset is evaluated beside it with hard labels and with the same
teacher's logits (`baselines`).
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from distill_jax import data as data_lib
from distill_jax import distilled as distilled_lib
from distill_jax import parallel
from distill_jax.methods import _pixels
from distill_jax.methods.base import DistillMethod, register_method
from distill_jax.objectives import prediction_matching_loss
from distill_jax.training import teachers as teachers_lib
from distill_jax.training.recipe import Recipe
from distill_jax.training.trainer import Trainer

Array = jax.Array
PyTree = Any

OBJECTIVES = ("released", "paper")
# `fold_in` tag of the key that picks the labelling teacher (Algorithm 1 line 12).
_LABEL_TAG = 1


@flax.struct.dataclass
class APMState:
  """An APM run's state (what the checkpoints hold).

  Attributes:
    x_syn: (N, H, W, ch) images, class-major (image i has class i // ipc).
    opt_state: the images' SGD momentum buffer.
    checkpoints: `(params, model_state)` of the current student after E/K, ..., E epochs, each
      leaf stacked on a leading axis of K.
    teacher: () int32, the pool index of the current teacher.
    step: () int32, iterations done.
    key: typed PRNG key of the next iteration.
  """

  x_syn: Array
  opt_state: Any
  checkpoints: Any
  teacher: Array
  step: Array
  key: Array


@register_method("apm")
class APM(DistillMethod):
  """APM (see the module docstring).

  Args:
    config: an APM config (`configs/apm.py`).
    data: the `RealData` to distil.
  """

  def __init__(self, config: ml_collections.ConfigDict, data):
    super().__init__(config, data)
    outer, inner = config.outer, config.inner
    _pixels.check_init(config.init)
    if outer.objective not in OBJECTIVES:
      raise ValueError(f"unknown config.outer.objective {outer.objective!r}; use one of "
                       f"{', '.join(OBJECTIVES)}")
    for name in ("num_steps", "inner.epochs", "inner.checkpoints", "inner.refresh_every",
                 "inner.batch_size", "outer.segments", "teachers.num_teachers"):
      _pixels.positive_int(config, name)
    _pixels.positive_int(config, "outer.batch_size", zero_means="the whole set")
    if inner.epochs % inner.checkpoints:
      raise ValueError(
          f"config.inner.checkpoints={inner.checkpoints} does not divide config.inner.epochs="
          f"{inner.epochs} (checkpoints at E/K, 2E/K, ..., E); choose a divisor of the epochs")
    self.num_images = config.ipc * data.num_classes
    self.batch_size = outer.batch_size or self.num_images
    if outer.batch_size > self.num_images:
      raise ValueError(
          f"config.outer.batch_size={outer.batch_size} exceeds the {self.num_images} synthetic "
          "images; set it to at most that, or 0 for the whole set")
    if self.batch_size % outer.segments:
      fits = max(d for d in range(1, outer.segments + 1) if self.batch_size % d == 0)
      raise ValueError(
          f"config.outer.segments={outer.segments} does not divide the minibatch of "
          f"{self.batch_size} images; set it to a divisor such as {fits}")
    self.spec = teachers_lib.teacher_spec(config, data)  # Validates the teacher recipe.
    self.model = self.spec.make_model()
    student_recipe = Recipe(
        model=config.teachers.model, model_kwargs=dict(config.teachers.model_kwargs),
        optimizer="sgd", lr=float(inner.lr), momentum=float(inner.momentum),
        weight_decay=float(inner.weight_decay), schedule="step", epochs=inner.epochs,
        batch_size=inner.batch_size, loss="l1", augmentation=inner.augmentation)
    self.trainer = Trainer(recipe=student_recipe, num_classes=data.num_classes,
                           num_train=self.batch_size, channels=data.image_shape[-1],
                           label_kind="logits")
    self.optimizer = optax.trace(decay=outer.momentum)  # torch.optim.SGD's momentum buffer.

  @functools.cached_property
  def pool(self) -> teachers_lib.TeacherPool:
    """The teachers (trained, or read from the cache, on first use)."""
    return teachers_lib.ensure_teachers(self.config, self.data)

  def prepare(self) -> None:
    _ = self.device_teachers  # Trains the teacher pool before step 1.

  @functools.cached_property
  def device_teachers(self) -> PyTree:
    """Every teacher's variables stacked on a leading axis, on the device."""
    return self.pool.stacked_variables()

  def inputs(self, step: int) -> PyTree:
    del step
    return self.device_teachers

  @functools.cached_property
  def labels(self) -> np.ndarray:
    """`(N,)` distilling class of every image (class-major)."""
    return _pixels.initial_labels(self.data.num_classes, self.config.ipc)

  def init(self, key: Array) -> APMState:
    init_key, run_key = jax.random.split(key)
    x = _pixels.initial_images(self.data, ipc=self.config.ipc, seed=self.config.seed,
                               init=self.config.init, key=init_key)
    student = jax.eval_shape(lambda: self.trainer.init(jax.random.key(0), x[:1]))
    checkpoints = jax.tree.map(
        lambda a: jnp.zeros((self.config.inner.checkpoints, *a.shape), a.dtype),
        (student.params, student.model_state))
    return APMState(x_syn=x, opt_state=self.optimizer.init(x), checkpoints=checkpoints,
                    teacher=jnp.zeros((), jnp.int32), step=jnp.zeros((), jnp.int32),
                    key=run_key)

  def train_student(self, key: Array, x_b: Array, targets: Array) -> PyTree:
    """Algorithm 1 lines 3-8: a fresh student trained E epochs on `(x_b, targets)` (B images and
    the teacher's `(B, C)` logits); returns its `(params, model_state)` after E/K, 2E/K, ..., E
    epochs, stacked on a leading axis of K."""
    trainer, inner = self.trainer, self.config.inner
    meta = self.data.set_meta("apm", max(1, self.batch_size // self.data.num_classes),
                              label_kind="logits")
    training_set = distilled_lib.PixelSet(x_b, targets, meta=meta)
    steps = inner.epochs // inner.checkpoints * trainer.steps_per_epoch
    lr = jnp.float32(inner.lr)

    def between_checkpoints(state, first_step):
      state, _ = jax.lax.scan(
          lambda s, t: trainer.step(s, t, training_set, lr), state,
          first_step + jnp.arange(steps))
      return state, (state.params, state.model_state)

    _, checkpoints = jax.lax.scan(between_checkpoints, trainer.init(key, x_b[:1]),
                                  steps * jnp.arange(inner.checkpoints))
    return checkpoints

  def student_logits(self, checkpoints: PyTree, x: Array) -> Array:
    """`(K, B, C)` inference-mode logits of the K checkpoints: vmapped on accelerators, a loop
    inside the program on CPU (vmapped convolutions become slow grouped ones there)."""
    def logits(variables):
      params, model_state = variables
      return self.model.apply({"params": params, **model_state}, x, train=False)

    if jax.default_backend() == "cpu":
      return jax.lax.map(logits, checkpoints)
    return jax.vmap(logits)(checkpoints)

  def loss(self, x: Array, y: Array, teacher: PyTree, checkpoints: PyTree
           ) -> tuple[Array, tuple[Array, Array]]:
    """Eq. 4 on b images `x` of classes `y`, as the mean over the b images.

    "released": `prediction_matching_loss(..., alpha=C * alpha, log_distance=False) / C` =
    `-(1/(b C)) sum_{k,i,c} |t_ic - s_kic| + alpha * mean_i CE_i`; "paper": the loss with the
    log and `alpha`. Returns `(loss, (mean |t - s|, mean CE))`.
    """
    t_logits = self.model.apply(teacher, x, train=False)
    s_logits = self.student_logits(checkpoints, x)
    alpha, num_classes = self.config.outer.alpha, self.data.num_classes
    if self.config.outer.objective == "released":
      loss = prediction_matching_loss(t_logits, s_logits, y, alpha=num_classes * alpha,
                                      log_distance=False) / num_classes
    else:
      loss = prediction_matching_loss(t_logits, s_logits, y, alpha=alpha, log_distance=True)
    distance = jnp.mean(jnp.abs(t_logits[None] - s_logits))
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(t_logits, y))
    return loss, (distance, ce)

  def minibatch_gradient(self, x_b: Array, y_b: Array, teacher: PyTree, checkpoints: PyTree
                         ) -> tuple[Array, dict[str, Array]]:
    """The gradient of the minibatch's mean loss w.r.t. its B images, accumulated over
    `segments` parts of B / segments images (one part's activations live at a time).

    Returns `((B, H, W, ch) gradient, {loss, distance, ce} means over the minibatch)`.
    """
    segments = self.config.outer.segments
    parts = (x_b.reshape(segments, -1, *x_b.shape[1:]), y_b.reshape(segments, -1))

    def part(_, xy):
      (loss, (distance, ce)), grad = jax.value_and_grad(self.loss, has_aux=True)(
          xy[0], xy[1], teacher, checkpoints)
      return None, (grad / segments, jnp.stack([loss, distance, ce]) / segments)

    _, (grads, values) = jax.lax.scan(part, None, parts)
    loss, distance, ce = jnp.sum(values, axis=0)
    return grads.reshape(x_b.shape), {"loss": loss, "distance": distance, "ce": ce}

  def step(self, state: APMState, teachers: PyTree) -> tuple[APMState, dict[str, Array]]:
    config = self.config
    key, batch_key, teacher_key, student_key = jax.random.split(state.key, 4)
    indices = jax.random.permutation(batch_key, self.num_images)[:self.batch_size]
    x_b, y_b = parallel.constrain_leading(  # On a mesh: the minibatch over `data`.
        (state.x_syn[indices], jnp.asarray(self.labels)[indices]), "data")
    pick = lambda m: jax.tree.map(lambda a: a[m], teachers)  # noqa: E731

    def refresh(_):
      m = jax.random.randint(teacher_key, (), 0, config.teachers.num_teachers)
      x_fixed = jax.lax.stop_gradient(x_b)
      targets = self.model.apply(pick(m), x_fixed, train=False)
      return m, self.train_student(student_key, x_fixed, targets)

    teacher, checkpoints = jax.lax.cond(
        state.step % config.inner.refresh_every == 0, refresh,
        lambda _: (state.teacher, state.checkpoints), None)
    grad_b, metrics = self.minibatch_gradient(x_b, y_b, pick(teacher), checkpoints)
    grad = jnp.zeros_like(state.x_syn).at[indices].set(grad_b)
    direction, opt_state = self.optimizer.update(grad, state.opt_state)
    lr = config.outer.lr * jnp.where(state.step >= config.num_steps // 2, config.outer.lr_decay,
                                     1.0)
    new_state = APMState(x_syn=state.x_syn - lr * direction, opt_state=opt_state,
                         checkpoints=checkpoints, teacher=teacher, step=state.step + 1, key=key)
    return new_state, {**metrics, "lr": lr, "teacher": teacher}

  @functools.cached_property
  def label_teacher(self) -> int:
    """The pool index whose logits label the final images (drawn from the seed)."""
    key = jax.random.fold_in(jax.random.key(self.config.seed), _LABEL_TAG)
    return int(jax.random.randint(key, (), 0, self.config.teachers.num_teachers))

  def teacher_labelled(self, x: Any, method: str) -> distilled_lib.PixelSet:
    """Images labelled with the labelling teacher's logits."""
    logits = self.pool.logits(self.label_teacher, x)
    return distilled_lib.PixelSet(np.asarray(x, np.float32), np.asarray(logits, np.float32),
                                  meta=self.data.set_meta(method, self.config.ipc,
                                                          label_kind="logits"))

  def result(self, state: APMState) -> distilled_lib.PixelSet:
    return self.teacher_labelled(np.asarray(state.x_syn), "apm")

  def baselines(self) -> dict[str, Any]:
    """The random subset labelled with the same teacher's logits (the soft-label gain apart
    from the image gain)."""
    x, _ = data_lib.random_subset(self.data.x_train, self.data.y_train, ipc=self.config.ipc,
                                  num_classes=self.data.num_classes, seed=self.config.seed)
    return {"random_teacher_labels": self.teacher_labelled(x, "random")}

  def report_extras(self, distilled_set, workdir) -> dict[str, Any]:
    del distilled_set, workdir
    return {"teachers": {**self.pool.summary(), "label_teacher": self.label_teacher}}

  def divergence_hint(self) -> str:
    return f"lower outer.lr (now {self.config.outer.lr})"
