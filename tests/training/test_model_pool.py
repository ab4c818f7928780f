"""The FRePo model pool: staggered start, member access, one online step and the reset after K."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill_jax.models import get_model
from distill_jax.training import Recipe
from distill_jax.training.model_pool import MemberState, ModelPool


class _Linear(nn.Module):
  """A linear classifier on flattened pixels, following the models' call convention."""

  num_classes: int

  @nn.compact
  def __call__(self, x, train=False, return_features=False):
    features = x.reshape((x.shape[0], -1))
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.1))(features)
    if return_features:
      return logits, {"penultimate": features, "blocks": ()}
    return logits


def _leaves_equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_init_staggers_step_counters_and_draws_distinct_members():
  pool = ModelPool(_Linear(3), input_shape=(2, 2, 1), num_models=4, max_online_updates=10)
  state = jax.jit(pool.init)(jax.random.key(0))
  # Released code: member i starts at (K // m) * i.
  assert state.step.tolist() == [0, 2, 4, 6]
  kernels = np.asarray(state.params["Dense_0"]["kernel"])
  assert kernels.shape == (4, 4, 3)
  assert not np.allclose(kernels[0], kernels[1])
  # Adam's state is stacked like the parameters.
  assert jax.tree.leaves(state.opt_state)[0].shape[0] == 4


def test_member_and_set_member_round_trip_under_jit():
  pool = ModelPool(_Linear(3), input_shape=(2, 2, 1), num_models=3, max_online_updates=5)
  state = jax.jit(pool.init)(jax.random.key(1))
  index = jnp.asarray(2)
  member = jax.jit(pool.member)(state, index)
  assert member.step.shape == () and int(member.step) == 2 * (5 // 3)
  assert _leaves_equal(jax.jit(pool.set_member)(state, index, member), state)
  changed = member.replace(step=jnp.asarray(99, jnp.int32))
  new_state = jax.jit(pool.set_member)(state, jnp.asarray(1), changed)
  assert new_state.step.tolist() == [0, 99, 2]
  np.testing.assert_array_equal(
      new_state.params["Dense_0"]["kernel"][1], state.params["Dense_0"]["kernel"][2]
  )


def test_train_step_is_one_adam_step_on_the_mse_loss():
  lr = 0.01
  pool = ModelPool(
      _Linear(3), input_shape=(2, 2, 1), num_models=1, max_online_updates=5,
      optimizer=optax.adam(lr),
  )
  member = jax.jit(pool.init_member)(jax.random.key(2))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 2, 2, 1)).astype(np.float32)
  y = rng.normal(size=(6, 3)).astype(np.float32)
  new_member, loss = jax.jit(pool.train_step)(member, x, y)

  # NumPy: loss = mean_i 0.5 sum_c (x W + b - y)^2; Adam's first step moves each weight by
  # -lr * g / (|g| + eps) (bias-corrected moments equal g and g^2).
  w = np.asarray(member.params["Dense_0"]["kernel"], np.float64)
  b = np.asarray(member.params["Dense_0"]["bias"], np.float64)
  features = x.reshape(6, -1).astype(np.float64)
  residual = features @ w + b - y
  np.testing.assert_allclose(loss, 0.5 * np.mean(np.sum(residual**2, -1)), rtol=1e-5)
  grad_w, grad_b = features.T @ residual / 6, residual.mean(0)
  np.testing.assert_allclose(
      new_member.params["Dense_0"]["kernel"], w - lr * grad_w / (np.abs(grad_w) + 1e-8),
      rtol=1e-4, atol=1e-6,
  )
  np.testing.assert_allclose(
      new_member.params["Dense_0"]["bias"], b - lr * grad_b / (np.abs(grad_b) + 1e-8),
      rtol=1e-4, atol=1e-6,
  )
  assert int(new_member.step) == 1


@pytest.fixture(scope="module")
def batch_norm_pool():
  model = get_model("convnet", num_classes=4, width=4, depth=2, norm="batch", width_doubling=True)
  pool = ModelPool(model, input_shape=(8, 8, 1), num_models=2, max_online_updates=5)
  # An "rbg" key compiles the ConvNet's initialisation about 3x faster on CPU than the default
  # threefry; the pool is indifferent to the key implementation.
  return model, pool, jax.jit(pool.init)(jax.random.key(3, impl="rbg"))


