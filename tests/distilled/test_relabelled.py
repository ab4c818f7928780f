"""Relabelled sets (D3S Algorithm 2 and 4): recorded crops and logits, replay, storage, save/load,
and KD replay training against plain KD training."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import distilled
from distill_jax.data import rrc_apply
from distill_jax.distilled import RelabelledSet, SetMeta
from distill_jax.evaluation import get_protocol
from distill_jax.training import Trainer
from tests.digits_sets import digits_arrays, pixel_set, subset

META = SetMeta(method="d3s", dataset="digits", ipc=2, num_classes=10, image_shape=(8, 8, 1),
               label_kind="logits")
WEIGHTS = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)


def label_fn(views):
  """A fixed linear 'teacher' of the flattened views."""
  return np.asarray(views).reshape(len(views), -1) @ WEIGHTS


@pytest.fixture(scope="module")
def relabelled():
  x, y = subset(digits_arrays(), 2)
  return distilled.relabel(x, y, label_fn, epochs=4, key=jax.random.key(3), meta=META,
                           batch_size=7)


def params_of(crops):
  return {"top": crops[:, 0], "left": crops[:, 1], "height": crops[:, 2], "width": crops[:, 3],
          "flip": crops[:, 4] > 0}


def test_each_epoch_records_its_crops_and_the_logits_of_those_views(relabelled):
  s = relabelled
  assert s.logits.shape == (4, 20, 10) and s.crops.shape == (4, 20, 5)
  assert s.num_epochs == 4 and s.label_kind == "logits"
  assert len({s.crops[e].tobytes() for e in range(4)}) == 4  # A new draw every epoch.
  for e in range(4):
    views = rrc_apply(s.x, params_of(s.crops[e]), size=(8, 8))
    np.testing.assert_allclose(s.logits[e], label_fn(views), rtol=1e-5, atol=1e-5)
    x, logits = s.draw(np.arange(20), epoch=e)
    np.testing.assert_allclose(x, views, atol=1e-6)
    np.testing.assert_array_equal(logits, s.logits[e])


def test_a_run_key_replays_a_permutation_of_the_recorded_epochs_per_pass(relabelled):
  """Appendix D.7: each pass of E_L training epochs visits every recorded epoch once, in an order
  drawn per pass from the network's run key; without a key the recorded order repeats."""
  key = jax.random.key(7)
  order = [int(relabelled.recorded_epoch(e, key)) for e in range(12)]
  for start in range(0, 12, 4):
    assert sorted(order[start:start + 4]) == [0, 1, 2, 3]
  assert order[:4] != order[4:8] or order[4:8] != order[8:]
  assert [int(relabelled.recorded_epoch(e)) for e in range(6)] == [0, 1, 2, 3, 0, 1]
  jitted = jax.jit(lambda e: relabelled.recorded_epoch(e, key))
  assert [int(jitted(e)) for e in range(12)] == order


def test_storage_counts_images_labels_logits_and_crops(relabelled):
  # 4 bytes per value: images 20*64, class ids 20, logits 4*20*10, crops 4*20*5.
  assert distilled.storage_bytes(relabelled) == 4 * (20 * 64 + 20 + 4 * 20 * 10 + 4 * 20 * 5)
  # Fashion-MNIST IPC 10 with E_L = 25 (the D3S CPU preset): about 14.8 images per class.
  meta = dataclasses.replace(META, dataset="fashion_mnist", ipc=10, image_shape=(28, 28, 1))
  n = 100
  big = RelabelledSet(x=np.zeros((n, 28, 28, 1), np.float32), y=np.zeros(n, np.int32),
                      logits=np.zeros((25, n, 10), np.float32),
                      crops=np.zeros((25, n, 5), np.int32), meta=meta)
  assert distilled.ipc_equivalent(big) == pytest.approx(
      (n * 784 + n + 25 * n * 10 + 25 * n * 5) / (10 * 784))
  assert 14.5 < distilled.ipc_equivalent(big) < 15.0


def test_a_relabelled_set_round_trips_through_save_and_load(relabelled, tmp_path):
  distilled.save(str(tmp_path / "set"), relabelled)
  loaded = distilled.load(str(tmp_path / "set"))
  assert isinstance(loaded, RelabelledSet) and loaded.meta == relabelled.meta
  for name, array in relabelled.arrays().items():
    np.testing.assert_array_equal(loaded.arrays()[name], array, err_msg=name)
    assert loaded.arrays()[name].dtype == array.dtype


def test_bad_shapes_are_named():
  x = np.zeros((3, 8, 8, 1), np.float32)
  with pytest.raises(ValueError, match=r"crops have shape \(2, 3, 4\); expected \(2, 3, 5\)"):
    RelabelledSet(x=x, y=np.zeros(3, np.int32), logits=np.zeros((2, 3, 10), np.float32),
                  crops=np.zeros((2, 3, 4), np.int32), meta=META)
  with pytest.raises(ValueError, match="label_kind='logits'"):
    RelabelledSet(x=x, y=np.zeros(3, np.int32), logits=np.zeros((2, 3, 10), np.float32),
                  crops=np.zeros((2, 3, 5), np.int32),
                  meta=dataclasses.replace(META, label_kind="class_ids"))


def test_replay_with_identity_crops_equals_plain_kd_training():
  """Algorithm 4 with every recorded view the whole image, unflipped, and the same logits every
  epoch trains exactly the networks of KD training on (images, logits) as a pixel set."""
  x, y = subset(digits_arrays(), 3)
  n, epochs = len(x), 3
  logits = label_fn(x)
  identity = np.tile(np.array([0, 0, 8, 8, 0], np.int32), (epochs, n, 1))
  replay = RelabelledSet(x=x, y=y, logits=np.stack([logits] * epochs), crops=identity,
                         meta=dataclasses.replace(META, ipc=3))
  plain = pixel_set(x, logits, label_kind="logits", ipc=3)
  protocol = get_protocol("d3s", model="convnet", width=4, depth=2, epochs=5, batch_size=8)
  keys = jax.random.split(jax.random.key(0), 2)
  trained = [Trainer.for_set(protocol, s).train(keys, s) for s in (replay, plain)]
  np.testing.assert_allclose(trained[0].losses, trained[1].losses, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               trained[0].state.params, trained[1].state.params)
  assert jnp.all(jnp.isfinite(trained[0].losses))
