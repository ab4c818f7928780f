"""Expert trajectories for trajectory matching (MTT, D3, LatentMTT): training, storage, lazy reads.

MTT (Cazenavette et al. 2022, Section 3; the authors' `buffer.py`) trains E "experts" from
scratch on the real training set and records their parameters at initialisation and after every
epoch: the trajectory `theta*_0, ..., theta*_T`. Distillation then starts a student at `theta*_t`
and matches `theta*_{t+M}` (D3 Appendix B.3 and LatentDD Algorithm 3 reuse the same buffers).
The authors' recipe, kept here as the defaults: ConvNet (width 128, depth 3, instance norm), SGD
with lr 0.01, no momentum, no weight decay, batch 256 with a reshuffle every epoch and the last
batch partial, DSA (`color_crop_cutout_flip_scale_rotate`, one op per batch) on every real batch,
cross-entropy, 50 epochs, no learning-rate decay.

What differs from `buffer.py` is the machinery:

- `experts_per_shard` experts train together in one jitted step (`jax.vmap` over stacked
  parameters), driven by a host loop over the steps of an epoch (no `lax.scan`: XLA:CPU runs
  convolution gradients inside loops 10-25x slower); each expert has its own initialisation,
  data order and augmentation.
- The buffer is a directory of Orbax checkpoints, one per (shard, epoch), each holding that
  epoch's parameters of the shard's experts as separate subtrees, so `TrajectoryBuffer.params`
  restores exactly one expert at one epoch (`partial_restore`) and a buffer of 100 experts x 50
  epochs never has to fit in memory.
- Every epoch checkpoint is also the resume point: a killed run restarts from the last
  finalised epoch of the unfinished shard (the keys are derived from the seed, shard and epoch,
  so the resumed trajectory is the one an uninterrupted run writes).
- The directory is keyed by a hash of everything that determines its contents (`ExpertSpec`:
  recipe, model, dataset, preprocessing and a fingerprint of the training arrays), under
  `$DISTILL_JAX_CACHE/buffers/` (default `~/.cache/distill_jax/buffers/`), so MTT, D3 and
  LatentMTT runs with the same expert settings share one buffer. A buffer with more experts
  than a run asks for serves it; one with fewer is extended.

Layout of a buffer directory::

  buffer.json                 the ExpertSpec and its digest
  shard_0000/epoch_000/       Orbax: {"params": {"expert_00": params, ...},
                                      "opt_state": {"0": leaf, ...}, "metrics": {...}}
  shard_0000/epoch_050/
  shard_0000/shard.json       written once the shard's last epoch is saved: it is complete

>>> import numpy as np, tempfile
>>> from distill_jax.methods.base import RealData
>>> rng = np.random.default_rng(0)
>>> x = rng.normal(size=(32, 8, 8, 1)).astype(np.float32)
>>> y = np.arange(32, dtype=np.int32) % 2
>>> data = RealData("toy", 2, (8, 8, 1), ("a", "b"), x, y, x[:4], y[:4], None)
>>> spec = ExpertSpec.create(data, preprocessing="none", num_epochs=2, batch_size=16,
...                          dsa_strategy="", experts_per_shard=2,
...                          model_kwargs={"width": 4, "depth": 2})
>>> buffer = train_experts(spec, data, tempfile.mkdtemp(), num_experts=2)
>>> buffer.num_experts, buffer.num_epochs
(2, 2)
>>> sorted(buffer.params(1, 2))[:2]
['Conv_0', 'Conv_1']
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from distill_jax import models
from distill_jax.data import augment
from distill_jax.data.datasets import fingerprint

PyTree = Any

FORMAT_VERSION = 1
CACHE_ENV = "DISTILL_JAX_CACHE"
_SPEC_FILE = "buffer.json"
_SHARD_DONE_FILE = "shard.json"
_LOCK_FILE = ".lock"
_EPOCH_RE = re.compile(r"^epoch_(\d{3,})$")
# Test images per forward pass when measuring an expert's accuracy.
_EVAL_CHUNK = 1000


class BufferError(ValueError):
  """A trajectory buffer is missing, incomplete, or was written with other settings."""


@dataclasses.dataclass(frozen=True)
class ExpertSpec:
  """Everything that determines a trajectory buffer's contents; its digest names the directory.

  The number of experts is deliberately not part of it: experts are independent (keyed by seed,
  shard and position), so a buffer grows by whole shards and serves any run asking for fewer.

  Attributes:
    dataset: name of the real dataset (`RealData.name`).
    preprocessing: preprocessor kind the training arrays went through (e.g. "zca_kornia").
    data_fingerprint: sha256 (hex, 16 chars) of the raw training images and labels
      (`RealData.source_fingerprint`), else of the arrays as given: another subset, source or
      latent encoder gives another buffer, another XLA thread count fitting the same ZCA does not.
    image_shape: `(H, W, C)` of the training inputs.
    num_classes: classes C.
    model: name in `distill_jax.models.MODELS`.
    model_kwargs: its keyword arguments as sorted `(name, value)` pairs.
    num_epochs: epochs per expert T; the trajectory has T + 1 entries (initialisation first).
    lr: SGD learning rate (`buffer.py --lr_teacher`, 0.01).
    momentum: SGD momentum (`buffer.py` builds `SGD(momentum=0)`).
    weight_decay: L2 coefficient added to the gradient (PyTorch SGD style; `buffer.py`: 0).
    batch_size: real images per step (`buffer.py --batch_train`, 256); the last batch of an
      epoch is partial, as PyTorch's `DataLoader(drop_last=False)`.
    dsa_strategy: DSA ops applied to every real batch, one chosen per batch ("" for none).
    experts_per_shard: experts trained together in one vmapped program and stored together.
    seed: root of every key (initialisation, data order, augmentation).
  """

  dataset: str
  preprocessing: str
  data_fingerprint: str
  image_shape: tuple[int, int, int]
  num_classes: int
  model: str = "convnet"
  model_kwargs: tuple[tuple[str, Any], ...] = (("depth", 3), ("norm", "instance"), ("width", 128))
  num_epochs: int = 50
  lr: float = 0.01
  momentum: float = 0.0
  weight_decay: float = 0.0
  batch_size: int = 256
  dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
  experts_per_shard: int = 10
  seed: int = 0

  def __post_init__(self):
    for name in ("num_epochs", "batch_size", "experts_per_shard", "num_classes"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"experts.{name} must be a positive int, got {value!r}")
    if not (isinstance(self.lr, (int, float)) and self.lr > 0):
      raise ValueError(f"experts.lr must be > 0, got {self.lr!r}")
    if not 0 <= self.momentum < 1:
      raise ValueError(f"experts.momentum must be in [0, 1), got {self.momentum!r}")
    if self.weight_decay < 0:
      raise ValueError(f"experts.weight_decay must be >= 0, got {self.weight_decay!r}")
    object.__setattr__(self, "image_shape", tuple(int(d) for d in self.image_shape))
    object.__setattr__(
        self, "model_kwargs", tuple(sorted((str(k), v) for k, v in dict(self.model_kwargs).items()))
    )

  @classmethod
  def create(cls, data, *, preprocessing: str, model_kwargs: Mapping[str, Any] | None = None,
             **fields: Any) -> ExpertSpec:
    """The spec for training on `data` (a `RealData`); `fields` override the defaults above."""
    if model_kwargs is not None:
      fields["model_kwargs"] = tuple(dict(model_kwargs).items())
    return cls(
        dataset=data.name,
        preprocessing=preprocessing,
        # The raw arrays' digest when the loader recorded it (with `preprocessing` above it
        # names the data exactly and does not depend on float bits of a fitted whitening);
        # hand-built data without it is keyed on its arrays as given.
        data_fingerprint=data.source_fingerprint or fingerprint(data.x_train, data.y_train),
        image_shape=tuple(data.x_train.shape[1:]),
        num_classes=int(data.num_classes),
        **fields,
    )

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready dict of every field (model kwargs as a dict)."""
    out = dataclasses.asdict(self)
    out["image_shape"] = list(self.image_shape)
    out["model_kwargs"] = dict(self.model_kwargs)
    return out

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ExpertSpec:
    """Inverse of `to_dict`."""
    d = dict(d)
    d["model_kwargs"] = tuple(dict(d["model_kwargs"]).items())
    return cls(**d)

  def digest(self) -> str:
    """16 hex chars of sha256 over the canonical JSON of the spec and the storage format."""
    payload = json.dumps({"format": FORMAT_VERSION, **self.to_dict()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]

  def make_model(self):
    """The expert (and student) network."""
    return models.get_model(self.model, num_classes=self.num_classes, **dict(self.model_kwargs))

  def optimizer(self) -> optax.GradientTransformation:
    """PyTorch `SGD(lr, momentum, weight_decay)`: decay added to the gradient, then momentum."""
    sgd = optax.sgd(self.lr, momentum=self.momentum or None)
    if self.weight_decay:
      return optax.chain(optax.add_decayed_weights(self.weight_decay), sgd)
    return sgd


def expert_spec(config: ml_collections.ConfigDict, data) -> ExpertSpec:
  """The `ExpertSpec` of a method config's `experts` block for `data` (a `RealData`).

  Reads `config.preprocessing` and `config.experts.{model, model_kwargs, num_epochs, lr,
  momentum, weight_decay, batch_size, dsa_strategy, experts_per_shard, seed}`.
  """
  e = config.experts
  return ExpertSpec.create(
      data,
      preprocessing=config.preprocessing,
      model=e.model,
      model_kwargs=dict(e.model_kwargs),
      num_epochs=e.num_epochs,
      lr=float(e.lr),
      momentum=float(e.momentum),
      weight_decay=float(e.weight_decay),
      batch_size=e.batch_size,
      dsa_strategy=e.dsa_strategy,
      experts_per_shard=min(e.experts_per_shard, e.num_experts),
      seed=e.seed,
  )


def cache_root() -> str:
  """`$DISTILL_JAX_CACHE/buffers`, or `~/.cache/distill_jax/buffers` when it is unset."""
  root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "distill_jax")
  return os.path.join(root, "buffers")


