"""D3S: dataset distillation with domain shift (Loo et al., paper 001; SRe2L/CDA's recover loop).

The set is synthesised batch by batch (Algorithms 1 and 3). The N = ipc * C images are laid out
slot-major, as SRe2L's recover scripts make them: batch b holds one image per class for B
consecutive classes of one IPC slot, so image i has class `i mod C`. Batch b is optimised for K
iterations (`config.num_steps`) on teacher `m = b mod M` (ensemble synthesis, ENS; teacher 0
without it), with a fresh Adam (betas 0.5/0.9, lr cosine-annealed to 0 over the K iterations).
Each iteration:

  1. augment the batch: torchvision RandomResizedCrop with CDA's curriculum (the minimum scale
     falls from 1 to 0.08, linearly by default), horizontal flip, and a random roll by up to
     `jitter` pixels (the recover scripts' jitter);
  2. one inference-mode forward pass of teacher m: logits and every conv output
     (`models`' `features["blocks"]`); `objectives.feature_gaussian` of each layer's output gives
     the batch statistics `(mu^{S,b}_l, Sigma^{S,b}_l)`;
  3. incremental statistic updating (ISU, Eq. 2): `hat s = (1/b) s^{S,b} + (1 - 1/b) tilde s`
     with teacher m's running statistics `tilde s` of the batches before (`objectives.
     incremental_stats`);
  4. loss (Eq. 1): `alpha * CE(f_m(views), y_b) + sum_l KL(N(hat mu_l, hat Sigma_l) ||
     N(mu^T_{m,l}, Sigma^T_{m,l}))` against the real-set statistics of teacher m
     (`objectives.gaussian_kl`; the ablations of Table 4 swap in a diagonal covariance and/or
     SRe2L's BatchNorm loss `||mu^S - mu^T||_2 + ||Sigma^S - Sigma^T||`);
  5. one Adam step on the batch's pixels, then the pixels are clipped to the valid range (the
     recover scripts' clip, in the preprocessed space).

After a batch's last iteration the running statistics of every teacher are updated with that
batch's (un-augmented) statistics under it (Algorithm 3's final loop). The whole state (all
images, the batch's Adam state, the running statistics, the iteration counter and the key) is one
pytree, so a killed run resumes bit-identically inside or between batches. The finished images
are relabelled (ensemble labelling, ENL, Algorithm 2: E_L epochs of recorded crops with the
teachers' mean logits) into a `distilled.RelabelledSet`, evaluated with the `d3s` protocol.
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
from distill_jax.data import crops
from distill_jax.methods import _pixels
from distill_jax.methods.base import DistillMethod, register_method
from distill_jax.objectives import feature_gaussian, gaussian_kl, incremental_stats
from distill_jax.training import teachers as teachers_lib

Array = jax.Array
PyTree = Any

STATISTIC_LOSSES = ("kl", "bn")
CURRICULA = ("linear", "cosine", "step")
# `fold_in` tag of the relabelling key: the set and the relabelled random subset share the crops.
_RELABEL_TAG = 1


@flax.struct.dataclass
class D3SState:
  """A D3S run's state (what the checkpoints hold).

  Attributes:
    x_syn: (N, H, W, ch) images, slot-major (image i has class i mod C); batches after the
      current one still hold their initial values.
    opt_state: Adam state of the current batch's pixels (reset at each batch's first iteration).
    running: per conv layer `(mean (M, C_l), cov (M, C_l, C_l))`, the ISU running statistics of
      every teacher over the finished batches.
    step: () int32, iterations done (batch `step // K`, iteration `step % K`).
    key: typed PRNG key of the next iteration.
  """

  x_syn: Array
  opt_state: Any
  running: Any
  step: Array
  key: Array


@register_method("d3s")
class D3S(DistillMethod):
  """D3S image synthesis with ISU and ENS, then ENL relabelling (see the module docstring).

  Args:
    config: a D3S config (`configs/d3s.py`).
    data: the `RealData` to distil.
  """

  def __init__(self, config: ml_collections.ConfigDict, data):
    super().__init__(config, data)
    outer, num_classes = config.outer, data.num_classes
    _pixels.check_init(config.init)
    for name, value, choices in (("statistic_loss", config.statistic_loss, STATISTIC_LOSSES),
                                 ("outer.curriculum", outer.curriculum, CURRICULA)):
      if value not in choices:
        raise ValueError(f"unknown config.{name} {value!r}; use one of {', '.join(choices)}")
    for name, value in (("num_steps", config.num_steps), ("outer.batch_size", outer.batch_size),
                        ("relabel.epochs", config.relabel.epochs),
                        ("teachers.num_teachers", config.teachers.num_teachers)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.{name} must be a positive int, got {value!r}")
    if not 0 <= outer.milestone <= 1:
      raise ValueError(f"config.outer.milestone={outer.milestone} must lie in [0, 1] (the "
                       "fraction of a batch's iterations the crop curriculum lasts)")
    if not 0 < outer.min_crop_scale <= 1:
      raise ValueError(f"config.outer.min_crop_scale={outer.min_crop_scale} must lie in (0, 1]")
    # SRe2L's layout: a batch is B consecutive classes of one IPC slot, so B divides C.
    self.batch_size = min(outer.batch_size, num_classes)
    if num_classes % self.batch_size:
      divisors = [d for d in range(1, num_classes + 1) if num_classes % d == 0]
      fits = max(d for d in divisors if d <= self.batch_size)
      raise ValueError(
          f"config.outer.batch_size={outer.batch_size} does not divide the {num_classes} classes "
          f"(a batch holds consecutive classes of one IPC slot); set it to {fits}")
    self.num_batches = config.ipc * num_classes // self.batch_size
    self.spec = teachers_lib.teacher_spec(config, data)  # Validates the teacher recipe.
    self.model = self.spec.make_model()
    self.adam = optax.scale_by_adam(b1=outer.adam_b1, b2=outer.adam_b2, eps=1e-8)

  @property
  def num_steps(self) -> int:
    """Iterations of the whole run: `num_batches` batches x `num_steps` (K) iterations each."""
    return self.num_batches * int(self.config.num_steps)

  @functools.cached_property
  def pool(self) -> teachers_lib.TeacherPool:
    """The teachers (trained, or read from the cache, on first use)."""
    return teachers_lib.ensure_teachers(self.config, self.data)

  def prepare(self) -> None:
    _ = self.device_inputs  # Trains the teachers and measures their statistics before step 1.

  @functools.cached_property
  def device_inputs(self) -> tuple[PyTree, list[tuple[Array, Array]]]:
    """`(stacked teacher variables, per layer (mean (M, C_l), cov (M, C_l, C_l)))` on the
    device: every teacher and its real-set statistics (`TeacherPool.statistics`)."""
    stats = [self.pool.statistics(m, self.data) for m in range(self.pool.num_teachers)]
    real = [(jnp.asarray(np.stack([s[l][0] for s in stats]), jnp.float32),
             jnp.asarray(np.stack([s[l][1] for s in stats]), jnp.float32))
            for l in range(len(stats[0]))]
    return self.pool.stacked_variables(), real

  def inputs(self, step: int):
    del step
    return self.device_inputs

  def init(self, key: Array) -> D3SState:
    init_key, run_key = jax.random.split(key)
    num_classes, ipc = self.data.num_classes, self.config.ipc
    x = _pixels.initial_images(self.data, ipc=ipc, seed=self.config.seed, init=self.config.init,
                               key=init_key)
    # Class-major (c * ipc + k) to slot-major (k * C + c).
    x = x.reshape(num_classes, ipc, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)
    features = jax.eval_shape(
        lambda: self.model.apply(self.model.init(jax.random.key(0), x[:1], train=False), x[:1],
                                 train=False, return_features=True))[1]["blocks"]
    teachers = self.config.teachers.num_teachers
    running = [(jnp.zeros((teachers, f.shape[-1])), jnp.zeros((teachers, f.shape[-1], f.shape[-1])))
               for f in features]
    return D3SState(x_syn=x, opt_state=self.adam.init(x[:self.batch_size]), running=running,
                    step=jnp.zeros((), jnp.int32), key=run_key)

  def min_scale(self, t: Array) -> Array:
    """CDA's curriculum: RandomResizedCrop's minimum scale at iteration `t` of a batch, from 1
    down to `min_crop_scale` over the first `milestone` of the K iterations."""
    low, span = self.config.outer.min_crop_scale, self.config.outer.milestone * self.config.num_steps
    progress = jnp.minimum(t / max(span, 1e-9), 1.0)
    if self.config.outer.curriculum == "linear":
      return low + (1.0 - low) * (1.0 - progress)
    if self.config.outer.curriculum == "cosine":
      return low + (1.0 - low) * (1.0 + jnp.cos(jnp.pi * progress)) / 2
    return jnp.where(progress < 1.0, 1.0, low)

  def augment(self, key: Array, x: Array, min_scale: Array) -> Array:
    """RandomResizedCrop (scale `min_scale`-1) + flip, then a roll by 0..jitter pixels."""
    crop_key, jitter_key = jax.random.split(key)
    params = crops.rrc_params(crop_key, x.shape[0], image_shape=x.shape[1:],
                              scale=(min_scale, 1.0))
    views = crops.rrc_apply(x, params, size=x.shape[1:3])
    shifts = jax.random.randint(jitter_key, (2,), 0, self.config.outer.jitter + 1)
    return jnp.roll(views, (shifts[0], shifts[1]), axis=(1, 2))

  def statistic_loss(self, mean_s: Array, cov_s: Array, mean_t: Array, cov_t: Array) -> Array:
    """One layer's matching term: the Gaussian KL (Eq. 1) or SRe2L's BatchNorm loss, on full or
    diagonal covariances (`full_covariance`, Table 4)."""
    if not self.config.full_covariance:
      cov_s, cov_t = jnp.diag(jnp.diagonal(cov_s)), jnp.diag(jnp.diagonal(cov_t))
    if self.config.statistic_loss == "kl":
      return gaussian_kl(mean_s, cov_s, mean_t, cov_t)
    return jnp.linalg.norm(mean_s - mean_t) + jnp.linalg.norm(cov_s - cov_t)

  def batch_statistics(self, variables: PyTree, x: Array) -> tuple[Array, list]:
    """`(logits, [(mean, cov) per conv layer])` of an inference-mode forward pass."""
    logits, features = self.model.apply(variables, x, train=False, return_features=True)
    return logits, [feature_gaussian(f) for f in features["blocks"]]

  def loss(self, x_b: Array, y_b: Array, variables: PyTree, real: list, running: list,
           batch_index: Array, key: Array, min_scale: Array) -> tuple[Array, tuple[Array, Array]]:
    """Eq. 1 with ISU for one batch: `alpha * CE + sum_l statistic_loss(hat s_l, s^T_l)`.

    Args:
      x_b: (B, H, W, ch) the batch's images; y_b: (B,) their classes.
      variables: the teacher's variables; real / running: its per-layer real and running
        `(mean, cov)`; batch_index: the 1-based batch number b of Eq. 2.
    """
    logits, stats = self.batch_statistics(variables, self.augment(key, x_b, min_scale))
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y_b))
    if self.config.isu:
      stats = incremental_stats(stats, running, batch_index=batch_index)
    matching = sum(self.statistic_loss(ms, cs, mt, ct)
                   for (ms, cs), (mt, ct) in zip(stats, real))
    return self.config.outer.alpha * ce + matching, (ce, matching)

  def step(self, state: D3SState, inputs) -> tuple[D3SState, dict[str, Array]]:
    teachers, real = inputs
    iterations, size = int(self.config.num_steps), self.batch_size
    b, t = state.step // iterations, state.step % iterations
    m = b % self.config.teachers.num_teachers if self.config.ens else jnp.zeros((), jnp.int32)
    pick = lambda tree: jax.tree.map(lambda a: a[m], tree)  # noqa: E731
    start = b * size
    # On a mesh the batch is split over `data` (its statistics reduce across devices).
    x_b = parallel.constrain_leading(jax.lax.dynamic_slice_in_dim(state.x_syn, start, size),
                                     "data")
    y_b = (start + jnp.arange(size)) % self.data.num_classes
    opt_state = jax.tree.map(lambda a: jnp.where(t == 0, jnp.zeros_like(a), a), state.opt_state)
    key, aug_key = jax.random.split(state.key)
    min_scale = self.min_scale(t)
    (loss, (ce, matching)), grad = jax.value_and_grad(self.loss, has_aux=True)(
        x_b, y_b, pick(teachers), pick(real), pick(state.running), b + 1, aug_key, min_scale)
    direction, opt_state = self.adam.update(grad, opt_state)
    lr = self.config.outer.lr * 0.5 * (1.0 + jnp.cos(jnp.pi * t / iterations))
    x_b = self.clip(x_b - lr * direction)
    running = jax.lax.cond(t == iterations - 1,
                           lambda r: self.update_running(r, x_b, teachers, b + 1),
                           lambda r: r, state.running)
    new_state = D3SState(x_syn=jax.lax.dynamic_update_slice_in_dim(state.x_syn, x_b, start, 0),
                         opt_state=opt_state, running=running, step=state.step + 1, key=key)
    return new_state, {"loss": loss, "ce": ce, "matching": matching, "min_scale": min_scale,
                       "lr": lr}

  def update_running(self, running: list, x_b: Array, teachers: PyTree, batch_index: Array):
    """Algorithm 3's end of batch: every teacher's running statistics absorb the finished
    batch's statistics under it (Eq. 2 with weight 1/b; the un-augmented images)."""
    per_teacher = []
    for m in range(self.config.teachers.num_teachers):
      _, stats = self.batch_statistics(jax.tree.map(lambda a: a[m], teachers), x_b)
      old = [(mean[m], cov[m]) for mean, cov in running]
      per_teacher.append(incremental_stats(stats, old, batch_index=batch_index))
    return [(jnp.stack([s[l][0] for s in per_teacher]), jnp.stack([s[l][1] for s in per_teacher]))
            for l in range(len(running))]

  def clip(self, x: Array) -> Array:
    """Pixels clipped to [0, 1] in image space, in the preprocessed space (SRe2L's clip)."""
    preprocessor = self.data.preprocessor
    if preprocessor is None:
      return jnp.clip(x, 0.0, 1.0)
    return preprocessor.apply(jnp.clip(preprocessor.invert(x), 0.0, 1.0))

  def labels(self) -> np.ndarray:
    """`(N,)` classes of the slot-major layout."""
    return np.arange(self.config.ipc * self.data.num_classes, dtype=np.int32) % self.data.num_classes

  def relabel(self, x: Any, y: Any, meta) -> distilled_lib.RelabelledSet:
    """Algorithm 2: E_L epochs of recorded crops labelled by the teachers' mean logits (ENL) or
    by teacher 0 alone; the same crops for every set of the same size."""
    pool = self.pool
    label_fn = pool.ensemble_logits if self.config.relabel.enl else functools.partial(
        pool.logits, 0)
    key = jax.random.fold_in(jax.random.key(self.config.seed), _RELABEL_TAG)
    return distilled_lib.relabel(x, y, label_fn, epochs=self.config.relabel.epochs, key=key,
                                 meta=meta)

  def result(self, state: D3SState) -> distilled_lib.RelabelledSet:
    return self.relabel(np.asarray(state.x_syn), self.labels(),
                        self.data.set_meta("d3s", self.config.ipc, label_kind="logits"))

  def baselines(self) -> dict[str, Any]:
    """The random subset beside the set relabelled by the same teachers with the same crops
    (separating the soft-label gain from the image gain)."""
    x, y = data_lib.random_subset(self.data.x_train, self.data.y_train, ipc=self.config.ipc,
                                  num_classes=self.data.num_classes, seed=self.config.seed)
    return {"random_relabelled": self.relabel(
        x, y, self.data.set_meta("random", self.config.ipc, label_kind="logits"))}

  def report_extras(self, distilled_set, workdir) -> dict[str, Any]:
    del distilled_set, workdir
    return {"teachers": self.pool.summary(),
            "relabel_epochs": int(self.config.relabel.epochs)}

  def divergence_hint(self) -> str:
    return f"lower outer.lr (now {self.config.outer.lr})"
