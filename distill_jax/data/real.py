"""`RealData`: the preprocessed real dataset a method distils, and who owns its fingerprint.

`load_real(name, preprocessing)` reads both splits, fits the preprocessor on the training split
and applies it to both. Every cache keyed on the data (expert buffers, teacher pools, encoded
latents) keys on `RealData.fingerprint`: the digest of the raw training arrays plus the
preprocessing kind when the loader made it (so the XLA thread count that fitted a ZCA matrix,
which changes its last bits, does not split the cache), and a digest derived from it and the new
arrays whenever `replace` swaps the training arrays (a subset, a class split for a federated
subtask, latent codes). No caller sets the fingerprint by hand.

>>> import numpy as np
>>> x = np.zeros((4, 2, 2, 1), np.float32); y = np.array([0, 1, 0, 1], np.int32)
>>> data = RealData("toy", 2, (2, 2, 1), ("a", "b"), x, y, x, y, preprocessor=None)
>>> half = data.replace(x_train=x[:2], y_train=y[:2])
>>> half.fingerprint != data.fingerprint, data.replace(name="same").fingerprint == data.fingerprint
(True, True)
"""

import dataclasses
import hashlib
from typing import Any

import numpy as np

from distill_jax.data import datasets
from distill_jax.data import preprocessing as preprocessing_lib

_TRAINING_FIELDS = ("x_train", "y_train")


@dataclasses.dataclass(frozen=True)
class RealData:
  """The real dataset a method distils, already preprocessed.

  Attributes:
    name: dataset name in `distill_jax.data.DATASETS`.
    num_classes: number of classes C.
    image_shape: `(H, W, channels)` of the training inputs.
    class_names: one name per class.
    x_train: `(N, H, W, channels)` float32, preprocessed (standardised or whitened).
    y_train: `(N,)` int32 class ids.
    x_test: `(M, H, W, channels)` float32, preprocessed the same way.
    y_test: `(M,)` int32.
    preprocessor: the fitted `distill_jax.data.Preprocessor` (its `invert` turns sets back into
      images), or None for data that needs none.
    fingerprint: 16 hex chars naming the training arrays exactly (see the module docstring);
      computed from `x_train`/`y_train` when not given.
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  class_names: tuple[str, ...]
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  preprocessor: Any = None
  fingerprint: str | None = None

  def __post_init__(self):
    if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
      raise ValueError(
          f"RealData {self.name!r}: {len(self.x_train)} training images with "
          f"{len(self.y_train)} labels and {len(self.x_test)} test images with "
          f"{len(self.y_test)} labels; give one label per image"
      )
    object.__setattr__(self, "image_shape", tuple(int(d) for d in self.image_shape))
    if self.fingerprint is None:
      object.__setattr__(self, "fingerprint", datasets.fingerprint(self.x_train, self.y_train))

  def replace(self, **changes: Any) -> "RealData":
    """A copy with fields replaced; training arrays that differ from the current ones (in dtype,
    shape or any bit) derive a new fingerprint, unchanged ones keep it.

    The new fingerprint hashes the old one with the new arrays, so data derived the same way
    from the same source gets the same fingerprint and anything else a different one.

    Raises:
      ValueError: when `fingerprint` is passed (it is derived, never set).
    """
    if "fingerprint" in changes:
      raise ValueError("RealData.fingerprint is derived from the data; do not pass it to replace()")
    if any(name in changes and not _same_bits(changes[name], getattr(self, name))
           for name in _TRAINING_FIELDS):
      merged = {name: changes.get(name, getattr(self, name)) for name in _TRAINING_FIELDS}
      digest = hashlib.sha256(
          (self.fingerprint + datasets.fingerprint(merged["x_train"], merged["y_train"])).encode()
      )
      changes["fingerprint"] = digest.hexdigest()[:16]
    return dataclasses.replace(self, **changes)

  def class_counts(self) -> np.ndarray:
    """`(C,)` training images per class."""
    return np.bincount(self.y_train, minlength=self.num_classes)

  def check_ipc(self, ipc: Any) -> None:
    """Fails early, before any long work, when no set of `ipc` images per class can exist."""
    smallest = int(self.class_counts().min())
    if isinstance(ipc, bool) or not isinstance(ipc, (int, np.integer)) or not 1 <= ipc <= smallest:
      raise ValueError(
          f"ipc={ipc!r} is impossible for {self.name}: each class must give 1 to {smallest} "
          f"images (its smallest class has {smallest}); set ipc to a value in that range"
      )

  def subtask(self, index: int, count: int) -> "RealData":
    """Subtask `index` of `count` contiguous class ranges (D3's federated distillation, paper
    000 section 2.3): classes `index C/k .. (index + 1) C/k - 1` of both splits, relabelled
    `0 .. C/k - 1`, with the whole set's preprocessing (so the subtasks' sets merge) and a
    fingerprint of their own (so each subtask trains its own experts).

    Raises:
      ValueError: `count` does not divide the classes or `index` is outside `0 .. count - 1`.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1 or (
        self.num_classes % count):
      raise ValueError(f"subtask.count={count!r} must divide the {self.num_classes} classes of "
                       f"{self.name} into equal contiguous ranges")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
      raise ValueError(f"subtask.index={index!r} must be in 0 .. {count - 1}")
    local = self.num_classes // count
    low = index * local

    def keep(x, y):
      mine = (y >= low) & (y < low + local)
      return x[mine], (y[mine] - low).astype(np.int32)

    x_train, y_train = keep(self.x_train, self.y_train)
    x_test, y_test = keep(self.x_test, self.y_test)
    return self.replace(num_classes=local, class_names=self.class_names[low:low + local],
                        x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)

  def to_images(self, x: Any) -> np.ndarray:
    """Preprocessed images back to `[0, 1]` pixels (clipped), for display."""
    x = np.asarray(x, np.float32)
    if self.preprocessor is not None:
      x = np.asarray(self.preprocessor.invert(x))
    return np.clip(x, 0.0, 1.0)

  def set_meta(self, method: str, ipc: int, *, label_kind: str = "class_ids"):
    """The `distilled.SetMeta` of a set made from this data by `method` at `ipc` per class."""
    from distill_jax import distilled  # Distilled sets depend on data, not the other way round.

    return distilled.SetMeta(
        method=method,
        dataset=self.name,
        ipc=ipc,
        num_classes=self.num_classes,
        image_shape=self.image_shape,
        preprocessing=(
            self.preprocessor.to_arrays() if self.preprocessor is not None else {"kind": "none"}
        ),
        label_kind=label_kind,
    )


