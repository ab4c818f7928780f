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
(Algorithm 2). `FRePo.step` does all of this in one jitted program from an explicit PRNG key; the
state (set, optimiser state, pool, step, key) is one pytree that the run loop checkpoints, so a
killed run resumes to exactly the result of an uninterrupted one.
"""

import math
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from distill_jax import data as data_lib
from distill_jax import distilled as distilled_lib
from distill_jax import evaluation
from distill_jax import io as io_lib
from distill_jax import parallel
from distill_jax.methods.base import DistillMethod, register_method
from distill_jax.models import get_model
from distill_jax.objectives import krr_predict, label_margin_loss, mse_loss
from distill_jax.training import Recipe
from distill_jax.training.model_pool import MemberState, ModelPool

Array = jax.Array

INITS = ("real", "noise", "real_noise")
ORDERS = ("v1", "v2")


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
    kernel_reg_floor: float = 1.0,
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
    kernel_reg_floor: `krr_predict`'s `reg_floor` (the ridge floor in units of `n_s * eps`).
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
  pred = krr_predict(feat_real, feature_fn(x_support), y_support, reg=kernel_reg,
                     reg_floor=kernel_reg_floor)
  kernel_loss = mse_loss(pred, y_real)
  accuracy = jnp.mean(jnp.argmax(pred, -1) == jnp.argmax(y_real, -1))
  loss = kernel_loss + label_margin_weight * label_loss
  return loss, {"kernel_loss": kernel_loss, "label_loss": label_loss, "accuracy": accuracy}


# ----------------------------------------------------------------------------------------------
# The method.


@flax.struct.dataclass
class FRePoState:
  """Everything a FRePo run needs to continue, as one pytree (what the checkpoints hold).

  Attributes:
    x_syn: (N, H, W, C) distilled images, preprocessed space.
    y_syn: (N, C) distilled (learned) labels.
    outer_opt_state: optimiser state of `{"x": x_syn, "y": y_syn}`.
    pool: the model pool, a `MemberState` with a leading `(pool.size,)` axis.
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
  choices = {"outer.order": (config.outer.order, ORDERS),
             "outer.optimizer": (config.outer.optimizer, tuple(OUTER_OPTIMIZERS)),
             "init": (config.init, INITS)}
  for name, (value, valid) in choices.items():
    if value not in valid:
      raise ValueError(f"unknown config.{name} {value!r}; use one of {', '.join(valid)}")
  for name, value in (("outer.real_batch_size", config.outer.real_batch_size),
                      ("pool.size", config.pool.size),
                      ("eval.krr.train_steps", config.eval.krr.train_steps),
                      ("pool.online_batch_size", config.pool.online_batch_size)):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"config.{name} must be a positive int, got {value!r}")
  for name, value in (("outer.lr", config.outer.lr), ("pool.online_lr", config.pool.online_lr)):
    if not value > 0:
      raise ValueError(f"config.{name} must be positive, got {value!r}")
  if not 0 <= config.outer.final_lr_fraction <= 1:
    raise ValueError(f"config.outer.final_lr_fraction must be in [0, 1], got "
                     f"{config.outer.final_lr_fraction!r}")
  for name in ("kernel_reg", "kernel_reg_floor"):
    if config.outer[name] < 0:
      raise ValueError(f"config.outer.{name} must be >= 0, got {config.outer[name]!r}")


def pool_model_kwargs(pool: ml_collections.ConfigDict, *, norm: str | None = None
                      ) -> dict[str, Any]:
  """`get_model` arguments of the pool's network: FRePo's ConvNet (widths doubling per block,
  Flax default init) from a config's `pool` block; `norm` overrides `pool.norm` (the KRR
  evaluation uses the evaluation norm)."""
  return {
      "width": pool.width,
      "depth": pool.depth,
      "norm": pool.norm if norm is None else norm,
      "width_doubling": True,
      "norm_position": "before_conv",  # released lib/models/networks.py `Conv`.
      "init_scheme": "flax",  # paper A.1 "Models": Lecun initialisation, Flax's default.
      "bn_momentum": pool.bn_momentum,
  }


