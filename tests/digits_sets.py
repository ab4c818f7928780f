"""Small training sets from scikit-learn's digits for the trainer and evaluation tests."""

import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

from distill_jax.distilled import PixelSet, SetMeta

NUM_CLASSES = 10


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """All 1797 digits: `(1797, 8, 8, 1)` float32 images in [0, 1] and int32 labels."""
  data = load_digits()
  return (data.images / 16.0).astype(np.float32)[..., None], data.target.astype(np.int32)


def subset(digits, per_class: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """`per_class` images of each class from `offset` on, sorted by class (a distilled-set-like set)."""
  x, y = digits
  idx = np.concatenate([np.flatnonzero(y == c)[offset:offset + per_class] for c in range(10)])
  return x[idx], y[idx]


def pixel_set(x, y, label_kind: str = "class_ids", lr=None, *, ipc: int = 1) -> PixelSet:
  """A `PixelSet` of digits arrays (labels as given: class ids, or rows for other kinds)."""
  meta = SetMeta(method="test", dataset="digits", ipc=ipc, num_classes=NUM_CLASSES,
                 image_shape=(8, 8, 1), label_kind=label_kind)
  return PixelSet(jnp.asarray(x), jnp.asarray(y), lr=lr, meta=meta)
