"""D3: distributional dataset distillation (Qin, Deng & Alvarez-Melis; paper 000).

D3 distils every class into LPC diagonal Gaussian priors in a latent space plus one decoder
trained from scratch with them (section 2.2, App. B.2); a network trained on the set decodes a
fresh sample of the priors at every step (`distilled.DistributionSet`). Every iteration makes two
updates, in the order of the released `distill_distribution.py` (App. B.3):

  1. MTT term. Pick an expert and a start epoch t (`choose`); a student starts at `theta*_t` and
     takes N SGD steps with the learned lr `leaky_relu(alpha) + 1e-4` on whole-set batches, each
     a fresh decode of the priors (`objectives.unroll_student`; no DSA, as released);
     `D_MTT = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2`
     (`objectives.param_matching_loss`) steps the priors (SGD, momentum 0.5), the decoder (Adam
     with L2 weight decay) and the lr (SGD, momentum 0.5).
  2. MMD term. With a second expert's final parameters `psi`, for every class c,
     `L_MMD = mmd_weight * sum_c MMD^2_u(psi(D_c), psi(S_c))` (Eq. 4-5, `objectives.mmd2`: RBF
     mixture, bandwidths 1..16, unbiased) between the penultimate features of `S` fresh decodes of
     the class's priors (S = mmd_samples // LPC per prior) and `S * LPC` random real images of
     the class; it steps the priors and the decoder only (the same optimiser states).

The experts and start epochs are drawn on the host from `(seed, step)` and their checkpoints read
one step ahead (as MTT: `training.experts`). The state (priors, decoder, lr, three optimiser
states, key) is what the checkpoints hold, so a killed run resumes bit-identically.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from distill_jax import parallel
from distill_jax.distilled.distribution import DistributionSet
from distill_jax.methods import _pixels
from distill_jax.methods import mtt as mtt_lib
from distill_jax.methods.base import DistillMethod, register_method
from distill_jax.models import decoders as decoders_lib
from distill_jax.models import get_model
from distill_jax.objectives import mmd2, param_matching_loss, unroll_student
from distill_jax.training import experts as experts_lib

Array = jax.Array
PyTree = Any

MMD_PARAMS = ("final", "target")
# The released student lr inside the unroll: nn.LeakyReLU()(syn_lr) + 1e-4.
LR_FLOOR = 1e-4


@flax.struct.dataclass
class D3State:
  """Everything a D3 run needs to continue (what the checkpoints hold).

  Attributes:
    priors: (N, z, 2) float32 means and log-variances, sorted by class.
    decoder: the decoder's "params".
    lr: () float32 learned student lr (before `leaky_relu(lr) + 1e-4`).
    opt_priors, opt_decoder, opt_lr: optax states of the three optimisers.
    key: typed PRNG key of the next iteration.
  """

  priors: Array
  decoder: PyTree
  lr: Array
  opt_priors: Any
  opt_decoder: Any
  opt_lr: Any
  key: Array


def check_config(config: ml_collections.ConfigDict, data) -> None:
  """One-line errors for D3 settings that cannot work (before any work starts)."""
  for name in ("inner.steps", "inner.expert_epochs", "inner.max_start_epoch"):
    _pixels.positive_int(config, name)
  _pixels.positive_int(config, "inner.batch_size", zero_means="all priors")
  _pixels.resolve_loop(config.inner.loop, remat=config.inner.remat)
  outer = config.outer
  if not 0 <= outer.momentum < 1:
    raise ValueError(f"config.outer.momentum must be in [0, 1), got {outer.momentum!r}")
  for name in ("lr_latent", "lr_decode", "lr_lr"):
    value = outer[name]
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
      raise ValueError(f"config.outer.{name} must be a positive finite number, got {value!r}")
  if not (isinstance(config.inner.lr, (int, float)) and config.inner.lr > 0):
    raise ValueError(f"config.inner.lr must be a positive number, got {config.inner.lr!r}")
  for name in ("mtt_weight", "mmd_weight", "decoder_weight_decay"):
    if not (isinstance(outer[name], (int, float)) and outer[name] >= 0):
      raise ValueError(f"config.outer.{name} must be a number >= 0, got {outer[name]!r}")
  if not outer.mtt_weight and not outer.mmd_weight:
    raise ValueError("config.outer.mtt_weight and config.outer.mmd_weight are both 0; keep at "
                     "least one loss term")
  if outer.mmd_params not in MMD_PARAMS:
    raise ValueError(f"unknown config.outer.mmd_params {outer.mmd_params!r}; use one of "
                     f"{', '.join(MMD_PARAMS)}")
  if outer.mmd_weight and outer.mmd_samples // config.ipc * config.ipc < 2:
    raise ValueError(
        f"config.outer.mmd_samples={outer.mmd_samples} gives {outer.mmd_samples // config.ipc} "
        f"decodes per prior at LPC {config.ipc}, under the 2 samples per class the unbiased MMD "
        f"needs; raise mmd_samples to at least {max(2, config.ipc)}")
  if outer.mmd_weight:
    _pixels.positive_int(config, "outer.mmd_samples")
    per_class = outer.mmd_samples // config.ipc * config.ipc
    smallest = int(data.class_counts().min())
    if per_class > smallest:
      raise ValueError(f"config.outer.mmd_samples={outer.mmd_samples} asks for {per_class} real "
                       f"images per class; {data.name}'s smallest class has {smallest}")
  if config.inner.batch_size > config.ipc * data.num_classes:
    raise ValueError(f"config.inner.batch_size={config.inner.batch_size} exceeds the "
                     f"{config.ipc * data.num_classes} priors; use 0 (all) or fewer")


def decoder_spec(config: ml_collections.ConfigDict, image_shape) -> dict[str, Any]:
  """The decoder spec of `config.decoder` (size, its overrides, output) for `image_shape`."""
  d = config.decoder
  overrides = {"kernel_num": d.kernel_num} if d.kernel_num else {}
  return decoders_lib.decoder_spec(d.size, image_shape, output=d.output, **overrides)


def z_dim(config: ml_collections.ConfigDict) -> int:
  """The priors' dimension: `decoder.z_dim`, or the size's (0); L's is fixed by its widths."""
  return config.decoder.z_dim or decoders_lib.default_z_dim(config.decoder.size)