OUTER_OPTIMIZERS = {"lamb": optax.lamb, "adam": optax.adam}


@register_method("frepo")
class FRePo(DistillMethod):
  """FRePo on the shared run loop: state, step, result and the KRR report extra.

  Args:
    config: a FRePo config (`configs/frepo.py`).
    data: the `RealData` to distil.
  """

  watched = ("loss", "kernel_loss", "label_loss")

  def __init__(self, config: ml_collections.ConfigDict, data):
    super().__init__(config, data)
    _check_config(config)
    self.num_classes = data.num_classes
    pool = config.pool
    self.pool = ModelPool(
        get_model(pool.model, num_classes=self.num_classes, **pool_model_kwargs(pool)),
        input_shape=data.image_shape,
        num_models=pool.size,
        max_online_updates=pool.max_online_updates,
        optimizer=optax.adam(pool.online_lr),
    )
    self.learning_rate = optax.cosine_decay_schedule(
        config.outer.lr, decay_steps=config.num_steps, alpha=config.outer.final_lr_fraction
    )
    self.outer_tx = OUTER_OPTIMIZERS[config.outer.optimizer](learning_rate=self.learning_rate)

  def init(self, key: Array) -> FRePoState:
    """Step 0 from `ipc` real images per class drawn with `config.seed` (paper A.1
    "Initialization"): images per `config.init` (noise from the key), labels `initial_labels`."""
    x_real, y_real = data_lib.random_subset(
        self.data.x_train, self.data.y_train, ipc=self.config.ipc, num_classes=self.num_classes,
        seed=self.config.seed,
    )
    init_key, run_key = jax.random.split(key)
    x_syn = initial_images(init_key, x_real, init=self.config.init,
                           noise_std=self.config.init_noise_std)
    y_syn = initial_labels(jnp.asarray(y_real), self.num_classes)
    pool_key, step_key = jax.random.split(run_key)
    return FRePoState(
        x_syn=x_syn,
        y_syn=y_syn,
        outer_opt_state=self.outer_tx.init({"x": x_syn, "y": y_syn}),
        pool=self.pool.init(pool_key),
        step=jnp.zeros((), jnp.int32),
        key=step_key,
    )

  def state_shardings(self, abstract_state: FRePoState) -> FRePoState:
    """On a mesh: the pool's members split over `model`, everything else replicated."""
    shardings = parallel.replicated_shardings(abstract_state)
    return shardings.replace(pool=parallel.stack_shardings(abstract_state.pool, "model"))

  def inputs(self, step: int) -> tuple[Array, Array]:
    """The real training set on the device (the step samples its batch from it)."""
    del step
    return self.device_train_set

  def _online_update(self, member, x_syn, y_syn, batch_key, reset_key):
    """Algorithm 1 lines 6-7 on (a subsample of) the current distilled set."""
    n_syn = x_syn.shape[0]
    if n_syn > self.config.pool.online_batch_size:
      index = jax.random.choice(batch_key, n_syn, (self.config.pool.online_batch_size,),
                                replace=False)
      x_syn, y_syn = x_syn[index], y_syn[index]
    return self.pool.online_update(member, x_syn, y_syn, reset_key)

  def step(self, state: FRePoState, inputs: tuple[Array, Array]
           ) -> tuple[FRePoState, dict[str, Array]]:
    """One outer step of FRePo (Algorithm 1 / 2); see the module docstring.

    Args:
      state: the current state.
      inputs: `(x_train (N_train, H, W, C), y_train (N_train,))`, the preprocessed real set.

    Returns:
      the next state and a dict of scalar metrics.
    """
    x_train, y_train = inputs
    outer = self.config.outer
    key, member_key, real_key, online_key, reset_key = jax.random.split(state.key, 5)
    index = jax.random.randint(member_key, (), 0, self.config.pool.size)
    member = self.pool.member(state.pool, index)
    online_loss = was_reset = None
    if outer.order == "v1":
      member, online_loss, was_reset = self._online_update(
          member, state.x_syn, state.y_syn, online_key, reset_key
      )

    # Real batch drawn uniformly (with replacement) inside the program: no host-side sampling.
    # On a mesh the real batch is split over `data` (its features, and the kernel rows).
    real_index = jax.random.randint(real_key, (outer.real_batch_size,), 0, x_train.shape[0])
    x_real, y_real = parallel.constrain_leading(
        (x_train[real_index], centered_one_hot(y_train[real_index], self.num_classes)), "data")
    feat_real = jax.lax.stop_gradient(self.pool.features(member, x_real))

    def loss_of(syn):
      return frepo_loss(
          syn["x"], syn["y"], feat_real, y_real, lambda x: self.pool.features(member, x),
          kernel_reg=outer.kernel_reg, kernel_reg_floor=outer.kernel_reg_floor,
          use_flip=outer.use_flip, learn_label=outer.learn_label,
          label_margin_weight=outer.label_margin_weight,
      )

    syn = {"x": state.x_syn, "y": state.y_syn}
    (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(syn)
    updates, outer_opt_state = self.outer_tx.update(grads, state.outer_opt_state, syn)
    syn = optax.apply_updates(syn, updates)

    if outer.order == "v2":
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

  def result(self, state: FRePoState) -> distilled_lib.PixelSet:
    """The distilled images with their learned `(N, C)` labels."""
    return distilled_lib.PixelSet(
        x=np.asarray(state.x_syn),
        y=np.asarray(state.y_syn),
        meta=self.data.set_meta("frepo", self.config.ipc, label_kind="learned"),
    )

  def divergence_hint(self) -> str:
    c = self.config
    return (f"lower outer.lr (now {c.outer.lr}) or pool.online_lr (now {c.pool.online_lr}), or "
            f"raise outer.kernel_reg (now {c.outer.kernel_reg})")

  def krr_recipe(self) -> Recipe:
    """The KRR evaluation's training recipe (released `proto_evaluate(eval_krr=True)`): the
    pool's ConvNet with `eval.krr.norm`, constant-lr Adam at `pool.online_lr`, MSE on the set's
    labels, batches of `min(N, eval.krr.batch_size)`, FRePo's augmentation when
    `eval.krr.augment`."""
    krr, pool = self.config.eval.krr, self.config.pool
    return Recipe(
        model=pool.model, model_kwargs=pool_model_kwargs(pool, norm=krr.norm),
        optimizer="adam", lr=float(pool.online_lr), momentum=0.0, weight_decay=0.0,
        schedule="constant", steps=krr.train_steps, batch_size=krr.batch_size,
        loss="mse", augmentation="frepo" if krr.augment else "none",
        aug_strategy=data_lib.augment.FREPO_STRATEGY, no_flip_grayscale=True,
    )

  def report_extras(self, distilled_set, workdir: io_lib.Workdir) -> dict[str, Any]:
    """FRePo's additions to report.json: the KRR test accuracy (paper Table 1, in brackets) and
    a heatmap of the learned labels (`images/labels.png`)."""
    if distilled_set.label_kind != "class_ids":
      io_lib.save_heatmap(
          os.path.join(workdir.images_dir, "labels.png"),
          np.asarray(distilled_set.y, np.float32),
          xlabel="class", ylabel="distilled image", title="FRePo learned labels",
      )
    outer = self.config.outer
    result = evaluation.krr_evaluate(
        distilled_set, self.krr_recipe(), self.data.x_test, self.data.y_test,
        kernel_reg=outer.kernel_reg, reg_floor=outer.kernel_reg_floor, use_flip=outer.use_flip,
        seed=self.config.seed, num_models=self.config.eval.krr.num_models,
    )
    return {"krr_accuracy": result}