def _same_bits(a: Any, b: Any) -> bool:
  """Whether two arrays have the same dtype, shape and bytes (what `fingerprint` digests)."""
  if a is b:
    return True
  a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
  return (a.dtype == b.dtype and a.shape == b.shape
          and np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)))


def load_real(name: str, preprocessing: str, *, validation: int = 0) -> RealData:
  """Loads dataset `name`, fits `preprocessing` on its training split and applies it to both.

  Args:
    name: a `distill_jax.data.DATASETS` name.
    preprocessing: a preprocessor kind ("none", "standardize", "zca_frepo", "zca_kornia").
    validation: when positive, this many training images (an equal number per class, drawn
      with seed 0) are held out and become the evaluation split in place of the test split;
      the preprocessor is fitted on the rest, which is all that teachers, experts and methods
      see; the test split is not loaded. Hyperparameters are chosen on this split, never on
      the test split.

  Returns:
    A `RealData` whose fingerprint digests the raw training arrays, `preprocessing` and the
    held-out count.
  """
  info = datasets.info(name)
  x_train, y_train = datasets.load(name, "train")
  if validation:  # The test split is not even read: nothing can be chosen on it by accident.
    x_train, y_train, x_test, y_test = _hold_out(x_train, y_train, validation, info.num_classes)
  else:
    x_test, y_test = datasets.load(name, "test")
  preprocessor = preprocessing_lib.fit_preprocessor(x_train, preprocessing)
  raw = datasets.fingerprint(x_train, y_train)
  held_out = f":validation={validation}" if validation else ""
  return RealData(
      name=name,
      num_classes=info.num_classes,
      image_shape=tuple(info.image_shape),
      class_names=tuple(info.class_names),
      x_train=np.asarray(preprocessor.apply(x_train), np.float32),
      y_train=np.asarray(y_train, np.int32),
      x_test=np.asarray(preprocessor.apply(x_test), np.float32),
      y_test=np.asarray(y_test, np.int32),
      preprocessor=preprocessor,
      fingerprint=hashlib.sha256(f"{raw}:{preprocessing}{held_out}".encode()).hexdigest()[:16],
  )


def _hold_out(x: np.ndarray, y: np.ndarray, count: int, num_classes: int):
  """`(x_rest, y_rest, x_held, y_held)`: `count / C` random training images of every class held
  out (seed 0), the rest in their original order."""
  if isinstance(count, bool) or not isinstance(count, int) or count < 0 or count % num_classes:
    raise ValueError(f"validation={count!r} must be a non-negative multiple of the "
                     f"{num_classes} classes (an equal number held out per class)")
  held = np.zeros(len(y), bool)
  rng = np.random.default_rng(0)
  for c in range(num_classes):
    members = np.flatnonzero(y == c)
    if count // num_classes >= len(members):
      raise ValueError(f"validation={count} holds out {count // num_classes} images of class {c}, "
                       f"which has {len(members)}; hold out fewer")
    held[rng.choice(members, count // num_classes, replace=False)] = True
  return x[~held], y[~held], x[held], y[held]
