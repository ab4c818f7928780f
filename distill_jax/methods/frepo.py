"""FRePo: dataset distillation with neural feature regression and a model pool.

Zhou, Nezhadarya and Ba, "Dataset Distillation using Neural Feature Regression", NeurIPS 2022
(paper 004). Every outer step (Algorithm 1 and Appendix A.1, released code
`lib/datadistillation/frepo.py`):

  1. choose a member of the model pool uniformly at random;
  2. sample a batch of real images;
  3. regress the real labels on the distilled set with kernel ridge regression on the member's
     features (the conjugate kernel, Eq. 2-3), plus the label margin regulariser;
  4. update the distilled images and labels with LAMB on that loss;
  5. train the member one step on the distilled set (Adam, MSE), or re-initialise it after K
     updates.

Version "v2" (the paper's default and the released code) does 3-4 before 5; "v1" does 5 first
(Algorithm 2). One jitted `FRePo.step` does all of this from an explicit PRNG key; the whole
state (set, optimiser state, pool, step, key) is one pytree that `distill` checkpoints with
Orbax, so a killed run resumes to exactly the result of an uninterrupted one.
"""

import collections
import dataclasses
import functools
import math
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from distill_jax import data as data_lib
from distill_jax import distilled as distilled_lib
from distill_jax import io as io_lib
from distill_jax.methods.base import (  # DivergenceError: re-exported for callers.
    METHODS, DivergenceError, Method, RealData, finite_host_metrics,
)
from distill_jax.models import get_model
from distill_jax.objectives import krr_predict, label_margin_loss, mse_loss
from distill_jax.training.model_pool import MemberState, ModelPool

Array = jax.Array

INITS = ("real", "noise", "real_noise")
ORDERS = ("v1", "v2")
OUTER_OPTIMIZERS = ("lamb", "adam")


# ----------------------------------------------------------------------------------------------
# Labels and initialisation.


def centered_one_hot(labels: Array, num_classes: int) -> Array:
  """FRePo's regression targets for real data: `one_hot(labels) - 1/C`.

  The released script/distill.py `y_transform` (on_value 1 - 1/C, off_value -1/C); the real
  targets are not rescaled.

  Args:
    labels: (N,) int class ids.
    num_classes: C.

  Returns:
    (N, C) float32.

  >>> centered_one_hot(jnp.array([1]), 4).tolist()
  [[-0.25, 0.75, -0.25, -0.25]]
  """
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) - 1.0 / num_classes


def initial_labels(labels: Array, num_classes: int) -> Array:
  """FRePo's initial distilled labels: `(one_hot - 1/C) / sqrt(C / 10)`.

  Paper A.1 "Initialization" (mean-centred one-hot scaled by `1 / sqrt(C/10)`), released
  `init_proto(scale_y=True)`.

  Args:
    labels: (N,) int class ids.
    num_classes: C.

  Returns:
    (N, C) float32.

  >>> [round(v, 4) for v in initial_labels(jnp.array([0]), 40)[0, :2].tolist()]
  [0.4875, -0.0125]
  """
  return centered_one_hot(labels, num_classes) / math.sqrt(num_classes / 10.0)


def initial_images(key: Array, x_real: Array, *, init: str, noise_std: float) -> Array:
  """The initial distilled images (paper A.1 "Initialization" and C.3).

  Args:
    key: PRNG key of the noise.
    x_real: (N, H, W, C) preprocessed real images, `ipc` per class.
    init: "real" (the images themselves, the default), "noise" (`noise_std * N(0, 1)`) or
      "real_noise" (`x_real + noise_std * N(0, 1)`).
    noise_std: standard deviation of the noise, in preprocessed units.

  Returns:
    (N, H, W, C) float32.
  """
  if init not in INITS:
    raise ValueError(f"unknown init {init!r}; use one of {', '.join(INITS)}")
  x_real = jnp.asarray(x_real, jnp.float32)
  if init == "real":
    return x_real
  noise = noise_std * jax.random.normal(key, x_real.shape, jnp.float32)
  return noise if init == "noise" else x_real + noise


