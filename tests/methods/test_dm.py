"""DM: the mean-embedding loss against NumPy, Siamese DSA, and a step (its smoke run is resumed
in test_resume.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dm as dm_config
from distill_jax import methods
from distill_jax.methods import _pixels, dm
from tests.methods.toy_data import toy_data

# The smoke preset with a one-block, 4-wide network, for the 3-class toy data.
TINY = ("smoke,ipc=2,outer.real_batch_size=4,pool.model_kwargs.width=4,"
        "pool.model_kwargs.depth=1")
DSA = "color_crop_cutout_flip_scale_rotate"


def tiny(extra=""):
  return dm.DM(dm_config.get_config(f"{TINY},{extra}" if extra else TINY), toy_data())


def _batches(seed=0):
  rng = np.random.default_rng(seed)
  x_syn = jnp.asarray(rng.normal(size=(6, 8, 8, 1)), jnp.float32)  # 3 classes x ipc 2.
  x_real = jnp.asarray(rng.normal(size=(3, 4, 8, 8, 1)), jnp.float32)  # 3 classes x 4.
  return x_syn, x_real


def test_dm_loss_matches_numpy_without_dsa():
  method = tiny("outer.dsa_strategy=''")
  x_syn, x_real = _batches()
  params = method.model.init(jax.random.key(0), x_syn[:1])["params"]
  loss = jax.jit(method.loss)(x_syn, x_real, params, jax.random.key(1))

  def features(x):  # The fixed network's embedding (the input of its classifier).
    _, feats = method.model.apply({"params": params}, x, train=True, return_features=True)
    return np.asarray(feats["penultimate"], np.float64)

  feat_syn = features(x_syn).reshape(3, 2, -1)
  feat_real = features(x_real.reshape(12, 8, 8, 1)).reshape(3, 4, -1)
  want = sum(np.sum((feat_real[c].mean(0) - feat_syn[c].mean(0)) ** 2) for c in range(3))
  assert want > 0
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_dsa_transforms_the_real_and_synthetic_batch_of_a_class_alike():
  x_syn, x_real = _batches()
  changed = False
  for seed in range(8):
    key = jax.random.key(seed)
    real, syn = _pixels.siamese_dsa(key, x_syn[:2], x_syn[:2], strategy=DSA)
    np.testing.assert_array_equal(real, syn)  # One draw for both batches.
    changed |= not np.array_equal(real, x_syn[:2])
    # The same transform whatever the other batch holds.
    real_again, _ = _pixels.siamese_dsa(key, x_syn[:2], x_real[0], strategy=DSA)
    np.testing.assert_array_equal(real_again, real)
  assert changed  # DSA does transform the images.
  # In DM's loss: with real batches equal to the class's synthetic images, every class's
  # embedding means agree exactly under DSA, which they would not with separate draws.
  method = tiny(f"outer.dsa_strategy={DSA}")
  params = method.model.init(jax.random.key(0), x_syn[:1])["params"]
  loss = jax.jit(method.loss)
  same = x_syn.reshape(3, 2, 8, 8, 1)
  for seed in range(3):
    assert float(loss(x_syn, same, params, jax.random.key(seed))) == 0.0
  assert float(loss(x_syn, x_real, params, jax.random.key(0))) > 0.0


def test_a_step_moves_the_images_against_the_gradient():
  method = tiny()
  assert method.config.outer.dsa_strategy == DSA
  inputs = method.inputs(1)
  x_train, y_train = inputs
  state = jax.jit(method.init)(jax.random.key(0))
  new, metrics = jax.jit(method.step)(state, inputs)
  # The step's network, real batches and DSA draw come from the state's key.
  _, net_key, real_key, aug_key = jax.random.split(state.key, 4)
  params = method.model.init(net_key, state.x_syn[:1], train=False)["params"]
  x_real = _pixels.real_class_batches(real_key, x_train, y_train, per_class=4, num_classes=3)
  loss, grad = jax.jit(jax.value_and_grad(method.loss))(state.x_syn, x_real, params, aug_key)
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
  # The first SGD step (empty momentum buffer): x - lr * g.
  np.testing.assert_allclose(np.asarray(new.x_syn),
                             np.asarray(state.x_syn) - method.config.outer.lr * np.asarray(grad),
                             rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(new.x_syn - state.x_syn).max()) > 0
  assert not np.array_equal(jax.random.key_data(new.key), jax.random.key_data(state.key))


def test_bad_settings_are_one_line_errors():
  for arg, message in [
      ("init=zeros", "unknown config.init 'zeros'"),
      ("outer.real_batch_size=0", "config.outer.real_batch_size must be a positive int"),
      ("outer.real_batch_size=17",
       "config.outer.real_batch_size=17 exceeds the 16 training images of the smallest class"),
      ("pool.model_kwargs.norm=batch", "pool.model_kwargs.norm='batch' is not supported"),
  ]:
    with pytest.raises(ValueError, match=message):
      tiny(arg)
  assert methods.get_method("dm") is dm.DM
  result = tiny().result(jax.jit(tiny().init)(jax.random.key(0)))
  assert result.y.tolist() == [0, 0, 1, 1, 2, 2] and result.meta.method == "dm"