def default_buffer_dir(spec: ExpertSpec) -> str:
  """Where the buffer of `spec` lives unless a config names a directory: `cache_root()/<digest>`."""
  return os.path.join(cache_root(), spec.digest())


def ensure_buffer(config: ml_collections.ConfigDict, data) -> TrajectoryBuffer:
  """The buffer a method config asks for, trained first where it is missing or incomplete.

  The directory is `config.experts.buffer_dir` when set, else `default_buffer_dir(spec)`. An
  already complete buffer is opened without training; an interrupted one resumes.

  Args:
    config: a method config with `preprocessing` and an `experts` block (see `configs/mtt.py`).
    data: the `RealData` the experts train on (already preprocessed).

  Returns:
    A `TrajectoryBuffer` of exactly `config.experts.num_experts` experts.
  """
  spec = expert_spec(config, data)
  path = config.experts.buffer_dir or default_buffer_dir(spec)
  return train_experts(spec, data, path, num_experts=config.experts.num_experts)


# ----------------------------------------------------------------------------------------------
# Training.


def _check_trainable(spec: ExpertSpec, num_experts: int) -> None:
  if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
    raise ValueError(f"experts.num_experts must be a positive int, got {num_experts!r}")
  if num_experts % spec.experts_per_shard:
    raise ValueError(
        f"experts.num_experts={num_experts} is not a multiple of experts.experts_per_shard="
        f"{spec.experts_per_shard}; buffers grow by whole shards, make it a multiple"
    )


