"""Shared pieces of the model zoo: the `MODELS` registry, initialisers, norms and pooling.

Every model in `distill_jax.models` is a Flax linen module called as

  model.apply(variables, x, train=False, return_features=False, mutable=...)

with `x` NHWC float32. It returns logits `(B, num_classes)`, or with `return_features=True`
`(logits, {"penultimate": (B, D), "blocks": tuple of NHWC tensors})`; the package docstring
of `distill_jax.models` says exactly which tensors these are.

Initialisation (`init_scheme=` on the convolutional models):
  "pytorch": PyTorch's layer defaults, which the DC/DSA/DM/MTT released code keeps (it never
    re-initialises): conv and dense kernels kaiming-uniform with a=sqrt(5), i.e.
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  "flax": Flax's defaults, which FRePo's released code keeps: kernels lecun-normal, biases 0.
Norm layers always start at scale 1 and offset 0 (both libraries agree). Norm epsilons are
PyTorch's 1e-5 and the variance is computed in the two-pass (not the E[x^2] - E[x]^2) form.
"""

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.models import convolution
from distill_jax.registry import Registry

MODELS: Registry = Registry("model")

NORMS = ("none", "batch", "instance", "layer", "group")
POOLINGS = ("avg", "max", "none")
INITS = ("pytorch", "flax")
NORM_EPSILON = 1e-5  # PyTorch's default for BatchNorm2d, GroupNorm and LayerNorm.
GROUP_NORM_GROUPS = 4  # DC's 'groupnorm' is nn.GroupNorm(4, channels).

Array = jax.Array
Initializer = Callable[..., Array]


def check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
  """Raises a one-line ValueError when `value` is not one of `choices`."""
  if value not in choices:
    raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(choices)}")


def check_positive(value: int, what: str) -> None:
  """Raises a one-line ValueError when `value` is not a positive int."""
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{what} must be a positive int, got {value!r}")


def check_momentum(value: float) -> None:
  """Raises a one-line ValueError unless the batch-norm momentum lies in [0, 1)."""
  if not 0.0 <= value < 1.0:
    raise ValueError(
        f"bn_momentum must lie in [0, 1) (Flax convention: 0.9 = PyTorch's 0.1), got {value!r}"
    )


def check_settings(model: nn.Module, *, widths: tuple[int, ...] = (),
                   norms: tuple[str, ...] = NORMS) -> None:
  """The checks every convolutional model runs in `__post_init__`: positive `num_classes` and
  `width`, a known `norm` (from `norms`) and `init_scheme`, a batch-norm momentum in [0, 1), and
  group norm's channel split for every layer width in `widths`."""
  check_positive(model.num_classes, "num_classes")
  check_positive(model.width, "width")
  check_choice(model.norm, norms, "norm")
  check_choice(model.init_scheme, INITS, "init_scheme")
  check_momentum(model.bn_momentum)
  if model.norm == "group" and any(w % GROUP_NORM_GROUPS for w in widths):
    raise ValueError(
        f"norm='group' splits channels into {GROUP_NORM_GROUPS} groups; use a width whose "
        f"layers ({', '.join(map(str, widths))} channels) divide by {GROUP_NORM_GROUPS}, got "
        f"width={model.width}"
    )


class Classifier(nn.Module):
  """Base of every model: the call convention of the package docstring around `forward`.

  A model implements `forward(x, train) -> (logits (B, C), penultimate (B, D), blocks)` as its
  compact method; `__call__` returns the logits, or with `return_features` the logits and
  `{"penultimate": ..., "blocks": tuple(blocks)}`.
  """

  def __call__(self, x: Array, train: bool = False, return_features: bool = False):
    """Logits `(B, num_classes)` of images `x (B, H, W, C)`; `train` switches batch norm to
    batch statistics (pass `mutable=["batch_stats"]`); `return_features` adds the features."""
    logits, penultimate, blocks = self.forward(x, train)
    if return_features:
      return logits, {"penultimate": penultimate, "blocks": tuple(blocks)}
    return logits


def check_images(x: Array, model: str) -> None:
  """Raises a one-line ValueError unless `x` is a floating NHWC batch."""
  if x.ndim != 4:
    raise ValueError(
        f"{model} expects NHWC images (B, H, W, C), got shape {tuple(x.shape)}; "
        "add a batch or channel axis"
    )
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{model} expects floating images, got dtype {x.dtype}; cast to float32")


def uniform_init(bound: float) -> Initializer:
  """Returns an initialiser drawing from U(-bound, bound)."""

  def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def kernel_init(init_scheme: str) -> Initializer:
  """The conv/dense kernel initialiser of `init_scheme` (see the module docstring)."""
  if init_scheme == "pytorch":
    # kaiming_uniform(a=sqrt(5)): gain^2 = 2 / (1 + 5), bound = gain * sqrt(3 / fan_in).
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
  return nn.initializers.lecun_normal()


def bias_init(init_scheme: str, fan_in: int) -> Initializer:
  """The bias initialiser of `init_scheme`; PyTorch's depends on the layer's fan-in."""
  if init_scheme == "pytorch":
    return uniform_init(1.0 / math.sqrt(fan_in))
  return nn.initializers.zeros


