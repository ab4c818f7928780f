"""Stable Diffusion's autoencoder (`AutoencoderKL`) with diffusers' Flax parameter tree, and a
loader of a user's local weights.

LatentDD (paper 002, section 4.1) encodes with SD v1.4's pretrained autoencoder (f = 8, 4 latent
channels), after upsampling the images x2 so that the codes have f = 4 relative to the data. No
weights can be downloaded here: `load_autoencoder_kl(folder)` reads a folder as diffusers saves
one, `config.json` plus either `diffusion_flax_model.msgpack` (Flax) or
`diffusion_pytorch_model.safetensors` (PyTorch names and layouts, converted on load).

The network (diffusers' `vae_flax.py` architecture, written here from its description):

  encoder: conv_in 3x3 -> down_blocks_i [resnets_j, downsamplers_0 (pad (0,1), 3x3 stride 2)
           except the last] -> mid_block [resnets_0, attentions_0, resnets_1] -> GroupNorm ->
           SiLU -> conv_out 3x3 (2 c: mean and log-variance) -> quant_conv 1x1
  decoder: post_quant_conv 1x1 -> conv_in 3x3 -> mid_block -> up_blocks_i [resnets_j
           (layers_per_block + 1 of them), upsamplers_0 (nearest x2, 3x3) except the last] ->
           GroupNorm -> SiLU -> conv_out 3x3
  resnet:  x + conv2(SiLU(GN(conv1(SiLU(GN(x)))))), a 1x1 conv_shortcut when channels change
  attention: one head over the h w positions, softmax(q k^T / sqrt(C)) v, proj_attn, residual

GroupNorm epsilon 1e-6. Codes are `mean * scaling_factor` (the posterior's mode, SD's
convention); images are in [-1, 1].
"""

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from distill_jax.models.autoencoder import DECODERS

Array = jax.Array

FLAX_WEIGHTS = "diffusion_flax_model.msgpack"
SAFETENSORS_WEIGHTS = "diffusion_pytorch_model.safetensors"
_EPSILON = 1e-6


def _conv(features: int, kernel: int, name: str, *, strides: int = 1, padding: Any = 1):
  pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=pad, name=name)


class ResnetBlock(nn.Module):
  out_channels: int
  groups: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = _conv(self.out_channels, 3, "conv1")(nn.swish(
        nn.GroupNorm(self.groups, epsilon=_EPSILON, name="norm1")(x)))
    h = _conv(self.out_channels, 3, "conv2")(nn.swish(
        nn.GroupNorm(self.groups, epsilon=_EPSILON, name="norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "conv_shortcut", padding="VALID")(x)
    return x + h


class AttentionBlock(nn.Module):
  groups: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    t = nn.GroupNorm(self.groups, epsilon=_EPSILON, name="group_norm")(x).reshape(b, h * w, c)
    q, k, v = (nn.Dense(c, name=n)(t) for n in ("query", "key", "value"))
    weights = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) / math.sqrt(c), axis=-1)
    out = nn.Dense(c, name="proj_attn")(jnp.einsum("bqk,bkc->bqc", weights, v))
    return x + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
  groups: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, name="resnets_0")(x)
    x = AttentionBlock(self.groups, name="attentions_0")(x)
    return ResnetBlock(c, self.groups, name="resnets_1")(x)


class DownBlock(nn.Module):
  out_channels: int
  layers: int
  groups: int
  downsample: bool

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for j in range(self.layers):
      x = ResnetBlock(self.out_channels, self.groups, name=f"resnets_{j}")(x)
    if self.downsample:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      x = _Downsample(self.out_channels, name="downsamplers_0")(x)
    return x


