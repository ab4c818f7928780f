"""RealData: who owns the fingerprint (derived on replace, never set) and load_real."""

import hashlib

import numpy as np
import pytest

from distill_jax import data
from distill_jax.data import RealData, load_real


def sha16(*arrays):
  """An independent digest of the shapes, dtypes and bytes of `arrays` (`data.fingerprint`)."""
  h = hashlib.sha256()
  for a in arrays:
    h.update(f"{a.dtype.str}{a.shape}".encode() + np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


def toy(seed=0, n=12):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 4, 4, 1)).astype(np.float32)
  y = (np.arange(n) % 3).astype(np.int32)
  return RealData("toy", 3, (4, 4, 1), ("a", "b", "c"), x, y, x[:3], y[:3])


def test_fingerprint_of_the_training_arrays():
  d = toy()
  assert d.fingerprint == sha16(d.x_train, d.y_train) == data.fingerprint(d.x_train, d.y_train)
  # The test split is not part of it; every bit of the training arrays is.
  assert toy().fingerprint == d.fingerprint
  flipped = d.x_train.copy()
  flipped.flat[7] = np.nextafter(flipped.flat[7], np.inf)
  assert RealData("toy", 3, (4, 4, 1), ("a", "b", "c"), flipped, d.y_train, d.x_test,
                  d.y_test).fingerprint != d.fingerprint


def test_replace_derives_a_new_fingerprint_only_for_new_training_arrays():
  d = toy()
  for changes in ({"name": "other"}, {"x_test": d.x_test[:1], "y_test": d.y_test[:1]},
                  {"class_names": ("x", "y", "z")}, {"preprocessor": object()}):
    assert d.replace(**changes).fingerprint == d.fingerprint, changes
  # Training arrays passed again unchanged (the same objects or equal copies) change nothing.
  assert d.replace(x_train=d.x_train, y_train=d.y_train.copy()).fingerprint == d.fingerprint
  # Equal values of another dtype or shape are other arrays.
  assert d.replace(y_train=d.y_train.astype(np.int64)).fingerprint != d.fingerprint
  assert d.replace(x_train=d.x_train.reshape(12, 4, 2, 2)).fingerprint != d.fingerprint
  half = d.replace(x_train=d.x_train[:6], y_train=d.y_train[:6])
  # Derived from the source's fingerprint and the new arrays, not the new arrays alone.
  want = hashlib.sha256((d.fingerprint + sha16(d.x_train[:6], d.y_train[:6])).encode())
  assert half.fingerprint == want.hexdigest()[:16] != sha16(d.x_train[:6], d.y_train[:6])
  relabelled = d.replace(y_train=(d.y_train + 1) % 3)
  assert relabelled.fingerprint not in (d.fingerprint, half.fingerprint)
  np.testing.assert_array_equal(relabelled.x_train, d.x_train)
  # The same derivation from the same source gives the same fingerprint; another source not.
  assert d.replace(x_train=d.x_train[:6].copy(), y_train=d.y_train[:6].copy()).fingerprint == (
      half.fingerprint)
  other_source = toy(seed=1)
  same_arrays = other_source.replace(x_train=d.x_train[:6], y_train=d.y_train[:6])
  assert same_arrays.fingerprint != half.fingerprint


def test_replace_refuses_an_explicit_fingerprint_and_checks_lengths():
  d = toy()
  with pytest.raises(ValueError, match="fingerprint is derived from the data"):
    d.replace(fingerprint="0123456789abcdef")
  with pytest.raises(ValueError, match="12 training images with 6 labels"):
    d.replace(y_train=d.y_train[:6])


def test_set_meta_and_helpers():
  d = toy()
  meta = d.set_meta("random", 2, label_kind="probabilities")
  assert (meta.method, meta.dataset, meta.ipc, meta.num_classes, meta.image_shape) == (
      "random", "toy", 2, 3, (4, 4, 1))
  assert meta.label_kind == "probabilities" and meta.preprocessing_kind == "none"
  np.testing.assert_array_equal(d.class_counts(), [4, 4, 4])
  d.check_ipc(4)
  with pytest.raises(ValueError, match="ipc=5 is impossible for toy"):
    d.check_ipc(5)
  np.testing.assert_array_equal(d.to_images(np.array([-1.0, 0.5, 2.0])), [0.0, 0.5, 1.0])


def test_load_real_keys_on_the_raw_arrays_and_the_preprocessing():
  standardized = load_real("digits", "standardize")
  raw_x, raw_y = data.load("digits", "train")
  want = hashlib.sha256(f"{sha16(raw_x, raw_y)}:standardize".encode()).hexdigest()[:16]
  assert standardized.fingerprint == want
  # Not the digest of the preprocessed floats: refitting the same preprocessing elsewhere (other
  # XLA thread counts change a ZCA's last bits) keeps the fingerprint.
  assert standardized.fingerprint != sha16(standardized.x_train, standardized.y_train)
  plain = load_real("digits", "none")
  assert plain.fingerprint != standardized.fingerprint
  x = raw_x.astype(np.float64)
  np.testing.assert_allclose(standardized.x_train, (x - x.mean()) / x.std(), atol=1e-4)
  np.testing.assert_array_equal(plain.x_train, raw_x)
  assert standardized.x_train.dtype == np.float32 and standardized.y_train.dtype == np.int32
  assert (standardized.num_classes, standardized.image_shape) == (10, (8, 8, 1))
  assert standardized.preprocessor.kind == "standardize"


def test_a_validation_split_is_held_out_of_training_before_preprocessing():
  """`validation=N` moves N / C training images of every class to the evaluation split; the
  preprocessor and the fingerprint see only the rest, and the test split is not used."""
  raw_x, raw_y = data.load("digits", "train")
  held = load_real("digits", "standardize", validation=100)
  plain = load_real("digits", "standardize")
  assert len(held.x_test) == 100 and len(held.x_train) == len(raw_x) - 100
  np.testing.assert_array_equal(np.bincount(held.y_test, minlength=10), [10] * 10)
  rest = held.preprocessor.invert(held.x_train)
  val = held.preprocessor.invert(held.x_test)
  pool = {row.tobytes() for row in np.round(raw_x, 4).astype(np.float32)}
  assert all(row.tobytes() in pool for row in np.round(val, 4).astype(np.float32)[:5])
  rest_keys = {row.tobytes() for row in np.round(rest, 4).astype(np.float32)}
  assert not any(row.tobytes() in rest_keys for row in np.round(val, 4).astype(np.float32))
  assert held.fingerprint != plain.fingerprint
  np.testing.assert_allclose(held.preprocessor.mean, np.asarray(rest).mean(axis=(0, 1, 2)),
                             atol=1e-5)
  with pytest.raises(ValueError, match="multiple of the 10 classes"):
    load_real("digits", "standardize", validation=15)


def test_with_a_validation_split_the_test_split_is_never_read(monkeypatch):
  load = data.datasets.load

  def no_test_split(name, split):
    if split == "test":
      raise AssertionError("the test split was read")
    return load(name, split)

  monkeypatch.setattr(data.datasets, "load", no_test_split)
  held = load_real("digits", "standardize", validation=100)
  assert len(held.x_test) == 100
  with pytest.raises(AssertionError, match="the test split was read"):
    load_real("digits", "standardize")
