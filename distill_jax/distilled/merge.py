"""Merging sets distilled apart into one set (APM's parallel distillation, paper 003 Fig. 4).

APM's images are independent of each other (each one's loss is its own), so a set can be
distilled in parts: different seeds for more images per class, or different class ranges, on
different workers. `merge` joins such parts: the examples are concatenated in the order given
and the storage is that of the arrays kept, i.e. the sum of the parts (nothing is shared or
counted twice). Pixel sets only; kinds with shared parts (a decoder) merge in their own module.

>>> import numpy as np
>>> from distill_jax.distilled import PixelSet, SetMeta, storage_bytes
>>> meta = SetMeta(method="apm", dataset="digits", ipc=1, num_classes=2, image_shape=(2, 2, 1))
>>> a = PixelSet(np.zeros((2, 2, 2, 1), np.float32), np.array([0, 1], np.int32), meta=meta)
>>> merged = merge([a, a])
>>> merged.meta.ipc, storage_bytes(merged) == 2 * storage_bytes(a)
(2, True)
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

from distill_jax.distilled.base import SetMeta
from distill_jax.distilled.pixels import PixelSet

# SetMeta fields that must agree for sets to be merged.
_SHARED = ("dataset", "num_classes", "image_shape", "label_kind")


def merge(sets: Sequence[PixelSet]) -> PixelSet:
  """One `PixelSet` holding every example of `sets` (same data, preprocessing and label kind).

  The merged `meta.ipc` is the examples per class (`N / C`, rounded down); `meta.method` is the
  parts' method, or their names joined by "+" when they differ.

  Raises:
    ValueError: fewer than two sets, a kind other than pixels, a learned lr, or parts made from
      different data (the message names the field that differs).
  """
  sets = list(sets)
  if len(sets) < 2:
    raise ValueError(f"merge needs at least two sets, got {len(sets)}")
  for i, part in enumerate(sets):
    if not isinstance(part, PixelSet):
      raise ValueError(f"set {i} is a {part.kind!r} set; merge joins pixel sets only")
    if part.lr is not None:
      raise ValueError(f"set {i} carries a learned lr (MTT); sets with one lr each cannot be "
                       "merged into one set")
  first = sets[0].meta
  for i, part in enumerate(sets[1:], start=1):
    for field in _SHARED:
      if getattr(part.meta, field) != getattr(first, field):
        raise ValueError(f"set {i} has {field}={getattr(part.meta, field)!r} but set 0 has "
                         f"{getattr(first, field)!r}; merge sets distilled from the same data")
    if dataclasses.replace(part.meta, method=first.method, ipc=first.ipc) != first:
      raise ValueError(f"set {i} was distilled in another preprocessed space than set 0 "
                       f"({part.meta.preprocessing_kind} vs {first.preprocessing_kind}); merge "
                       "sets made with the same preprocessing")
  x = np.concatenate([np.asarray(part.x) for part in sets])
  y = np.concatenate([np.asarray(part.y) for part in sets])
  methods = list(dict.fromkeys(part.meta.method for part in sets))
  meta = SetMeta(method="+".join(methods), dataset=first.dataset,
                 ipc=max(1, len(x) // first.num_classes), num_classes=first.num_classes,
                 image_shape=first.image_shape, preprocessing=first.preprocessing,
                 label_kind=first.label_kind)
  return PixelSet(x, y, meta=meta)
