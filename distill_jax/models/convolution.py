"""A 2-D convolution whose gradients stay fast inside `lax.scan` / `lax.cond` on XLA:CPU.

Every conv of the model zoo (`common.conv`) runs through `conv_general_dilated` here. The forward
pass is `lax.conv_general_dilated` unchanged; the difference is the backward pass. JAX's transpose
rules express both gradients as convolutions with permuted dimension numbers (the weight gradient
treats the input's channel axis as the batch: `dim_labels=f01b_...`). At the top level of a program
XLA:CPU inserts the transposes that make those convolutions canonical (NHWC x HWIO) and runs them on
its fast kernel; inside a nested computation (a `while` from `lax.scan`, a `conditional` from
`lax.cond`) it does not, and the permuted convolution falls back to a naive loop. Measured on 2 cores
(ConvNet width 16 training step, Fashion-MNIST, 100 images): 34 ms at the top level, 250 ms inside a
scan or a cond; a single 16 -> 16 channel weight gradient: 15 ms vs 286 ms. Writing the transposes
explicitly, as here, makes every convolution of the backward pass canonical wherever it runs: 18 ms
inside the cond (`benchmarks/conv_backward.py`).

The gradients, for `y = conv(x, w)` with strides `s`, padding `(lo, hi)` per spatial dim and an
`(k_h, k_w, C_in, C_out)` kernel:

  dx = conv(dilate_s(dy), flip_hw(w)^T_io, padding (k - 1 - lo, H - 1 - (H_out - 1) s + lo))
  dw[i, j, c, o] = sum_{b, h, v} x_pad[b, s h + i, s v + j, c] dy[b, h, v, o]
     = transpose(conv(x^T (C_in, H, W, B), dy^T (H_out, W_out, B, C_out) dilated by s))[:k]

both ordinary NHWC x HWIO convolutions on transposed operands. Higher-order derivatives (MTT's
meta-gradient through a student's SGD steps) differentiate these expressions as usual; forward-mode
(`jax.jvp`) is not defined for a `custom_vjp` function. Padding wider than `k - 1` (the grayscale
first conv of DC's ConvNet pads a 3x3 kernel by 3) makes the dx padding negative, which crops.
Grouped or dilated convolutions, string paddings and non-NHWC layouts fall back to
`lax.conv_general_dilated`.
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
_SPEC = ("NHWC", "HWIO", "NHWC")


def _conv(x: Array, w: Array, strides: tuple[int, int], padding: tuple[tuple[int, int], ...],
          precision: Any, lhs_dilation=(1, 1), rhs_dilation=(1, 1)) -> Array:
  return lax.conv_general_dilated(x, w, strides, padding, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation, dimension_numbers=_SPEC,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def canonical_conv(x: Array, w: Array, strides: tuple[int, int],
                   padding: tuple[tuple[int, int], ...], precision: Any = None) -> Array:
  """`lax.conv_general_dilated(x, w, strides, padding)` in NHWC x HWIO with canonical gradients.

  Args:
    x: (B, H, W, C_in) input.
    w: (k_h, k_w, C_in, C_out) kernel.
    strides: (s_h, s_w).
    padding: ((lo_h, hi_h), (lo_w, hi_w)) non-negative zero padding.
    precision: `lax.Precision` of the convolutions, or None.

  Returns:
    (B, H_out, W_out, C_out), `H_out = (H + lo_h + hi_h - k_h) // s_h + 1`.
  """
  return _conv(x, w, strides, padding, precision)


def _forward(x, w, strides, padding, precision):
  return _conv(x, w, strides, padding, precision), (x, w)


def _backward(strides, padding, precision, residuals, dy):
  x, w = residuals
  (k_h, k_w), (h_in, w_in) = w.shape[:2], x.shape[1:3]
  h_out, w_out = dy.shape[1:3]
  # dx: a stride-1 convolution of the stride-dilated dy with the flipped, io-swapped kernel.
  flipped = jnp.transpose(jnp.flip(w, (0, 1)), (0, 1, 3, 2))
  dx_padding = tuple((k - 1 - lo, size - 1 - (out - 1) * s + lo)
                     for k, (lo, _), size, out, s in zip((k_h, k_w), padding, (h_in, w_in),
                                                         (h_out, w_out), strides))
  dx = _conv(dy, flipped, (1, 1), dx_padding, precision, lhs_dilation=strides)
  # dw: the input's channels act as the batch and dy (dilated by the strides) as the kernel.
  dw = _conv(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3)), (1, 1), padding,
             precision, rhs_dilation=strides)
  dw = jnp.transpose(dw[:, :k_h, :k_w, :], (1, 2, 0, 3))
  return dx.astype(x.dtype), dw.astype(w.dtype)


canonical_conv.defvjp(_forward, _backward)


def _pairs(padding: Any) -> tuple[tuple[int, int], ...] | None:
  if isinstance(padding, str):
    return None
  pairs = tuple(tuple(int(p) for p in pair) for pair in padding)
  return pairs if all(len(pair) == 2 for pair in pairs) else None


def conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> Array:
  """Drop-in for `lax.conv_general_dilated` (Flax's `nn.Conv(conv_general_dilated=...)`):
  `canonical_conv` for plain 2-D NHWC x HWIO convolutions, `lax` for everything else."""
  pairs = _pairs(padding)
  spec = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _SPEC) if lhs.ndim == 4 else None
  plain = (
      lhs.ndim == 4 and rhs.ndim == 4 and pairs is not None and len(pairs) == 2
      and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == spec
      and tuple(lhs_dilation or (1, 1)) == (1, 1) and tuple(rhs_dilation or (1, 1)) == (1, 1)
      and feature_group_count == 1 and batch_group_count == 1 and preferred_element_type is None
      and all(lo >= 0 and hi >= 0 for lo, hi in pairs))
  if not plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  return canonical_conv(lhs, rhs, tuple(int(s) for s in window_strides), pairs, precision)
