"""MTT: dataset distillation by matching training trajectories.

Cazenavette, Wang, Torralba, Efros and Zhu, CVPR 2022; the trajectory-matching term of D3
(paper 000, Appendix B.3 "MTT Loss") and of LatentMTT (paper 002, Eq. 8 and Algorithm 3). Every
iteration (the authors' `distill.py`):

  1. pick an expert trajectory and a start epoch `t` uniformly in `0 .. max_start_epoch - 1`;
  2. start a student at the expert's parameters `theta*_t`;
  3. take N SGD steps with the learned lr `alpha` on minibatches of the synthetic set, each
     augmented with DSA under a fresh key (`objectives.unroll_student`: a `lax.scan`, unrolled
     into straight-line code on CPU, see `resolve_student_loop`);
  4. minimise `||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2`
     (`objectives.param_matching_loss`) w.r.t. the images and `alpha`, each with SGD and
     momentum 0.5 at its own learning rate (`lr_img`, `lr_lr`).

The expert and start epoch come from the run's key on the host (`MTT.plan`), so that exactly
those two checkpoints are read from the lazily loaded buffer (`training.experts`); a background
thread reads the next iteration's checkpoints while the current step runs. The step itself is one
jitted program of the state (images, lr, both optimiser states, step, key), which is what the
Orbax checkpoints hold: a killed run resumes to exactly the set of an uninterrupted one.
"""

from __future__ import annotations

import concurrent.futures
import math
import time
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
from distill_jax import models
from distill_jax.data import augment
from distill_jax.methods.base import (  # DivergenceError: re-exported for callers.
    METHODS, DivergenceError, Method, RealData, finite_host_metrics,
)
from distill_jax.objectives import param_matching_loss, unroll_student
from distill_jax.training import experts as experts_lib

Array = jax.Array
PyTree = Any

INITS = ("real", "noise")
STUDENT_LOOPS = ("auto", "scan", "unrolled")


@flax.struct.dataclass
class MTTState:
  """Everything an MTT run needs to continue, as one pytree (what the checkpoints hold).

  Attributes:
    x_syn: (N, H, W, C) synthetic images, preprocessed space.
    lr: () float32, the learned student learning rate (distill.py `syn_lr`).
    opt_x: optax SGD-momentum state of `x_syn`.
    opt_lr: optax SGD-momentum state of `lr`.
    step: () int32, outer iterations done.
    key: typed PRNG key of the next iteration (`MTT.plan` splits it).
  """

  x_syn: Array
  lr: Array
  opt_x: Any
  opt_lr: Any
  step: Array
  key: Array


def check_config(config: ml_collections.ConfigDict) -> None:
  """One-line errors for MTT config values that cannot work."""
  for name in ("syn_steps", "expert_epochs", "max_start_epoch", "num_steps", "log_every",
               "checkpoint_every", "ipc"):
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{name} must be a positive int, got {value!r}")
  batch = config.batch_syn
  if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
    raise ValueError(f"config.batch_syn must be 0 (whole set) or a positive int, got {batch!r}")
  for name in ("lr_img", "lr_lr", "lr_teacher"):
    value = config[name]
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
      raise ValueError(f"config.{name} must be a positive finite number, got {value!r}")
  if not 0 <= config.momentum < 1:
    raise ValueError(f"config.momentum must be in [0, 1), got {config.momentum!r}")
  if config.init not in INITS:
    raise ValueError(f"unknown init {config.init!r}; use one of {', '.join(INITS)}")
  resolve_student_loop(config.student_loop, remat=config.remat)
  if config.dsa and not config.dsa_strategy:
    raise ValueError(
        "config.dsa is True but config.dsa_strategy is empty; name the DSA ops or set dsa=False"
    )


def check_buffer(config: ml_collections.ConfigDict, num_epochs: int) -> None:
  """Raises unless every start epoch `t < max_start_epoch` has its target `t + M` stored."""
  last = config.max_start_epoch - 1 + config.expert_epochs
  if last > num_epochs:
    raise ValueError(
        f"max_start_epoch={config.max_start_epoch} with expert_epochs={config.expert_epochs} "
        f"needs expert epochs up to {last} but the experts train {num_epochs}; lower them or "
        f"raise experts.num_epochs to {last}"
    )


