"""Random-resized-crop + horizontal flip with recorded parameters (torchvision semantics).

`rrc_params` runs torchvision `RandomResizedCrop`'s 10 attempts (area fraction in `scale`,
log-uniform aspect ratio in `ratio`, sides rounded half-to-even, top-left corner uniform)
vectorised over the batch, with its centre-crop fallback, and `RandomHorizontalFlip`'s decision;
`rrc_apply` resamples each box to `size` with PIL's antialiased bilinear filter (torchvision's
`antialias=True`), restricted to the box, then flips. Recorded parameters let D3S relabel images
under exactly the crops a network trains on.
"""

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.data import resample

Params = dict[str, jax.Array]


def rrc_params(
    key: jax.Array,
    n: int,
    *,
    image_shape: Sequence[int],
    scale: tuple[float | jax.Array, float | jax.Array] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_prob: float = 0.5,
) -> Params:
  """Draws torchvision `RandomResizedCrop` boxes and `RandomHorizontalFlip` decisions.

  Ten attempts per image run in parallel: area `H*W*U(scale)`, aspect `exp(U(log ratio))`,
  `w = round(sqrt(area*aspect))`, `h = round(sqrt(area/aspect))` (half to even, like Python's
  `round`), top-left corner uniform; the first attempt that fits is kept, else torchvision's
  fallback (the whole image, or a centred crop clamped to the ratio range).

  Args:
    key: a PRNG key.
    n: number of images.
    image_shape: `(H, W)` or `(H, W, C)` of the source images (static).
    scale: range of the crop area as a fraction of the image area; its entries may be traced
      (CDA's curriculum lowers the minimum scale every iteration without recompiling).
    ratio: range of the crop aspect ratio w/h.
    flip_prob: probability of a horizontal flip after the crop.

  Returns:
    `{"top", "left", "height", "width"}` int32 `(n,)` and `"flip"` bool `(n,)`.

  >>> p = rrc_params(jax.random.key(0), 4, image_shape=(32, 32, 3))
  >>> bool(jnp.all((p["top"] + p["height"] <= 32) & (p["left"] + p["width"] <= 32)))
  True
  """
  height, width = int(image_shape[0]), int(image_shape[1])
  concrete = all(isinstance(s, (int, float, np.number)) for s in scale)
  if (concrete and not 0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
    raise ValueError(
        f"need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], got {scale}, {ratio}"
    )
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"n must be a positive int, got {n!r}")
  return _rrc_params_core(
      key, jnp.asarray(scale, jnp.float32), int(n), height, width, tuple(map(float, ratio)),
      float(flip_prob),
  )


@functools.partial(jax.jit, static_argnames=("n", "height", "width", "ratio", "flip_prob"))
def _rrc_params_core(
    key: jax.Array, scale: jax.Array, n: int, height: int, width: int,
    ratio: tuple[float, float], flip_prob: float,
) -> Params:
  attempts = 10
  u = jax.random.uniform(key, (n, 4 * attempts + 1))
  u_area, u_ratio, u_top, u_left = jnp.split(u[:, :-1], 4, axis=1)
  area = height * width * resample.between(u_area, scale[0], scale[1])
  aspect = jnp.exp(resample.between(u_ratio, math.log(ratio[0]), math.log(ratio[1])))
  w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  top = resample.uniform_int(u_top, jnp.maximum(height - h + 1, 1))
  left = resample.uniform_int(u_left, jnp.maximum(width - w + 1, 1))
  first = jnp.argmax(fits, axis=1)
  any_fits = jnp.any(fits, axis=1)

  # torchvision's fallback after 10 failures.
  in_ratio = width / height
  if in_ratio < min(ratio):
    fb_w, fb_h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    fb_h, fb_w = height, int(round(height * max(ratio)))
  else:
    fb_w, fb_h = width, height
  fb_top, fb_left = (height - fb_h) // 2, (width - fb_w) // 2

  def pick(values, fallback):
    chosen = jnp.take_along_axis(values, first[:, None], axis=1)[:, 0]
    return jnp.where(any_fits, chosen, fallback).astype(jnp.int32)

  return {
      "top": pick(top, fb_top),
      "left": pick(left, fb_left),
      "height": pick(h, fb_h),
      "width": pick(w, fb_w),
      "flip": u[:, -1] < flip_prob,
  }


def _box_weights(start: jax.Array, length: jax.Array, in_size: int, out_size: int) -> jax.Array:
  """PIL's antialiased bilinear weights `(B, out_size, in_size)` for the box [start, start+length).

  Output pixel o covers box coordinates centred at `start + (o + 0.5) * length / out_size`;
  input pixel k (centre k + 0.5) gets the triangle weight `max(0, 1 - |k + 0.5 - centre| / s)`
  with `s = max(length / out_size, 1)`, restricted to the box and normalised to sum 1.
  """
  length = length.astype(jnp.float32)
  step = length / out_size
  support = jnp.maximum(step, 1.0)
  centre = start[:, None] + (jnp.arange(out_size) + 0.5)[None, :] * step[:, None]
  pixel = jnp.arange(in_size, dtype=jnp.float32) + 0.5
  distance = jnp.abs(pixel[None, None, :] - centre[:, :, None]) / support[:, None, None]
  weight = jnp.maximum(0.0, 1.0 - distance)
  inside = (pixel[None, :] > start[:, None]) & (pixel[None, :] < start[:, None] + length[:, None])
  weight = weight * inside[:, None, :]
  return weight / jnp.sum(weight, axis=-1, keepdims=True)


def rrc_apply(x: jax.Array, params: Params, *, size: int | tuple[int, int]) -> jax.Array:
  """Crops each image's recorded box, resizes it to `size`, and flips it if recorded.

  Resampling is PIL's antialiased bilinear filter (torchvision `resized_crop(...,
  antialias=True)`), computed as two per-image weight matrices, so it is differentiable in x and
  re-applying the same `params` gives the same images.

  Args:
    x: `(B, H, W, C)` images.
    params: from `rrc_params(key, B, image_shape=(H, W, ...))`.
    size: output side, or `(height, width)`.

  Returns:
    `(B, size_h, size_w, C)`.

  >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  >>> full = {"top": jnp.array([0]), "left": jnp.array([0]), "height": jnp.array([4]),
  ...         "width": jnp.array([4]), "flip": jnp.array([False])}
  >>> bool(jnp.allclose(rrc_apply(x, full, size=4), x))
  True
  """
  out_h, out_w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
  x = jnp.asarray(x)
  if x.ndim != 4:
    raise ValueError(f"rrc_apply needs (B, H, W, C) images, got shape {x.shape}")
  return _rrc_apply_core(x, params, int(out_h), int(out_w))


@functools.partial(jax.jit, static_argnames=("out_h", "out_w"))
def _rrc_apply_core(x: jax.Array, params: Params, out_h: int, out_w: int) -> jax.Array:
  rows = _box_weights(params["top"], params["height"], x.shape[1], out_h)
  cols = _box_weights(params["left"], params["width"], x.shape[2], out_w)
  out = jnp.einsum(
      "boh,bhwc,bpw->bopc", rows, x, cols, precision=jax.lax.Precision.HIGHEST
  )
  return resample.flip_images(out, params["flip"])