@register_method("d3")
class D3(DistillMethod):
  """D3 on the shared run loop (module docstring).

  Args:
    config: a D3 config (`configs/d3.py`).
    data: the `RealData` to distil (a subtask's classes for a federated job).
  """

  watched = ("loss_mtt", "loss_mmd", "lr")

  def __init__(self, config: ml_collections.ConfigDict, data):
    super().__init__(config, data)
    check_config(config, data)
    self.num_classes = data.num_classes
    self.lpc = config.ipc
    self.spec = decoder_spec(config, data.image_shape)
    self.decoder = decoders_lib.build(self.spec)
    self.z_dim = z_dim(config)
    # Shapes only: a decoder that cannot take z_dim fails here, not after the experts.
    jax.eval_shape(lambda: self.decoder.init(jax.random.key(0), jnp.zeros((2, self.z_dim))))
    self.model = get_model(config.experts.model, num_classes=self.num_classes,
                           **dict(config.experts.model_kwargs))
    momentum = config.outer.momentum or None
    self.tx_priors = optax.sgd(config.outer.lr_latent, momentum=momentum)
    self.tx_lr = optax.sgd(config.outer.lr_lr, momentum=momentum)
    # PyTorch's Adam(weight_decay=wd) adds wd * theta to the gradient before the moments.
    self.tx_decoder = optax.chain(optax.add_decayed_weights(config.outer.decoder_weight_decay),
                                  optax.adam(config.outer.lr_decode))
    self.student_loop = _pixels.resolve_loop(config.inner.loop, remat=config.inner.remat)
    self.y_syn = _pixels.initial_labels(self.num_classes, self.lpc)
    self.meta = dataclasses.replace(data.set_meta("d3", self.lpc),
                                    decoder=json.dumps(self.spec, sort_keys=True))
    self.buffer = None

  def prepare(self) -> None:
    """Opens the expert buffer (MTT's, shared), training it first where the cache has none."""
    self.buffer = experts_lib.ensure_buffer(self.config, self.data)
    mtt_lib.check_buffer(self.config, self.buffer.num_epochs)
    inner = self.config.inner
    if (self.config.outer.mmd_params == "target"
        and inner.max_start_epoch + inner.expert_epochs > self.buffer.num_epochs):
      raise ValueError(
          f"outer.mmd_params='target' reads expert epoch {inner.max_start_epoch} + "
          f"{inner.expert_epochs} but the experts train {self.buffer.num_epochs}; use 'final' or "
          "raise experts.num_epochs")

  def init(self, key: Array) -> D3State:
    """Priors ~ N(0, 1) in mean and log-variance (torch.randn), the decoder's PyTorch init, the
    student lr at `inner.lr`."""
    prior_key, decoder_key, run_key = jax.random.split(key, 3)
    n = self.num_classes * self.lpc
    priors = jax.random.normal(prior_key, (n, self.z_dim, 2), jnp.float32)
    decoder = self.decoder.init(decoder_key, jnp.zeros((2, self.z_dim)))["params"]
    lr = jnp.asarray(self.config.inner.lr, jnp.float32)
    return D3State(priors=priors, decoder=decoder, lr=lr, opt_priors=self.tx_priors.init(priors),
                   opt_decoder=self.tx_decoder.init(decoder), opt_lr=self.tx_lr.init(lr),
                   key=run_key)

  def choose(self, step: int) -> tuple[int, int, int]:
    """Iteration `step`'s MTT expert and start epoch (as `MTT.choose`) and the MMD term's expert
    (the release draws it anew), from `(seed, step)` alone."""
    rng = np.random.default_rng((self.config.seed, step))
    experts = self.config.experts.num_experts
    return (int(rng.integers(experts)), int(rng.integers(self.config.inner.max_start_epoch)),
            int(rng.integers(experts)))

  def inputs(self, step: int) -> dict[str, Any]:
    """The MTT expert at t and t + M, and the MMD expert's parameters (three buffer reads)."""
    expert, start, mmd_expert = self.choose(step)
    inner = self.config.inner
    mmd_epoch = (self.buffer.num_epochs if self.config.outer.mmd_params == "final"
                 else inner.max_start_epoch + inner.expert_epochs)
    return {"start": self.buffer.params(expert, start),
            "target": self.buffer.params(expert, start + inner.expert_epochs),
            "mmd": self.buffer.params(mmd_expert, mmd_epoch),
            "expert": np.int32(expert), "start_epoch": np.int32(start)}

  def distribution(self, priors: Array, decoder: PyTree, lr: Array | None = None
                   ) -> DistributionSet:
    """The set of the current priors and decoder (jittable: the state's arrays as leaves)."""
    return DistributionSet(priors=priors, y=jnp.asarray(self.y_syn), decoders={"0": decoder},
                           part=jnp.zeros(len(self.y_syn), jnp.int32), lr=lr, meta=self.meta)

  def mtt_loss(self, priors: Array, decoder: PyTree, lr: Array, start: PyTree, target: PyTree,
               key: Array) -> Array:
    """`D_MTT` of N student steps on fresh decodes of the priors (module docstring, term 1)."""
    inner = self.config.inner
    synthetic = self.distribution(priors, decoder)

    def student_loss(params, indices, y, step_key):
      x, _ = synthetic.draw(indices, key=step_key)
      x, y = parallel.constrain_leading((x, y), "data")  # On a mesh: the minibatch over `data`.
      logits = self.model.apply({"params": params}, x, train=True)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    n = len(self.y_syn)
    student_end = unroll_student(
        student_loss, start, jnp.arange(n), jnp.asarray(self.y_syn),
        lr=jax.nn.leaky_relu(lr, 0.01) + LR_FLOOR, num_steps=inner.steps,
        batch_size=inner.batch_size or n, key=key, remat=inner.remat, loss_takes_key=True,
        unroll=True if self.student_loop == "unrolled" else 1)
    return param_matching_loss(student_end, start, target)

  def mmd_loss(self, priors: Array, decoder: PyTree, params: PyTree, x_real: Array,
               key: Array) -> Array:
    """`sum_c MMD^2_u(psi(D_c), psi(S_c))` (module docstring, term 2).

    Args:
      x_real: `(C, S * LPC, H, W, ch)` real images of every class.
    """
    outer = self.config.outer
    samples = outer.mmd_samples // self.lpc
    synthetic = self.distribution(priors, decoder)
    everything = jnp.arange(len(self.y_syn))
    # S decodes of every prior, each with the batch statistics of the whole set (as released).
    x_syn = jnp.stack([synthetic.draw(everything, key=k)[0]
                       for k in jax.random.split(key, samples)], axis=1)
    per_class = samples * self.lpc
    x_syn = x_syn.reshape(self.num_classes, per_class, *x_syn.shape[2:])

    def features(x):
      flat = x.reshape(-1, *x.shape[2:])
      feats = self.model.apply({"params": params}, flat, train=True,
                               return_features=True)[1]["penultimate"]
      return feats.reshape(self.num_classes, per_class, -1)

    feat_real = jax.lax.stop_gradient(features(x_real))
    feat_syn = features(x_syn)
    per_class_mmd = jax.vmap(lambda a, b: mmd2(a, b, bandwidths=outer.bandwidths))(
        feat_syn, feat_real)
    return outer.mmd_weight * jnp.sum(per_class_mmd)

  def step(self, state: D3State, inputs: dict[str, Any]) -> tuple[D3State, dict[str, Array]]:
    """One iteration: the MTT update, then the MMD update (module docstring)."""
    outer = self.config.outer
    next_key, mtt_key, mmd_key, real_key = jax.random.split(state.key, 4)
    priors, decoder, lr = state.priors, state.decoder, state.lr
    opt_priors, opt_decoder, opt_lr = state.opt_priors, state.opt_decoder, state.opt_lr
    metrics = {"expert": inputs["expert"], "start_epoch": inputs["start_epoch"]}

    loss_mtt = jnp.zeros(())
    if outer.mtt_weight:
      loss_mtt, (g_priors, g_decoder, g_lr) = jax.value_and_grad(
          lambda p, d, a: outer.mtt_weight * self.mtt_loss(p, d, a, inputs["start"],
                                                           inputs["target"], mtt_key),
          argnums=(0, 1, 2))(priors, decoder, lr)
      priors, opt_priors = _apply(self.tx_priors, g_priors, opt_priors, priors)
      decoder, opt_decoder = _apply(self.tx_decoder, g_decoder, opt_decoder, decoder)
      lr, opt_lr = _apply(self.tx_lr, g_lr, opt_lr, lr)
      metrics["grad_lr"] = g_lr

    loss_mmd = jnp.zeros(())
    if outer.mmd_weight:
      x_train, y_train = self.device_train_set
      x_real = _pixels.real_class_batches(
          real_key, x_train, y_train, per_class=outer.mmd_samples // self.lpc * self.lpc,
          num_classes=self.num_classes)
      loss_mmd, (g_priors, g_decoder) = jax.value_and_grad(
          self.mmd_loss, argnums=(0, 1))(priors, decoder, inputs["mmd"], x_real, mmd_key)
      priors, opt_priors = _apply(self.tx_priors, g_priors, opt_priors, priors)
      decoder, opt_decoder = _apply(self.tx_decoder, g_decoder, opt_decoder, decoder)

    new_state = D3State(priors=priors, decoder=decoder, lr=lr, opt_priors=opt_priors,
                        opt_decoder=opt_decoder, opt_lr=opt_lr, key=next_key)
    metrics.update(loss=loss_mtt + loss_mmd, loss_mtt=loss_mtt, loss_mmd=loss_mmd, lr=lr)
    return new_state, metrics

  def result(self, state: D3State) -> DistributionSet:
    """The priors, labels, decoder and learned lr as a `distribution` set."""
    return jax.device_get(self.distribution(state.priors, state.decoder, state.lr))

  def divergence_hint(self) -> str:
    outer = self.config.outer
    return (f"lower outer.lr_latent (now {outer.lr_latent}), outer.lr_decode (now "
            f"{outer.lr_decode}) or outer.lr_lr (now {outer.lr_lr})")

  def report_extras(self, distilled_set, workdir) -> dict[str, Any]:
    """The decoder's size and the expert buffer behind the run."""
    del workdir
    buffer = self.buffer or experts_lib.ensure_buffer(self.config, self.data)
    decoder_values = sum(math.prod(np.shape(leaf))
                         for leaf in jax.tree.leaves(distilled_set.decoders))
    return {
        "d3": {"decoder": self.spec, "decoder_parameters": int(decoder_values),
               "lpc": self.lpc, "z_dim": self.z_dim,
               "subtask": {"index": self.config.subtask.index,
                           "count": self.config.subtask.count}},
        "experts": mtt_lib.expert_summary(buffer, self.config.inner.max_start_epoch),
    }


def _apply(tx, grads, opt_state, params):
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state
