"""SetMeta, PixelSet (pytree, validation) and the KINDS registry."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.distilled import (
    KINDS,
    DistilledSet,
    PixelSet,
    SetMeta,
    load,
    register_kind,
    save,
    storage_bytes,
)
from distill_jax.registry import UnknownNameError


def make_meta(**overrides):
  fields = dict(method="frepo", dataset="digits", ipc=2, num_classes=3, image_shape=(4, 4, 1))
  fields.update(overrides)
  return SetMeta(**fields)


def make_set(soft=False, lr=None, meta=None):
  meta = meta or make_meta(label_kind="learned" if soft else "class_ids")
  x = jnp.arange(6 * 16, dtype=jnp.float32).reshape(6, 4, 4, 1) / 100
  y = jax.nn.one_hot(jnp.arange(6) % 3, 3) if soft else jnp.arange(6, dtype=jnp.int32) % 3
  return PixelSet(x, y, lr=lr, meta=meta)


def test_meta_copies_and_freezes_preprocessing():
  whiten = np.eye(3)
  meta = make_meta(preprocessing={"kind": "zca_frepo", "whiten": whiten})
  whiten[0, 0] = 5.0  # The caller's later edit must not reach the metadata.
  assert meta.preprocessing["whiten"][0, 0] == 1.0
  assert not meta.preprocessing["whiten"].flags.writeable
  assert meta.preprocessing_kind == "zca_frepo"
  assert set(meta.preprocessing_arrays()) == {"whiten"}
  with pytest.raises(dataclasses.FrozenInstanceError):
    meta.ipc = 3
  with pytest.raises(TypeError):
    meta.preprocessing["whiten"] = np.zeros(3)  # Would silently break the cached hash.


def test_meta_equality_and_hash_follow_array_bytes():
  a = make_meta(
      preprocessing={"kind": "zca_frepo", "whiten": np.eye(3), "mean": np.array([np.nan])}
  )
  b = make_meta(
      preprocessing={"kind": "zca_frepo", "whiten": np.eye(3), "mean": np.array([np.nan])}
  )
  c = make_meta(
      preprocessing={"kind": "zca_frepo", "whiten": 2 * np.eye(3), "mean": np.array([np.nan])}
  )
  assert a == b and hash(a) == hash(b)  # NaN-safe: compared as bytes.
  assert a != c
  assert a != make_meta(ipc=3)
  assert a != make_meta(
      preprocessing={
          "kind": "zca_frepo",
          "whiten": np.eye(3, dtype=np.float32),
          "mean": np.array([np.nan]),
      }
  )
  assert "whiten=float64[3, 3]" in repr(a)
  # The label kind is part of the identity (and of the jit cache key) of a set's metadata.
  assert make_meta() == make_meta(label_kind="class_ids")
  assert make_meta() != make_meta(label_kind="learned")
  assert make_meta(label_kind="logits") != make_meta(label_kind="probabilities")
  assert hash(make_meta(label_kind="logits")) == hash(make_meta(label_kind="logits"))
  assert "label_kind='logits'" in repr(make_meta(label_kind="logits"))
  assert make_meta(label_kind="logits").to_json()["label_kind"] == "logits"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(ipc=0), "ipc must be a positive int"),
        (dict(num_classes=2.0), "num_classes must be a positive int"),
        (dict(image_shape=(4, 4)), "image_shape must be"),
        (dict(method=""), "method must be a non-empty string"),
        (dict(preprocessing={"mean": np.zeros(3)}), "no 'kind' entry"),
        (dict(preprocessing={"kind": "x", "f": np.array([object()])}), "numeric or string"),
        (dict(preprocessing={"kind": 3}), "'kind'] must be a string"),
        (dict(label_kind="soft"), "label_kind 'soft' is unknown; use one of class_ids, learned, "
         "probabilities, logits"),
        (dict(label_kind=None), "label_kind None is unknown"),
    ],
)
def test_meta_rejects_bad_fields(overrides, message):
  with pytest.raises(ValueError, match=message):
    make_meta(**overrides)


def test_pixel_set_is_a_pytree_with_static_meta():
  s = make_set(soft=True, lr=0.01)
  leaves, treedef = jax.tree.flatten(s)
  assert len(leaves) == 3  # x, y, lr; meta is aux data.
  assert jax.tree.unflatten(treedef, leaves).meta is s.meta
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(s)[0]]
  assert paths == [".x", ".y", ".lr"]
  doubled = jax.tree.map(lambda a: 2 * a, s)
  np.testing.assert_allclose(doubled.x, 2 * np.asarray(s.x))
  assert doubled.meta == s.meta and isinstance(doubled, PixelSet)
  assert len(jax.tree.leaves(make_set())) == 2  # No lr: None is not a leaf.


def test_pixel_set_under_jit_grad_and_vmap():
  s = make_set(soft=True, lr=jnp.float32(0.5))
  traces = []

  @jax.jit
  def loss(t):
    traces.append(1)
    return jnp.sum(t.x**2) * t.lr + jnp.sum(t.y)

  expected = np.sum(np.asarray(s.x, np.float64) ** 2) * 0.5 + 6.0
  np.testing.assert_allclose(loss(s), expected, rtol=1e-6)
  # An equal (not identical) meta must hit the jit cache.
  loss(PixelSet(s.x + 1, s.y, lr=s.lr, meta=make_meta(label_kind="learned")))
  assert len(traces) == 1
  # Another label kind is another program.
  loss(PixelSet(s.x, s.y, lr=s.lr, meta=make_meta(label_kind="probabilities")))
  assert len(traces) == 2
  grads = jax.grad(loss)(s)
  np.testing.assert_allclose(grads.x, 2 * 0.5 * np.asarray(s.x), rtol=1e-6)
  np.testing.assert_allclose(grads.lr, np.sum(np.asarray(s.x, np.float64) ** 2), rtol=1e-6)
  # A stack of sets from vmap (leading batch axis) is a valid set, and reductions to scalars
  # through tree.map do not trip the shape checks.
  stacked = jax.vmap(lambda scale: jax.tree.map(lambda a: a * scale, s))(jnp.arange(2.0))
  assert stacked.x.shape == (2, 6, 4, 4, 1) and stacked.lr.shape == (2,)
  norms = jax.tree.map(jnp.linalg.norm, s)
  assert norms.x.shape == ()


def test_pixel_set_arrays_and_num_examples():
  s = make_set(lr=0.01)
  arrays = s.arrays()
  assert list(arrays) == ["x", "y", "lr"]
  assert all(isinstance(a, np.ndarray) for a in arrays.values())
  np.testing.assert_array_equal(arrays["x"], np.asarray(s.x))
  assert arrays["lr"].dtype == np.float32 and arrays["lr"].shape == ()
  assert s.num_examples == 6
  rebuilt = PixelSet.from_arrays(arrays, s.meta)
  np.testing.assert_array_equal(rebuilt.y, arrays["y"])


@pytest.mark.parametrize(
    "x_shape, y, message",
    [
        ((6, 4, 4, 3), np.zeros(6, np.int32), r"expected \(N, \*\(4, 4, 1\)\)"),
        ((6, 4, 4), np.zeros(6, np.int32), "images are NHWC"),
        ((6, 4, 4, 1), np.zeros(5, np.int32), "has 6 images but labels y of shape"),
        ((6, 4, 4, 1), np.zeros((6, 4), np.float32), "4 columns but meta.num_classes is 3"),
        ((6, 4, 4, 1), np.zeros(6, np.float32), "cast class ids to int32"),
        ((6, 4, 4, 1), np.zeros((6, 3), np.int32), "cast them to float32"),
        ((6, 4, 4, 1), np.zeros((6, 3, 1), np.float32), "give hard labels"),
    ],
)
def test_pixel_set_rejects_bad_shapes(x_shape, y, message):
  label_kind = "learned" if np.ndim(y) == 2 else "class_ids"
  with pytest.raises(ValueError, match=message):
    PixelSet(np.zeros(x_shape, np.float32), y, meta=make_meta(label_kind=label_kind))


@pytest.mark.parametrize(
    "label_kind, y, message",
    [
        ("class_ids", np.zeros((6, 3), np.float32), r"are \(N, C\) floats but meta.label_kind is "
         "'class_ids'"),
        ("learned", np.zeros(6, np.int32), r"are \(N,\) class ids but meta.label_kind is "
         "'learned'"),
        ("probabilities", np.zeros(6, np.int32), "meta.label_kind is 'probabilities'"),
        ("logits", np.zeros(6, np.int32), "meta.label_kind is 'logits'"),
    ],
)
def test_pixel_set_labels_must_match_the_label_kind(label_kind, y, message):
  with pytest.raises(ValueError, match=message):
    PixelSet(np.zeros((6, 4, 4, 1), np.float32), y, meta=make_meta(label_kind=label_kind))


def test_pixel_set_rejects_bad_lr_meta_and_dtype():
  x, y = np.zeros((6, 4, 4, 1), np.float32), np.zeros(6, np.int32)
  with pytest.raises(ValueError, match="must be a scalar"):
    PixelSet(x, y, lr=np.zeros(2, np.float32), meta=make_meta())
  with pytest.raises(ValueError, match="must be a SetMeta"):
    PixelSet(x, y, meta={"method": "frepo"})
  with pytest.raises(ValueError, match="cast them to float32"):
    PixelSet(x.astype(np.int32), y, meta=make_meta())
  with pytest.raises(TypeError):
    PixelSet(x, y)  # meta is required (keyword-only).
  with pytest.raises(ValueError, match="has 6 images"):
    make_set().replace(y=jnp.zeros(2, jnp.int32))


@register_kind("test_toy")
@dataclasses.dataclass(frozen=True)
class ToySet(DistilledSet):
  """A latents-like kind: codes decoded to 4x4 images by nested decoder parameters."""

  z: object
  decoder: object
  meta: SetMeta = dataclasses.field(kw_only=True)

  @property
  def num_examples(self):
    return int(self.z.shape[0])

  def draw(self, indices, *, key, epoch, run_key=None):
    del key, epoch, run_key
    dense = self.decoder["dense"]
    flat = jnp.asarray(self.z)[indices] @ dense["kernel"] + dense.get("bias", 0.0)
    return flat.reshape(-1, *self.meta.image_shape), jnp.asarray(indices) % self.meta.num_classes

  def class_ids(self):
    return np.arange(self.num_examples, dtype=np.int32) % self.meta.num_classes


def toy_set(z=None, kernel=None, bias=None):
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, 3)).astype(np.float32) if z is None else z
  dense = {"kernel": rng.normal(size=(3, 16)).astype(np.float32) if kernel is None else kernel}
  if bias is not False:
    dense["bias"] = np.zeros(16, np.float32) if bias is None else bias
  return ToySet(z, {"dense": dense}, meta=make_meta())


def test_kinds_registry_and_a_new_kind_plugs_in():
  assert KINDS.get("pixels") is PixelSet and PixelSet.kind == "pixels"
  assert KINDS.get("test_toy") is ToySet
  with pytest.raises(UnknownNameError, match="valid names: .*pixels"):
    KINDS.get("nope")
  toy = toy_set()
  arrays = toy.arrays()
  assert sorted(arrays) == ["decoder/dense/bias", "decoder/dense/kernel", "z"]
  rebuilt = ToySet.from_arrays(arrays, toy.meta)
  np.testing.assert_array_equal(rebuilt.decoder["dense"]["kernel"], toy.decoder["dense"]["kernel"])
  assert len(jax.tree.leaves(toy)) == 3
  with pytest.raises(ValueError, match="does not belong"):
    ToySet.from_arrays({"w": np.ones(2)}, toy.meta)
  with pytest.raises(ValueError, match="already registered"):
    register_kind("pixels")(ToySet)
  with pytest.raises(ValueError, match="contains '/'"):
    ToySet(np.ones(2), {"a/b": np.ones(2)}, meta=make_meta()).arrays()


def test_the_set_protocol_defaults_of_a_new_kind():
  """A kind implementing num_examples, draw and class_ids gets preview, label_kind and
  training_lr from the base class."""
  toy = toy_set(bias=np.linspace(0, 1, 16, dtype=np.float32))
  images, ids = toy.preview()
  dense = toy.decoder["dense"]
  want = np.asarray(toy.z, np.float64) @ dense["kernel"] + dense["bias"]
  np.testing.assert_allclose(images, want.reshape(2, 4, 4, 1), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(ids, [0, 1])
  assert toy.label_kind == "class_ids" and toy.training_lr() is None
  # The protocol is abstract: a kind without it cannot be built.

  @dataclasses.dataclass(frozen=True)
  class Incomplete(DistilledSet):
    z: object
    meta: SetMeta = dataclasses.field(kw_only=True)

  with pytest.raises(TypeError, match="abstract"):
    Incomplete(np.ones(2), meta=make_meta())


def test_pixel_set_protocol():
  soft = make_set(soft=True, lr=0.02)
  y = np.asarray(soft.y)
  indices = np.array([4, 0, 4])
  x_batch, y_batch = jax.jit(lambda s, i: s.draw(i, key=jax.random.key(0), epoch=3))(soft, indices)
  np.testing.assert_array_equal(x_batch, np.asarray(soft.x)[indices])
  np.testing.assert_array_equal(y_batch, y[indices])
  assert soft.label_kind == "learned"
  np.testing.assert_array_equal(soft.class_ids(), np.argmax(y, axis=1))
  assert soft.class_ids().dtype == np.int32
  images, ids = soft.preview()
  np.testing.assert_array_equal(images, soft.x)
  np.testing.assert_array_equal(ids, soft.class_ids())
  assert soft.training_lr() == pytest.approx(0.02) and isinstance(soft.training_lr(), float)
  hard = make_set()
  np.testing.assert_array_equal(hard.class_ids(), np.arange(6) % 3)
  assert hard.label_kind == "class_ids" and hard.training_lr() is None
  # Learned labels whose argmax is not their position: class_ids follows the labels.
  shuffled = PixelSet(soft.x, jnp.asarray(y[::-1]), meta=soft.meta)
  np.testing.assert_array_equal(shuffled.class_ids(), np.argmax(y[::-1], axis=1))


def test_a_new_kind_round_trips_through_save_and_load(tmp_path):
  toy = toy_set(z=np.arange(6.0).reshape(2, 3), kernel=np.ones((3, 16), np.float32), bias=False)
  save(tmp_path / "toy", toy)
  loaded = load(tmp_path / "toy")
  assert isinstance(loaded, ToySet) and loaded.meta == toy.meta
  np.testing.assert_array_equal(loaded.z, toy.z)
  np.testing.assert_array_equal(loaded.decoder["dense"]["kernel"], toy.decoder["dense"]["kernel"])
  assert storage_bytes(loaded) == 4 * (6 + 48)
  np.testing.assert_array_equal(loaded.preview()[0], toy.preview()[0])
