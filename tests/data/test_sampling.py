"""Sampling: class-balanced subsets and jittable index draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import data

# 3 classes of sizes 5, 7, 4, in shuffled order.
Y = np.random.default_rng(0).permutation(np.repeat(np.arange(3), [5, 7, 4])).astype(np.int32)


def test_class_indices_matches_where():
  got = data.class_indices(Y, 4)
  for c in range(4):
    np.testing.assert_array_equal(got[c], np.flatnonzero(Y == c))


def test_random_subset_properties():
  x = np.arange(len(Y)) * 10  # x encodes its own position
  x_sub, y_sub = data.random_subset(x, Y, ipc=3, num_classes=3, seed=7)
  assert y_sub.dtype == np.int32 and y_sub.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  positions = x_sub // 10
  np.testing.assert_array_equal(Y[positions], y_sub)  # each image keeps its label
  assert len(set(positions.tolist())) == 9  # distinct images
  again = data.random_subset(x, Y, ipc=3, num_classes=3, seed=7)
  np.testing.assert_array_equal(again[0], x_sub)
  others = {tuple(data.random_subset(x, Y, ipc=3, num_classes=3, seed=s)[0]) for s in range(10)}
  assert len(others) > 1
  # Works on jax arrays and on multi-dimensional images; ipc = smallest class is allowed.
  images = jnp.arange(len(Y) * 4.0).reshape(len(Y), 2, 2, 1)
  x_all, y_all = data.random_subset(images, jnp.asarray(Y), ipc=4, num_classes=3, seed=0)
  assert x_all.shape == (12, 2, 2, 1) and np.bincount(y_all).tolist() == [4, 4, 4]


def test_random_subset_is_uniform_within_a_class():
  x = np.arange(len(Y))
  counts = np.zeros(len(Y))
  for seed in range(700):
    counts[data.random_subset(x, Y, ipc=2, num_classes=3, seed=seed)[0]] += 1
  expected = 700 * 2 / np.bincount(Y)[Y]
  assert np.all(np.abs(counts - expected) < 0.2 * expected)


@pytest.mark.parametrize("ipc", [0, 5, -1, True, 2.0])
def test_random_subset_bad_ipc(ipc):
  with pytest.raises(ValueError, match="smallest class \\(id 2\\) has 4; use 1 <= ipc <= 4"):
    data.random_subset(np.zeros(len(Y)), Y, ipc=ipc, num_classes=3, seed=0)


def test_random_subset_bad_labels():
  with pytest.raises(ValueError, match="labels must lie in 0..1"):
    data.random_subset(np.zeros(len(Y)), Y, ipc=1, num_classes=2, seed=0)
  with pytest.raises(ValueError, match="x has 3 images but y has 16"):
    data.random_subset(np.zeros(3), Y, ipc=1, num_classes=3, seed=0)


def test_balanced_indices_jit_and_properties():
  idx = data.balanced_indices(jax.random.key(0), Y, per_class=3, num_classes=3)
  assert idx.shape == (9,) and idx.dtype == jnp.int32
  np.testing.assert_array_equal(Y[np.asarray(idx)], np.repeat(np.arange(3), 3))
  assert len(set(idx.tolist())) == 9
  # Under jit (traced labels) and vmap: the same draw for the same key, and uniform sampling
  # without replacement within each class: P(selected) = per_class / class size.
  many = jax.jit(jax.vmap(
      lambda key, y: data.balanced_indices(key, y, per_class=3, num_classes=3), in_axes=(0, None)
  ))
  keys = jax.random.split(jax.random.key(1), 2000)
  draws = np.asarray(many(keys, jnp.asarray(Y)))
  np.testing.assert_array_equal(
      draws[5], data.balanced_indices(keys[5], Y, per_class=3, num_classes=3)
  )
  assert all(len(set(row)) == 9 for row in draws[:50].tolist())
  np.testing.assert_array_equal(Y[draws], np.broadcast_to(np.repeat(np.arange(3), 3), draws.shape))
  freq = np.bincount(draws.reshape(-1), minlength=len(Y)) / 2000
  np.testing.assert_allclose(freq, 3 / np.bincount(Y)[Y], atol=0.05)


def test_balanced_indices_too_many_per_class():
  expected = "per_class=5 exceeds the smallest class \\(id 2, 4 examples\\)"
  with pytest.raises(ValueError, match=expected):
    data.balanced_indices(jax.random.key(0), Y, per_class=5, num_classes=3)


def test_random_batch():
  fn = jax.jit(lambda key: data.random_batch(key, 10, 4))
  idx = fn(jax.random.key(3))
  assert idx.shape == (4,) and idx.dtype == jnp.int32 and len(set(idx.tolist())) == 4
  assert int(idx.min()) >= 0 and int(idx.max()) < 10
  np.testing.assert_array_equal(fn(jax.random.key(3)), idx)
  draws = np.asarray(jax.jit(jax.vmap(fn))(jax.random.split(jax.random.key(4), 3000)))
  np.testing.assert_allclose(np.bincount(draws.reshape(-1), minlength=10) / 3000, 0.4, atol=0.04)
  with pytest.raises(ValueError, match="batch_size must be in 1..n=10"):
    data.random_batch(jax.random.key(0), 10, 11)
