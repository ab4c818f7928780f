"""Differentiable resampling of image batches, shared by the augmentations (augment.py, crops.py).

Bilinear sampling at fractional pixel positions with zero or edge padding, PyTorch's
`affine_grid` + `grid_sample` (align_corners=True), augmax's centred affine map, flips and
uniform integer draws. Everything is jnp and differentiable with respect to the images.
"""

import math

import jax
import jax.numpy as jnp


def bilinear(x: jax.Array, rows: jax.Array, cols: jax.Array, padding: str) -> jax.Array:
  """Samples `x (B, H, W, C)` at fractional pixel positions `rows, cols (B, Ho, Wo)`.

  `padding="zeros"` treats pixels outside the image as 0 (grid_sample's default);
  `padding="edge"` clamps them to the border (map_coordinates' mode='nearest').
  """
  height, width = x.shape[1], x.shape[2]

  def one(image, r, c):
    r0, c0 = jnp.floor(r), jnp.floor(c)
    wr, wc = r - r0, c - c0
    r0, c0 = r0.astype(jnp.int32), c0.astype(jnp.int32)
    flat = image.reshape(height * width, image.shape[-1])

    def tap(ri, ci, weight):
      index = jnp.clip(ri, 0, height - 1) * width + jnp.clip(ci, 0, width - 1)
      if padding == "zeros":
        weight = weight * ((ri >= 0) & (ri < height) & (ci >= 0) & (ci < width))
      return flat[index] * weight[..., None]

    return (
        tap(r0, c0, (1 - wr) * (1 - wc)) + tap(r0, c0 + 1, (1 - wr) * wc)
        + tap(r0 + 1, c0, wr * (1 - wc)) + tap(r0 + 1, c0 + 1, wr * wc)
    )

  return jax.vmap(one)(x, rows, cols)


def torch_affine(x: jax.Array, theta: jax.Array) -> jax.Array:
  """`grid_sample(x, affine_grid(theta, align_corners=True), align_corners=True)`, zero padding.

  `theta (B, 2, 2)` maps output (x=width, y=height) coordinates normalised to [-1, 1] onto input
  coordinates, as in PyTorch (no translation column: DSA's scale and rotate have none).
  """
  height, width = x.shape[1], x.shape[2]
  y_out, x_out = jnp.meshgrid(
      jnp.linspace(-1.0, 1.0, height), jnp.linspace(-1.0, 1.0, width), indexing="ij"
  )
  t = theta[:, :, :, None, None]
  x_in = t[:, 0, 0] * x_out + t[:, 0, 1] * y_out
  y_in = t[:, 1, 0] * x_out + t[:, 1, 1] * y_out
  cols = (x_in + 1.0) * 0.5 * (width - 1)
  rows = (y_in + 1.0) * 0.5 * (height - 1)
  return bilinear(x, rows, cols, "zeros")


def centred_affine(
    x: jax.Array, matrix: jax.Array, offset: jax.Array, padding: str
) -> jax.Array:
  """augmax's geometric sampling: `in = matrix @ (out - c) + offset + c` in (row, col) pixels.

  `c = ((H - 1) / 2, (W - 1) / 2)` is the pixel-grid centre; `matrix (B, 2, 2)`,
  `offset (B, 2)`.
  """
  height, width = x.shape[1], x.shape[2]
  r_out, c_out = jnp.meshgrid(
      jnp.arange(height, dtype=jnp.float32) - (height - 1) / 2,
      jnp.arange(width, dtype=jnp.float32) - (width - 1) / 2,
      indexing="ij",
  )
  m = matrix[:, :, :, None, None]
  rows = m[:, 0, 0] * r_out + m[:, 0, 1] * c_out + offset[:, 0, None, None] + (height - 1) / 2
  cols = m[:, 1, 0] * r_out + m[:, 1, 1] * c_out + offset[:, 1, None, None] + (width - 1) / 2
  return bilinear(x, rows, cols, padding)


def per_image(value: jax.Array) -> jax.Array:
  """A per-image value `(B,)` broadcastable against images `(B, H, W, C)`."""
  return value[:, None, None, None]


def flip_images(x: jax.Array, flip: jax.Array) -> jax.Array:
  """Mirrors the images `x (B, H, W, C)` left-right where `flip (B,)` is true."""
  return jnp.where(per_image(flip), x[:, :, ::-1, :], x)


def uniform_int(u: jax.Array, count: int) -> jax.Array:
  """Maps U[0, 1) draws to integers uniform in `0..count-1` (torch.randint's distribution)."""
  return jnp.clip(jnp.floor(u * count), 0, count - 1).astype(jnp.int32)


def between(u: jax.Array, low: float, high: float) -> jax.Array:
  """Maps U[0, 1) draws to U[low, high)."""
  return low + u * (high - low)


def log_between(u: jax.Array, low: float, high: float) -> jax.Array:
  """Maps U[0, 1) draws to log-uniform values in [low, high)."""
  return jnp.exp(between(u, math.log(low), math.log(high)))