class _Downsample(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return _conv(self.channels, 3, "conv", strides=2, padding="VALID")(x)


class _Upsample(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # Nearest x2.
    return _conv(self.channels, 3, "conv")(x)


class UpBlock(nn.Module):
  out_channels: int
  layers: int
  groups: int
  upsample: bool

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for j in range(self.layers):
      x = ResnetBlock(self.out_channels, self.groups, name=f"resnets_{j}")(x)
    if self.upsample:
      x = _Upsample(self.out_channels, name="upsamplers_0")(x)
    return x


class KLEncoder(nn.Module):
  block_out_channels: Sequence[int]
  layers_per_block: int
  groups: int
  latent_channels: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = tuple(self.block_out_channels)
    x = _conv(channels[0], 3, "conv_in")(x)
    for i, c in enumerate(channels):
      x = DownBlock(c, self.layers_per_block, self.groups, i < len(channels) - 1,
                    name=f"down_blocks_{i}")(x)
    x = MidBlock(self.groups, name="mid_block")(x)
    x = nn.swish(nn.GroupNorm(self.groups, epsilon=_EPSILON, name="conv_norm_out")(x))
    return _conv(2 * self.latent_channels, 3, "conv_out")(x)


class KLDecoder(nn.Module):
  block_out_channels: Sequence[int]
  layers_per_block: int
  groups: int
  out_channels: int

  @nn.compact
  def __call__(self, z: Array) -> Array:
    channels = tuple(reversed(self.block_out_channels))
    x = _conv(channels[0], 3, "conv_in")(z)
    x = MidBlock(self.groups, name="mid_block")(x)
    for i, c in enumerate(channels):
      x = UpBlock(c, self.layers_per_block + 1, self.groups, i < len(channels) - 1,
                  name=f"up_blocks_{i}")(x)
    x = nn.swish(nn.GroupNorm(self.groups, epsilon=_EPSILON, name="conv_norm_out")(x))
    return _conv(self.out_channels, 3, "conv_out")(x)


@dataclasses.dataclass(frozen=True)
class KLConfig:
  """The fields of a diffusers `config.json` the network needs (SD v1.4's values as defaults)."""

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215

  @classmethod
  def from_json(cls, record: dict[str, Any]) -> "KLConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in record.items() if k in fields}
    if "block_out_channels" in values:
      values["block_out_channels"] = tuple(values["block_out_channels"])
    return cls(**values)

  @property
  def factor(self) -> int:
    """The spatial downsampling: 2 per down block but the last (8 for SD)."""
    return 2 ** (len(self.block_out_channels) - 1)


class AutoencoderKL(nn.Module):
  """SD's autoencoder with diffusers' parameter names (`encoder`, `decoder`, `quant_conv`,
  `post_quant_conv`); NHWC images in [-1, 1], codes scaled by `scaling_factor`."""

  config: KLConfig

  def setup(self):
    c = self.config
    self.encoder = KLEncoder(c.block_out_channels, c.layers_per_block, c.norm_num_groups,
                             c.latent_channels)
    self.decoder = KLDecoder(c.block_out_channels, c.layers_per_block, c.norm_num_groups,
                             c.out_channels)
    self.quant_conv = nn.Conv(2 * c.latent_channels, (1, 1), padding="VALID")
    self.post_quant_conv = nn.Conv(c.latent_channels, (1, 1), padding="VALID")

  def __call__(self, x: Array) -> Array:
    return self.decode(self.encode(x))

  def encode(self, x: Array) -> Array:
    """`(B, H, W, in_channels)` in [-1, 1] -> `(B, H/f, W/f, c)` codes: the posterior mean
    times `scaling_factor`."""
    moments = self.quant_conv(self.encoder(x))
    return moments[..., :self.config.latent_channels] * self.config.scaling_factor

  def decode(self, z: Array) -> Array:
    """`(B, h, w, c)` codes -> `(B, h f, w f, out_channels)` images in [-1, 1] (unclipped)."""
    return self.decoder(self.post_quant_conv(z / self.config.scaling_factor))


class AutoencoderKLError(ValueError):
  """A folder that does not hold a loadable AutoencoderKL; the message says what to fix."""


def read_config(folder: str) -> KLConfig:
  """The `KLConfig` of the diffusers `config.json` in `folder` (one-line error without one)."""
  config_path = os.path.join(folder, "config.json")
  if not os.path.exists(config_path):
    raise AutoencoderKLError(f"no config.json in {folder}; pass the folder of a diffusers "
                             "AutoencoderKL (e.g. <stable-diffusion>/vae)")
  try:
    with open(config_path) as f:
      return KLConfig.from_json(json.load(f))
  except (ValueError, TypeError) as e:
    raise AutoencoderKLError(f"{config_path} is not a diffusers AutoencoderKL config ({e})") from e


def load_autoencoder_kl(folder: str) -> tuple[AutoencoderKL, Any]:
  """`(module, params)` of the diffusers AutoencoderKL saved in `folder`.

  Reads `config.json` and `diffusion_flax_model.msgpack` when present, else
  `diffusion_pytorch_model.safetensors` (converted: conv weights OIHW -> HWIO, linear weights
  transposed, norm `weight` -> `scale`, `to_q/to_k/to_v/to_out.0` -> `query/key/value/proj_attn`).

  Raises:
    AutoencoderKLError: no config, no weights, or weights that do not fit the config.
  """
  config = read_config(folder)
  module = AutoencoderKL(config)
  template = jax.eval_shape(lambda: module.init(
      jax.random.key(0), jnp.zeros((1, 2 * config.factor, 2 * config.factor,
                                    config.in_channels)))["params"])
  flax_path, torch_path = (os.path.join(folder, n) for n in (FLAX_WEIGHTS, SAFETENSORS_WEIGHTS))
  if os.path.exists(flax_path):
    with open(flax_path, "rb") as f:
      params = serialization.msgpack_restore(f.read())
    if set(params) == {"params"}:  # Saved with the collection's name around it.
      params = params["params"]
  elif os.path.exists(torch_path):
    params = from_pytorch(_read_safetensors(torch_path))
  else:
    raise AutoencoderKLError(f"no {FLAX_WEIGHTS} or {SAFETENSORS_WEIGHTS} in {folder}")
  _check_against(params, template, folder)
  return module, jax.tree.map(jnp.asarray, params)


def _check_against(params: Any, template: Any, folder: str) -> None:
  got = {jax.tree_util.keystr(p): tuple(np.shape(v))
         for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  want = {jax.tree_util.keystr(p): tuple(v.shape)
          for p, v in jax.tree_util.tree_flatten_with_path(template)[0]}
  missing = sorted(set(want) - set(got))
  wrong = sorted(k for k in want if k in got and got[k] != want[k])
  if missing or wrong:
    first = (f"missing {missing[0]}" if missing
             else f"{wrong[0]} has shape {got[wrong[0]]}, config.json implies {want[wrong[0]]}")
    raise AutoencoderKLError(f"the weights in {folder} do not fit its config.json "
                             f"({len(missing)} missing, {len(wrong)} misshaped; {first})")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """The tensors of a `.safetensors` file (the `safetensors` package's numpy reader)."""
  try:
    from safetensors.numpy import load_file
  except ImportError as e:
    raise AutoencoderKLError(f"reading {path} needs the safetensors package; pip install "
                             "safetensors (or save the VAE with Flax weights)") from e
  return load_file(path)


_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out": "proj_attn",
                    "query": "query", "key": "key", "value": "value", "proj_attn": "proj_attn"}


def from_pytorch(tensors: dict[str, np.ndarray]) -> dict[str, Any]:
  """diffusers' PyTorch AutoencoderKL state dict -> the Flax parameter tree of `AutoencoderKL`.

  `encoder.down_blocks.0.resnets.1.conv1.weight (O, I, kh, kw)` becomes
  `params["encoder"]["down_blocks_0"]["resnets_1"]["conv1"]["kernel"] (kh, kw, I, O)`; indices
  of `down_blocks`, `up_blocks`, `resnets`, `attentions`, `downsamplers` and `upsamplers` join
  their list's name; `to_out.0` is `proj_attn`.
  """
  params: dict[str, Any] = {}
  for name, value in tensors.items():
    parts, out = name.split("."), []
    i = 0
    while i < len(parts):
      part = parts[i]
      if i + 1 < len(parts) and parts[i + 1].isdigit() and part != "to_out":
        out.append(f"{part}_{parts[i + 1]}")
        i += 2
        continue
      if part == "to_out":
        i += 1  # `to_out.0`: the linear layer of the output projection.
      out.append(_ATTENTION_NAMES.get(part, part))
      i += 1
    *path, leaf = out
    value = np.asarray(value, np.float32)
    in_attention = path and path[-1] in ("query", "key", "value", "proj_attn")
    if leaf == "weight" and in_attention:
      value = value.reshape(value.shape[0], -1).T  # Linear (or 1x1 conv) -> Dense kernel.
      leaf = "kernel"
    elif leaf == "weight" and value.ndim == 4:
      value, leaf = value.transpose(2, 3, 1, 0), "kernel"
    elif leaf == "weight":
      leaf = "scale"  # GroupNorm.
    node = params
    for part in path:
      node = node.setdefault(part, {})
    node[leaf] = value
  return params


def to_unit_pixels(images: Array, *, downsample: int, channels: int) -> Array:
  """The autoencoder's `(B, H', W', 3)` output in [-1, 1] -> the data's `(B, H'/d, W'/d, ch)`
  in [0, 1]: average-pooled by `downsample` (the paper's post-downsampling), grey as the mean
  of the three channels."""
  b, h, w, c = images.shape
  d = downsample
  images = images.reshape(b, h // d, d, w // d, d, c).mean(axis=(2, 4))
  if channels == 1 and c != 1:
    images = images.mean(axis=-1, keepdims=True)
  return (images + 1.0) / 2.0


def from_unit_pixels(images: Array, *, upsample: int, in_channels: int) -> Array:
  """The data's `(B, H, W, ch)` in [0, 1] -> the autoencoder's input `(B, H u, W u, 3)` in
  [-1, 1]: bilinear upsampling by `upsample` (the paper's pre-upsampling), grey replicated."""
  b, h, w, c = images.shape
  if c != in_channels:
    images = jnp.repeat(images, in_channels // c, axis=-1)
  images = jax.image.resize(images, (b, h * upsample, w * upsample, in_channels), "bilinear")
  return images * 2.0 - 1.0


@DECODERS.register("autoencoder_kl")
def _kl_decoder(*, downsample: int, channels: int, **config: Any):
  """`decode(params, z)`: codes -> [0, 1] images of the data's size and channels (a latent
  set's spec marks this output "pixels": the set applies its preprocessing)."""
  module = AutoencoderKL(KLConfig.from_json(config))

  def decode(params, z):
    images = module.apply({"params": params}, z, method="decode")
    return to_unit_pixels(images, downsample=downsample, channels=channels)

  return decode


def decoder_spec(config: KLConfig, *, downsample: int, channels: int, public: str
                 ) -> dict[str, Any]:
  """The latent-set spec of a pretrained AutoencoderKL's decoder (not counted in storage)."""
  return {"name": "autoencoder_kl", "output": "pixels", "public": public,
          "kwargs": {**dataclasses.asdict(config),
                     "block_out_channels": list(config.block_out_channels),
                     "downsample": downsample, "channels": channels}}


def weights_digest(folder: str) -> str:
  """sha256 (16 hex) of the weights file `load_autoencoder_kl` reads in `folder`."""
  import hashlib

  for name in (FLAX_WEIGHTS, SAFETENSORS_WEIGHTS):
    path = os.path.join(folder, name)
    if os.path.exists(path):
      digest = hashlib.sha256()
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          digest.update(chunk)
      return digest.hexdigest()[:16]
  raise AutoencoderKLError(f"no {FLAX_WEIGHTS} or {SAFETENSORS_WEIGHTS} in {folder}")
