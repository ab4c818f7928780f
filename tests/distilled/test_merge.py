"""Merging sets distilled apart: examples concatenated, storage the sum, mismatches refused, and
the merged set round-trips through save/load and `launch.merge`."""

import os
import subprocess
import sys

import numpy as np
import pytest

from distill_jax.distilled import (PixelSet, RelabelledSet, SetMeta, load, merge, save,
                                   storage_bytes)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STD = {"kind": "standardize", "mean": np.array([0.5], np.float32),
       "std": np.array([0.25], np.float32)}


def part(seed, n=6, classes=3, method="apm", preprocessing=STD, label_kind="logits"):
  rng = np.random.default_rng(seed)
  meta = SetMeta(method=method, dataset="digits", ipc=n // classes, num_classes=classes,
                 image_shape=(4, 4, 1), preprocessing=preprocessing, label_kind=label_kind)
  y = (rng.normal(size=(n, classes)).astype(np.float32) if label_kind == "logits"
       else np.arange(n, dtype=np.int32) % classes)
  return PixelSet(rng.normal(size=(n, 4, 4, 1)).astype(np.float32), y, meta=meta)


def test_examples_are_concatenated_and_storage_is_the_sum():
  a, b, c = part(0), part(1), part(2, n=3)
  merged = merge([a, b, c])
  np.testing.assert_array_equal(merged.x, np.concatenate([a.x, b.x, c.x]))
  np.testing.assert_array_equal(merged.y, np.concatenate([a.y, b.y, c.y]))
  assert storage_bytes(merged) == storage_bytes(a) + storage_bytes(b) + storage_bytes(c)
  assert merged.meta.ipc == 5 and merged.meta.method == "apm"
  assert merged.meta.preprocessing_kind == "standardize"
  assert merge([a, part(3, method="random")]).meta.method == "apm+random"


@pytest.mark.parametrize("other, message", [
    (part(1, classes=2, n=4), "num_classes=2 but set 0 has 3"),
    (part(1, label_kind="class_ids"), "label_kind='class_ids' but set 0 has 'logits'"),
    (part(1, preprocessing={"kind": "none"}), "another preprocessed space"),
    (part(1, preprocessing={**STD, "std": np.array([0.3], np.float32)}),
     "another preprocessed space"),
])
def test_parts_of_other_data_are_refused(other, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    merge([part(0), other])


def test_other_kinds_and_single_sets_are_refused():
  with pytest.raises(ValueError, match="at least two sets"):
    merge([part(0)])
  meta = SetMeta(method="d3s", dataset="digits", ipc=1, num_classes=3, image_shape=(4, 4, 1),
                 label_kind="logits")
  relabelled = RelabelledSet(np.zeros((3, 4, 4, 1), np.float32), np.arange(3, dtype=np.int32),
                             np.zeros((1, 3, 3), np.float32), np.zeros((1, 3, 5), np.int32),
                             meta=meta)
  with pytest.raises(ValueError, match="'relabelled' set; merge joins pixel sets only"):
    merge([part(0), relabelled])
  with pytest.raises(ValueError, match="learned lr"):
    merge([part(0), part(1).replace(lr=np.float32(0.01))])


def test_the_launcher_saves_a_set_that_loads(tmp_path):
  save(tmp_path / "a", part(0))
  save(tmp_path / "b", part(1))
  result = subprocess.run(
      [sys.executable, "-m", "launch.merge", f"--sets={tmp_path / 'a'},{tmp_path / 'b'}",
       f"--out={tmp_path / 'merged'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "12 examples, ipc 4" in result.stdout
  merged = load(tmp_path / "merged")
  expected = merge([part(0), part(1)])
  np.testing.assert_array_equal(merged.x, expected.x)
  np.testing.assert_array_equal(merged.y, expected.y)
  assert merged.meta == expected.meta
