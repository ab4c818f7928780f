"""TrajectoryStore: save points of stacked networks through io.Checkpointer."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.distilled import PixelSet, SetMeta
from distill_jax.training import Recipe, Trainer
from distill_jax.training.trajectories import TrajectoryStore

# Batch norm, so every network has statistics next to its parameters; momentum, so the
# optimiser state is not empty.
RECIPE = Recipe(model="convnet", model_kwargs={"width": 4, "depth": 1, "norm": "batch"},
                lr=0.05, momentum=0.9, steps=6, batch_size=8, augmentation="none")


@pytest.fixture(scope="module")
def trained():
  """Three networks trained 6 steps, their stacked states at steps 0, 2 and 6 (host copies)."""
  rng = np.random.default_rng(0)
  meta = SetMeta(method="real", dataset="toy", ipc=1, num_classes=3, image_shape=(8, 8, 1))
  train_set = PixelSet(rng.normal(size=(16, 8, 8, 1)).astype(np.float32),
                       (np.arange(16) % 3).astype(np.int32), meta=meta)
  trainer = Trainer.for_set(RECIPE, train_set)
  keys = jax.random.split(jax.random.key(0, impl="rbg"), 3)
  states = {0: trainer.initial_state(keys, (8, 8, 1))}
  trainer.train(keys, train_set, state=jax.tree.map(jnp.copy, states[0]), save_at=[2, 6],
                on_save=lambda t, state, _: states.update({t: jax.tree.map(jnp.copy, state)}))
  return trainer, states


def variables(state, i):
  return jax.tree.map(lambda a: np.asarray(a[i]), {"params": state.params, **state.model_state})


def assert_tree_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    if jnp.issubdtype(e.dtype, jax.dtypes.prng_key):
      assert jax.random.key_impl(a) == jax.random.key_impl(e)
      a, e = jax.random.key_data(a), jax.random.key_data(e)
    assert np.asarray(a).dtype == np.asarray(e).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def write_all(store, states, shard=0):
  for point, state in sorted(states.items()):
    store.write(shard, point, state, {"loss": np.full(3, point, np.float32),
                                      "accuracy": np.arange(3) / 10 + point})
  store.wait()


def test_round_trip_of_every_network_at_every_point(trained, tmp_path):
  _, states = trained
  store = TrajectoryStore(str(tmp_path / "store"), networks_per_shard=3)
  assert store.points(0) == [] and not store.is_complete(0)
  write_all(store, states)
  assert store.points(0) == [0, 2, 6]
  template = variables(states[0], 0)
  assert set(template) == {"params", "batch_stats"}
  for point, state in states.items():
    for i in range(3):
      got = store.read(i, point, template)
      assert_tree_equal(got, variables(state, i))
      assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(got))
  # Batch-norm statistics moved in training and come back with the network.
  assert not np.allclose(states[6].model_state["batch_stats"]["BatchNorm_0"]["mean"],
                         states[0].model_state["batch_stats"]["BatchNorm_0"]["mean"])
  metrics = store.metrics(0, 2, ("loss", "accuracy"))
  np.testing.assert_array_equal(metrics["loss"], np.full(3, 2, np.float32))
  np.testing.assert_allclose(metrics["accuracy"], np.arange(3) / 10 + 2, rtol=1e-6)
  assert metrics["accuracy"].dtype == np.float32
  store.close()


def test_read_of_one_network_with_a_partial_template(trained, tmp_path):
  """`read` names one network's subtree only; shards are separate folders, so a store with
  network 4 of 6 on disk reads it without the other shard."""
  _, states = trained
  store = TrajectoryStore(str(tmp_path / "store"), networks_per_shard=3)
  shifted = {p: jax.tree.map(lambda a: a[::-1], s) for p, s in states.items()}
  write_all(store, states, shard=0)
  write_all(store, shifted, shard=1)
  store.close()
  os.rename(tmp_path / "store" / "shard_0000", tmp_path / "elsewhere")
  reader = TrajectoryStore(str(tmp_path / "store"), networks_per_shard=3)
  template = variables(states[0], 0)
  got = reader.read(4, 6, template)  # Shard 1, local network 1 of the reversed stack.
  assert_tree_equal(got, variables(states[6], 1))
  got = reader.read(3, 2, template)  # Local network 0 of the reversed stack: original 2.
  assert_tree_equal(got, variables(states[2], 2))
  with pytest.raises(Exception):
    reader.read(0, 2, template)  # Shard 0 is gone.
  reader.close()


def test_restore_shard_resumes_training_exactly(trained, tmp_path):
  trainer, states = trained
  store = TrajectoryStore(str(tmp_path / "store"), networks_per_shard=3)
  write_all(store, {0: states[0], 2: states[2]})
  fresh = trainer.initial_state(jax.random.split(jax.random.key(9, impl="rbg"), 3), (8, 8, 1))
  restored = store.restore_shard(0, 2, fresh)
  # Parameters, statistics, the optimiser's momentum and all three keys of every network.
  assert_tree_equal(jax.tree.map(np.asarray, restored.params),
                    jax.tree.map(np.asarray, states[2].params))
  assert_tree_equal(jax.tree.map(np.asarray, restored.model_state),
                    jax.tree.map(np.asarray, states[2].model_state))
  assert_tree_equal(restored.opt_state, states[2].opt_state)
  for name in ("shuffle_key", "aug_key", "dropout_key"):
    assert_tree_equal(getattr(restored, name), getattr(states[2], name))
  store.close()


def test_completion_summary_and_reopening(trained, tmp_path):
  _, states = trained
  path = str(tmp_path / "store")
  store = TrajectoryStore(path, networks_per_shard=3)
  write_all(store, {0: states[0]})
  store.mark_complete(0, {"epochs": 1, "curve": [[0.5, 0.25, 0.125]]})
  assert store.is_complete(0) and not store.is_complete(1)
  store.close()
  again = TrajectoryStore(path, networks_per_shard=3)
  assert again.summary(0) == {"epochs": 1, "curve": [[0.5, 0.25, 0.125]]}
  assert again.points(0) == [0]
  with pytest.raises(ValueError, match="not after the latest saved step 0"):
    again.write(0, 0, states[0], {})
  again.close()
