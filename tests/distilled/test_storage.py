"""Storage accounting (D3 Appendix B.1) against hand computations."""

import numpy as np
import pytest

from distill_jax.distilled import PixelSet, SetMeta, ipc_equivalent, storage_bytes, storage_mb


def make(n, shape, num_classes, soft, lr=None, preprocessing=None):
  meta = SetMeta(
      method="m",
      dataset="d",
      ipc=max(1, n // num_classes),
      num_classes=num_classes,
      image_shape=shape,
      preprocessing=preprocessing or {"kind": "none"},
      label_kind="learned" if soft else "class_ids",
  )
  y = np.zeros((n, num_classes), np.float32) if soft else np.zeros(n, np.int32)
  return PixelSet(np.zeros((n, *shape), np.float32), y, lr=lr, meta=meta)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("with_lr", [False, True])
def test_storage_counts_every_array_in_float32(soft, with_lr):
  n, (h, w, ch), c = 20, (5, 6, 3), 10
  s = make(n, (h, w, ch), c, soft, lr=0.01 if with_lr else None)
  values = n * h * w * ch + (n * c if soft else n) + (1 if with_lr else 0)
  assert storage_bytes(s) == 4 * values
  assert storage_mb(s) == pytest.approx(4 * values / 2**20)
  assert ipc_equivalent(s) == pytest.approx(values / (c * h * w * ch))


def test_storage_ignores_dtype_and_preprocessing():
  s = make(10, (8, 8, 1), 10, soft=False, preprocessing={"kind": "zca", "whiten": np.eye(64)})
  half = PixelSet(s.x.astype(np.float16), s.y.astype(np.int8), meta=s.meta)
  assert storage_bytes(half) == storage_bytes(s) == 4 * (640 + 10)


def test_ipc_equivalent_of_images_only_equals_ipc():
  # Soft labels of FRePo's digits 1-IPC set add C values per image to H*W*ch.
  s = make(10, (8, 8, 1), 10, soft=True)
  assert ipc_equivalent(s) == pytest.approx((640 + 100) / 640)


def test_d3_table7_soft_label_megabytes():
  # D3 Table 7: TESLA ImageNet-1K 10 IPC soft labels, 10,000 x 1,000 fp32, "38" MB.
  labels_bytes = 4 * 10_000 * 1_000
  assert round(labels_bytes / 2**20) == 38
  s = make(2, (1, 1, 1), 1000, soft=True)
  assert storage_mb(s) == pytest.approx(4 * (2 + 2 * 1000) / 2**20)
