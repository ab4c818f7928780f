"""MTT: dataset distillation by matching training trajectories.

Cazenavette, Wang, Torralba, Efros and Zhu, CVPR 2022; the trajectory-matching term of D3
(paper 000, Appendix B.3 "MTT Loss") and of LatentMTT (paper 002, Eq. 8 and Algorithm 3). Every
iteration (the authors' `distill.py`):

  1. pick an expert trajectory and a start epoch `t` uniformly in `0 .. max_start_epoch - 1`;
  2. start a student at the expert's parameters `theta*_t`;
  3. take N SGD steps with the learned lr `alpha` on minibatches of the synthetic set, each
     augmented with DSA under a fresh key (`objectives.unroll_student`: a `lax.scan`, unrolled
     into straight-line code on CPU, see `_pixels.resolve_loop`);
  4. minimise `||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2`
     (`objectives.param_matching_loss`) w.r.t. the images and `alpha`, each with SGD and
     momentum 0.5 at its own learning rate (`lr_img`, `lr_lr`).

The expert and start epoch of iteration s are drawn on the host from `(seed, s)`
(`MTT.choose`), so that exactly those two checkpoints are read from the lazily loaded buffer
(`training.experts`), by the run loop's reader thread one iteration ahead. The step itself is
one jitted program of the state (images, lr, both optimiser states, key), which is what the
checkpoints hold: a killed run resumes to exactly the set of an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from distill_jax import data as data_lib
from distill_jax import distilled as distilled_lib
from distill_jax import models
from distill_jax import parallel
from distill_jax.data import augment
from distill_jax.methods import _pixels
from distill_jax.methods.base import DistillMethod, register_method
from distill_jax.objectives import param_matching_loss, unroll_student
from distill_jax.training import experts as experts_lib

Array = jax.Array
PyTree = Any



@flax.struct.dataclass
class MTTState:
  """Everything an MTT run needs to continue, as one pytree (what the checkpoints hold).

  Attributes:
    x_syn: (N, H, W, C) synthetic images, preprocessed space.
    lr: () float32, the learned student learning rate (distill.py `syn_lr`).
    opt_x: optax SGD-momentum state of `x_syn`.
    opt_lr: optax SGD-momentum state of `lr`.
    key: typed PRNG key of the next iteration's unroll (minibatches and DSA draws).
  """

  x_syn: Array
  lr: Array
  opt_x: Any
  opt_lr: Any
  key: Array


def check_config(config: ml_collections.ConfigDict) -> None:
  """One-line errors for MTT config values that cannot work."""
  inner, outer = config.inner, config.outer
  for name, value in (("inner.steps", inner.steps), ("inner.expert_epochs", inner.expert_epochs),
                      ("inner.max_start_epoch", inner.max_start_epoch)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{name} must be a positive int, got {value!r}")
  batch = inner.batch_size
  if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
    raise ValueError(
        f"config.inner.batch_size must be 0 (whole set) or a positive int, got {batch!r}")
  if batch > config.ipc * data_lib.info(config.dataset).num_classes:
    raise ValueError(
        f"config.inner.batch_size={batch} exceeds the {config.ipc} x classes synthetic images; "
        "use 0 (the whole set) or fewer"
    )
  for name, value in (("outer.lr_img", outer.lr_img), ("outer.lr_lr", outer.lr_lr),
                      ("inner.lr", inner.lr)):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
      raise ValueError(f"config.{name} must be a positive finite number, got {value!r}")
  if not 0 <= outer.momentum < 1:
    raise ValueError(f"config.outer.momentum must be in [0, 1), got {outer.momentum!r}")
  _pixels.check_init(config.init)
  _pixels.resolve_loop(inner.loop, remat=inner.remat)


def check_buffer(config: ml_collections.ConfigDict, num_epochs: int) -> None:
  """Raises unless every start epoch `t < max_start_epoch` has its target `t + M` stored."""
  inner = config.inner
  last = inner.max_start_epoch - 1 + inner.expert_epochs
  if last > num_epochs:
    raise ValueError(
        f"inner.max_start_epoch={inner.max_start_epoch} with inner.expert_epochs="
        f"{inner.expert_epochs} needs expert epochs up to {last} but the experts train "
        f"{num_epochs}; lower them or raise experts.num_epochs to {last}"
    )


@register_method("mtt")
class MTT(DistillMethod):
  """MTT on the shared run loop: the expert buffer, the host-side plan, the jitted iteration.

  Args:
    config: an MTT config (`configs/mtt.py`).
    data: the `RealData` to distil.
  """

  watched = ("loss", "lr")

  def __init__(self, config: ml_collections.ConfigDict, data):
    super().__init__(config, data)
    check_config(config)
    self.num_classes = data.num_classes
    # The student is the experts' network: their parameters are its starting points.
    self.model = models.get_model(config.experts.model, num_classes=self.num_classes,
                                  **dict(config.experts.model_kwargs))
    momentum = config.outer.momentum or None
    self.tx_x = optax.sgd(config.outer.lr_img, momentum=momentum)
    self.tx_lr = optax.sgd(config.outer.lr_lr, momentum=momentum)
    # How the N student steps compile (see `_pixels.resolve_loop`): unrolled on CPU.
    self.student_loop = _pixels.resolve_loop(config.inner.loop, remat=config.inner.remat)
    self.buffer = None
    self.y_syn = _pixels.initial_labels(self.num_classes, config.ipc)

  def prepare(self) -> None:
    """Opens the expert buffer, training it first where the cache has none for these settings."""
    self.buffer = experts_lib.ensure_buffer(self.config, self.data)
    check_buffer(self.config, self.buffer.num_epochs)

  def init(self, key: Array) -> MTTState:
    """Images per `config.init`, the student lr at `inner.lr` (distill.py `lr_teacher`)."""
    init_key, run_key = jax.random.split(key)
    x_syn = _pixels.initial_images(self.data, ipc=self.config.ipc, seed=self.config.seed,
                                   init=self.config.init, key=init_key)
    lr = jnp.asarray(self.config.inner.lr, jnp.float32)
    return MTTState(x_syn=x_syn, lr=lr, opt_x=self.tx_x.init(x_syn), opt_lr=self.tx_lr.init(lr),
                    key=run_key)

  def choose(self, step: int) -> tuple[int, int]:
    """Iteration `step`'s expert (uniform over the buffer's experts) and start epoch (uniform in
    `0 .. max_start_epoch - 1`, distill.py's `np.random.randint(0, args.max_start_epoch)`),
    drawn from `(seed, step)` alone."""
    rng = np.random.default_rng((self.config.seed, step))
    return (int(rng.integers(self.config.experts.num_experts)),
            int(rng.integers(self.config.inner.max_start_epoch)))

  def inputs(self, step: int) -> dict[str, Any]:
    """The chosen expert's parameters at the start epoch t and at t + M (two buffer reads)."""
    expert, start = self.choose(step)
    return {"start": self.buffer.params(expert, start),
            "target": self.buffer.params(expert, start + self.config.inner.expert_epochs),
            "expert": np.int32(expert), "start_epoch": np.int32(start)}

  def student_loss(self, params: PyTree, x: Array, y: Array, key: Array | None = None) -> Array:
    """Mean cross-entropy of the student on a (DSA-augmented) synthetic batch.

    Args:
      params: the network's "params" collection.
      x: (B, H, W, C) images.
      y: (B,) int class ids.
      key: DSA key (one op of `inner.dsa_strategy` per batch, per-image parameters); None: no
        DSA.
    """
    x, y = parallel.constrain_leading((x, y), "data")  # On a mesh: the minibatch over `data`.
    if key is not None:
      x = augment.dsa(key, x, strategy=self.config.inner.dsa_strategy, mode="single")
    logits = self.model.apply({"params": params}, x, train=True)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  def matching_loss(self, x_syn: Array, lr: Array, start_params: PyTree, target_params: PyTree,
                    key: Array) -> Array:
    """MTT's objective for one (expert, t): unroll N student steps, match `theta*_{t+M}`.

    Args:
      x_syn: (N_syn, H, W, C) synthetic images.
      lr: () student learning rate.
      start_params: the expert at epoch t.
      target_params: the expert at epoch t + M.
      key: the unroll's key (minibatches and a fresh DSA key per student step).

    Returns:
      the scalar normalised parameter distance (D3 App. B.3 `D_MTT`).
    """
    inner = self.config.inner
    student_end = unroll_student(
        self.student_loss, start_params, x_syn, jnp.asarray(self.y_syn),
        lr=lr, num_steps=inner.steps, batch_size=inner.batch_size or x_syn.shape[0],
        key=key, remat=inner.remat, loss_takes_key=bool(inner.dsa_strategy),
        unroll=True if self.student_loop == "unrolled" else 1,
    )
    return param_matching_loss(student_end, start_params, target_params)

  def step(self, state: MTTState, inputs: dict[str, Any]) -> tuple[MTTState, dict[str, Array]]:
    """One outer iteration on the expert checkpoints `inputs` holds (see `inputs`)."""
    next_key, unroll_key = jax.random.split(state.key)
    loss, (grad_x, grad_lr) = jax.value_and_grad(self.matching_loss, argnums=(0, 1))(
        state.x_syn, state.lr, inputs["start"], inputs["target"], unroll_key
    )
    updates_x, opt_x = self.tx_x.update(grad_x, state.opt_x, state.x_syn)
    updates_lr, opt_lr = self.tx_lr.update(grad_lr, state.opt_lr, state.lr)
    new_state = MTTState(
        x_syn=optax.apply_updates(state.x_syn, updates_x),
        lr=optax.apply_updates(state.lr, updates_lr),
        opt_x=opt_x,
        opt_lr=opt_lr,
        key=next_key,
    )
    metrics = {
        "loss": loss,
        "lr": new_state.lr,
        "grad_norm_x": jnp.linalg.norm(grad_x),
        "grad_lr": grad_lr,
        "expert": inputs["expert"],
        "start_epoch": inputs["start_epoch"],
    }
    return new_state, metrics

  def result(self, state: MTTState) -> distilled_lib.PixelSet:
    """The images with their class labels and the learned lr."""
    return distilled_lib.PixelSet(
        x=np.asarray(state.x_syn), y=np.asarray(self.y_syn), lr=np.asarray(state.lr, np.float32),
        meta=self.data.set_meta("mtt", self.config.ipc),
    )

  def divergence_hint(self) -> str:
    outer = self.config.outer
    return f"lower outer.lr_img (now {outer.lr_img}) or outer.lr_lr (now {outer.lr_lr})"

  def report_extras(self, distilled_set, workdir) -> dict[str, Any]:
    """The expert buffer behind the run: where it is and how good its experts are."""
    del distilled_set, workdir
    return {"experts": expert_summary(self.buffer or experts_lib.ensure_buffer(
        self.config, self.data), self.config.inner.max_start_epoch)}


def expert_summary(buffer, max_start_epoch: int) -> dict[str, Any]:
  """report.json's `experts` block: the buffer's path and size, and its experts' test accuracy
  after their last epoch and at `max_start_epoch` (MTT and D3 share the buffers)."""
  accuracy = buffer.metrics()["test_accuracy"]
  return {
      "buffer_dir": buffer.path,
      "num_experts": buffer.num_experts,
      "num_epochs": buffer.num_epochs,
      "final_test_accuracy": {"mean": float(accuracy[:, -1].mean()),
                              "std": float(accuracy[:, -1].std())},
      "test_accuracy_at_max_start_epoch": float(
          accuracy[:, min(max_start_epoch, buffer.num_epochs)].mean()),
  }
