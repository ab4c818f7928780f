"""LatentDD: the autoencoder and its cache, the latent set, the LPC arithmetic and the
composition with DC/DM/MTT (its smoke run is resumed in test_resume.py)."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import latent as latent_config
from distill_jax import data as data_lib
from distill_jax import distilled
from distill_jax.distilled import LatentSet, SetMeta
from distill_jax.methods import latent
from distill_jax.models import autoencoder as autoencoder_lib
from distill_jax.training import autoencoder as autoencoder_training


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("DISTILL_JAX_CACHE", str(tmp_path / "cache"))
  return tmp_path / "cache"


@pytest.mark.parametrize("factor,latent_channels,image", [(4, 4, (28, 28, 1)), (2, 2, (8, 8, 1)),
                                                          (1, 3, (8, 8, 3))])
def test_encode_and_decode_shapes_and_the_decoder_spec(factor, latent_channels, image):
  model = autoencoder_lib.ConvAutoencoder(factor, latent_channels, image[-1], width=4)
  x = jax.random.normal(jax.random.key(0), (2, *image))
  params = jax.jit(model.init)(jax.random.key(1), x)["params"]
  z = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))(params, x)
  shape = autoencoder_lib.latent_shape(image, factor, latent_channels)
  assert z.shape == (2, *shape) == (2, image[0] // factor, image[1] // factor, latent_channels)
  decoded = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))(params, z)
  assert decoded.shape == x.shape
  # The set rebuilds the decoder from its JSON spec alone.
  spec = json.loads(json.dumps(model.decoder_spec()))
  rebuilt = jax.jit(autoencoder_lib.decoder_from_spec(spec))(params["decoder"], z)
  np.testing.assert_allclose(rebuilt, decoded, rtol=1e-6, atol=1e-6)


def test_depth_to_space_places_the_sub_pixels_as_documented():
  x = np.arange(2 * 3 * 3 * 8, dtype=np.float32).reshape(2, 3, 3, 8)  # ch = 2.
  y = np.asarray(autoencoder_lib.depth_to_space(jnp.asarray(x)))
  for a in range(2):
    for b in range(2):
      np.testing.assert_array_equal(y[:, a::2, b::2, :], x[..., (2 * a + b) * 2:(2 * a + b + 1) * 2])


def test_bad_factors_are_one_line_errors():
  with pytest.raises(ValueError, match="must be a power of two"):
    autoencoder_lib.latent_shape((28, 28, 1), 3, 4)
  with pytest.raises(ValueError, match="does not divide the 28x28 images"):
    autoencoder_lib.latent_shape((28, 28, 1), 8, 4)


def _fashion_like():
  """Data with Fashion-MNIST's shape and classes, without its pixels (for arithmetic)."""
  y = np.repeat(np.arange(10, dtype=np.int32), 20)
  x = np.zeros((200, 28, 28, 1), np.float32)
  return data_lib.RealData("fashion_mnist", 10, (28, 28, 1), tuple("abcdefghij"), x, y, x, y)


def test_the_decoder_size_and_the_lpc_that_fits_the_ipc_budget():
  config = latent_config.get_config("fashion_mnist,algorithm=dm,ipc=10")
  # conv3x3 4->32, conv3x3 32->16, conv3x3 16->4 (sub-pixel), with biases.
  want = (9 * 4 * 32 + 32) + (9 * 32 * 16 + 16) + (9 * 16 * 4 + 4)
  assert latent.decoder_parameter_count(config, (28, 28, 1)) == want == 6388
  lpc = latent.latents_per_class(config, _fashion_like())
  budget = 10 * 10 * (784 + 1)  # Values of 10 images per class with their labels.
  per_lpc = 10 * (7 * 7 * 4 + 1)  # Codes and labels of one code per class.
  assert lpc * per_lpc + want <= budget < (lpc + 1) * per_lpc + want
  assert lpc == 36
  config.lpc = 8
  assert latent.latents_per_class(config, _fashion_like()) == 8
  config.lpc, config.ipc = 0, 1
  with pytest.raises(ValueError, match="decoder's 6388 parameters exceed the storage of ipc=1"):
    latent.latents_per_class(config, _fashion_like())


def test_the_derived_config_of_each_algorithm():
  for algorithm, field in (("dm", "lr"), ("dc", "lr"), ("mtt", "lr_img")):
    config = latent_config.get_config(f"fashion_mnist,algorithm={algorithm}")
    derived = latent.derived_config(config, lpc=12)
    assert derived.method == algorithm and derived.ipc == 12
    assert derived.outer[field] == pytest.approx(config.outer.lr_base * 12)  # Eq. 10.
    block = derived.experts if algorithm == "mtt" else derived.pool
    assert block.model_kwargs.depth == 1  # Pixel depth 3 - log2(4).
    assert "lr_base" not in derived.outer and "autoencoder" not in derived
    strategies = ([derived.inner.dsa_strategy, derived.experts.dsa_strategy]
                  if algorithm == "mtt" else [derived.outer.dsa_strategy])
    assert strategies == [""] * len(strategies)  # No DSA in latent space.
  dc = latent_config.get_config("fashion_mnist,algorithm=dc")
  assert (dc.inner.data, dc.outer.distance, dc.outer.loops, dc.inner.epochs) == (
      "real", "mse", 10, 50)  # Table 6 / IDC.
  with pytest.raises(ValueError, match="unknown algorithm='gm'"):
    latent_config.get_config("algorithm=gm")


