"""D3's decoders: latent vectors `z (B, d)` to images, trained with the latent priors.

D3 (paper 000, Appendix C, Table 8; sunnytqin/D3 `decoder.py`) decodes with the decoder half of
a VAE trained from scratch during distillation:

  S (`tiny_vae`, the authors' TinyVAE; kernel_num k = 256, z = 64):
      Linear(z -> 2 x 2 x k) -> [ConvTranspose 4x4 stride 2 pad 1 -> BatchNorm -> LeakyReLU(0.01)]
      over channels k/1 -> k/2 -> k/4 -> k/8 -> k/8 (32 px; one more k/8 block per doubling)
      -> Conv 3x3 (image channels) -> tanh.
      772,707 parameters at 32x32x3 (k 256, z 64).
  M (`vanilla_vae`, the authors' VanillaVAE; z = 2048, hidden 32..512, or 64..512 for 32 px):
      Linear(z -> 2 x 2 x h_last) -> [ConvTranspose 3x3 stride 2 pad 1 output_pad 1 -> BatchNorm
      -> LeakyReLU] over the reversed hidden widths -> the same block at h_0 -> Conv 3x3 -> tanh.
  L (`vanilla_vae` with `linear=False`, z = 4 x 1024 = 4096, hidden 64..1024): z itself is
      reshaped to 2 x 2 x 1024.
  XS (`tiny_vae` at k = 32, z = 32): ours, a CPU-sized S.

Two properties follow the released code rather than a textbook VAE:

- Batch norm always normalises with the statistics of the decode batch: the authors never put
  the decoder in eval mode, neither while distilling nor while training networks on its images.
  There are no running statistics; an optional `mask (B,)` restricts the statistics to the rows
  it marks (a set merged from subtasks decodes each subtask's rows with its own decoder, each
  with the statistics of its own rows).
- A view of the Linear output as `(B, k, 2, 2)` is PyTorch's NCHW order; it is kept, so that a
  converted checkpoint would decode the same.

Outputs: `output="preprocessed"` is the authors' tanh, read as values in the data's preprocessed
space (their standardised CIFAR images mostly lie in [-1, 1]); `output="pixels"` (ours) maps the
same tanh to [0, 1] pixels, `(tanh + 1) / 2`, which the set then preprocesses, for data whose
preprocessed range exceeds [-1, 1] (Fashion-MNIST standardised or whitened). For images smaller
than the decoder's power-of-two canvas (28x28) the canvas (32x32) is centre-cropped.

Transposed convolutions run as their exact sub-pixel form (a stride-2 transposed convolution is
a 3x3 convolution to 4x the channels followed by depth-to-space, each output phase using the
kernel taps that reach it), so every convolution is a plain one: XLA:CPU runs lhs-dilated
convolutions slowly. The parameters are the transposed kernel itself, `(K, K, in, out)`.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.models import common, convolution
from distill_jax.models.autoencoder import DECODERS, depth_to_space

Array = jax.Array

BN_EPSILON = 1e-5  # torch.nn.BatchNorm2d.
LEAKY_SLOPE = 0.01  # torch.nn.LeakyReLU().
OUTPUTS = ("preprocessed", "pixels")
# TinyVAE's channel divisors per canvas size (decoder.py `decoder_config`).
_TINY_DIVISORS = {32: (1, 2, 4, 8, 8), 64: (1, 2, 4, 8, 8, 8), 128: (1, 2, 4, 8, 8, 8, 8),
                  256: (1, 2, 4, 8, 8, 8, 8, 8)}


def _phase_taps(kernel_size: int, padding: int) -> np.ndarray:
  """`(2, 3)` int: for output phase a and tap t (input row m + t - 1), the kernel row of a
  stride-2 transposed convolution that connects them (-1: none).

  PyTorch's transposed convolution writes `y[2 i - p + k] += x[i] w[k]`; output row `2 m + a`
  takes input row `m + t - 1` through `k = a - 2 t + 2 + p` when `0 <= k < K`.
  """
  taps = np.full((2, 3), -1, np.int32)
  for a in range(2):
    for t in range(3):
      k = a - 2 * t + 2 + padding
      if 0 <= k < kernel_size:
        taps[a, t] = k
  return taps


def conv_transpose_x2(x: Array, kernel: Array, bias: Array, *, padding: int) -> Array:
  """PyTorch's `ConvTranspose2d(stride=2, padding=p)` with an output twice the input's size.

  Covers TinyVAE's (K 4, p 1) and VanillaVAE's (K 3, p 1, output_padding 1) blocks:
  `y[b, 2 i - p + k, 2 j - p + l, o] += sum_c x[b, i, j, c] kernel[k, l, c, o]`, cropped to
  `(2 H, 2 W)`. Computed as a 3x3 convolution (padding 1) to `4 out` channels, one group per
  output phase `(a, b)`, then depth-to-space.

  Args:
    x: (B, H, W, in).
    kernel: (K, K, in, out), K in {3, 4} (a transposed kernel: tap k moves input row i to
      output row 2 i - p + k).
    bias: (out,).
    padding: p (1 for both of D3's decoders).

  Returns:
    (B, 2 H, 2 W, out).
  """
  size, _, c_in, c_out = kernel.shape
  taps = _phase_taps(size, padding)
  rows = np.where(taps >= 0, taps, size)  # Row `size` of the padded kernel is zero.
  padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))
  # (a, b, t, u, in, out): the kernel tap that takes input (m + t - 1, n + u - 1) to output
  # pixel (2 m + a, 2 n + b); one gather, whose gradient is one scatter-add.
  phases = padded[rows[:, None, :, None], rows[None, :, None, :]]
  # Channel (2 a + b) * out + o of the 3x3 output is pixel (2 i + a, 2 j + b), channel o.
  phase_kernel = phases.transpose(2, 3, 4, 0, 1, 5).reshape(3, 3, c_in, 4 * c_out)
  y = convolution.conv_general_dilated(x, phase_kernel, (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return depth_to_space(y + jnp.tile(bias, 4))


class ConvTransposeX2(nn.Module):
  """`conv_transpose_x2` with PyTorch's initialisation: U(-b, b), b = 1 / sqrt(out K^2) for
  kernel and bias (torch computes a transposed kernel's fan-in from its second axis)."""

  features: int
  kernel_size: int
  padding: int = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    bound = 1.0 / math.sqrt(self.features * self.kernel_size**2)
    kernel = self.param("kernel", common.uniform_init(bound),
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
    bias = self.param("bias", common.uniform_init(bound), (self.features,))
    return conv_transpose_x2(x, kernel, bias, padding=self.padding)


class BatchStatNorm(nn.Module):
  """Batch norm with the batch's own statistics, always (the decoders' `BatchNorm2d` in the
  train mode the authors leave them in): per channel over (B, H, W), biased variance, eps 1e-5,
  affine `scale`, `bias` starting at 1 and 0. `mask (B,)` (0/1) restricts the statistics to the
  marked rows; every row is normalised with them."""

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    weights = jnp.ones(x.shape[0], x.dtype) if mask is None else mask.astype(x.dtype)
    weights = weights[:, None, None, None]
    count = jnp.sum(weights) * x.shape[1] * x.shape[2]
    mean = jnp.sum(weights * x, axis=(0, 1, 2)) / count
    var = jnp.sum(weights * jnp.square(x - mean), axis=(0, 1, 2)) / count
    return (x - mean) * jax.lax.rsqrt(var + BN_EPSILON) * scale + bias


def _linear(z: Array, features: int, name: str) -> Array:
  """PyTorch's `nn.Linear` (init U(+-1/sqrt(fan_in)) for kernel and bias)."""
  return common.dense(z, features, init_scheme="pytorch", name=name)


def _nchw_to_nhwc(h: Array, channels: int) -> Array:
  """`(B, channels * 4)` viewed as PyTorch's `(B, channels, 2, 2)`, returned as NHWC."""
  return h.reshape(h.shape[0], channels, 2, 2).transpose(0, 2, 3, 1)


def _finish(x: Array, image_shape: Sequence[int], output: str) -> Array:
  """Centre-crop the canvas to `image_shape` and map tanh outputs per `output`."""
  height, width, _ = image_shape
  top, left = (x.shape[1] - height) // 2, (x.shape[2] - width) // 2
  x = x[:, top:top + height, left:left + width]
  return (x + 1.0) / 2.0 if output == "pixels" else x


def canvas_size(image_shape: Sequence[int]) -> int:
  """The smallest power-of-two square (at least 32) holding the images: 28 px decode at 32."""
  side = max(int(image_shape[0]), int(image_shape[1]), 32)
  return 2 ** math.ceil(math.log2(side))


class TinyVAEDecoder(nn.Module):
  """D3's S decoder (and our XS): `z (B, z_dim) -> (B, H, W, ch)` (module docstring).

  Attributes:
    image_shape: `(H, W, ch)` of the images (decoded on `canvas_size` and centre-cropped).
    kernel_num: k, channels of the first block.
    output: "preprocessed" or "pixels" (module docstring).
  """

  image_shape: tuple[int, int, int]
  kernel_num: int = 256
  output: str = "preprocessed"

  @nn.compact
  def __call__(self, z: Array, mask: Array | None = None) -> Array:
    canvas = canvas_size(self.image_shape)
    if canvas not in _TINY_DIVISORS:
      raise ValueError(f"tiny_vae decodes 32, 64, 128 or 256 px canvases; {self.image_shape} "
                       f"needs {canvas}")
    divisors = _TINY_DIVISORS[canvas]
    k = self.kernel_num
    x = _nchw_to_nhwc(_linear(z, 4 * k, "project"), k)
    for i in range(len(divisors) - 1):
      x = ConvTransposeX2(k // divisors[i + 1], 4, name=f"deconv{i}")(x)
      x = nn.leaky_relu(BatchStatNorm(name=f"norm{i}")(x, mask), LEAKY_SLOPE)
    x = common.conv(x, self.image_shape[2], 3, init_scheme="pytorch", padding=1, name="out")
    return _finish(jnp.tanh(x), self.image_shape, self.output)


class VanillaVAEDecoder(nn.Module):
  """D3's M and L decoders: `z (B, z_dim) -> (B, H, W, ch)` (module docstring).

  Attributes:
    image_shape: `(H, W, ch)`.
    hidden: the encoder-side widths (decoded in reverse), e.g. (32, 64, 128, 256, 512).
    linear: project z with a Linear layer (M); False (L) reshapes z, which must then have
      `4 * hidden[-1]` entries.
    output: "preprocessed" or "pixels".
  """

  image_shape: tuple[int, int, int]
  hidden: tuple[int, ...] = (32, 64, 128, 256, 512)
  linear: bool = True
  output: str = "preprocessed"

  @nn.compact
  def __call__(self, z: Array, mask: Array | None = None) -> Array:
    widths = tuple(reversed(self.hidden))
    if self.linear:
      z = _linear(z, 4 * widths[0], "project")
    elif z.shape[-1] != 4 * widths[0]:
      raise ValueError(f"vanilla_vae with linear=False reshapes z to 2x2x{widths[0]}: z_dim must "
                       f"be {4 * widths[0]}, got {z.shape[-1]}")
    x = _nchw_to_nhwc(z, widths[0])
    for i, features in enumerate(widths[1:] + widths[-1:]):
      x = ConvTransposeX2(features, 3, name=f"deconv{i}")(x)
      x = nn.leaky_relu(BatchStatNorm(name=f"norm{i}")(x, mask), LEAKY_SLOPE)
    x = common.conv(x, self.image_shape[2], 3, init_scheme="pytorch", padding=1, name="out")
    return _finish(jnp.tanh(x), self.image_shape, self.output)


# D3's named sizes (Table 8 / the released commands) and ours (xs): module and keyword arguments.
SIZES: dict[str, tuple[type[nn.Module], dict[str, Any], int]] = {
    # size: (module, its kwargs, z_dim)
    "xs": (TinyVAEDecoder, {"kernel_num": 32}, 32),  # Ours: CPU-sized.
    "s": (TinyVAEDecoder, {"kernel_num": 256}, 64),  # --decoder_size=small --kernel_num=256.
    "m": (VanillaVAEDecoder, {"hidden": (32, 64, 128, 256, 512)}, 2048),  # medium, z 2048.
    "l": (VanillaVAEDecoder, {"hidden": (64, 128, 256, 512, 1024), "linear": False}, 4096),
}


def decoder_spec(size: str, image_shape: Sequence[int], *, output: str,
                 **overrides: Any) -> dict[str, Any]:
  """The JSON spec of D3 decoder `size` ("xs", "s", "m", "l") for images of `image_shape`.

  `overrides` replace the size's keyword arguments (e.g. `kernel_num`). The M decoder of
  32-px data uses hidden widths 64..512 (distill_distribution.py's CIFAR branch).
  """
  if size not in SIZES:
    raise ValueError(f"unknown decoder size {size!r}; use one of {', '.join(SIZES)}")
  if output not in OUTPUTS:
    raise ValueError(f"unknown decoder output {output!r}; use one of {', '.join(OUTPUTS)}")
  module, kwargs, _ = SIZES[size]
  kwargs = dict(kwargs)
  if size == "m" and canvas_size(image_shape) == 32:
    kwargs["hidden"] = (64, 128, 256, 512)
  kwargs.update(overrides)
  name = "tiny_vae" if module is TinyVAEDecoder else "vanilla_vae"
  kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
  return {"name": name, "kwargs": {"image_shape": [int(d) for d in image_shape], "output": output,
                                   **kwargs}}


def default_z_dim(size: str) -> int:
  """The latent dimension of D3's size (XS: ours)."""
  return SIZES[size][2]


_MODULES = {"tiny_vae": TinyVAEDecoder, "vanilla_vae": VanillaVAEDecoder}


def build(spec: dict[str, Any]) -> nn.Module:
  """The flax module of a D3 decoder spec (`decoder_spec`; JSON lists back to tuples)."""
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["kwargs"].items()}
  return _MODULES[spec["name"]](**kwargs)


def _builder(name: str) -> Callable[..., Callable[..., Array]]:
  """`DECODERS` entry: spec kwargs -> `decode(params, z (B, d), mask=None) -> images`."""

  def make(**kwargs: Any) -> Callable[..., Array]:
    module = build({"name": name, "kwargs": kwargs})
    return lambda params, z, mask=None: module.apply({"params": params}, z, mask)

  return make


for _name in _MODULES:
  DECODERS.register(_name, _builder(_name))
