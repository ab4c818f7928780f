"""Teacher pools: M networks trained on the real set, shared by D3S and APM.

D3S (paper 001, Appendix D.2, Table 8) trains M = 5 ResNet-18s on the full training set and uses
them three ways: their per-layer feature statistics on the real set (the target of its KL loss),
one of them per synthesis batch (ensemble synthesis, ENS), and their mean logits as the labels
of every recorded augmentation (ensemble labelling, ENL). APM (paper 003) distils against a pool
of trained teachers too. A pool here is:

- a `TeacherSpec`: the data's identity plus a `training.Recipe` (model and kwargs, SGD lr /
  momentum / weight decay, schedule, epochs, batch, augmentation "none" / "dsa" / "rrc") and a
  seed; teacher i trains from `fold_in(key(seed), i)` on the shared `training.Trainer`, so teachers
  are independent of each other and of how many are asked for;
- stored in a `training.TrajectoryStore` with one network per shard (one Orbax checkpoint folder
  per teacher, batch-norm statistics kept), under `$DISTILL_JAX_CACHE/teachers/<digest>` (default
  `~/.cache/distill_jax/teachers/`), where the digest covers everything that decides the
  weights: a rerun, another method or another run with the same teacher settings reuses them,
  a killed training resumes from the teacher's last saved epoch, a pool with fewer teachers than
  asked for is extended;
- read through `TeacherPool`: `variables(i)`, `logits(i, x)`, `ensemble_logits(x)` (the mean in
  logit space, D3S Algorithm 2), `test_accuracy()`, `statistics(i, data)` (cached beside the
  teacher) and `stacked_variables()` for use inside a jitted step.

`TeacherPool.from_buffer(buffer)` serves the last epoch of an MTT expert buffer as teachers.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from distill_jax import distilled
from distill_jax.io._atomic import atomic_write, atomic_write_text
from distill_jax.training import experts
from distill_jax.training.recipe import Recipe
from distill_jax.training.statistics import layer_statistics
from distill_jax.training.trainer import Trainer, classification_accuracy
from distill_jax.training.trajectories import TrajectoryStore

PyTree = Any

FORMAT_VERSION = 1
_SPEC_FILE = "teachers.json"
_STATS_DIR = "statistics"


class TeacherError(ValueError):
  """A teacher pool is missing, incomplete, or was trained with other settings."""


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
  """Everything that decides a teacher pool's weights; its digest names the pool's folder.

  Attributes:
    dataset: `RealData.name`.
    preprocessing: the preprocessor kind of the training arrays.
    data_fingerprint: `RealData.fingerprint`.
    image_shape: `(H, W, C)`.
    num_classes: C.
    recipe: how every teacher trains (`loss` is cross-entropy).
    seed: teacher i trains from `fold_in(key(seed), i)`.
  """

  dataset: str
  preprocessing: str
  data_fingerprint: str
  image_shape: tuple[int, int, int]
  num_classes: int
  recipe: Recipe
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "image_shape", tuple(int(d) for d in self.image_shape))
    if self.recipe.epochs is None:
      raise ValueError("teachers train for a number of epochs; set teachers.epochs")

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["image_shape"] = list(self.image_shape)
    out["recipe"] = self.recipe.to_dict()
    return out

  def digest(self) -> str:
    """16 hex chars of sha256 over the canonical JSON of the spec and the storage format."""
    payload = json.dumps({"format": FORMAT_VERSION, **self.to_dict()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]

  def key(self, teacher: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(self.seed), teacher)

  def make_model(self):
    return self.recipe.make_model(self.num_classes)


def teacher_spec(config: ml_collections.ConfigDict, data) -> TeacherSpec:
  """The `TeacherSpec` of a method config's `teachers` block for `data` (a `RealData`).

  Reads `config.preprocessing` and `config.teachers.{model, model_kwargs, optimizer, lr,
  momentum, weight_decay, schedule, warmup_epochs, epochs, batch_size, augmentation, seed}`;
  warm-up is given in epochs and becomes steps of this data's epoch length.
  """
  t = config.teachers
  steps_per_epoch = math.ceil(len(data.x_train) / min(t.batch_size, len(data.x_train)))
  recipe = Recipe(
      model=t.model, model_kwargs=dict(t.model_kwargs), optimizer=t.optimizer, lr=float(t.lr),
      momentum=float(t.momentum), weight_decay=float(t.weight_decay), schedule=t.schedule,
      warmup_steps=int(t.warmup_epochs) * steps_per_epoch, epochs=t.epochs,
      batch_size=t.batch_size, loss="ce", augmentation=t.augmentation,
  )
  return TeacherSpec(dataset=data.name, preprocessing=config.preprocessing,
                     data_fingerprint=data.fingerprint, image_shape=tuple(data.x_train.shape[1:]),
                     num_classes=int(data.num_classes), recipe=recipe, seed=int(t.seed))


def default_teachers_dir(spec: TeacherSpec) -> str:
  """Where the pool of `spec` lives unless a config names a folder: the cache, by digest."""
  return os.path.join(experts.cache_root("teachers"), spec.digest())


def ensure_teachers(config: ml_collections.ConfigDict, data) -> TeacherPool:
  """The pool a config's `teachers` block asks for, trained first where missing or unfinished.

  The folder is `config.teachers.dir` when set, else `default_teachers_dir(spec)`.
  """
  spec = teacher_spec(config, data)
  path = config.teachers.dir or default_teachers_dir(spec)
  return train_teachers(spec, data, path, num_teachers=config.teachers.num_teachers,
                        checkpoint_every=config.teachers.checkpoint_every)


def train_teachers(spec: TeacherSpec, data, path: str, *, num_teachers: int,
                   checkpoint_every: int = 1) -> TeacherPool:
  """Trains (or finishes) teachers `0 .. num_teachers - 1` of `spec` into the pool at `path`.

  Finished teachers are skipped; an unfinished one resumes from its last saved epoch (saved
  every `checkpoint_every` epochs and at the end; only the last two are kept). A file lock
  serialises processes training the same pool.

  Raises:
    TeacherError: `path` holds a pool trained with another spec.
  """
  for name, value in (("teachers.num_teachers", num_teachers),
                      ("teachers.checkpoint_every", checkpoint_every)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if tuple(data.x_train.shape[1:]) != spec.image_shape:
    raise ValueError(f"the training images have shape {data.x_train.shape[1:]} but the teacher "
                     f"spec says {spec.image_shape}; build the spec from this data")
  os.makedirs(path, exist_ok=True)
  store = TrajectoryStore(path, networks_per_shard=1, keep=2)
  with experts.file_lock(path):
    _write_or_check_spec(path, spec)
    todo = [i for i in range(num_teachers) if not store.is_complete(i)]
    if todo:
      real = distilled.PixelSet(data.x_train, data.y_train, meta=data.set_meta("real", 1))
      trainer = Trainer.for_set(spec.recipe, real)
      for teacher in todo:
        _train_teacher(spec, store, teacher, trainer, real, data, checkpoint_every)
  store.close()
  return TeacherPool.open(path, num_teachers=num_teachers)


def _train_teacher(spec: TeacherSpec, store: TrajectoryStore, teacher: int, trainer: Trainer,
                   real, data, checkpoint_every: int) -> None:
  epochs, per_epoch = spec.recipe.epochs, trainer.steps_per_epoch
  keys = spec.key(teacher)[None]
  state = trainer.initial_state(keys, spec.image_shape)
  points = store.points(teacher)
  if points:
    state = store.restore_shard(teacher, points[-1], state)
    logging.info("Teacher %d of %s: resuming after epoch %d.", teacher, store.path, points[-1])
  save_epochs = sorted(set(range(checkpoint_every, epochs + 1, checkpoint_every)) | {epochs})
  losses = {}

  def on_save(step: int, saved_state, mean_loss: np.ndarray) -> None:
    epoch = step // per_epoch
    if not np.all(np.isfinite(mean_loss)):
      raise FloatingPointError(
          f"teacher {teacher} diverged (loss {mean_loss.tolist()}) by epoch {epoch}; lower "
          f"teachers.lr (now {spec.recipe.lr})")
    losses[epoch] = float(mean_loss[0])
    store.write(teacher, epoch, saved_state, {"train_loss": mean_loss})
    logging.info("Teacher %d epoch %d/%d: train loss %.4f", teacher, epoch, epochs, mean_loss[0])

  result = trainer.train(keys, real, state=state,
                         start_step=(points[-1] if points else 0) * per_epoch,
                         save_at=[e * per_epoch for e in save_epochs], on_save=on_save,
                         label=f"teacher {teacher}", log_every=per_epoch)
  accuracy = float(trainer.accuracy(result.state, data.x_test, data.y_test, batch_size=1000)[0])
  logging.info("Teacher %d: test accuracy %.4f", teacher, accuracy)
  store.mark_complete(teacher, {"epochs": epochs, "test_accuracy": accuracy,
                                "final_train_loss": losses.get(epochs)})


def _write_or_check_spec(path: str, spec: TeacherSpec) -> None:
  spec_path = os.path.join(path, _SPEC_FILE)
  if not os.path.exists(spec_path):
    atomic_write_text(spec_path, json.dumps(
        {"format": FORMAT_VERSION, "digest": spec.digest(), "spec": spec.to_dict()}, indent=1))
    return
  stored = experts.read_json(spec_path)
  if stored.get("format") != FORMAT_VERSION or stored.get("spec") != json.loads(
      json.dumps(spec.to_dict())):
    raise TeacherError(
        f"the teacher pool at {path} was trained with other settings (stored digest "
        f"{stored.get('digest')}, wanted {spec.digest()}); point teachers.dir elsewhere or leave "
        "it empty to use the cache folder of these settings")


def _spec_from_dict(d: dict[str, Any]) -> TeacherSpec:
  d = dict(d)
  recipe = dict(d.pop("recipe"))
  if recipe.get("steps_by_set_size") is not None:
    recipe["steps_by_set_size"] = tuple(tuple(p) for p in recipe["steps_by_set_size"])
  return TeacherSpec(recipe=Recipe(**recipe), **d)


class TeacherPool:
  """Read access to M trained networks of one architecture (lazily read, cached).

  Args:
    model: the (unbound) Flax module of every teacher.
    read: `i -> variables` of teacher i (numpy arrays).
    num_teachers: M.
    path: folder for cached statistics.
    test_accuracies: `(M,)` recorded test accuracies (NaN where unknown).
    description: what the pool is (logs and reports).
  """

  def __init__(self, model, read: Callable[[int], PyTree], num_teachers: int, *, path: str,
               test_accuracies: Sequence[float], description: str):
    self.model = model
    self.num_teachers = int(num_teachers)
    self.path = path
    self.description = description
    self._test_accuracies = np.asarray(test_accuracies, np.float64)
    self._read = functools.lru_cache(maxsize=None)(read)

  def __repr__(self) -> str:
    return f"TeacherPool({self.description}, num_teachers={self.num_teachers})"

  @classmethod
  def open(cls, path: str, *, num_teachers: int | None = None) -> TeacherPool:
    """The finished teachers of the pool at `path` (the first `num_teachers`, default all).

    Raises:
      TeacherError: no pool there, or fewer finished teachers than asked for.
    """
    spec_path = os.path.join(path, _SPEC_FILE)
    if not os.path.exists(spec_path):
      raise TeacherError(f"no teacher pool at {path} ({_SPEC_FILE} missing); train one with "
                         "`python -m launch.train_teachers --config=...`")
    spec = _spec_from_dict(experts.read_json(spec_path)["spec"])
    store = TrajectoryStore(path, networks_per_shard=1, keep=2)
    finished = 0
    while store.is_complete(finished):
      finished += 1
    num_teachers = finished if num_teachers is None else num_teachers
    if not 1 <= num_teachers <= finished:
      raise TeacherError(f"the teacher pool at {path} has {finished} finished teachers but "
                         f"{num_teachers} were asked for; train the rest with "
                         "launch.train_teachers (it resumes) or ask for fewer")
    model = spec.make_model()
    template = _template(model, spec.image_shape)

    def read(i: int) -> PyTree:
      return store.read(i, store.points(i)[-1], template)

    accuracies = [store.summary(i)["test_accuracy"] for i in range(num_teachers)]
    return cls(model, read, num_teachers, path=path, test_accuracies=accuracies,
               description=f"{spec.recipe.model} teachers at {path}")

  @classmethod
  def from_buffer(cls, buffer: experts.TrajectoryBuffer, *, epoch: int | None = None,
                  num_teachers: int | None = None) -> TeacherPool:
    """An MTT expert buffer's experts at `epoch` (default: the last) as a teacher pool."""
    epoch = buffer.num_epochs if epoch is None else int(epoch)
    count = buffer.num_experts if num_teachers is None else int(num_teachers)
    if not 1 <= count <= buffer.num_experts:
      raise TeacherError(f"the buffer at {buffer.path} has {buffer.num_experts} experts; ask "
                         f"for 1 to {buffer.num_experts} teachers, not {count}")
    curves = buffer.metrics()["test_accuracy"]
    return cls(buffer.spec.make_model(), lambda i: buffer.variables(i, epoch), count,
               path=os.path.join(buffer.path, f"teachers_epoch_{epoch:03d}"),
               test_accuracies=curves[:count, epoch],
               description=f"experts of {buffer.path} at epoch {epoch}")

  def variables(self, teacher: int) -> PyTree:
    """Teacher `teacher`'s Flax variables (parameters and batch-norm statistics), numpy."""
    if not 0 <= int(teacher) < self.num_teachers:
      raise ValueError(f"teacher {teacher} out of range; this pool has 0..{self.num_teachers - 1}")
    return self._read(int(teacher))

  def stacked_variables(self, members: Sequence[int] | None = None) -> PyTree:
    """The variables of `members` (default all) stacked on a leading axis, on the device."""
    members = range(self.num_teachers) if members is None else members
    return jax.tree.map(lambda *a: jnp.asarray(np.stack(a)), *[self.variables(i) for i in members])

  @functools.cached_property
  def _apply(self):
    return jax.jit(lambda variables, x: self.model.apply(variables, x, train=False))

  def logits(self, teacher: int, x: Any, *, batch_size: int = 1000) -> np.ndarray:
    """`(N, C)` float32 inference-mode logits of teacher `teacher` on images `x (N, H, W, ch)`."""
    variables = self.variables(teacher)
    return np.concatenate([np.asarray(self._apply(variables, jnp.asarray(x[s:s + batch_size])))
                           for s in range(0, len(x), batch_size)])

  def ensemble_logits(self, x: Any, members: Sequence[int] | None = None) -> np.ndarray:
    """`(N, C)` mean logits of `members` (default all): D3S Algorithm 2's ensemble label."""
    members = range(self.num_teachers) if members is None else members
    return np.mean([self.logits(i, x) for i in members], axis=0).astype(np.float32)

  def test_accuracy(self, data=None) -> np.ndarray:
    """`(M,)` test accuracies: recorded ones, or measured on `data.x_test` when given."""
    if data is None:
      return self._test_accuracies
    return np.array([classification_accuracy(
        lambda x, i=i: self._apply(self.variables(i), x), data.x_test, data.y_test)
        for i in range(self.num_teachers)])

  def summary(self) -> dict[str, Any]:
    """What a report says of the pool: its description and recorded test accuracies."""
    accuracy = self.test_accuracy()
    return {"description": self.description,
            "test_accuracy": [float(a) for a in accuracy],
            "mean_test_accuracy": float(np.mean(accuracy))}

  def statistics(self, teacher: int, data, *, chunk_size: int = 1000
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-conv-layer `(mean (C_l,), cov (C_l, C_l))` float64 of teacher `teacher` over
    `data.x_train` (`training.statistics.layer_statistics`), cached in the pool's folder by the
    data's fingerprint."""
    path = os.path.join(self.path, _STATS_DIR, f"teacher_{teacher:03d}_{data.fingerprint}.npz")
    if os.path.exists(path):
      try:
        with np.load(path) as f:
          count = int(f["num_layers"])
          return [(f[f"mean_{l}"], f[f"cov_{l}"]) for l in range(count)]
      except (OSError, ValueError, KeyError) as error:
        logging.warning("%s is unreadable (%s); computing the statistics again.", path, error)
    variables = self.variables(teacher)

    def blocks(x):
      return self.model.apply(variables, x, train=False, return_features=True)[1]["blocks"]

    stats = layer_statistics(blocks, data.x_train, chunk_size=chunk_size)
    arrays = {"num_layers": np.asarray(len(stats))}
    for l, (mean, cov) in enumerate(stats):
      arrays[f"mean_{l}"], arrays[f"cov_{l}"] = mean, cov
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return stats


def _template(model, image_shape) -> PyTree:
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))