def _latent_set(public=False, seed=0):
  model = autoencoder_lib.ConvAutoencoder(2, 2, 1, width=4)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)))["params"]
  spec = {**model.decoder_spec(), **({"public": "tiny/vae sha256:0"} if public else {})}
  meta = SetMeta(method="latent_dm", dataset="digits", ipc=3, num_classes=2,
                 image_shape=(8, 8, 1), decoder=json.dumps(spec))
  z = np.random.default_rng(seed).normal(size=(6, 4, 4, 2)).astype(np.float32)
  return LatentSet(z=z, y=np.repeat(np.arange(2, dtype=np.int32), 3),
                   decoder=jax.tree.map(np.asarray, params["decoder"]), meta=meta), model, params


def test_a_latent_set_round_trips_with_its_storage(tmp_path):
  s, model, params = _latent_set()
  distilled.save(tmp_path / "set", s)
  back = distilled.load(tmp_path / "set")
  assert isinstance(back, LatentSet) and back.meta == s.meta
  for name, array in s.arrays().items():
    np.testing.assert_array_equal(back.arrays()[name], array)
  decoder_values = autoencoder_lib.num_parameters(params["decoder"])
  assert distilled.storage_bytes(back) == 4 * (6 * 4 * 4 * 2 + 6 + decoder_values)
  assert back.storage_without_decoder() == 4 * (6 * 4 * 4 * 2 + 6)
  # A public decoder is not counted (the paper's convention for SD's autoencoder).
  public, _, _ = _latent_set(public=True)
  assert distilled.storage_bytes(public) == public.storage_without_decoder()
  # The equal-storage random subset: the fewest images per class storing at least as much.
  per_ipc = 4 * 2 * (64 + 1)
  assert back.baseline_ipc() == math.ceil(distilled.storage_bytes(back) / per_ipc)
  assert public.baseline_ipc() == math.ceil(public.storage_without_decoder() / per_ipc)


def test_training_draws_the_decoded_codes_decoded_once():
  s, model, params = _latent_set()
  want = model.apply({"params": params}, jnp.asarray(s.z), method="decode")
  pixels = s.for_training()
  assert isinstance(pixels, distilled.PixelSet) and pixels.meta.decoder == ""
  np.testing.assert_allclose(pixels.x, want, rtol=1e-5, atol=1e-6)
  x, y = jax.jit(lambda t, i: t.draw(i))(s, jnp.array([4, 1]))
  np.testing.assert_allclose(x, want[jnp.array([4, 1])], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(y, [1, 0])
  with pytest.raises(ValueError, match="needs meta.decoder"):
    LatentSet(z=s.z, y=s.y, decoder=s.decoder, meta=dataclasses.replace(s.meta, decoder=""))


def test_an_interrupted_autoencoder_training_resumes_to_the_uninterrupted_weights(cache):
  data = data_lib.load_real("digits", "standardize")
  config = latent_config.get_config("smoke")
  config.autoencoder.epochs = 2
  spec = autoencoder_training.autoencoder_spec(config, data)
  straight = autoencoder_training._train(spec, data, str(cache / "straight"))
  # One epoch, then the 2-epoch spec in the same folder: it restores epoch 1 and trains one more.
  autoencoder_training._train(dataclasses.replace(spec, epochs=1), data, str(cache / "resumed"))
  resumed = autoencoder_training._train(spec, data, str(cache / "resumed"))
  for a, b in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)
  assert resumed.reconstruction_mse == straight.reconstruction_mse
  # The cache: the same settings open the trained weights; the codes are cached too.
  first = autoencoder_training.ensure_autoencoder(config, data)
  again = autoencoder_training.ensure_autoencoder(config, data)
  assert first.path == again.path
  train, test = first.encode_splits(data)
  np.testing.assert_array_equal(train, first.encode(data.x_train))
  assert test.shape == (len(data.x_test), 4, 4, 2)
  assert first.encode_splits(data)[0] is not train  # Read back from the file...
  np.testing.assert_array_equal(first.encode_splits(data)[0], train)  # ...bit for bit.


def test_latent_dm_starts_from_real_codes_and_its_set_decodes_with_the_autoencoder(cache):
  data = data_lib.load_real("digits", "standardize")
  config = latent_config.get_config("smoke,num_steps=2")
  method = latent.LatentDD(config, data)
  assert method.lpc == latent.latents_per_class(config, data)
  method.prepare()
  # The algorithm runs on the codes of the training set.
  np.testing.assert_array_equal(method.latent_data.x_train,
                                method.autoencoder.encode(data.x_train))
  assert method.latent_data.fingerprint != data.fingerprint
  state = jax.jit(method.init)(jax.random.key(config.seed))
  codes = np.asarray(state.x_syn)
  labels = np.repeat(np.arange(10), method.lpc)
  for code, label in zip(codes, labels):  # Each initial code is a real code of its class.
    matches = np.all(method.latent_data.x_train == code, axis=(1, 2, 3))
    assert matches.any() and set(data.y_train[matches]) == {label}
  state, metrics = jax.jit(method.step)(state, method.inputs(1))
  assert np.isfinite(float(metrics["loss"])) and not np.array_equal(state.x_syn, codes)
  result = method.result(state)
  assert isinstance(result, LatentSet) and result.meta.ipc == method.lpc
  np.testing.assert_array_equal(result.y, labels)
  decoded = method.autoencoder.model.apply({"params": method.autoencoder.params},
                                           jnp.asarray(result.z), method="decode")
  np.testing.assert_allclose(result.for_training().x, decoded, rtol=1e-5, atol=1e-6)
  # The baseline: the initial codes, decoded by the same autoencoder.
  initial = method.baselines()["random_latents"]
  np.testing.assert_array_equal(initial.z, codes)
  assert distilled.storage_bytes(result) <= config.ipc * 10 * 4 * (64 + 1)