def resolve_student_loop(name: str, *, remat: bool) -> str:
  """"scan" or "unrolled" for `config.student_loop`.

  "scan" is `objectives.unroll_student` with one rolled `lax.scan` body: compile time does not
  grow with N, and `remat` bounds memory. "unrolled" passes `unroll=True`: the same steps as
  straight-line code, which XLA:CPU runs many times faster (it executes convolution gradients
  inside while loops as slow generic loops; measured 6x for MTT's step at width 16) but whose
  compile time grows with N, and where remat saves no memory (XLA schedules the recomputation
  freely). "auto" is "unrolled" on CPU without remat and "scan" otherwise.
  """
  if name not in STUDENT_LOOPS:
    raise ValueError(f"unknown student_loop {name!r}; use one of {', '.join(STUDENT_LOOPS)}")
  if name == "auto":
    return "unrolled" if jax.default_backend() == "cpu" and not remat else "scan"
  if name == "unrolled" and remat:
    raise ValueError(
        "remat=True needs student_loop='scan' (or 'auto'): XLA reorders the recomputation of "
        "straight-line code and saves no memory"
    )
  return name


class MTT:
  """MTT's pure pieces for one config and set shape: initial state, `plan` and the jitted step.

  `step` is compiled once and donates the state it is given; `num_traces` counts how often its
  Python body ran (1 after any number of steps means no retracing).

  Args:
    config: an MTT config (`configs/mtt.py`).
    num_classes: C.
    image_shape: (H, W, channels).
    num_experts: experts the buffer serves (start points are drawn among them).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, num_classes: int,
               image_shape: tuple[int, ...], num_experts: int):
    check_config(config)
    self.config = config
    self.num_classes = int(num_classes)
    self.image_shape = tuple(int(d) for d in image_shape)
    self.num_experts = int(num_experts)
    # The student is the experts' network: their parameters are its starting points.
    self.model = models.get_model(config.experts.model, num_classes=self.num_classes,
                                  **dict(config.experts.model_kwargs))
    self.tx_x = optax.sgd(config.lr_img, momentum=config.momentum or None)
    self.tx_lr = optax.sgd(config.lr_lr, momentum=config.momentum or None)
    self.student_loop = resolve_student_loop(config.student_loop, remat=config.remat)
    self.num_traces = 0
    self.step = jax.jit(self._step, donate_argnums=0)
    self.plan = jax.jit(self._plan)

  def init(self, key: Array, x_syn: Array) -> MTTState:
    """The state before the first iteration: images `x_syn`, lr `config.lr_teacher`."""
    x_syn = jnp.asarray(x_syn, jnp.float32)
    if x_syn.shape[1:] != self.image_shape:
      raise ValueError(
          f"initial images have shape {x_syn.shape[1:]}, expected {self.image_shape}; build them "
          "from the same dataset"
      )
    lr = jnp.asarray(self.config.lr_teacher, jnp.float32)
    return MTTState(
        x_syn=x_syn,
        lr=lr,
        opt_x=self.tx_x.init(x_syn),
        opt_lr=self.tx_lr.init(lr),
        step=jnp.zeros((), jnp.int32),
        key=key,
    )

  def _plan(self, key: Array) -> tuple[Array, Array, Array, Array]:
    """Splits an iteration's key: `(next_key, unroll_key, expert, start_epoch)`.

    The expert is uniform over `num_experts` and the start epoch uniform over
    `0 .. max_start_epoch - 1` (distill.py: `np.random.randint(0, args.max_start_epoch)`).
    """
    next_key, choice_key, unroll_key = jax.random.split(key, 3)
    expert_key, epoch_key = jax.random.split(choice_key)
    expert = jax.random.randint(expert_key, (), 0, self.num_experts)
    start_epoch = jax.random.randint(epoch_key, (), 0, self.config.max_start_epoch)
    return next_key, unroll_key, expert, start_epoch

  def choose(self, key: Array) -> tuple[Array, int, int]:
    """The host-side part of `plan`: `(next_key, expert, start_epoch)` with Python ints."""
    next_key, _, expert, start_epoch = self.plan(key)
    return next_key, int(expert), int(start_epoch)

  def student_loss(self, params: PyTree, x: Array, y: Array, key: Array | None = None) -> Array:
    """Mean cross-entropy of the student on a (DSA-augmented) synthetic batch.

    Args:
      params: the network's "params" collection.
      x: (B, H, W, C) images.
      y: (B,) int class ids.
      key: DSA key (one op of `dsa_strategy` per batch, per-image parameters); None: no DSA.
    """
    if key is not None:
      x = augment.dsa(key, x, strategy=self.config.dsa_strategy, mode="single")
    logits = self.model.apply({"params": params}, x, train=True)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  def matching_loss(self, x_syn: Array, lr: Array, y_syn: Array, start_params: PyTree,
                    target_params: PyTree, key: Array) -> Array:
    """MTT's objective for one (expert, t): unroll N student steps, match `theta*_{t+M}`.

    Args:
      x_syn: (N_syn, H, W, C) synthetic images.
      lr: () student learning rate.
      y_syn: (N_syn,) int labels.
      start_params: the expert at epoch t.
      target_params: the expert at epoch t + M.
      key: the unroll's key (minibatches and a fresh DSA key per student step).

    Returns:
      the scalar normalised parameter distance (D3 App. B.3 `D_MTT`).
    """
    config = self.config
    student_end = unroll_student(
        self.student_loss, start_params, x_syn, y_syn,
        lr=lr, num_steps=config.syn_steps, batch_size=config.batch_syn or x_syn.shape[0],
        key=key, remat=config.remat, loss_takes_key=config.dsa,
        unroll=True if self.student_loop == "unrolled" else 1,
    )
    return param_matching_loss(student_end, start_params, target_params)

  def _step(self, state: MTTState, y_syn: Array, start_params: PyTree,
            target_params: PyTree) -> tuple[MTTState, dict[str, Array]]:
    """One outer iteration on the expert checkpoints `plan(state.key)` chose.

    Args:
      state: the current state (donated).
      y_syn: (N_syn,) int labels (fixed).
      start_params: `buffer.params(expert, t)` for `(expert, t)` from `plan(state.key)`.
      target_params: `buffer.params(expert, t + expert_epochs)`.

    Returns:
      the next state and scalar metrics (loss, lr, gradient norms).
    """
    self.num_traces += 1
    next_key, unroll_key, _, _ = self._plan(state.key)
    loss, (grad_x, grad_lr) = jax.value_and_grad(self.matching_loss, argnums=(0, 1))(
        state.x_syn, state.lr, y_syn, start_params, target_params, unroll_key
    )
    updates_x, opt_x = self.tx_x.update(grad_x, state.opt_x, state.x_syn)
    updates_lr, opt_lr = self.tx_lr.update(grad_lr, state.opt_lr, state.lr)
    new_state = MTTState(
        x_syn=optax.apply_updates(state.x_syn, updates_x),
        lr=optax.apply_updates(state.lr, updates_lr),
        opt_x=opt_x,
        opt_lr=opt_lr,
        step=state.step + 1,
        key=next_key,
    )
    metrics = {
        "loss": loss,
        "lr": new_state.lr,
        "grad_norm_x": jnp.linalg.norm(grad_x),
        "grad_lr": grad_lr,
    }
    return new_state, metrics


# ----------------------------------------------------------------------------------------------
# The distillation loop.


def initial_images(config: ml_collections.ConfigDict, data: RealData,
                   key: Array | None) -> tuple[np.ndarray, np.ndarray]:
  """`ipc` images per class sorted by class and their labels (distill.py `label_syn`).

  "real": a class-balanced random subset of the (preprocessed) training set, seeded by
  `config.seed`; "noise": standard normal images in preprocessed units (distill.py's
  `torch.randn` default).

  Returns:
    `(x_syn (C * ipc, H, W, channels) float32, y_syn (C * ipc,) int32)`.
  """
  x_real, y_syn = data_lib.random_subset(
      data.x_train, data.y_train, ipc=config.ipc, num_classes=data.num_classes, seed=config.seed
  )
  if config.init == "noise":
    x_real = np.asarray(jax.random.normal(key, x_real.shape, jnp.float32))
  return np.asarray(x_real, np.float32), np.asarray(y_syn, np.int32)


def _check_finite(step: int, metrics: dict[str, Array], config) -> dict[str, float]:
  return finite_host_metrics(
      metrics, ("loss", "lr"),
      lambda host: (
          f"MTT diverged at iteration {step} (loss={host['loss']}, learned lr={host['lr']}); "
          f"lower lr_img (now {config.lr_img}) or lr_lr (now {config.lr_lr}); the last checkpoint "
          "holds the last finite state"
      ),
  )


def _run(mtt: MTT, config, buffer, state: MTTState, y_syn: Array, checkpointer, writer,
         first: int) -> MTTState:
  """Iterations `first .. num_steps`: plan on the host, read the experts ahead, step, log, save."""

  def fetch(expert: int, start_epoch: int) -> tuple[PyTree, PyTree]:
    return (buffer.params(expert, start_epoch),
            buffer.params(expert, start_epoch + config.expert_epochs))

  progress = io_lib.ProgressLogger(config.num_steps, every=config.log_every, start_step=first - 1)
  pending = None  # (step, metrics) of the step before the one in flight.
  # One reader thread: the next iteration's checkpoints load while this one computes.
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as reader:
    key = state.key
    if first <= config.num_steps:
      key, expert, start_epoch = mtt.choose(key)
      future = reader.submit(fetch, expert, start_epoch)
    for step in range(first, config.num_steps + 1):
      start_params, target_params = future.result()
      chosen = (expert, start_epoch)
      if step < config.num_steps:
        key, expert, start_epoch = mtt.choose(key)
        future = reader.submit(fetch, expert, start_epoch)
      state, metrics = mtt.step(state, y_syn, start_params, target_params)
      if pending is not None:
        _check_finite(*pending, config)
      pending = (step, metrics)
      is_last = step == config.num_steps
      if step % config.log_every == 0 or is_last:
        host = _check_finite(step, metrics, config)
        writer.write(step, **host, expert=chosen[0], start_epoch=chosen[1])
        progress.log(step, loss=host["loss"], lr=host["lr"])
      if step % config.checkpoint_every == 0 or is_last:
        _check_finite(step, metrics, config)
        checkpointer.save(step, state)
  if pending is not None:
    _check_finite(*pending, config)
  return state


def distill(config: ml_collections.ConfigDict, data: RealData,
            workdir: io_lib.Workdir) -> distilled_lib.PixelSet:
  """Runs MTT on `data` and returns the distilled set with its learned lr.

  Trains the expert buffer first when the cache has none for these settings
  (`experts.ensure_buffer`). Resumes from the latest checkpoint in `workdir.checkpoint_dir`;
  checkpoints every `config.checkpoint_every` iterations and at the end; logs every
  `config.log_every` iterations.

  Raises:
    DivergenceError: when the loss or the learned lr becomes NaN or infinite.
  """
  check_config(config)
  start_time = time.perf_counter()
  buffer = experts_lib.ensure_buffer(config, data)
  logging.info("MTT: %s ready after %.1f s.", buffer, time.perf_counter() - start_time)
  check_buffer(config, buffer.num_epochs)
  mtt = MTT(config, num_classes=data.num_classes, image_shape=data.image_shape,
            num_experts=buffer.num_experts)

  init_key, run_key = jax.random.split(jax.random.key(config.seed))
  x_syn, y_syn = initial_images(config, data, init_key)
  if config.batch_syn > x_syn.shape[0]:
    raise ValueError(
        f"config.batch_syn={config.batch_syn} exceeds the {x_syn.shape[0]} synthetic images; "
        "use 0 (the whole set) or fewer"
    )
  state = mtt.init(run_key, x_syn)
  with io_lib.Checkpointer(workdir.checkpoint_dir) as checkpointer, \
      io_lib.MetricWriter(workdir) as writer:
    latest = checkpointer.latest_step()
    if latest is not None:
      if latest > config.num_steps:
        raise ValueError(
            f"{workdir.checkpoint_dir} holds iteration {latest}, beyond "
            f"num_steps={config.num_steps}; use a fresh workdir or the num_steps of that run"
        )
      state = checkpointer.restore(latest, state)
      logging.info("MTT: resumed from the checkpoint at iteration %d.", latest)
    first = int(state.step) + 1
    # Lines a killed run logged after its last checkpoint are logged again by this one.
    writer.truncate(first - 1)
    state = _run(mtt, config, buffer, state, jnp.asarray(y_syn), checkpointer, writer, first)
    checkpointer.wait()
  logging.info("MTT: the step was traced %d time(s); %d buffer reads.", mtt.num_traces,
               buffer.reads)

  return distilled_lib.PixelSet(
      x=np.asarray(state.x_syn),
      y=np.asarray(y_syn),
      lr=np.asarray(state.lr, np.float32),
      meta=data.set_meta("mtt", config.ipc),
  )


def report_extras(config: ml_collections.ConfigDict, data: RealData, distilled_set,
                  workdir: io_lib.Workdir) -> dict[str, Any]:
  """The expert buffer behind the run: where it is and how good its experts are."""
  del distilled_set, workdir
  buffer = experts_lib.ensure_buffer(config, data)
  accuracy = buffer.metrics()["test_accuracy"]
  return {
      "experts": {
          "buffer_dir": buffer.path,
          "num_experts": buffer.num_experts,
          "num_epochs": buffer.num_epochs,
          # Test accuracy of the experts after their last epoch and at max_start_epoch.
          "final_test_accuracy": {"mean": float(accuracy[:, -1].mean()),
                                  "std": float(accuracy[:, -1].std())},
          "test_accuracy_at_max_start_epoch": float(
              accuracy[:, min(config.max_start_epoch, buffer.num_epochs)].mean()
          ),
      }
  }


METHODS.register("mtt", Method("mtt", distill=distill, report_extras=report_extras))
