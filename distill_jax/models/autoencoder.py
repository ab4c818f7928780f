"""Autoencoders whose latent codes LatentDD distils, and the decoders a latent set carries.

`ConvAutoencoder(factor=f, latent_channels=c)` maps `(B, H, W, ch)` images to `(B, H/f, W/f, c)`
codes and back, as Stable Diffusion's autoencoder does (LatentDD, paper 002, section 3.2: "a
latent code l in R^{C x H/f x W/f}"), at a size a CPU trains in minutes (ours: LatentDD uses the
pretrained SD v1.4 autoencoder, which no test can download; `autoencoder_kl.py` loads it):

  encode: k x [conv4x4 stride 2 (w * 2^i channels) -> ReLU] -> conv3x3 (c)      (k = log2 f)
  decode: conv3x3 (w * 2^(k-1)) -> ReLU -> for i = k-1 .. 1: [nearest x2 upsampling ->
          conv3x3 (w * 2^(i-1)) -> ReLU] -> conv3x3 (4 ch) -> depth-to-space x2 (ch)

No convolution runs at full resolution: the last layer is a sub-pixel convolution (ESPCN, Shi
et al. 2016) whose 4 ch outputs at half resolution are the 2x2 pixels of each position, which
keeps a CPU epoch of Fashion-MNIST short (a full-resolution conv to one channel is slow on
XLA:CPU).

Upsampling by nearest neighbours and a convolution (SD's decoder upsamples the same way) keeps
every convolution a plain one (XLA:CPU runs transposed ones slowly). Codes and images live in
the data's preprocessed space; the decoder is linear at its output.

A latent set stores its decoder as a spec (`decoder_spec()`: a JSON dict naming a registered
`DECODERS` entry and its arguments) plus the decoder's parameters; `decoder_from_spec(spec)`
rebuilds a function `decode(params, z) -> images` from the spec alone.
"""

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.models import common
from distill_jax.registry import Registry

Array = jax.Array

# Decoders a latent set can name in its spec: name -> builder(**kwargs) -> decode(params, z).
DECODERS: Registry[Callable[..., Callable[[Any, Array], Array]]] = Registry("decoder")


def _check_factor(factor: int) -> int:
  levels = int(round(math.log2(factor))) if isinstance(factor, int) and factor >= 1 else -1
  if levels < 0 or 2**levels != factor:
    raise ValueError(f"autoencoder factor f={factor!r} must be a power of two (1, 2, 4, 8)")
  return levels


class Encoder(nn.Module):
  """`(B, H, W, ch)` images -> `(B, H/f, W/f, c)` codes (see the module docstring)."""

  factor: int = 4
  latent_channels: int = 4
  width: int = 16

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(_check_factor(self.factor)):
      x = nn.relu(common.conv(x, self.width * 2**i, 4, init_scheme="flax", strides=2, padding=1))
    return common.conv(x, self.latent_channels, 3, init_scheme="flax", padding=1)


class Decoder(nn.Module):
  """`(B, h, w, c)` codes -> `(B, h f, w f, out_channels)` images (see the module docstring)."""

  factor: int = 4
  out_channels: int = 1
  width: int = 16

  @nn.compact
  def __call__(self, z: Array) -> Array:
    levels = _check_factor(self.factor)
    x = nn.relu(common.conv(z, self.width * 2**max(levels - 1, 0), 3, init_scheme="flax",
                            padding=1))
    if not levels:
      return common.conv(x, self.out_channels, 3, init_scheme="flax", padding=1)
    for i in reversed(range(1, levels)):
      x = _upsample(x)
      x = nn.relu(common.conv(x, self.width * 2**(i - 1), 3, init_scheme="flax", padding=1))
    return depth_to_space(common.conv(x, 4 * self.out_channels, 3, init_scheme="flax",
                                       padding=1))


def _upsample(x: Array) -> Array:
  """Nearest-neighbour x2 upsampling of `(B, h, w, ch)` to `(B, 2h, 2w, ch)`."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def depth_to_space(x: Array) -> Array:
  """`(B, h, w, 4 ch)` -> `(B, 2h, 2w, ch)`: channel `(2 a + b) ch + k` becomes pixel
  `(2 i + a, 2 j + b)`, channel k."""
  b, h, w, c4 = x.shape
  x = x.reshape(b, h, w, 2, 2, c4 // 4).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, 2 * h, 2 * w, c4 // 4)


class ConvAutoencoder(nn.Module):
  """Encoder and decoder of a small convolutional autoencoder (module docstring).

  Attributes:
    factor: spatial downsampling f (a power of two dividing H and W).
    latent_channels: c, channels of a code.
    out_channels: ch, channels of the images.
    width: channels of the first/last convolution (doubling per downsampling).
  """

  factor: int = 4
  latent_channels: int = 4
  out_channels: int = 1
  width: int = 16

  def setup(self):
    self.encoder = Encoder(self.factor, self.latent_channels, self.width)
    self.decoder = Decoder(self.factor, self.out_channels, self.width)

  def __call__(self, x: Array) -> Array:
    """Reconstructions `decode(encode(x))`, `(B, H, W, ch)`."""
    return self.decoder(self.encoder(x))

  def encode(self, x: Array) -> Array:
    return self.encoder(x)

  def decode(self, z: Array) -> Array:
    return self.decoder(z)

  def decoder_spec(self) -> dict[str, Any]:
    """The JSON spec `decoder_from_spec` rebuilds this autoencoder's decoder from."""
    return {"name": "conv_decoder",
            "kwargs": {"factor": self.factor, "out_channels": self.out_channels,
                       "width": self.width}}


@DECODERS.register("conv_decoder")
def _conv_decoder(**kwargs: Any) -> Callable[[Any, Array], Array]:
  module = Decoder(**kwargs)
  return lambda params, z: module.apply({"params": params}, z)


def decoder_from_spec(spec: dict[str, Any]) -> Callable[[Any, Array], Array]:
  """`decode(params, z (B, h, w, c)) -> (B, H, W, ch)` images for a decoder spec.

  Raises:
    UnknownNameError: the spec names no registered decoder.
  """
  if not isinstance(spec, dict) or "name" not in spec:
    raise ValueError(f"a decoder spec is a dict with 'name' and 'kwargs', got {spec!r}")
  return DECODERS.get(spec["name"])(**dict(spec.get("kwargs", {})))


def latent_shape(image_shape: tuple[int, int, int], factor: int,
                 latent_channels: int) -> tuple[int, int, int]:
  """`(H / f, W / f, c)`; a one-line error unless f divides H and W."""
  _check_factor(factor)
  height, width, _ = image_shape
  if height % factor or width % factor:
    raise ValueError(f"autoencoder factor f={factor} does not divide the {height}x{width} "
                     f"images; use a factor dividing both (e.g. {math.gcd(height, width) & -math.gcd(height, width)})")
  return height // factor, width // factor, latent_channels


def num_parameters(params: Any) -> int:
  """Number of scalars in a parameter tree."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