def conv(
    x: Array,
    features: int,
    kernel_size: int,
    *,
    init_scheme: str,
    strides: int = 1,
    padding: int,
    use_bias: bool = True,
    name: str | None = None,
) -> Array:
  """A PyTorch-style conv: symmetric zero padding of `padding` pixels, square kernel.

  Explicit symmetric padding matters for strided convs: Flax's "SAME" pads (0, 1) where
  PyTorch pads (1, 1). The convolution is `convolution.conv_general_dilated`: lax's forward,
  gradients as canonical-layout convolutions (fast inside `scan`/`cond` on XLA:CPU). Must be
  called inside a compact `__call__`.

  Args:
    x: (B, H, W, C_in).
    features: C_out.
    kernel_size: k for a k x k kernel.
    init_scheme: "pytorch" or "flax".
    strides: stride in both spatial dims.
    padding: zero pixels added on every side.
    use_bias: whether the conv has a bias.
    name: optional submodule name.

  Returns:
    (B, (H + 2p - k) // s + 1, (W + 2p - k) // s + 1, C_out).
  """
  fan_in = x.shape[-1] * kernel_size * kernel_size
  return nn.Conv(
      features,
      (kernel_size, kernel_size),
      strides=(strides, strides),
      padding=((padding, padding), (padding, padding)),
      use_bias=use_bias,
      kernel_init=kernel_init(init_scheme),
      bias_init=bias_init(init_scheme, fan_in),
      conv_general_dilated=convolution.conv_general_dilated,
      name=name,
  )(x)


def dense(x: Array, features: int, *, init_scheme: str, name: str | None = None) -> Array:
  """A Dense layer `(B, D) -> (B, features)` with the kernel/bias init of `init_scheme`."""
  return nn.Dense(
      features,
      kernel_init=kernel_init(init_scheme),
      bias_init=bias_init(init_scheme, x.shape[-1]),
      name=name,
  )(x)


def norm(
    x: Array, kind: str, *, train: bool, bn_momentum: float, name: str | None = None
) -> Array:
  """Applies DC's norm layer `kind` to an NHWC tensor (must be called in a compact method).

  - "batch": batch norm over (B, H, W) per channel; batch statistics when `train`, running
    statistics (collection "batch_stats") otherwise. `bn_momentum` is Flax's (the running
    average keeps `bn_momentum` of its old value; PyTorch's momentum 0.1 is Flax's 0.9). The
    running variance averages the biased batch variance (PyTorch averages the unbiased one).
  - "instance": per sample and channel over (H, W), affine per channel (DC's
    `nn.GroupNorm(C, C)`).
  - "layer": per sample over (H, W, C), elementwise affine of shape (H, W, C) (DC's
    `nn.LayerNorm([C, H, W])`).
  - "group": per sample over (H, W, C / 4) within each of 4 channel groups, affine per channel
    (DC's `nn.GroupNorm(4, C)`).
  - "none": identity.

  Args:
    x: (B, H, W, C).
    kind: one of `NORMS`.
    train: batch norm mode.
    bn_momentum: running-average decay of batch norm.
    name: optional submodule name.

  Returns:
    (B, H, W, C).
  """
  if kind == "batch":
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=bn_momentum,
        epsilon=NORM_EPSILON,
        use_fast_variance=False,
        name=name,
    )(x)
  if kind == "instance":
    return nn.GroupNorm(
        num_groups=None, group_size=1, epsilon=NORM_EPSILON, use_fast_variance=False, name=name
    )(x)
  if kind == "group":
    return nn.GroupNorm(
        num_groups=GROUP_NORM_GROUPS, epsilon=NORM_EPSILON, use_fast_variance=False, name=name
    )(x)
  if kind == "layer":
    return nn.LayerNorm(
        epsilon=NORM_EPSILON,
        reduction_axes=(-3, -2, -1),
        feature_axes=(-3, -2, -1),
        use_fast_variance=False,
        name=name,
    )(x)
  if kind == "none":
    return x
  raise ValueError(f"unknown norm {kind!r}; use one of {', '.join(NORMS)}")


def pool2x2(x: Array, kind: str, *, model: str) -> Array:
  """2x2 pooling with stride 2 and no padding (floor of odd sizes, as PyTorch).

  Args:
    x: (B, H, W, C).
    kind: "avg", "max" or "none" (identity).
    model: the model's name, for the error message.

  Returns:
    (B, H // 2, W // 2, C), or `x` for "none".

  Raises:
    ValueError: when H or W is below 2, where pooling would leave an empty map.
  """
  if kind == "none":
    return x
  height, width = x.shape[1:3]
  if height < 2 or width < 2:
    raise ValueError(
        f"{model}: cannot 2x2-pool a {height}x{width} feature map; use fewer blocks "
        "(smaller depth), larger images, or pooling='none'"
    )
  if kind == "avg":
    return nn.avg_pool(x, (2, 2), strides=(2, 2))
  if kind == "max":
    return nn.max_pool(x, (2, 2), strides=(2, 2))
  raise ValueError(f"unknown pooling {kind!r}; use one of {', '.join(POOLINGS)}")


def first_conv_padding(x: Array, padding: int, pad_grayscale: bool) -> int:
  """Padding of a model's first conv: DC/MTT/FRePo add 2 pixels per side for 1-channel input.

  The released codes pad the first conv of 1-channel (MNIST-style) images by 2 more pixels per
  side, so 28x28 inputs give 32x32 maps and the rest of the network sees CIFAR's sizes.
  """
  return padding + 2 if pad_grayscale and x.shape[-1] == 1 else padding