# ----------------------------------------------------------------------------------------------
# The meta-loss.


def frepo_loss(
    x_syn: Array,
    y_syn: Array,
    feat_real: Array,
    y_real: Array,
    feature_fn,
    *,
    kernel_reg: float,
    use_flip: bool,
    learn_label: bool = True,
    label_margin_weight: float = 1.0,
) -> tuple[Array, dict[str, Array]]:
  """FRePo's meta-training loss: Eq. 2 on the real batch plus the label margin regulariser.

  `0.5 * mean_i sum_c (y_real - K_ts (K_ss + lam I)^-1 Y_s)^2 + w * mean_j -min(margin_j, 1/C)`
  with the conjugate kernel of `feature_fn` (Eq. 3) and `lam = kernel_reg * tr(K_ss) / n_s`
  (released `nfr`; see `distill_jax.objectives.krr_predict`). With `use_flip` the support set
  is the distilled images and their horizontal mirror images with the same labels (paper A.1;
  released `proto_train_step`); the margin term sees each label once.

  Args:
    x_syn: (N, H, W, C) distilled images.
    y_syn: (N, C) distilled labels.
    feat_real: (B, D) features of the real batch (treated as constants by the caller).
    y_real: (B, C) real targets, `centered_one_hot`.
    feature_fn: `(M, H, W, C) -> (M, D)`, the pool member's feature map.
    kernel_reg: relative ridge lambda_0.
    use_flip: add the mirrored images to the support set.
    learn_label: when False the labels get no gradient (paper A.1 "Label Learning").
    label_margin_weight: weight w of the margin term (1 in the released code).

  Returns:
    `(loss, aux)`: the scalar loss and a dict with "kernel_loss", "label_loss" and "accuracy"
    (KRR accuracy on the real batch) scalars.
  """
  if not learn_label:
    y_syn = jax.lax.stop_gradient(y_syn)
  label_loss = label_margin_loss(y_syn)
  x_support, y_support = x_syn, y_syn
  if use_flip:
    x_support = jnp.concatenate([x_syn, jnp.flip(x_syn, axis=2)], axis=0)
    y_support = jnp.concatenate([y_syn, y_syn], axis=0)
  pred = krr_predict(feat_real, feature_fn(x_support), y_support, reg=kernel_reg)
  kernel_loss = mse_loss(pred, y_real)
  accuracy = jnp.mean(jnp.argmax(pred, -1) == jnp.argmax(y_real, -1))
  loss = kernel_loss + label_margin_weight * label_loss
  return loss, {"kernel_loss": kernel_loss, "label_loss": label_loss, "accuracy": accuracy}


# ----------------------------------------------------------------------------------------------
# The state and the jitted step.


@flax.struct.dataclass
class FRePoState:
  """Everything a FRePo run needs to continue, as one pytree (what the checkpoints hold).

  Attributes:
    x_syn: (N, H, W, C) distilled images, preprocessed space.
    y_syn: (N, C) distilled (learned) labels.
    outer_opt_state: optimiser state of `{"x": x_syn, "y": y_syn}`.
    pool: the model pool, a `MemberState` with a leading `(pool_size,)` axis.
    step: int32 scalar, outer steps done.
    key: typed PRNG key of the next step.
  """

  x_syn: Array
  y_syn: Array
  outer_opt_state: Any
  pool: MemberState
  step: Array
  key: Array


def _check_config(config: ml_collections.ConfigDict) -> None:
  """One-line errors for FRePo config values that cannot work."""
  if config.order not in ORDERS:
    raise ValueError(f"unknown order {config.order!r}; use one of {', '.join(ORDERS)}")
  if config.outer_optimizer not in OUTER_OPTIMIZERS:
    raise ValueError(
        f"unknown outer_optimizer {config.outer_optimizer!r}; use one of "
        f"{', '.join(OUTER_OPTIMIZERS)}"
    )
  if config.init not in INITS:
    raise ValueError(f"unknown init {config.init!r}; use one of {', '.join(INITS)}")
  for name in ("num_steps", "real_batch_size", "pool_size", "online_batch_size", "log_every",
               "checkpoint_every"):
    value = config[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"config.{name} must be a positive int, got {value!r}")
  for name in ("outer_lr", "online_lr"):
    if not config[name] > 0:
      raise ValueError(f"config.{name} must be positive, got {config[name]!r}")
  if not 0 <= config.outer_final_lr_fraction <= 1:
    raise ValueError(
        f"config.outer_final_lr_fraction must be in [0, 1], got {config.outer_final_lr_fraction!r}"
    )
  if config.kernel_reg < 0:
    raise ValueError(f"config.kernel_reg must be >= 0, got {config.kernel_reg!r}")