def _shard_key(spec: ExpertSpec, shard: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(spec.seed), shard)


def init_shard(spec: ExpertSpec, shard: int) -> tuple[PyTree, PyTree]:
  """Initial parameters and optimiser states of one shard, stacked `(experts_per_shard, ...)`.

  Expert i of shard s is initialised from `fold_in(fold_in(key(seed), s), 0)` split into
  `experts_per_shard` keys, so every expert is reproducible without the others.
  """
  keys = jax.random.split(jax.random.fold_in(_shard_key(spec, shard), 0), spec.experts_per_shard)
  params, others = _make_init(spec)(keys)
  if jax.tree.leaves(others):
    raise ValueError(
        f"expert model {spec.model} with {dict(spec.model_kwargs)} has state besides its "
        f"parameters ({', '.join(others)}); trajectories only record parameters, use a model "
        "without batch norm (MTT's ConvNet uses norm='instance')"
    )
  opt_state = jax.vmap(spec.optimizer().init)(params)
  return params, opt_state


@functools.lru_cache(maxsize=4)
def _make_init(spec: ExpertSpec):
  # Cached per spec: every shard (and every call of train_experts) reuses one compilation.
  model = spec.make_model()
  x = jnp.zeros((1, *spec.image_shape), jnp.float32)

  def init_one(key):
    variables = model.init(key, x)
    return variables["params"], {k: v for k, v in variables.items() if k != "params"}

  return jax.jit(jax.vmap(init_one))


