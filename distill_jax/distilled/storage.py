"""Storage accounting of distilled sets, after D3 (Appendix B.1, "Computing storage cost").

D3 counts "all generated artifacts that are needed to reproduce the distilled dataset (decoder
weights, images prototypes, soft labels, augmentation parameters etc)", each in single-precision
float (fp32), whatever dtype a method actually stores. distill_jax follows that literally:

- every array of `set.storage_leaves()` counts `size * 4` bytes: images, labels (hard labels
  too: they are an array a downstream user needs; as int32 they take the same 4 bytes each, and
  against an `H * W * channels` image they are negligible, as D3 section 2.1 notes), a learned
  lr (4 bytes), latents, priors, decoder parameters, relabels, augmentation parameters;
- the preprocessing in `meta` (e.g. a ZCA matrix) is not counted: it is fitted on the real
  training set and is part of the data pipeline every method uses, not a distilled artifact
  (D3 counts no such transform either);
- MB means 2**20 bytes: D3 Table 7's label storage for 10 IPC ImageNet-1K soft labels
  (10,000 x 1,000 fp32 = 40,000,000 bytes) is listed as 38 MB.
"""

import math

from distill_jax.distilled.base import DistilledSet

BYTES_PER_VALUE = 4  # fp32, D3 Appendix B.1.
BYTES_PER_MB = 2**20


def storage_bytes(distilled_set: DistilledSet) -> int:
  """Bytes to store `distilled_set` with every needed array in float32 (D3, Appendix B.1).

  `sum over arrays a of storage_leaves(): 4 * a.size`; dtype is ignored on purpose (a uint8
  image or an int32 label counts 4 bytes per value like a float32 one).

  >>> import numpy as np
  >>> from distill_jax.distilled import PixelSet, SetMeta
  >>> meta = SetMeta(method="mtt", dataset="digits", ipc=1, num_classes=10, image_shape=(8, 8, 1))
  >>> s = PixelSet(np.zeros((10, 8, 8, 1), np.float32), np.arange(10), lr=0.01, meta=meta)
  >>> storage_bytes(s)  # 4 * (10 * 64 images + 10 labels + 1 lr)
  2604
  """
  return sum(
      BYTES_PER_VALUE * math.prod(leaf.shape) for leaf in distilled_set.storage_leaves().values()
  )


def storage_mb(distilled_set: DistilledSet) -> float:
  """`storage_bytes / 2**20` (MB as in D3 Table 7)."""
  return storage_bytes(distilled_set) / BYTES_PER_MB


def ipc_equivalent(distilled_set: DistilledSet) -> float:
  """How many real images per class the same storage would hold: `bytes / (C * H * W * ch * 4)`.

  D3 section 2.1 and Table 1 annotate storage with this "equivalence if storing only images".
  A pixel set with hard labels comes out slightly above its IPC (the labels are counted).

  >>> import numpy as np
  >>> from distill_jax.distilled import PixelSet, SetMeta
  >>> meta = SetMeta(method="frepo", dataset="digits", ipc=2, num_classes=10, image_shape=(8, 8, 1),
  ...                label_kind="learned")
  >>> s = PixelSet(np.zeros((20, 8, 8, 1), np.float32), np.zeros((20, 10), np.float32), meta=meta)
  >>> ipc_equivalent(s)  # 2 IPC of images + 20 * 10 soft-label values
  2.3125
  """
  meta = distilled_set.meta
  return storage_bytes(distilled_set) / (
      meta.num_classes * math.prod(meta.image_shape) * BYTES_PER_VALUE
  )


def equal_storage_ipc(distilled_set: DistilledSet) -> int:
  """The smallest IPC whose random real subset (images and class ids, 4 bytes a value) stores
  at least the set's bytes: the baseline at equal storage for sets that store something other
  than images (D3: "IPC rounded up").

  >>> import numpy as np
  >>> from distill_jax.distilled import PixelSet, SetMeta
  >>> meta = SetMeta(method="mtt", dataset="digits", ipc=1, num_classes=10, image_shape=(8, 8, 1))
  >>> equal_storage_ipc(PixelSet(np.zeros((10, 8, 8, 1), np.float32), np.arange(10), lr=0.01,
  ...                            meta=meta))  # 2604 bytes > 10 * 65 * 4: one image too many
  2
  """
  meta = distilled_set.meta
  per_ipc = meta.num_classes * BYTES_PER_VALUE * (math.prod(meta.image_shape) + 1)
  return max(1, math.ceil(storage_bytes(distilled_set) / per_ipc))
