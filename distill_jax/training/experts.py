"""Expert trajectories for trajectory matching (MTT, D3, LatentMTT): recipe, training, lazy reads.

MTT (Cazenavette et al. 2022, Section 3; the authors' `buffer.py`) trains E "experts" from
scratch on the real training set and records their parameters at initialisation and after every
epoch: the trajectory `theta*_0, ..., theta*_T`. Distillation then starts a student at `theta*_t`
and matches `theta*_{t+M}` (D3 Appendix B.3 and LatentDD Algorithm 3 reuse the same buffers).
The authors' recipe, kept here as the defaults: ConvNet (width 128, depth 3, instance norm), SGD
with lr 0.01, no momentum, no weight decay, batch 256 with a reshuffle every epoch and the last
batch partial, DSA (`color_crop_cutout_flip_scale_rotate`, one op per batch) on every real batch,
cross-entropy, 50 epochs, no learning-rate decay.

What differs from `buffer.py` is the machinery:

- The recipe (`ExpertSpec`) is apart from the storage: experts train on the shared
  `training.Trainer` (`ExpertSpec.recipe()`), `experts_per_shard` at a time, and every epoch is a
  save point of a `training.TrajectoryStore` (one `io.Checkpointer` folder per shard), which
  also keeps batch-norm statistics for models that have them.
- Expert i trains from `fold_in(key(seed), i)`: experts are independent of each other and of the
  shard size; a killed run resumes from the last saved epoch of the unfinished shard and writes
  the trajectory an uninterrupted run writes (the trainer's keys depend on the step only).
- The directory is keyed by a hash of everything that determines its contents (the spec: recipe,
  model, dataset, preprocessing and `RealData.fingerprint`), under
  `$DISTILL_JAX_CACHE/buffers/` (default `~/.cache/distill_jax/buffers/`), so MTT, D3 and
  LatentMTT runs with the same expert settings share one buffer. A buffer with more experts than a
  run asks for serves it; one with fewer is extended. (Format 2: buffers of format 1, written
  before the shared trainer, are not read; their settings hash to other directories.)

>>> import numpy as np, tempfile
>>> from distill_jax.data import RealData
>>> rng = np.random.default_rng(0)
>>> x = rng.normal(size=(32, 8, 8, 1)).astype(np.float32)
>>> y = np.arange(32, dtype=np.int32) % 2
>>> data = RealData("toy", 2, (8, 8, 1), ("a", "b"), x, y, x[:4], y[:4])
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
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from distill_jax import distilled
from distill_jax import models
from distill_jax.io._atomic import atomic_write_text
from distill_jax.training.recipe import Recipe
from distill_jax.training.trainer import Trainer
from distill_jax.training.trajectories import TrajectoryStore

PyTree = Any

FORMAT_VERSION = 2
CACHE_ENV = "DISTILL_JAX_CACHE"
_SPEC_FILE = "buffer.json"
_LOCK_FILE = ".lock"
_METRICS = ("train_loss", "test_accuracy")


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
    data_fingerprint: `RealData.fingerprint` of the training data: another subset, source or
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
        data_fingerprint=data.fingerprint,
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

  def recipe(self) -> Recipe:
    """The experts' training recipe: PyTorch SGD at a constant lr, cross-entropy, DSA."""
    return Recipe(
        model=self.model, model_kwargs=dict(self.model_kwargs), optimizer="sgd", lr=self.lr,
        momentum=self.momentum, weight_decay=self.weight_decay, schedule="constant",
        epochs=self.num_epochs, batch_size=self.batch_size, loss="ce",
        augmentation="dsa" if self.dsa_strategy else "none",
        aug_strategy=self.dsa_strategy or "none", aug_mode="single",
    )

  def expert_keys(self, experts: range) -> jax.Array:
    """`(len(experts),)` keys: expert i trains from `fold_in(key(seed), i)`."""
    root = jax.random.key(self.seed)
    return jnp.stack([jax.random.fold_in(root, i) for i in experts])


def expert_spec(config: ml_collections.ConfigDict, data) -> ExpertSpec:
  """The `ExpertSpec` of a method config's `experts` block for `data` (a `RealData`).

  Reads `config.preprocessing` and `config.experts.{model, model_kwargs, num_epochs, lr,
  momentum, weight_decay, batch_size, dsa_strategy, experts_per_shard, seed}`.
  """
  e = config.experts
  _check_count(e.num_experts)  # Before it bounds experts_per_shard below.
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


def cache_root(kind: str = "buffers") -> str:
  """`$DISTILL_JAX_CACHE/<kind>`, or `~/.cache/distill_jax/<kind>` when it is unset (kinds:
  "buffers" for expert trajectories, "teachers" for teacher pools)."""
  root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "distill_jax")
  return os.path.join(root, kind)


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


