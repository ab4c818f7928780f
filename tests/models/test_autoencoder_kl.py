"""The AutoencoderKL with diffusers' parameter tree: loading a tiny checkpoint in both of
diffusers' layouts, against diffusers' own Flax model where it is installed, and LatentDD on it."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from distill_jax.models import autoencoder_kl as kl

TINY = kl.KLConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                   latent_channels=4)


@functools.cache
def _tiny_params(seed=0):
  module = kl.AutoencoderKL(TINY)

  @jax.jit
  def init(key):
    params = module.init(key, jnp.zeros((1, 8, 8, 3)))["params"]
    # Random norm scales and biases too, so a mixed-up leaf cannot go unnoticed.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    return jax.tree.unflatten(tree, [l + 0.1 * jax.random.normal(k, l.shape)
                                     for l, k in zip(leaves, keys)])

  return module, jax.tree.map(np.asarray, init(jax.random.key(seed)))


def _write_config(folder, config=TINY):
  record = {"_class_name": "AutoencoderKL", **dataclasses.asdict(config),
            "block_out_channels": list(config.block_out_channels), "act_fn": "silu",
            "down_block_types": ["DownEncoderBlock2D"] * len(config.block_out_channels),
            "up_block_types": ["UpDecoderBlock2D"] * len(config.block_out_channels),
            "sample_size": 8}
  (folder / "config.json").write_text(json.dumps(record))


def _to_pytorch(params):
  """The PyTorch state dict diffusers saves for these parameters (written independently of
  `kl.from_pytorch`): list entries `name_i` -> `name.i`, kernels HWIO -> OIHW, Dense kernels
  transposed, `scale` -> `weight`, attention projections under their current names."""
  renames = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
  out = {}
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [p.key for p in path]
    parts = []
    for name in names[:-1]:
      head, _, index = name.rpartition("_")
      if index.isdigit() and head in ("down_blocks", "up_blocks", "resnets", "attentions",
                                      "downsamplers", "upsamplers"):
        parts += [head, index]
      else:
        parts.append(renames.get(name, name))
    leaf = names[-1]
    value = np.asarray(value)
    if leaf == "kernel" and value.ndim == 4:
      value, leaf = value.transpose(3, 2, 0, 1), "weight"
    elif leaf == "kernel":
      value, leaf = value.T, "weight"
    elif leaf == "scale":
      leaf = "weight"
    out[".".join(parts + [leaf])] = np.ascontiguousarray(value)
  return out


def test_the_parameter_tree_has_diffusers_names():
  _, params = _tiny_params()
  flat = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
  for name in ("['encoder']['down_blocks_0']['resnets_0']['conv1']['kernel']",
               "['encoder']['down_blocks_0']['downsamplers_0']['conv']['kernel']",
               "['encoder']['down_blocks_1']['resnets_0']['conv_shortcut']['kernel']",
               "['encoder']['mid_block']['attentions_0']['query']['kernel']",
               "['encoder']['mid_block']['resnets_1']['norm2']['scale']",
               "['decoder']['up_blocks_0']['resnets_1']['conv2']['bias']",
               "['decoder']['up_blocks_0']['upsamplers_0']['conv']['kernel']",
               "['quant_conv']['kernel']", "['post_quant_conv']['bias']"):
    assert name in flat, name
  assert not any("up_blocks_1']['upsamplers" in n or "down_blocks_1']['downsamplers" in n
                 for n in flat)  # The last block neither down- nor upsamples.


@pytest.mark.parametrize("layout", ["flax", "safetensors"])
def test_a_tiny_checkpoint_in_diffusers_layout_loads_exactly(tmp_path, layout):
  module, params = _tiny_params()
  _write_config(tmp_path)
  if layout == "flax":
    (tmp_path / kl.FLAX_WEIGHTS).write_bytes(serialization.to_bytes(params))
  else:
    from safetensors.numpy import save_file

    save_file(_to_pytorch(params), str(tmp_path / kl.SAFETENSORS_WEIGHTS))
  loaded_module, loaded = kl.load_autoencoder_kl(str(tmp_path))
  assert loaded_module.config == TINY and TINY.factor == 2
  for (path, want), got in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                               jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))
  x = jax.random.uniform(jax.random.key(2), (2, 8, 8, 3), minval=-1, maxval=1)
  z = module.apply({"params": loaded}, x, method="encode")
  assert z.shape == (2, 4, 4, 4)
  assert module.apply({"params": loaded}, z, method="decode").shape == x.shape


def test_loading_errors_name_the_problem(tmp_path):
  with pytest.raises(kl.AutoencoderKLError, match="no config.json"):
    kl.load_autoencoder_kl(str(tmp_path))
  _write_config(tmp_path)
  with pytest.raises(kl.AutoencoderKLError, match="no diffusion_flax_model.msgpack"):
    kl.load_autoencoder_kl(str(tmp_path))
  _, params = _tiny_params()
  _write_config(tmp_path, dataclasses.replace(TINY, block_out_channels=(8, 32)))
  (tmp_path / kl.FLAX_WEIGHTS).write_bytes(serialization.to_bytes(params))
  with pytest.raises(kl.AutoencoderKLError, match="do not fit its config.json"):
    kl.load_autoencoder_kl(str(tmp_path))


def test_encode_and_decode_equal_diffusers_flax_autoencoder():
  diffusers = pytest.importorskip("diffusers")
  module, params = _tiny_params()
  theirs = diffusers.FlaxAutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
      layers_per_block=1, norm_num_groups=4,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
  x = jax.random.uniform(jax.random.key(3), (2, 8, 8, 3), minval=-1, maxval=1)
  posterior = theirs.apply({"params": params}, jnp.transpose(x, (0, 3, 1, 2)),
                           method=theirs.encode).latent_dist
  ours = module.apply({"params": params}, x, method="encode")
  np.testing.assert_allclose(ours, posterior.mean * TINY.scaling_factor, rtol=2e-4, atol=2e-5)
  decoded = theirs.apply({"params": params}, posterior.mean, method=theirs.decode).sample
  np.testing.assert_allclose(module.apply({"params": params}, ours, method="decode"),
                             jnp.transpose(decoded, (0, 2, 3, 1)), rtol=2e-4, atol=2e-4)


def test_latent_dd_on_a_pretrained_autoencoder(tmp_path, monkeypatch):
  from configs import latent as latent_config
  from distill_jax import data as data_lib
  from distill_jax import distilled
  from distill_jax.methods import latent

  monkeypatch.setenv("DISTILL_JAX_CACHE", str(tmp_path / "cache"))
  folder = tmp_path / "vae"
  folder.mkdir()
  _, params = _tiny_params()
  _write_config(folder)
  (folder / kl.FLAX_WEIGHTS).write_bytes(serialization.to_bytes(params))
  data = data_lib.load_real("digits", "standardize")
  # SD's protocol at f = 1 relative to the data: 8x8 images upsampled x2, 8x8x4 codes.
  config = latent_config.get_config(
      f"smoke,num_steps=2,autoencoder.factor=1,autoencoder.latent_channels=4,"
      f"autoencoder.pretrained_dir='{folder}'")
  method = latent.LatentDD(config, data)
  # The public decoder is not counted: LPC fills the whole budget of 4 images per class.
  assert method.lpc == (4 * 10 * 65) // (10 * (8 * 8 * 4 + 1))
  method.prepare()
  assert method.autoencoder.upsample == 2 and np.isfinite(method.autoencoder.reconstruction_mse)
  state = jax.jit(method.init)(jax.random.key(0))
  state, _ = jax.jit(method.step)(state, method.inputs(1))
  result = method.result(state)
  assert result.decoder_is_public
  assert distilled.storage_bytes(result) == result.storage_without_decoder()
  images = result.for_training().x
  assert images.shape == (10 * method.lpc, 8, 8, 1)
  # The decode: the module's images pooled back to 8x8, grey, [0, 1], then standardised.
  module = kl.AutoencoderKL(TINY)
  raw = module.apply({"params": params}, jnp.asarray(result.z), method="decode")
  unit = (raw.reshape(-1, 8, 2, 8, 2, 3).mean(axis=(2, 4)).mean(-1, keepdims=True) + 1) / 2
  np.testing.assert_allclose(images, data.preprocessor.apply(np.asarray(unit)), rtol=1e-4,
                             atol=1e-4)