def pool_model(config: ml_collections.ConfigDict, num_classes: int, *, norm: str | None = None):
  """The pool's network: FRePo's ConvNet (widths doubling per block, Flax default init).

  Args:
    config: a FRePo config (model, width, depth, norm, bn_momentum).
    num_classes: C.
    norm: overrides `config.norm` (the KRR evaluation uses the evaluation norm).

  Returns:
    a Flax module.
  """
  return get_model(
      config.model,
      num_classes=num_classes,
      width=config.width,
      depth=config.depth,
      norm=config.norm if norm is None else norm,
      width_doubling=True,
      norm_position="before_conv",  # released lib/models/networks.py `Conv`.
      init_scheme="flax",  # paper A.1 "Models": Lecun initialisation, Flax's default.
      bn_momentum=config.bn_momentum,
  )


class FRePo:
  """FRePo's pure pieces for one config and dataset shape: state initialisation and the step.

  `step` and `init` are `jax.jit`-compiled with the instance as a static argument; instances
  with equal configs and shapes are equal, so they share compiled programs. `step` donates the
  state it is given. `num_traces` counts how often the step's Python body ran for this config
  and shape in this process (1 after any number of steps means no retracing).

  Args:
    config: a FRePo config (`configs/frepo.py`).
    num_classes: C.
    image_shape: (H, W, channels).
  """

  def __init__(
      self, config: ml_collections.ConfigDict, *, num_classes: int, image_shape: tuple[int, ...]
  ):
    _check_config(config)
    self.config = config
    self.num_classes = int(num_classes)
    self.image_shape = tuple(int(d) for d in image_shape)
    self.pool = ModelPool(
        pool_model(config, self.num_classes),
        input_shape=self.image_shape,
        num_models=config.pool_size,
        max_online_updates=config.max_online_updates,
        optimizer=optax.adam(config.online_lr),
        loss_fn=mse_loss,
    )
    self.learning_rate = optax.cosine_decay_schedule(
        config.outer_lr, decay_steps=config.num_steps, alpha=config.outer_final_lr_fraction
    )
    make_tx = {"lamb": optax.lamb, "adam": optax.adam}[config.outer_optimizer]
    self.outer_tx = make_tx(learning_rate=self.learning_rate)
    # Everything the traced programs depend on: equal signatures share compiled programs.
    self._signature = (config.to_json(sort_keys=True), self.num_classes, self.image_shape)
    # The initial state depends on fewer fields, so e.g. `order` or `learn_label` changes
    # reuse the compiled initialisation.
    self._initializer = _Initializer(
        signature=(
            tuple((name, config[name]) for name in _INIT_FIELDS),
            self.num_classes,
            self.image_shape,
        ),
        pool=self.pool,
        outer_tx=self.outer_tx,
    )

  def __hash__(self) -> int:
    return hash(self._signature)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, FRePo) and self._signature == other._signature

  @property
  def num_traces(self) -> int:
    """How often the step was traced for this config and shape in this process."""
    return _STEP_TRACES[self._signature]

  def step(
      self, state: FRePoState, x_train: Array, y_train: Array
  ) -> tuple[FRePoState, dict[str, Array]]:
    """One jitted outer step (donates `state`); see `_step`."""
    return _jitted_step(self, state, x_train, y_train)

  def init(self, key: Array, x_syn: Array, y_syn: Array) -> FRePoState:
    """The state before the first step (jit-compiled).

    Args:
      key: the run's PRNG key (the pool and every later step derive from it).
      x_syn: (N, H, W, C) initial images (`initial_images`).
      y_syn: (N, C) initial labels (`initial_labels`).

    Returns:
      a `FRePoState` at step 0.
    """
    x_syn = jnp.asarray(x_syn, jnp.float32)
    y_syn = jnp.asarray(y_syn, jnp.float32)
    if x_syn.shape[1:] != self.image_shape or y_syn.shape != (x_syn.shape[0], self.num_classes):
      raise ValueError(
          f"initial set shapes x {x_syn.shape}, y {y_syn.shape} do not match images "
          f"{self.image_shape} and {self.num_classes} classes; build them from the same dataset"
      )
    return _jitted_init(self._initializer, key, x_syn, y_syn)

  def initial_state(self, key: Array, x_real: Array, y_real: Array) -> FRePoState:
    """The step-0 state from `ipc` real images per class (paper A.1 "Initialization").

    Images follow `config.init` (noise from `key`), labels are `initial_labels`.

    Args:
      key: the run's PRNG key.
      x_real: (N, H, W, C) preprocessed real images, e.g. `ipc` per class.
      y_real: (N,) their int class ids.

    Returns:
      a `FRePoState` at step 0.
    """
    x_real = jnp.asarray(x_real, jnp.float32)
    y_real = jnp.asarray(y_real)
    if x_real.shape[1:] != self.image_shape or y_real.shape != x_real.shape[:1]:
      raise ValueError(
          f"real images {x_real.shape} and labels {y_real.shape} do not match images "
          f"{self.image_shape}; pass (N, H, W, C) images and (N,) labels of the same dataset"
      )
    return _jitted_initial_state(self._initializer, key, x_real, y_real)

  def _online_update(self, member, x_syn, y_syn, batch_key, reset_key):
    """Algorithm 1 lines 6-7 on (a subsample of) the current distilled set."""
    n_syn = x_syn.shape[0]
    if n_syn > self.config.online_batch_size:
      index = jax.random.choice(batch_key, n_syn, (self.config.online_batch_size,), replace=False)
      x_syn, y_syn = x_syn[index], y_syn[index]
    return self.pool.online_update(member, x_syn, y_syn, reset_key)

  def _step(
      self, state: FRePoState, x_train: Array, y_train: Array
  ) -> tuple[FRePoState, dict[str, Array]]:
    """One outer step of FRePo (Algorithm 1 / 2); see the module docstring.

    Args:
      state: the current state (donated).
      x_train: (N_train, H, W, C) preprocessed real images.
      y_train: (N_train,) int class ids.

    Returns:
      the next state and a dict of scalar metrics.
    """
    _STEP_TRACES[self._signature] += 1
    config = self.config
    key, member_key, real_key, online_key, reset_key = jax.random.split(state.key, 5)
    index = jax.random.randint(member_key, (), 0, config.pool_size)
    member = self.pool.member(state.pool, index)
    online_loss = was_reset = None
    if config.order == "v1":
      member, online_loss, was_reset = self._online_update(
          member, state.x_syn, state.y_syn, online_key, reset_key
      )

    # Real batch drawn uniformly (with replacement) inside the program: no host-side sampling.
    real_index = jax.random.randint(real_key, (config.real_batch_size,), 0, x_train.shape[0])
    y_real = centered_one_hot(y_train[real_index], self.num_classes)
    feat_real = jax.lax.stop_gradient(self.pool.features(member, x_train[real_index]))

    def loss_of(syn):
      return frepo_loss(
          syn["x"],
          syn["y"],
          feat_real,
          y_real,
          lambda x: self.pool.features(member, x),
          kernel_reg=config.kernel_reg,
          use_flip=config.use_flip,
          learn_label=config.learn_label,
          label_margin_weight=config.label_margin_weight,
      )

    syn = {"x": state.x_syn, "y": state.y_syn}
    (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(syn)
    updates, outer_opt_state = self.outer_tx.update(grads, state.outer_opt_state, syn)
    syn = optax.apply_updates(syn, updates)

    if config.order == "v2":
      member, online_loss, was_reset = self._online_update(
          member, syn["x"], syn["y"], online_key, reset_key
      )

    new_state = FRePoState(
        x_syn=syn["x"],
        y_syn=syn["y"],
        outer_opt_state=outer_opt_state,
        pool=self.pool.set_member(state.pool, index, member),
        step=state.step + 1,
        key=key,
    )
    top2 = jax.lax.top_k(syn["y"], 2)[0]
    metrics = {
        "loss": loss,
        **aux,
        "online_loss": online_loss,
        "reset": was_reset.astype(jnp.float32),
        "member": index.astype(jnp.float32),
        "outer_lr": jnp.asarray(self.learning_rate(state.step), jnp.float32),
        "grad_norm_x": jnp.linalg.norm(grads["x"]),
        "grad_norm_y": jnp.linalg.norm(grads["y"]),
        "x_norm": jnp.mean(jnp.linalg.norm(syn["x"].reshape(syn["x"].shape[0], -1), axis=-1)),
        "y_margin": jnp.mean(top2[:, 0] - top2[:, 1]),
    }
    return new_state, metrics


# The config fields the initial state depends on (see `FRePo._initializer`).
_INIT_FIELDS = (
    "model", "width", "depth", "norm", "bn_momentum", "pool_size", "max_online_updates",
    "online_lr", "outer_optimizer", "init", "init_noise_std",
)


@dataclasses.dataclass(frozen=True)
class _Initializer:
  """What FRePo's initial state depends on; equal signatures share the compiled program."""

  signature: tuple
  pool: ModelPool = dataclasses.field(compare=False)
  outer_tx: optax.GradientTransformation = dataclasses.field(compare=False)

  @property
  def num_classes(self) -> int:
    return self.signature[1]

  def config_value(self, name: str) -> Any:
    return dict(self.signature[0])[name]


@functools.partial(jax.jit, static_argnums=0)
def _jitted_init(initializer: _Initializer, key: Array, x_syn: Array, y_syn: Array) -> FRePoState:
  pool_key, step_key = jax.random.split(key)
  return FRePoState(
      x_syn=x_syn,
      y_syn=y_syn,
      outer_opt_state=initializer.outer_tx.init({"x": x_syn, "y": y_syn}),
      pool=initializer.pool.init(pool_key),
      step=jnp.zeros((), jnp.int32),
      key=step_key,
  )


@functools.partial(jax.jit, static_argnums=0)
def _jitted_initial_state(
    initializer: _Initializer, key: Array, x_real: Array, y_real: Array
) -> FRePoState:
  init_key, run_key = jax.random.split(key)
  x_syn = initial_images(
      init_key,
      x_real,
      init=initializer.config_value("init"),
      noise_std=initializer.config_value("init_noise_std"),
  )
  y_syn = initial_labels(y_real, initializer.num_classes)
  return _jitted_init(initializer, run_key, x_syn, y_syn)


_STEP_TRACES: collections.Counter = collections.Counter()
_jitted_step = jax.jit(FRePo._step, static_argnums=0, donate_argnums=1)


# ----------------------------------------------------------------------------------------------
# The distillation loop.


def _start_state(frepo: FRePo, config: ml_collections.ConfigDict, data: RealData) -> FRePoState:
  """The step-0 state of a run: `ipc` real images per class drawn with `config.seed`."""
  x_real, y_real = data_lib.random_subset(
      data.x_train, data.y_train, ipc=config.ipc, num_classes=data.num_classes, seed=config.seed
  )
  return frepo.initial_state(jax.random.key(config.seed), x_real, y_real)


def _divergence_message(step: int, metrics: dict[str, float], config) -> str:
  return (
      f"FRePo's loss became non-finite at step {step} (loss={metrics['loss']}, "
      f"kernel_loss={metrics['kernel_loss']}, label_loss={metrics['label_loss']}); lower "
      f"outer_lr (now {config.outer_lr}) or online_lr (now {config.online_lr}), or raise "
      f"kernel_reg (now {config.kernel_reg}); the last checkpoint holds the last finite state"
  )


def distill(
    config: ml_collections.ConfigDict, data: RealData, workdir: io_lib.Workdir
) -> distilled_lib.PixelSet:
  """Runs FRePo on `data` and returns the distilled set (learned labels, `(N, C)` floats).

  Resumes from the latest checkpoint in `workdir.checkpoint_dir` when there is one; checkpoints
  every `config.checkpoint_every` steps and at the end; logs metrics every `config.log_every`
  steps to `workdir`'s metric files and the progress to the log.

  Raises:
    DivergenceError: when the loss becomes NaN or infinite (the message names the fix).
  """
  frepo = FRePo(config, num_classes=data.num_classes, image_shape=data.image_shape)
  x_train = jnp.asarray(data.x_train, jnp.float32)
  y_train = jnp.asarray(data.y_train, jnp.int32)
  state = _start_state(frepo, config, data)
  checkpointer = io_lib.Checkpointer(workdir.checkpoint_dir)
  latest = checkpointer.latest_step()
  if latest is not None:
    if latest > config.num_steps:
      raise ValueError(
          f"{workdir.checkpoint_dir} holds step {latest}, beyond num_steps={config.num_steps}; "
          "use a fresh workdir or the num_steps of that run"
      )
    state = checkpointer.restore(latest, state)
    logging.info("FRePo: resumed from the checkpoint at step %d.", latest)
  start = int(state.step)

  writer = io_lib.MetricWriter(workdir)
  writer.truncate(start)  # Drop what a killed run logged after its last checkpoint.
  progress = io_lib.ProgressLogger(config.num_steps, every=config.log_every, start_step=start)
  try:
    state = _run_steps(frepo, state, x_train, y_train, config, writer, progress, checkpointer)
  finally:
    writer.close()
    checkpointer.close()
  logging.info("FRePo: the step was traced %d time(s).", frepo.num_traces)
  return distilled_lib.PixelSet(
      x=np.asarray(state.x_syn),
      y=np.asarray(state.y_syn),
      meta=data.set_meta("frepo", config.ipc),
  )


def _run_steps(frepo, state, x_train, y_train, config, writer, progress, checkpointer):
  """Steps from `state.step` to `config.num_steps`: log, check for NaN, checkpoint."""
  pending = None  # (step, metrics) of the step before the one in flight.
  for step in range(int(state.step) + 1, config.num_steps + 1):
    state, metrics = frepo.step(state, x_train, y_train)
    # Checking the previous step keeps one step in flight while the host waits.
    if pending is not None:
      _check_finite(*pending, config)
    pending = (step, metrics)
    is_last = step == config.num_steps
    if step % config.log_every == 0 or is_last:
      # step_traces stays 1 unless something forces a recompilation (a bug worth seeing).
      writer.write(step, **_check_finite(step, metrics, config), step_traces=frepo.num_traces)
    progress.log(step, loss=metrics["loss"], krr_accuracy=metrics["accuracy"])
    if step % config.checkpoint_every == 0 or is_last:
      _check_finite(step, metrics, config)  # Never checkpoint a diverged state.
      checkpointer.save(step, state)
      # The next step donates (overwrites) these buffers: the save must have read them first.
      checkpointer.wait()
  if pending is not None:
    _check_finite(*pending, config)
  return state


def _check_finite(step: int, metrics: dict[str, Array], config) -> dict[str, float]:
  return finite_host_metrics(metrics, ("loss", "kernel_loss", "label_loss"),
                             lambda host: _divergence_message(step, host, config))


# ----------------------------------------------------------------------------------------------
# KRR evaluation and report extras.


def krr_accuracy(
    x_support: Array,
    y_support: Array,
    x_test: Array,
    y_test: Array,
    model,
    variables: dict[str, Any],
    *,
    kernel_reg: float,
    use_flip: bool,
    chunk_size: int = 1000,
) -> float:
  """Test accuracy of the KRR predictor with `(x_support, y_support)` as support set.

  Predicts `K_ts (K_ss + lam I)^-1 Y_s` (FRePo Eq. 2) with the features (the input of the final
  Dense layer, inference mode) of `model` with `variables`; with `use_flip` the support set also
  holds the mirrored images (released `eval_on_proto_krr`).

  Args:
    x_support: (N, H, W, C) support images.
    y_support: (N, C) float support labels, or (N,) int ids (then `centered_one_hot`).
    x_test: (M, H, W, C) test images.
    y_test: (M,) int test labels.
    model: a Flax module of the `distill_jax.models` convention (with `num_classes`).
    variables: its variables.
    kernel_reg: relative ridge lambda_0.
    use_flip: add the mirrored support images.
    chunk_size: test images per forward pass (does not change the result).

  Returns:
    accuracy in [0, 1] (fraction of test images whose argmax prediction is their label).
  """
  y_support = jnp.asarray(y_support)
  if y_support.ndim == 1:
    y_support = centered_one_hot(y_support, model.num_classes)
  x_test = np.asarray(x_test, np.float32)
  y_test = np.asarray(y_test, np.int32)
  chunk_size = min(chunk_size, x_test.shape[0])
  # Pad the test set to whole chunks; padded rows get label -1, which no prediction matches.
  pad = -x_test.shape[0] % chunk_size
  x_test = np.concatenate([x_test, np.zeros((pad, *x_test.shape[1:]), np.float32)])
  y_test = np.concatenate([y_test, np.full((pad,), -1, np.int32)])
  correct = _krr_num_correct(
      model,
      variables,
      jnp.asarray(x_support, jnp.float32),
      y_support.astype(jnp.float32),
      x_test.reshape(-1, chunk_size, *x_test.shape[1:]),
      y_test.reshape(-1, chunk_size),
      kernel_reg=kernel_reg,
      use_flip=use_flip,
  )
  return int(correct) / (x_test.shape[0] - pad)


@functools.partial(jax.jit, static_argnames=("model", "use_flip"))
def _krr_num_correct(model, variables, x_support, y_support, x_chunks, y_chunks, *, kernel_reg,
                     use_flip):
  """Number of test images (chunked `(K, chunk, H, W, C)`) the KRR predictor gets right."""

  def features(x):
    return model.apply(variables, x, train=False, return_features=True)[1]["penultimate"]

  if use_flip:
    x_support = jnp.concatenate([x_support, jnp.flip(x_support, axis=2)], axis=0)
    y_support = jnp.concatenate([y_support, y_support], axis=0)
  feat_support = features(x_support)

  def chunk_correct(chunk):
    x_chunk, y_chunk = chunk
    pred = krr_predict(features(x_chunk), feat_support, y_support, reg=kernel_reg)
    return jnp.sum(jnp.argmax(pred, -1) == y_chunk)

  return jnp.sum(jax.lax.map(chunk_correct, (x_chunks, y_chunks)))


def _eval_pool(model, lr: float, image_shape: tuple[int, ...]) -> ModelPool:
  return ModelPool(
      model, input_shape=image_shape, num_models=1, optimizer=optax.adam(lr), loss_fn=mse_loss
  )


@functools.partial(jax.jit, static_argnames=("model", "lr", "batch_size", "augment"),
                   donate_argnums=0)
def _eval_train_step(member, key, x_syn, y_syn, *, model, lr, batch_size, augment):
  """One Adam step (MSE) of a KRR-evaluation network on a batch of the distilled set."""
  pool = _eval_pool(model, lr, tuple(x_syn.shape[1:]))
  index_key, aug_key = jax.random.split(key)
  index = jax.random.choice(index_key, x_syn.shape[0], (batch_size,), replace=False)
  x_batch = x_syn[index]
  if augment:
    x_batch = data_lib.frepo_augment(aug_key, x_batch)
  return pool.train_step(member, x_batch, y_syn[index])[0]


@functools.partial(jax.jit, static_argnames=("model", "lr", "image_shape"))
def _eval_init(key, *, model, lr, image_shape):
  return _eval_pool(model, lr, image_shape).init_member(key)


def _train_on_set(key, x_syn, y_syn, *, model, lr, steps, batch_size, augment):
  """A fresh network trained `steps` Adam steps (MSE) on `(x_syn, y_syn)`; returns its variables.

  A Python loop over a jitted step rather than `lax.scan`: XLA:CPU runs the convolutions of a
  backward pass inside a loop body about 30x slower (jax-ml/jax#12868).
  """
  pool = _eval_pool(model, lr, tuple(x_syn.shape[1:]))
  init_key, batch_key = jax.random.split(key)
  member = _eval_init(init_key, model=model, lr=lr, image_shape=tuple(x_syn.shape[1:]))
  for step_key in jax.random.split(batch_key, steps):
    member = _eval_train_step(
        member, step_key, x_syn, y_syn, model=model, lr=lr, batch_size=batch_size,
        augment=augment,
    )
  return pool.variables(member)


def krr_evaluation(
    config: ml_collections.ConfigDict,
    x_syn: Array,
    y_syn: Array,
    x_test: Array,
    y_test: Array,
    *,
    num_classes: int,
    seed: int,
) -> dict[str, Any]:
  """FRePo's KRR test accuracy of a distilled set, over `config.krr_eval.num_models` networks.

  Each network (FRePo's ConvNet with `config.krr_eval.norm`) starts from a fresh initialisation
  (keys from `seed`), trains `config.krr_eval.train_steps` Adam steps (lr `config.online_lr`,
  MSE on `y_syn`, batches of `min(N, krr_eval.batch_size)` drawn without replacement, FRePo's
  augmentation when `krr_eval.augment`) on the distilled set, and predicts the test set with
  KRR on its features and the distilled set as support (`krr_accuracy`).

  Returns:
    `{"mean", "std", "n", "accuracies", "train_steps", "norm"}` (accuracies in [0, 1]).
  """
  settings = config.krr_eval
  model = pool_model(config, num_classes, norm=settings.norm)
  x_syn = jnp.asarray(x_syn, jnp.float32)
  y_syn = jnp.asarray(y_syn)
  if y_syn.ndim == 1:
    y_syn = centered_one_hot(y_syn.astype(jnp.int32), num_classes)
  y_syn = y_syn.astype(jnp.float32)
  train = functools.partial(
      _train_on_set,
      model=model,
      lr=float(config.online_lr),
      steps=int(settings.train_steps),
      batch_size=min(x_syn.shape[0], settings.batch_size),
      augment=bool(settings.augment),
  )
  accuracies = [
      krr_accuracy(
          x_syn, y_syn, x_test, y_test, model, train(key, x_syn, y_syn),
          kernel_reg=config.kernel_reg, use_flip=config.use_flip,
      )
      for key in jax.random.split(jax.random.key(seed), settings.num_models)
  ]
  return {
      "mean": float(np.mean(accuracies)),
      "std": float(np.std(accuracies)),
      "n": len(accuracies),
      "accuracies": [float(a) for a in accuracies],
      "train_steps": int(settings.train_steps),
      "norm": settings.norm,
      "augment": bool(settings.augment),
  }


def report_extras(
    config: ml_collections.ConfigDict,
    data: RealData,
    distilled_set: distilled_lib.PixelSet,
    workdir: io_lib.Workdir,
) -> dict[str, Any]:
  """FRePo's additions to report.json: the KRR test accuracy, and a heatmap of the labels.

  Writes `images/labels.png` (the learned labels, rows = distilled images, columns = classes).

  Returns:
    `{"krr_accuracy": krr_evaluation(...)}`.
  """
  labels = np.asarray(distilled_set.y, np.float32)
  if labels.ndim == 2:
    io_lib.save_heatmap(
        os.path.join(workdir.images_dir, "labels.png"),
        labels,
        xlabel="class",
        ylabel="distilled image",
        title="FRePo learned labels",
    )
  result = krr_evaluation(
      config,
      distilled_set.x,
      distilled_set.y,
      data.x_test,
      data.y_test,
      num_classes=data.num_classes,
      seed=config.seed,
  )
  logging.info(
      "FRePo KRR test accuracy: %.2f%% +- %.2f over %d networks",
      100 * result["mean"], 100 * result["std"], result["n"],
  )
  return {"krr_accuracy": result}


METHODS.register("frepo", Method("frepo", distill=distill, report_extras=report_extras))