# Training.


def _check_count(num_experts: int) -> None:
  if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
    raise ValueError(f"experts.num_experts must be a positive int, got {num_experts!r}")


def _check_trainable(spec: ExpertSpec, num_experts: int) -> None:
  _check_count(num_experts)
  if num_experts % spec.experts_per_shard:
    raise ValueError(
        f"experts.num_experts={num_experts} is not a multiple of experts.experts_per_shard="
        f"{spec.experts_per_shard}; buffers grow by whole shards, make it a multiple"
    )


def train_experts(spec: ExpertSpec, data, path: str, *, num_experts: int) -> TrajectoryBuffer:
  """Trains (or finishes training) `num_experts` experts of `spec` into the buffer at `path`.

  Complete shards are skipped; an unfinished shard resumes from its last saved epoch, so running
  this again after a kill continues where it stopped and writes the same trajectories. A file
  lock serialises processes training the same buffer.

  Args:
    spec: the expert recipe; must match the spec already stored at `path`, if any.
    data: `RealData` with `x_train (N, H, W, C)` float32, `y_train (N,)` int32 and the test split
      (each expert's test accuracy is recorded after every epoch).
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
  store = TrajectoryStore(path, networks_per_shard=spec.experts_per_shard)
  num_shards = num_experts // spec.experts_per_shard
  with file_lock(path):
    _write_or_check_spec(path, spec)
    todo = [s for s in range(num_shards) if not store.is_complete(s)]
    if todo:
      real = distilled.PixelSet(data.x_train, data.y_train, meta=data.set_meta("real", 1))
      trainer = Trainer.for_set(spec.recipe(), real)
      for i, shard in enumerate(todo):
        _train_shard(spec, store, shard, trainer, real, data,
                     later_epochs=spec.num_epochs * (len(todo) - i - 1))
  store.close()
  return TrajectoryBuffer(path, num_experts=num_experts)


def _train_shard(spec: ExpertSpec, store: TrajectoryStore, shard: int, trainer: Trainer, real,
                 data, *, later_epochs: int) -> None:
  per_epoch = trainer.steps_per_epoch
  experts = range(shard * spec.experts_per_shard, (shard + 1) * spec.experts_per_shard)
  keys = spec.expert_keys(experts)
  state = trainer.initial_state(keys, spec.image_shape)
  points = store.points(shard)
  if points:
    state = store.restore_shard(shard, points[-1], state)
    logging.info("Shard %d of %s: resuming after epoch %d.", shard, store.path, points[-1])
  else:
    store.write(shard, 0, state, _metrics(trainer, state, data, np.full(len(keys), np.nan)))
  begin = [time.perf_counter()]
  epoch_seconds = []

  def on_save(step: int, saved_state, mean_loss: np.ndarray) -> None:
    epoch = step // per_epoch
    metrics = _metrics(trainer, saved_state, data, mean_loss)
    if not np.all(np.isfinite(mean_loss)):
      raise FloatingPointError(
          f"expert training diverged (loss {mean_loss.tolist()}) in shard {shard}, epoch "
          f"{epoch}; lower experts.lr (now {spec.lr})"
      )
    store.write(shard, epoch, saved_state, metrics)
    epoch_seconds.append(time.perf_counter() - begin[0])
    begin[0] = time.perf_counter()
    # The median leaves out the first epoch's compilation once there are a few.
    left = (spec.num_epochs - epoch + later_epochs) * float(np.median(epoch_seconds))
    logging.info(
        "Shard %d epoch %d/%d: train loss %s, test accuracy %s (%.1f s; the buffer needs about "
        "%s more)", shard, epoch, spec.num_epochs, np.round(mean_loss, 4).tolist(),
        np.round(metrics["test_accuracy"], 4).tolist(), epoch_seconds[-1],
        f"{left:.0f} s" if left < 120 else f"{left / 60:.0f} min",
    )

  start = (points[-1] if points else 0) * per_epoch
  trainer.train(keys, real, state=state, start_step=start,
                save_at=[e * per_epoch for e in range(1, spec.num_epochs + 1)], on_save=on_save,
                label=f"experts shard {shard}", log_every=per_epoch)
  curves = [store.metrics(shard, e, _METRICS) for e in range(spec.num_epochs + 1)]
  store.mark_complete(shard, {
      "experts": spec.experts_per_shard,
      "epochs": spec.num_epochs,
      # [epoch][expert]; epoch 0 is the initialisation (no training loss).
      **{name: [np.asarray(c[name]).tolist() for c in curves] for name in _METRICS},
  })


def _metrics(trainer: Trainer, state, data, mean_loss: np.ndarray) -> dict[str, np.ndarray]:
  accuracy = trainer.accuracy(state, data.x_test, data.y_test, batch_size=1000)
  return {"train_loss": np.asarray(mean_loss, np.float32),
          "test_accuracy": np.asarray(accuracy, np.float32)}


# Reading.


class TrajectoryBuffer:
  """Read-only, lazy access to a trajectory buffer: one expert at one epoch per read.

  Nothing is loaded when the buffer is opened; `params(expert, epoch)` restores that single
  subtree from the shard's checkpoint of that epoch. A small LRU cache keeps the last few reads,
  since MTT reads an expert's start and target epochs together.

  Attributes:
    path: the buffer directory.
    spec: its `ExpertSpec`.
    num_experts: experts served (indices `0 .. num_experts - 1`).
    num_epochs: T; epochs `0 .. T` are stored (0 = initialisation).
    reads: number of restores from disk so far (cache hits excluded).
    bytes_read: bytes of variables restored from disk so far.
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
    record = read_json(spec_path)
    if record.get("format") != FORMAT_VERSION:
      raise BufferError(
          f"the buffer at {path} has format {record.get('format')}, this version reads "
          f"{FORMAT_VERSION}; train a new buffer (leave experts.buffer_dir empty)"
      )
    self.path = path
    self.spec = ExpertSpec.from_dict(record["spec"])
    self._store = TrajectoryStore(path, networks_per_shard=self.spec.experts_per_shard)
    complete = 0
    while self._store.is_complete(complete):
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
    self._cached = functools.lru_cache(maxsize=cache_size)(self._read)

  def __repr__(self) -> str:
    return (f"TrajectoryBuffer({self.path!r}, num_experts={self.num_experts}, "
            f"num_epochs={self.num_epochs})")

  def variables(self, expert: int, epoch: int) -> dict[str, PyTree]:
    """The Flax variables (parameters, batch-norm statistics) of `expert` after `epoch` epochs
    (0 = initialisation), as numpy arrays; only that expert's arrays of that epoch are read."""
    expert, epoch = int(expert), int(epoch)
    if not 0 <= expert < self.num_experts:
      raise ValueError(f"expert {expert} out of range; this buffer serves 0..{self.num_experts - 1}")
    if not 0 <= epoch <= self.num_epochs:
      raise ValueError(f"epoch {epoch} out of range; this buffer stores 0..{self.num_epochs}")
    return self._cached(expert, epoch)

  def params(self, expert: int, epoch: int) -> PyTree:
    """The parameters of `expert` after `epoch` epochs (see `variables`)."""
    return self.variables(expert, epoch)["params"]

  def _read(self, expert: int, epoch: int) -> dict[str, PyTree]:
    variables = self._store.read(expert, epoch, self.template())
    self.reads += 1
    self.bytes_read += sum(a.nbytes for a in jax.tree.leaves(variables))
    return variables

  @functools.cache
  def template(self) -> dict[str, PyTree]:
    """Zero arrays with the structure, shapes and dtypes of one expert's variables."""
    model = self.spec.make_model()
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, *self.spec.image_shape)), train=False)
    )
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))

  def metrics(self) -> dict[str, np.ndarray]:
    """Per-expert curves `{"train_loss", "test_accuracy"}`, each `(num_experts, T + 1)`."""
    per_shard = [self._store.summary(s)
                 for s in range(self.num_experts // self.spec.experts_per_shard)]
    return {
        key: np.concatenate([np.asarray(m[key], np.float32).T for m in per_shard])
        for key in _METRICS
    }


# Files.


def _write_or_check_spec(path: str, spec: ExpertSpec) -> None:
  spec_path = os.path.join(path, _SPEC_FILE)
  if not os.path.exists(spec_path):
    atomic_write_text(spec_path, json.dumps(
        {"format": FORMAT_VERSION, "digest": spec.digest(), "spec": spec.to_dict()}, indent=1))
    return
  record = read_json(spec_path)
  stored, wanted = record["spec"], spec.to_dict()
  diff = [f"{k}: stored {stored.get(k)!r}, wanted {wanted[k]!r}"
          for k in wanted if stored.get(k) != wanted[k]]
  if record.get("format") != FORMAT_VERSION:
    diff.insert(0, f"format: stored {record.get('format')}, wanted {FORMAT_VERSION}")
  if diff:
    raise BufferError(
        f"the buffer at {path} was trained with other settings ({'; '.join(diff)}); point "
        "experts.buffer_dir elsewhere or leave it empty to use the cache directory of these settings"
    )


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
  # flock is released by the kernel when the process dies, so a killed run never leaves a stale lock.
  with open(os.path.join(path, _LOCK_FILE), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)
