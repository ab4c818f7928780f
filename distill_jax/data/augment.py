"""Differentiable image augmentation with recorded parameters (jnp only, jit-able).

Two families, each split into `*_params(key, n, ...)` (sample the random parameters of a batch
of n images) and `*_apply(x, params, ...)` (apply them), so a batch can be augmented again
identically later: DC/DM's Siamese augmentation applies one draw to the real and the synthetic
batch, D3S relabels images with the exact crops it trained on.

DSA (Zhao & Bilen 2021; VICO-UoE/DatasetCondensation utils.py `ParamDiffAug`/`DiffAugment`, the
version MTT copies): ops `color` (brightness, then saturation, then contrast), `crop`
(translation by whole pixels with zero fill), `cutout`, `flip`, `scale`, `rotate`, with
`ParamDiffAug`'s magnitudes (below). Mode "single" (DSA's aug_mode 'S', MTT's default) draws
one op per call, uniformly from the strategy, and applies it to the whole batch with per-image
parameters; "multiple" ('M') applies every op of the strategy in order. `scale` and `rotate`
reproduce `F.affine_grid(theta, align_corners=True)` + `F.grid_sample(align_corners=True)`
(bilinear, zero padding); everything is differentiable with respect to the images.

Parameters with a leading size of 1 are broadcast over any batch: `dsa_params(key, 1)` is DSA's
"batch mode" (`seed != -1`: one shared transform for every image), which DC and DM use to
augment a real batch and a synthetic batch of different sizes identically.

FRePo (yongchaoz/FRePo lib/dataset/augmax `get_aug_by_name`, used when it trains the evaluation
networks): one op per call from "flip_color_crop_rotate_translate_cutout" (no `flip` for
MNIST/Fashion-MNIST), per-image parameters, bilinear resampling with edge replication (augmax
`mode='nearest'`) around the pixel-grid centre: `flip` (p=0.5), `color`
(`NormalizedColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, p=1)`: add U(-0.25,
0.25), then scale the deviation from the image mean by a log-uniform factor in [e^-0.25,
e^0.25], then the deviation from the per-pixel channel mean by another), `crop`
(`RandomSizedCrop(zoom_range=(0.8, 1.25))`: log-uniform zoom, centre shifted uniformly by up to
|H*zoom - H|/2), `rotate` (U(-15, 15) degrees), `translate` (`RandomTranslate(0.125)`:
continuous shift up to H/8, W/8), `cutout` (one (H//4) x (W//4) hole of zeros inside the image).

Random-resized-crop with recorded parameters (D3S) is in `crops.py`; the resampling both use is
in `resample.py`.
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.data import resample

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
MODES = ("single", "multiple")

# ParamDiffAug's defaults (DSA and MTT utils.py).
DSA_PROB_FLIP = 0.5
DSA_RATIO_SCALE = 1.2
DSA_RATIO_ROTATE = 15.0  # degrees
DSA_RATIO_CROP_PAD = 0.125
DSA_RATIO_CUTOUT = 0.5
DSA_BRIGHTNESS = 1.0
DSA_SATURATION = 2.0
DSA_CONTRAST = 0.5

# FRePo's augmax settings (lib/dataset/augmax/__init__.py `get_aug_by_name`).
FREPO_STRATEGY = "flip_color_crop_rotate_translate_cutout"
FREPO_STRATEGY_GRAYSCALE = "color_crop_rotate_translate_cutout"
FREPO_COLOR = 0.25
FREPO_ZOOM_RANGE = (0.8, 1.25)
FREPO_ROTATE = 15.0  # degrees
FREPO_TRANSLATE = 0.125
FREPO_CUTOUT_DIVISOR = 4

Params = dict[str, jax.Array]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["op_index", "ops"],
    meta_fields=["family", "strategy", "mode"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class AugParams:
  """Recorded parameters of one DSA or FRePo augmentation call (a pytree).

  Attributes:
    op_index: int32 scalar, the op of `strategy` drawn in "single" mode (-1 in "multiple").
    ops: one dict of per-image arrays (leading dimension n, or 1 to broadcast) per op of the
      strategy, in strategy order; every op is sampled so the structure is fixed.
    family: "dsa" or "frepo" (static).
    strategy: the ops joined by "_" (static).
    mode: "single" or "multiple" (static).
  """

  op_index: jax.Array
  ops: tuple[Params, ...]
  family: str
  strategy: str
  mode: str


# ----------------------------------------------------------------------------------------------
# DSA ops: sample(key, n) -> params; apply(x, params) -> x.


def _dsa_sample_color(u: jax.Array) -> Params:
  return {
      "brightness": (u[:, 0] - 0.5) * DSA_BRIGHTNESS,
      "saturation": u[:, 1] * DSA_SATURATION,
      "contrast": u[:, 2] + DSA_CONTRAST,
  }


def _dsa_apply_color(x: jax.Array, p: Params) -> jax.Array:
  x = x + resample.per_image(p["brightness"])
  mean = x.mean(axis=3, keepdims=True)
  x = (x - mean) * resample.per_image(p["saturation"]) + mean
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  return (x - mean) * resample.per_image(p["contrast"]) + mean


def _keep_uniforms(u: jax.Array) -> Params:
  # Integer shifts depend on the image size, so the draw is stored and discretised in apply.
  return {"u": u}


def _dsa_apply_crop(x: jax.Array, p: Params) -> jax.Array:
  _, height, width, channels = x.shape
  shift_h = int(height * DSA_RATIO_CROP_PAD + 0.5)
  shift_w = int(width * DSA_RATIO_CROP_PAD + 0.5)
  dy = resample.uniform_int(p["u"][:, 0], 2 * shift_h + 1) - shift_h
  dx = resample.uniform_int(p["u"][:, 1], 2 * shift_w + 1) - shift_w
  padded = jnp.pad(x, ((0, 0), (shift_h, shift_h), (shift_w, shift_w), (0, 0)))
  # out[i, j] = x[i + dy, j + dx], zero outside the image.
  return jax.vmap(
      lambda image, a, b: jax.lax.dynamic_slice(
          image, (shift_h + a, shift_w + b, 0), (height, width, channels)
      )
  )(padded, dy, dx)


def _dsa_apply_cutout(x: jax.Array, p: Params) -> jax.Array:
  _, height, width, _ = x.shape
  size_h = int(height * DSA_RATIO_CUTOUT + 0.5)
  size_w = int(width * DSA_RATIO_CUTOUT + 0.5)
  # DSA draws the hole centre in 0..H - (size % 2) and clamps the hole to the image.
  top = resample.uniform_int(p["u"][:, 0], height + 1 - size_h % 2) - size_h // 2
  left = resample.uniform_int(p["u"][:, 1], width + 1 - size_w % 2) - size_w // 2
  rows, cols = jnp.arange(height), jnp.arange(width)
  in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size_h)
  in_cols = (cols >= left[:, None]) & (cols < left[:, None] + size_w)
  hole = in_rows[:, :, None] & in_cols[:, None, :]
  return x * (1.0 - hole.astype(x.dtype))[..., None]


def _dsa_sample_flip(u: jax.Array) -> Params:
  return {"flip": u[:, 0] < DSA_PROB_FLIP}


def _apply_flip(x: jax.Array, p: Params) -> jax.Array:
  return resample.flip_images(x, p["flip"])


def _dsa_sample_scale(u: jax.Array) -> Params:
  low, high = 1.0 / DSA_RATIO_SCALE, DSA_RATIO_SCALE
  return {"sx": u[:, 0] * (high - low) + low, "sy": u[:, 1] * (high - low) + low}


def _dsa_apply_scale(x: jax.Array, p: Params) -> jax.Array:
  zeros = jnp.zeros_like(p["sx"])
  theta = jnp.stack([jnp.stack([p["sx"], zeros], -1), jnp.stack([zeros, p["sy"]], -1)], 1)
  return resample.torch_affine(x, theta)


def _dsa_sample_rotate(u: jax.Array) -> Params:
  return {"angle": (u[:, 0] - 0.5) * 2 * DSA_RATIO_ROTATE / 180 * math.pi}


def _dsa_apply_rotate(x: jax.Array, p: Params) -> jax.Array:
  cos, sin = jnp.cos(p["angle"]), jnp.sin(p["angle"])
  theta = jnp.stack([jnp.stack([cos, -sin], -1), jnp.stack([sin, cos], -1)], 1)
  return resample.torch_affine(x, theta)


@dataclasses.dataclass(frozen=True)
class _Op:
  """An op: `sample(u)` maps `num_uniforms` U[0, 1) draws per image `(n, k)` to its params."""

  num_uniforms: int
  sample: Callable[[jax.Array], Params]
  apply: Callable[[jax.Array, Params], jax.Array]


DSA_OPS: dict[str, _Op] = {
    "color": _Op(3, _dsa_sample_color, _dsa_apply_color),
    "crop": _Op(2, _keep_uniforms, _dsa_apply_crop),
    "cutout": _Op(2, _keep_uniforms, _dsa_apply_cutout),
    "flip": _Op(1, _dsa_sample_flip, _apply_flip),
    "scale": _Op(2, _dsa_sample_scale, _dsa_apply_scale),
    "rotate": _Op(1, _dsa_sample_rotate, _dsa_apply_rotate),
}


# ----------------------------------------------------------------------------------------------
# FRePo (augmax) ops.


def _frepo_sample_color(u: jax.Array) -> Params:
  strength = math.exp(FREPO_COLOR)
  return {
      "brightness": resample.between(u[:, 0], -FREPO_COLOR, FREPO_COLOR),
      "contrast": resample.log_between(u[:, 1], 1 / strength, strength),
      "saturation": resample.log_between(u[:, 2], 1 / strength, strength),
  }


def _frepo_apply_color(x: jax.Array, p: Params) -> jax.Array:
  x = x + resample.per_image(p["brightness"])
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  x = (x - mean) * resample.per_image(p["contrast"]) + mean
  mean = x.mean(axis=3, keepdims=True)
  return (x - mean) * resample.per_image(p["saturation"]) + mean


def _frepo_sample_flip(u: jax.Array) -> Params:
  return {"flip": u[:, 0] < 0.5}


def _frepo_sample_crop(u: jax.Array) -> Params:
  return {"zoom": resample.log_between(u[:, 0], *FREPO_ZOOM_RANGE), "shift": resample.between(u[:, 1:], -1.0, 1.0)}


def _frepo_apply_crop(x: jax.Array, p: Params) -> jax.Array:
  sizes = jnp.array(x.shape[1:3], jnp.float32)
  zoom = p["zoom"]
  centre = p["shift"] * jnp.abs(sizes * zoom[:, None] - sizes) / 2
  matrix = jnp.eye(2)[None] / zoom[:, None, None]
  return resample.centred_affine(x, matrix, centre / zoom[:, None], "edge")


def _frepo_sample_rotate(u: jax.Array) -> Params:
  limit = math.radians(FREPO_ROTATE)
  return {"angle": resample.between(u[:, 0], -limit, limit)}


def _frepo_apply_rotate(x: jax.Array, p: Params) -> jax.Array:
  cos, sin = jnp.cos(p["angle"]), jnp.sin(p["angle"])
  matrix = jnp.stack([jnp.stack([cos, sin], -1), jnp.stack([-sin, cos], -1)], 1)
  return resample.centred_affine(x, matrix, jnp.zeros((x.shape[0], 2)), "edge")


def _frepo_sample_translate(u: jax.Array) -> Params:
  return {"shift": resample.between(u, -1.0, 1.0)}


def _frepo_apply_translate(x: jax.Array, p: Params) -> jax.Array:
  limits = jnp.array(x.shape[1:3], jnp.float32) * FREPO_TRANSLATE
  matrix = jnp.broadcast_to(jnp.eye(2), (x.shape[0], 2, 2))
  return resample.centred_affine(x, matrix, -p["shift"] * limits, "edge")


def _frepo_apply_cutout(x: jax.Array, p: Params) -> jax.Array:
  _, height, width, _ = x.shape
  size_h, size_w = height // FREPO_CUTOUT_DIVISOR, width // FREPO_CUTOUT_DIVISOR
  top = resample.uniform_int(p["u"][:, 0], height - size_h + 1)
  left = resample.uniform_int(p["u"][:, 1], width - size_w + 1)
  rows, cols = jnp.arange(height), jnp.arange(width)
  in_rows = (rows >= top[:, None]) & (rows < top[:, None] + size_h)
  in_cols = (cols >= left[:, None]) & (cols < left[:, None] + size_w)
  hole = in_rows[:, :, None] & in_cols[:, None, :]
  return x * (1.0 - hole.astype(x.dtype))[..., None]


FREPO_OPS: dict[str, _Op] = {
    "color": _Op(3, _frepo_sample_color, _frepo_apply_color),
    "crop": _Op(3, _frepo_sample_crop, _frepo_apply_crop),
    "cutout": _Op(2, _keep_uniforms, _frepo_apply_cutout),
    "flip": _Op(1, _frepo_sample_flip, _apply_flip),
    "rotate": _Op(1, _frepo_sample_rotate, _frepo_apply_rotate),
    "translate": _Op(2, _frepo_sample_translate, _frepo_apply_translate),
}
_FAMILIES = {"dsa": DSA_OPS, "frepo": FREPO_OPS}


# ----------------------------------------------------------------------------------------------
# Strategy plumbing shared by DSA and FRePo.


def parse_strategy(strategy: str, family: str = "dsa") -> tuple[str, ...]:
  """Splits "color_crop_..." into op names, checking each; "none" or "" gives no ops.

  >>> parse_strategy("flip_rotate")
  ('flip', 'rotate')
  """
  ops = _FAMILIES[family]
  if strategy in ("", "none", "None"):
    return ()
  names = tuple(strategy.split("_"))
  for name in names:
    if name not in ops:
      raise ValueError(
          f"unknown {family} augmentation op {name!r} in strategy {strategy!r}; valid ops: "
          f"{', '.join(sorted(ops))} (join them with '_', or use 'none')"
      )
  return names


def _sample(key: jax.Array, n: int, strategy: str, mode: str, family: str) -> AugParams:
  if mode not in MODES:
    raise ValueError(f"unknown augmentation mode {mode!r}; use one of {', '.join(MODES)}")
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"n must be a positive int (the batch size, or 1 to share), got {n!r}")
  names = parse_strategy(strategy, family)
  return _sample_core(key, int(n), names, mode, family)


@functools.partial(jax.jit, static_argnames=("n", "names", "mode", "family"))
def _sample_core(
    key: jax.Array, n: int, names: tuple[str, ...], mode: str, family: str
) -> AugParams:
  # One threefry draw for the whole call: separate draws per op multiply the compile time.
  table = _FAMILIES[family]
  widths = [table[name].num_uniforms for name in names]
  draws = jax.random.uniform(key, (n * sum(widths) + 1,))
  per_image = draws[:-1].reshape(n, sum(widths))
  bounds = np.cumsum([0] + widths)
  ops = tuple(
      table[name].sample(per_image[:, bounds[i]:bounds[i + 1]]) for i, name in enumerate(names)
  )
  if mode == "single" and names:
    op_index = resample.uniform_int(draws[-1], len(names))
  else:
    op_index = jnp.array(-1, jnp.int32)
  return AugParams(op_index, ops, family, "_".join(names), mode)


def _apply(x: jax.Array, params: AugParams, strategy: str | None, family: str) -> jax.Array:
  if not isinstance(params, AugParams) or params.family != family:
    raise ValueError(
        f"expected {family} parameters from {family}_params(...), got "
        f"{getattr(params, 'family', type(params).__name__)!r}"
    )
  drawn = parse_strategy(params.strategy, family)
  if strategy is not None and parse_strategy(strategy, family) != drawn:
    raise ValueError(
        f"params were drawn for strategy {params.strategy!r}, not {strategy!r}; draw them with "
        "the same strategy"
    )
  x = jnp.asarray(x)
  if x.ndim != 4:
    raise ValueError(f"augmentation needs (B, H, W, C) images, got shape {x.shape}")
  for op_params in params.ops:
    for value in jax.tree.leaves(op_params):
      if value.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"augmentation params were drawn for {value.shape[0]} images but the batch has "
            f"{x.shape[0]}; draw them with n equal to the batch size (or n=1 to share one "
            "transform)"
        )
  if not params.strategy:
    return x
  return _apply_core(x, params)


@jax.jit
def _apply_core(x: jax.Array, params: AugParams) -> jax.Array:
  names = parse_strategy(params.strategy, params.family)
  table = _FAMILIES[params.family]
  ops = tuple(
      jax.tree.map(lambda v: jnp.broadcast_to(v, (x.shape[0],) + v.shape[1:]), p)
      for p in params.ops
  )
  if params.mode == "multiple":
    for name, p in zip(names, ops):
      x = table[name].apply(x, p)
    return x
  branches = [_branch(table[name].apply, i) for i, name in enumerate(names)]
  return jax.lax.switch(params.op_index, branches, x, ops)


def _branch(
    apply: Callable[[jax.Array, Params], jax.Array], index: int
) -> Callable[[jax.Array, tuple[Params, ...]], jax.Array]:
  return lambda x, ops: apply(x, ops[index])


# ----------------------------------------------------------------------------------------------
# Public DSA API.


def dsa_params(
    key: jax.Array, n: int, *, strategy: str = DEFAULT_STRATEGY, mode: str = "single"
) -> AugParams:
  """Draws DSA parameters for a batch of `n` images (jit-able with static n/strategy/mode).

  Args:
    key: a PRNG key.
    n: batch size; 1 draws one transform shared by every image of any batch (DSA batch mode).
    strategy: ops joined by "_" from color, crop, cutout, flip, scale, rotate; "none" = identity.
    mode: "single" (one op per call, DSA 'S') or "multiple" (all ops in order, DSA 'M').

  Returns:
    An `AugParams` pytree: per-image draws of every op (leading dim n) and the chosen op index.

  >>> p = dsa_params(jax.random.key(0), 8)
  >>> p.strategy, p.mode, int(p.op_index) in range(6)
  ('color_crop_cutout_flip_scale_rotate', 'single', True)
  """
  return _sample(key, n, strategy, mode, "dsa")


def dsa_apply(x: jax.Array, params: AugParams, *, strategy: str | None = None) -> jax.Array:
  """Applies recorded DSA parameters to `x (B, H, W, C)`; same shape out, differentiable in x.

  The same `params` applied to another batch of B images (or any batch, when drawn with n=1)
  applies the identical transform. Under `jit` the op is chosen with `lax.switch`, so one
  compilation serves every draw.

  Args:
    x: images `(B, H, W, C)` (any real-valued preprocessing; crop/cutout/scale/rotate fill with 0).
    params: from `dsa_params` with n = B or n = 1.
    strategy: optional check that `params` were drawn for this strategy.
  """
  return _apply(x, params, strategy, "dsa")


def dsa(
    key: jax.Array, x: jax.Array, *, strategy: str = DEFAULT_STRATEGY, mode: str = "single"
) -> jax.Array:
  """DSA augmentation of a batch: `dsa_apply(x, dsa_params(key, B, ...))`.

  >>> x = jnp.ones((2, 4, 4, 1))
  >>> dsa(jax.random.key(1), x, strategy="flip").shape
  (2, 4, 4, 1)
  """
  return dsa_apply(x, dsa_params(key, x.shape[0], strategy=strategy, mode=mode))


# ----------------------------------------------------------------------------------------------
# Public FRePo API.


def frepo_default_strategy(channels: int) -> str:
  """FRePo's evaluation strategy: no flip for 1-channel (MNIST-like) images."""
  return FREPO_STRATEGY_GRAYSCALE if channels == 1 else FREPO_STRATEGY


def frepo_params(key: jax.Array, n: int, *, strategy: str = FREPO_STRATEGY) -> AugParams:
  """Draws FRePo (augmax) augmentation parameters: one op per call, per-image parameters.

  Args:
    key: a PRNG key.
    n: batch size (1 shares one transform).
    strategy: ops joined by "_" from flip, color, crop, rotate, translate, cutout.
  """
  return _sample(key, n, strategy, "single", "frepo")


def frepo_apply(x: jax.Array, params: AugParams, *, strategy: str | None = None) -> jax.Array:
  """Applies recorded FRePo parameters to `x (B, H, W, C)`; differentiable in x."""
  return _apply(x, params, strategy, "frepo")


def frepo_augment(key: jax.Array, x: jax.Array, *, strategy: str | None = None) -> jax.Array:
  """FRePo's evaluation augmentation of a batch (strategy defaults by channel count).

  >>> frepo_augment(jax.random.key(0), jnp.zeros((3, 8, 8, 1))).shape
  (3, 8, 8, 1)
  """
  strategy = strategy or frepo_default_strategy(x.shape[-1])
  return frepo_apply(x, frepo_params(key, x.shape[0], strategy=strategy))