def epoch_keys(spec: ExpertSpec, shard: int, epoch: int) -> jax.Array:
  """Keys `(experts_per_shard,)` for the data order and augmentation of 1-based `epoch`."""
  key = jax.random.fold_in(jax.random.fold_in(_shard_key(spec, shard), 1), epoch)
  return jax.random.split(key, spec.experts_per_shard)


@functools.lru_cache(maxsize=4)
def make_train_epoch(spec: ExpertSpec, num_train: int):
  """A function training every expert of a shard for one epoch.

  `train_epoch(params, opt_state, keys, x_train, y_train) -> (params, opt_state, mean_loss)`
  with stacked `params`/`opt_state` (leading axis experts_per_shard), `keys (E,)`, `x_train
  (N, H, W, C)`, `y_train (N,)` int. Each expert reshuffles the N examples with its key, takes
  `ceil(N / batch_size)` SGD steps (the last batch partial, padded and masked out of the mean),
  augments each batch with DSA under a fresh key, and returns its mean training loss `(E,)`.

  The steps are a host loop over one jitted, vmapped SGD step rather than a `lax.scan`:
  XLA:CPU runs convolution gradients inside while loops 10-25x slower than at the top level
  (it does not canonicalise those convolutions), and one dispatch per step costs nothing next
  to a step. Each expert's keys: `order_key, aug_key = split(key)`; the order is
  `permutation(order_key, N)` padded with its own head to whole batches; step i augments with
  `split(aug_key, steps)[i]`.
  """
  model = spec.make_model()
  tx = spec.optimizer()
  batch = min(spec.batch_size, num_train)
  steps = -(-num_train // batch)
  pad = steps * batch - num_train
  mask = (np.arange(steps * batch) < num_train).astype(np.float32).reshape(steps, batch)
  counts = mask.sum(1)

  def loss_fn(params, x, y, weight, key):
    if spec.dsa_strategy:
      x = augment.dsa(key, x, strategy=spec.dsa_strategy, mode="single")
    logits = model.apply({"params": params}, x, train=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(ce * weight) / jnp.sum(weight)

  def plan_one(key):
    order_key, aug_key = jax.random.split(key)
    order = jax.random.permutation(order_key, num_train)
    # Padding with the first indices only fills the shape; their weight is 0.
    order = jnp.concatenate([order, order[:pad]]).reshape(steps, batch)
    return order, jax.random.split(aug_key, steps)

  def step_one(params, opt_state, idx, weight, key, x_train, y_train):
    loss, grads = jax.value_and_grad(loss_fn)(params, x_train[idx], y_train[idx], weight, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  plan = jax.jit(jax.vmap(plan_one))
  step = jax.jit(jax.vmap(step_one, in_axes=(0, 0, 0, None, 0, None, None)), donate_argnums=(0, 1))

  def train_epoch(params, opt_state, keys, x_train, y_train):
    orders, step_keys = plan(keys)
    total = 0.0
    for i in range(steps):
      params, opt_state, loss = step(params, opt_state, orders[:, i], mask[i], step_keys[:, i],
                                     x_train, y_train)
      total = total + loss * counts[i]
    return params, opt_state, total / num_train

  return train_epoch


@functools.lru_cache(maxsize=4)
def make_evaluate(spec: ExpertSpec):
  """Jitted `evaluate(params, x, y) -> accuracy (E,)` of stacked experts on a test set."""
  model = spec.make_model()

  def accuracy(params, x, y):
    n = x.shape[0]
    chunk = min(_EVAL_CHUNK, n)
    full = n // chunk * chunk

    def correct(xb, yb):
      return jnp.sum(jnp.argmax(model.apply({"params": params}, xb), -1) == yb)

    head = jax.lax.map(
        lambda b: correct(*b),
        (x[:full].reshape(-1, chunk, *x.shape[1:]), y[:full].reshape(-1, chunk)),
    ).sum()
    tail = correct(x[full:], y[full:]) if full < n else 0
    return (head + tail) / n

  return jax.jit(jax.vmap(accuracy, in_axes=(0, None, None)))


def train_experts(
    spec: ExpertSpec, data, path: str, *, num_experts: int
) -> TrajectoryBuffer:
  """Trains (or finishes training) `num_experts` experts of `spec` into the buffer at `path`.

  Complete shards are skipped; an unfinished shard resumes from its last finalised epoch, so
  running this again after a kill continues where it stopped and writes the same trajectories.
  A file lock serialises processes training the same buffer.

  Args:
    spec: the expert recipe; must match the spec already stored at `path`, if any.
    data: `RealData` with `x_train (N, H, W, C)` float32, `y_train (N,)` int32 and the test split
      (used to log each expert's test accuracy after every epoch).
    path: the buffer directory.
    num_experts: experts wanted, a multiple of `spec.experts_per_shard`.

  Returns:
    A `TrajectoryBuffer` over the first `num_experts` experts.

  Raises:
    BufferError: `path` holds a buffer written with a different spec.
  """
  _check_trainable(spec, num_experts)
  if tuple(data.x_train.shape[1:]) != spec.image_shape:
    raise ValueError(
        f"the training images have shape {data.x_train.shape[1:]} but the expert spec says "
        f"{spec.image_shape}; build the spec from this data with expert_spec/ExpertSpec.create"
    )
  os.makedirs(path, exist_ok=True)
  num_shards = num_experts // spec.experts_per_shard
  with _locked(path):
    _write_or_check_spec(path, spec)
    todo = [s for s in range(num_shards) if not _shard_complete(path, s)]
    if todo:
      x_train = jnp.asarray(data.x_train, jnp.float32)
      y_train = jnp.asarray(data.y_train, jnp.int32)
      x_test = jnp.asarray(data.x_test, jnp.float32)
      y_test = jnp.asarray(data.y_test, jnp.int32)
      train_epoch = make_train_epoch(spec, int(x_train.shape[0]))
      evaluate = make_evaluate(spec)
      checkpointer = ocp.PyTreeCheckpointer()
      epoch_seconds = []  # Every epoch this call trains, for the log's time-left estimate.
      for i, shard in enumerate(todo):
        _train_shard(spec, path, shard, train_epoch, evaluate, checkpointer,
                     x_train, y_train, x_test, y_test, epoch_seconds=epoch_seconds,
                     later_epochs=spec.num_epochs * (len(todo) - i - 1))
  return TrajectoryBuffer(path, num_experts=num_experts)


def _train_shard(spec, path, shard, train_epoch, evaluate, checkpointer,
                 x_train, y_train, x_test, y_test, *, epoch_seconds: list[float],
                 later_epochs: int) -> None:
  shard_dir = _shard_dir(path, shard)
  os.makedirs(shard_dir, exist_ok=True)
  for name in os.listdir(shard_dir):
    if ocp.utils.TMP_DIR_SUFFIX in name:  # A save a killed run left half-written.
      shutil.rmtree(os.path.join(shard_dir, name))
  params, opt_state = init_shard(spec, shard)
  done = _finalised_epochs(shard_dir)
  # Only a gapless prefix 0..k counts: a later epoch without its predecessors is not resumable.
  last = -1
  while last + 1 in done:
    last += 1
  if last >= 0:
    params, opt_state = _restore_epoch(checkpointer, shard_dir, last, params, opt_state)
    logging.info("Shard %d of %s: resuming after epoch %d.", shard, path, last)
  else:
    accuracy = evaluate(params, x_test, y_test)
    _save_epoch(checkpointer, shard_dir, 0, params, opt_state,
                loss=np.full(spec.experts_per_shard, np.nan, np.float32), accuracy=accuracy)
    last = 0
  for epoch in range(last + 1, spec.num_epochs + 1):
    start = time.perf_counter()
    params, opt_state, loss = train_epoch(params, opt_state, epoch_keys(spec, shard, epoch),
                                          x_train, y_train)
    accuracy = evaluate(params, x_test, y_test)
    loss = np.asarray(loss)
    if not np.all(np.isfinite(loss)):
      raise FloatingPointError(
          f"expert training diverged (loss {loss.tolist()}) in shard {shard}, epoch {epoch}; "
          f"lower experts.lr (now {spec.lr})"
      )
    _save_epoch(checkpointer, shard_dir, epoch, params, opt_state, loss=loss, accuracy=accuracy)
    epoch_seconds.append(time.perf_counter() - start)
    # The median leaves out the first epoch's compilation once there are a few.
    left = (spec.num_epochs - epoch + later_epochs) * float(np.median(epoch_seconds))
    logging.info(
        "Shard %d epoch %d/%d: train loss %s, test accuracy %s (%.1f s; the buffer needs about "
        "%s more)", shard, epoch, spec.num_epochs, np.round(loss, 4).tolist(),
        np.round(np.asarray(accuracy), 4).tolist(), epoch_seconds[-1],
        f"{left:.0f} s" if left < 120 else f"{left / 60:.0f} min",
    )
  metrics = [
      checkpointer.restore(
          _epoch_dir(shard_dir, e),
          args=ocp.args.PyTreeRestore(
              item={"metrics": _metrics_template(spec)},
              restore_args={"metrics": _numpy_restore_args(_metrics_template(spec))},
              partial_restore=True,
          ),
      )["metrics"]
      for e in range(spec.num_epochs + 1)
  ]
  _write_json(os.path.join(shard_dir, _SHARD_DONE_FILE), {
      "experts": spec.experts_per_shard,
      "epochs": spec.num_epochs,
      # [epoch][expert]; epoch 0 is the initialisation (no training loss).
      "train_loss": [np.asarray(m["train_loss"]).tolist() for m in metrics],
      "test_accuracy": [np.asarray(m["test_accuracy"]).tolist() for m in metrics],
  })


def _metrics_template(spec: ExpertSpec) -> dict[str, np.ndarray]:
  e = spec.experts_per_shard
  return {"train_loss": np.zeros(e, np.float32), "test_accuracy": np.zeros(e, np.float32)}


def _numpy_restore_args(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)


def _save_epoch(checkpointer, shard_dir, epoch, params, opt_state, *, loss, accuracy) -> None:
  params = jax.device_get(params)
  num = jax.tree.leaves(params)[0].shape[0]
  tree = {
      "params": {_expert_name(i): jax.tree.map(lambda a, i=i: a[i], params) for i in range(num)},
      "metrics": {
          "train_loss": np.asarray(loss, np.float32),
          "test_accuracy": np.asarray(accuracy, np.float32),
      },
  }
  opt_leaves = jax.device_get(jax.tree.leaves(opt_state))
  if opt_leaves:  # SGD without momentum has no state at all.
    tree["opt_state"] = {str(i): leaf for i, leaf in enumerate(opt_leaves)}
  # Orbax writes to a temporary directory and renames it when complete: a kill mid-save
  # leaves no directory that `_finalised_epochs` would count.
  target = _epoch_dir(shard_dir, epoch)
  checkpointer.save(target, tree, force=True)


def _restore_epoch(checkpointer, shard_dir, epoch, params_template, opt_template):
  num = jax.tree.leaves(params_template)[0].shape[0]
  host_params = jax.device_get(params_template)
  item = {"params": {_expert_name(i): jax.tree.map(lambda a, i=i: a[i], host_params)
                     for i in range(num)}}
  opt_leaves, opt_def = jax.tree.flatten(jax.device_get(opt_template))
  if opt_leaves:
    item["opt_state"] = {str(i): leaf for i, leaf in enumerate(opt_leaves)}
  restored = checkpointer.restore(
      _epoch_dir(shard_dir, epoch),
      args=ocp.args.PyTreeRestore(item=item, restore_args=_numpy_restore_args(item),
                                  partial_restore=True),
  )
  experts = [restored["params"][_expert_name(i)] for i in range(num)]
  params = jax.tree.map(lambda *a: jnp.stack(a), *experts)
  if opt_leaves:
    opt_state = jax.tree.unflatten(
        opt_def, [jnp.asarray(restored["opt_state"][str(i)]) for i in range(len(opt_leaves))]
    )
  else:
    opt_state = opt_template
  return params, opt_state


# ----------------------------------------------------------------------------------------------
# Reading.


class TrajectoryBuffer:
  """Read-only, lazy access to a trajectory buffer: one expert at one epoch per read.

  Nothing is loaded when the buffer is opened; `params(expert, epoch)` restores that single
  subtree from the (shard, epoch) Orbax checkpoint. A small LRU cache keeps the last few reads,
  since MTT reads an expert's start and target epochs together.

  Attributes:
    path: the buffer directory.
    spec: its `ExpertSpec`.
    num_experts: experts served (indices `0 .. num_experts - 1`).
    num_epochs: T; epochs `0 .. T` are stored (0 = initialisation).
    reads: number of restores from disk so far (cache hits excluded).
    bytes_read: bytes of parameters restored from disk so far.
  """

  def __init__(self, path: str, *, num_experts: int | None = None, cache_size: int = 8):
    """Opens the buffer at `path`, serving its first `num_experts` experts (default: all complete).

    Raises:
      BufferError: no buffer at `path`, or fewer complete experts than `num_experts`.
    """
    spec_path = os.path.join(path, _SPEC_FILE)
    if not os.path.exists(spec_path):
      raise BufferError(
          f"no trajectory buffer at {path} ({_SPEC_FILE} missing); train one with "
          "`python -m launch.train_experts --config=... --buffer_dir=...`"
      )
    self.path = path
    self.spec = ExpertSpec.from_dict(_read_json(spec_path)["spec"])
    complete = 0
    while _shard_complete(path, complete):
      complete += 1
    available = complete * self.spec.experts_per_shard
    if num_experts is None:
      num_experts = available
    if num_experts < 1 or num_experts > available:
      raise BufferError(
          f"the buffer at {path} has {available} complete experts but {num_experts} were asked "
          "for; train the rest with launch.train_experts (it resumes) or ask for fewer"
      )
    self.num_experts = int(num_experts)
    self.num_epochs = self.spec.num_epochs
    self.reads = 0
    self.bytes_read = 0
    self._checkpointer = ocp.PyTreeCheckpointer()
    self._template = None
    self._cached = functools.lru_cache(maxsize=cache_size)(self._read)

  def __repr__(self) -> str:
    return (f"TrajectoryBuffer({self.path!r}, num_experts={self.num_experts}, "
            f"num_epochs={self.num_epochs})")

  def _check(self, expert: int, epoch: int) -> None:
    if not 0 <= expert < self.num_experts:
      raise ValueError(f"expert {expert} out of range; this buffer serves 0..{self.num_experts - 1}")
    if not 0 <= epoch <= self.num_epochs:
      raise ValueError(f"epoch {epoch} out of range; this buffer stores 0..{self.num_epochs}")

  def params(self, expert: int, epoch: int) -> PyTree:
    """The parameters of `expert` after `epoch` epochs (0 = initialisation), as numpy arrays.

    Only that expert's arrays of that epoch's checkpoint are read.
    """
    expert, epoch = int(expert), int(epoch)
    self._check(expert, epoch)
    return self._cached(expert, epoch)

  def _read(self, expert: int, epoch: int) -> PyTree:
    shard, local = divmod(expert, self.spec.experts_per_shard)
    name = _expert_name(local)
    item = {"params": {name: self.template()}}
    restored = self._checkpointer.restore(
        _epoch_dir(_shard_dir(self.path, shard), epoch),
        args=ocp.args.PyTreeRestore(item=item, restore_args=_numpy_restore_args(item),
                                    partial_restore=True),
    )
    params = restored["params"][name]
    self.reads += 1
    self.bytes_read += sum(a.nbytes for a in jax.tree.leaves(params))
    return params

  def template(self) -> PyTree:
    """Zero arrays with the structure, shapes and dtypes of one expert's parameters."""
    if self._template is None:
      model = self.spec.make_model()
      shapes = jax.eval_shape(
          lambda: model.init(jax.random.key(0), jnp.zeros((1, *self.spec.image_shape)))["params"]
      )
      self._template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    return self._template

  def metrics(self) -> dict[str, np.ndarray]:
    """Per-expert curves `{"train_loss", "test_accuracy"}`, each `(num_experts, T + 1)`."""
    per_shard = [_read_json(os.path.join(_shard_dir(self.path, s), _SHARD_DONE_FILE))
                 for s in range(self.num_experts // self.spec.experts_per_shard)]
    return {
        key: np.concatenate([np.asarray(m[key], np.float32).T for m in per_shard])
        for key in ("train_loss", "test_accuracy")
    }


# ----------------------------------------------------------------------------------------------
# Files.


def _expert_name(local: int) -> str:
  return f"expert_{local:02d}"


def _shard_dir(path: str, shard: int) -> str:
  return os.path.join(path, f"shard_{shard:04d}")


def _epoch_dir(shard_dir: str, epoch: int) -> str:
  return os.path.join(shard_dir, f"epoch_{epoch:03d}")


def _finalised_epochs(shard_dir: str) -> set[int]:
  epochs = set()
  if not os.path.isdir(shard_dir):
    return epochs
  for name in os.listdir(shard_dir):
    match = _EPOCH_RE.match(name)
    full = os.path.join(shard_dir, name)
    if match and ocp.utils.is_checkpoint_finalized(full):
      epochs.add(int(match.group(1)))
  return epochs


def _shard_complete(path: str, shard: int) -> bool:
  return os.path.exists(os.path.join(_shard_dir(path, shard), _SHARD_DONE_FILE))


def _write_or_check_spec(path: str, spec: ExpertSpec) -> None:
  spec_path = os.path.join(path, _SPEC_FILE)
  if not os.path.exists(spec_path):
    _write_json(spec_path, {"format": FORMAT_VERSION, "digest": spec.digest(), "spec": spec.to_dict()})
    return
  stored = _read_json(spec_path)["spec"]
  wanted = spec.to_dict()
  diff = [f"{k}: stored {stored.get(k)!r}, wanted {wanted[k]!r}"
          for k in wanted if stored.get(k) != wanted[k]]
  if diff:
    raise BufferError(
        f"the buffer at {path} was trained with other settings ({'; '.join(diff)}); point "
        "experts.buffer_dir elsewhere or leave it empty to use the cache directory of these settings"
    )


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
  # flock is released by the kernel when the process dies, so a killed run never leaves a stale lock.
  with open(os.path.join(path, _LOCK_FILE), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, value: Any) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)  # Atomic: a kill never leaves half a file behind.
