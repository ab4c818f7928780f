"""What the pixel-space methods share: initial images, class-balanced real batches, Siamese DSA,
and how a loop of network steps is compiled.

MTT, DC and DM start from `ipc` real images per class (or noise), DC and DM compare each class's
synthetic images with a fresh batch of real images of that class, augmented with one shared DSA
draw (DSA's Siamese augmentation: `DiffAugment(..., seed=s)` applied to both batches, DC
utils.py; with a seed every image of the batch gets the same transform).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from distill_jax import data as data_lib
from distill_jax import models
from distill_jax import parallel
from distill_jax.data import augment

Array = jax.Array

INITS = ("real", "noise")
LOOPS = ("auto", "scan", "unrolled")


def check_init(init: str) -> None:
  if init not in INITS:
    raise ValueError(f"unknown config.init {init!r}; use one of {', '.join(INITS)}")


def random_network(config, data):
  """The DC/DM network (`config.pool`) and the images' SGD-momentum optimiser (`config.outer`),
  after the checks both methods share (init, real batch, a network without running statistics).

  DC/DM here train networks without running statistics (instance norm, the released default);
  the released ConvNetBN branch (statistics frozen from a real batch) is not built.
  """
  check_init(config.init)
  check_real_batch(config, data)
  model = models.get_model(config.pool.model, num_classes=data.num_classes,
                           **dict(config.pool.model_kwargs))
  if getattr(model, "norm", None) == "batch":
    raise ValueError(
        "pool.model_kwargs.norm='batch' is not supported by DC/DM here (the released "
        "ConvNetBN branch freezes statistics from a real batch); use 'instance' (the default)"
    )
  return model, optax.sgd(config.outer.lr, momentum=config.outer.momentum or None)


def initial_images(data, *, ipc: int, seed: int, init: str, key: Array) -> Array:
  """`ipc` images per class, sorted by class (labels: `initial_labels`).

  "real": a class-balanced random subset of the (preprocessed) training set drawn with `seed`
  (the released codes' `--init real` / `--pix_init real`); "noise": standard normal images in
  preprocessed units from `key` (their `torch.randn` default).

  Returns:
    `(C * ipc, H, W, channels)` float32.
  """
  x_real, _ = data_lib.random_subset(data.x_train, data.y_train, ipc=ipc,
                                     num_classes=data.num_classes, seed=seed)
  if init == "noise":
    return jax.random.normal(key, x_real.shape, jnp.float32)
  return jnp.asarray(x_real, jnp.float32)


def initial_labels(num_classes: int, ipc: int) -> np.ndarray:
  """`(C * ipc,)` int32 labels `[0] * ipc + [1] * ipc + ...` (the released `label_syn`)."""
  return np.repeat(np.arange(num_classes, dtype=np.int32), ipc)


def real_class_batches(key: Array, x_train: Array, y_train: Array, *, per_class: int,
                       num_classes: int) -> Array:
  """`(C, per_class, H, W, ch)`: `per_class` distinct random real images of every class (the
  released `get_images(c, n)` for every c), drawn inside the jitted step; on a mesh each
  class's images are split over `data`."""
  index = data_lib.balanced_indices(key, y_train, per_class=per_class, num_classes=num_classes)
  batches = x_train[index].reshape(num_classes, per_class, *x_train.shape[1:])
  return parallel.constrain_leading(batches, "data", dim=1)


def siamese_dsa(key: Array, x_real: Array, x_syn: Array, *, strategy: str) -> tuple[Array, Array]:
  """One DSA draw (one op, one transform for every image) applied to both batches of a class.

  `strategy=""` returns the batches unchanged.
  """
  if not strategy:
    return x_real, x_syn
  params = augment.dsa_params(key, 1, strategy=strategy, mode="single")
  return (augment.dsa_apply(x_real, params, strategy=strategy),
          augment.dsa_apply(x_syn, params, strategy=strategy))


def resolve_loop(name: str, *, remat: bool = False) -> str:
  """"scan" or "unrolled" for a config's loop setting ("auto", "scan", "unrolled").

  A loop of network training steps inside a jitted step can be a rolled `lax.scan` (compile time
  independent of its length; remat bounds memory) or straight-line code (`unroll=True`), which
  XLA:CPU runs many times faster: it executes convolution gradients inside while loops as slow
  generic loops (measured 6x for MTT's step at width 16), at a compile time growing with the
  length and without remat's memory saving (XLA reorders the recomputation of straight-line
  code). "auto" is "unrolled" on CPU without remat and "scan" otherwise.
  """
  if name not in LOOPS:
    raise ValueError(f"unknown loop {name!r}; use one of {', '.join(LOOPS)}")
  if name == "auto":
    return "unrolled" if jax.default_backend() == "cpu" and not remat else "scan"
  if name == "unrolled" and remat:
    raise ValueError(
        "remat=True needs loop='scan' (or 'auto'): XLA reorders the recomputation of "
        "straight-line code and saves no memory"
    )
  return name


def check_real_batch(config, data) -> None:
  """One-line error unless every class of `data` gives `config.outer.real_batch_size` distinct
  real images (DC/DM draw a whole batch of every class each step)."""
  positive_int(config, "outer.real_batch_size")
  smallest = int(data.class_counts().min())
  if config.outer.real_batch_size > smallest:
    raise ValueError(
        f"config.outer.real_batch_size={config.outer.real_batch_size} exceeds the {smallest} "
        f"training images of the smallest class of {data.name}; set it to at most {smallest}"
    )


def positive_int(config, name: str, *, zero_means: str | None = None) -> None:
  """One-line error unless `config.<name>` (dotted) is a positive int (or 0 when `zero_means`
  says what 0 stands for)."""
  value: Any = config
  for part in name.split("."):
    value = value[part]
  low = 0 if zero_means else 1
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    allowed = f"0 ({zero_means}) or a positive int" if zero_means else "a positive int"
    raise ValueError(f"config.{name} must be {allowed}, got {value!r}")