def test_features_are_the_penultimate_activations_in_inference_mode(batch_norm_pool):
  model, pool, state = batch_norm_pool
  member = pool.member(state, 0)
  x = jax.random.normal(jax.random.key(4), (5, 8, 8, 1))
  variables = {"params": member.params, "batch_stats": member.batch_stats}

  @jax.jit
  def both(member, variables, x):
    expected = model.apply(variables, x, train=False, return_features=True)[1]["penultimate"]
    return pool.features(member, x), pool.features(member, x[:2]), expected

  features, first_two, expected = both(member, variables, x)
  np.testing.assert_allclose(features, expected, rtol=1e-6)
  # Inference mode: each image's features do not depend on the rest of the batch.
  np.testing.assert_allclose(first_two, expected[:2], rtol=1e-5)


def test_training_updates_batch_norm_statistics(batch_norm_pool):
  _, pool, state = batch_norm_pool
  member = pool.member(state, 1)
  x = 3.0 + jax.random.normal(jax.random.key(6), (8, 8, 8, 1))
  y = jax.nn.one_hot(jnp.arange(8) % 4, 4)
  new_member, loss = jax.jit(pool.train_step)(member, x, y)
  assert np.isfinite(loss) and int(new_member.step) == int(member.step) + 1
  assert not _leaves_equal(new_member.batch_stats, member.batch_stats)
  assert not _leaves_equal(new_member.params, member.params)


def test_online_update_trains_until_k_then_resets_from_the_key():
  max_updates = 3
  pool = ModelPool(_Linear(2), input_shape=(2, 2, 1), num_models=1, max_online_updates=max_updates)
  member = jax.jit(pool.init_member)(jax.random.key(7))
  x = jnp.ones((4, 2, 2, 1))
  y = jnp.ones((4, 2))
  update = jax.jit(pool.online_update)
  steps, resets = [], []
  reset_key = jax.random.key(8)
  for _ in range(2 * (max_updates + 2)):
    member, loss, was_reset = update(member, x, y, reset_key)
    steps.append(int(member.step))
    resets.append(bool(was_reset))
    assert np.isfinite(loss)
  # "Updated more than K steps" (released: step > K) -> re-initialised, not trained.
  assert steps == [1, 2, 3, 4, 0, 1, 2, 3, 4, 0]
  assert resets == [False] * 4 + [True] + [False] * 4 + [True]
  fresh = jax.jit(pool.init_member)(reset_key)
  jax.tree.map(np.testing.assert_array_equal, member, fresh)


def test_bad_sizes_are_one_line_errors():
  with pytest.raises(ValueError, match="num_models must be a positive int"):
    ModelPool(_Linear(2), input_shape=(2, 2, 1), num_models=0)
  with pytest.raises(ValueError, match="max_online_updates must be a non-negative int"):
    ModelPool(_Linear(2), input_shape=(2, 2, 1), max_online_updates=-1)
  with pytest.raises(ValueError, match=r"input_shape must be \(H, W, C\)"):
    ModelPool(_Linear(2), input_shape=(2, 2))


def test_member_state_is_a_pytree():
  state = MemberState(params={"w": jnp.ones(2)}, batch_stats={}, opt_state=(), step=jnp.zeros(()))
  assert len(jax.tree.leaves(state)) == 2


def test_a_recipes_per_example_loss_is_averaged_over_the_batch():
  """`loss_fn` is per-example (a recipe's `per_example_loss`); the step uses its batch mean."""
  lr = 0.01
  pool = ModelPool(
      _Linear(3), input_shape=(2, 2, 1), num_models=1, max_online_updates=5,
      optimizer=optax.adam(lr), loss_fn=Recipe(epochs=1, loss="ce").per_example_loss,
  )
  member = jax.jit(pool.init_member)(jax.random.key(5))
  rng = np.random.default_rng(1)
  x = rng.normal(size=(6, 2, 2, 1)).astype(np.float32)
  y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 6)]
  new_member, loss = jax.jit(pool.train_step)(member, x, y)
  w = np.asarray(member.params["Dense_0"]["kernel"], np.float64)
  b = np.asarray(member.params["Dense_0"]["bias"], np.float64)
  features = x.reshape(6, -1).astype(np.float64)
  logits = features @ w + b
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  np.testing.assert_allclose(loss, np.mean(-np.sum(y * np.log(p), axis=1)), rtol=1e-5)
  grad_w = features.T @ (p - y) / 6  # Adam's first step: -lr * g / (|g| + eps).
  np.testing.assert_allclose(new_member.params["Dense_0"]["kernel"],
                             w - lr * grad_w / (np.abs(grad_w) + 1e-8), rtol=1e-4, atol=1e-6)
