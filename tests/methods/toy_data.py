"""A tiny 3-class dataset of 8x8 grey images for the pixel methods' unit tests."""

import numpy as np

from distill_jax import data as data_lib


def toy_data(per_class: int = 16, seed: int = 0) -> data_lib.RealData:
  """`3 * per_class` training images whose class shifts their mean, and 12 test images."""
  rng = np.random.default_rng(seed)
  y = (np.arange(3 * per_class) % 3).astype(np.int32)
  x = (rng.normal(size=(len(y), 8, 8, 1)) + y[:, None, None, None]).astype(np.float32)
  return data_lib.RealData("toy", 3, (8, 8, 1), ("a", "b", "c"), x, y, x[:12], y[:12])
