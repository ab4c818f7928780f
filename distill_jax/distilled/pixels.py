"""`PixelSet`: synthetic images with hard, soft or learned labels and an optional learned lr."""

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from distill_jax.distilled.base import DistilledSet, SetMeta, register_kind


def _is_floating(dtype: Any) -> bool:
  return jnp.issubdtype(dtype, jnp.floating)


def _is_integer(dtype: Any) -> bool:
  return jnp.issubdtype(dtype, jnp.integer)


@register_kind("pixels")
@dataclasses.dataclass(frozen=True)
class PixelSet(DistilledSet):
  """Distilled images (FRePo, MTT, DC/DM, APM, D3S images): kind `"pixels"`.

  A pytree: `x`, `y` and `lr` are children, `meta` is static. The images live in the
  preprocessed space described by `meta.preprocessing` (invert it to view them).

  Attributes:
    x: `(N, H, W, channels)` floating images, `(H, W, channels) == meta.image_shape`.
    y: `(N,)` integer class ids (hard labels, `meta.label_kind == "class_ids"`) or `(N, C)`
      floating targets whose meaning `meta.label_kind` says ("learned" for FRePo's labels,
      "probabilities", "logits"), `C == meta.num_classes`.
    lr: optional learned scalar learning rate `()` (MTT's `syn_lr`), or None.
    meta: `SetMeta` (keyword-only).

  Construction checks the shapes; leading batch axes in front of `N` are allowed (a stack of
  sets from `jax.vmap`), then `y` and `lr` carry the same leading axes.

  >>> import jax
  >>> meta = SetMeta(method="random", dataset="digits", ipc=1, num_classes=3, image_shape=(8, 8, 1))
  >>> s = PixelSet(jnp.zeros((3, 8, 8, 1)), jnp.arange(3), meta=meta)
  >>> jax.jit(lambda t: jax.tree.map(lambda a: a + 1, t))(s).y.tolist()
  [1, 2, 3]
  >>> PixelSet(jnp.zeros((3, 8, 8, 1)), jnp.zeros((3, 3)), meta=meta)  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ValueError: PixelSet labels y of shape (3, 3) are (N, C) floats but meta.label_kind is ...
  """

  x: Any
  y: Any
  lr: Any = None
  meta: SetMeta = dataclasses.field(kw_only=True)

  def __post_init__(self):
    if not isinstance(self.meta, SetMeta):
      raise ValueError(f"PixelSet.meta must be a SetMeta, got {type(self.meta).__name__}")
    if isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool):
      object.__setattr__(self, "lr", np.asarray(self.lr, np.float32))
    for name in ("x", "y") + (() if self.lr is None else ("lr",)):
      if not hasattr(getattr(self, name), "shape"):
        raise ValueError(
            f"PixelSet.{name} must be an array, got {type(getattr(self, name)).__name__}; "
            "pass a numpy or jax array"
        )
    x, y, lr, meta = self.x, self.y, self.lr, self.meta
    if x.ndim < 4 or tuple(x.shape[-3:]) != meta.image_shape:
      raise ValueError(
          f"PixelSet images x have shape {tuple(x.shape)}; expected (N, *{meta.image_shape}) "
          "as meta.image_shape says (images are NHWC)"
      )
    if not _is_floating(x.dtype):
      raise ValueError(f"PixelSet images x have dtype {x.dtype}; cast them to float32")
    lead = tuple(x.shape[:-3])  # (N,) or (*batch, N).
    hard = meta.label_kind == "class_ids"
    if y.ndim != len(lead) + (0 if hard else 1) and y.ndim in (len(lead), len(lead) + 1):
      raise ValueError(
          f"PixelSet labels y of shape {tuple(y.shape)} are "
          f"{'(N, C) floats' if hard else '(N,) class ids'} but meta.label_kind is "
          f"{meta.label_kind!r}; build the meta with the label_kind of these labels"
      )
    if y.ndim == len(lead):
      if _is_floating(y.dtype):
        raise ValueError(
            f"PixelSet hard labels y of shape {tuple(y.shape)} have float dtype {y.dtype}; "
            "cast class ids to int32, or give soft labels of shape (N, num_classes)"
        )
    elif y.ndim == len(lead) + 1:
      if not _is_floating(y.dtype):
        raise ValueError(
            f"PixelSet soft labels y of shape {tuple(y.shape)} have dtype {y.dtype}; "
            "cast them to float32, or give hard labels of shape (N,)"
        )
      if y.shape[-1] != meta.num_classes:
        raise ValueError(
            f"PixelSet soft labels y have {y.shape[-1]} columns but meta.num_classes is "
            f"{meta.num_classes}; give y of shape {lead + (meta.num_classes,)}"
        )
    else:
      raise ValueError(
          f"PixelSet labels y have shape {tuple(y.shape)}; for images of shape {tuple(x.shape)} "
          f"give hard labels {lead} or soft labels {lead + (meta.num_classes,)}"
      )
    if tuple(y.shape[: len(lead)]) != lead:
      raise ValueError(
          f"PixelSet has {lead[-1]} images but labels y of shape {tuple(y.shape)}; "
          "give one label (row) per image"
      )
    if lr is not None:
      if tuple(lr.shape) != lead[:-1]:
        raise ValueError(
            f"PixelSet learned lr has shape {tuple(lr.shape)}; it must be a scalar (shape ())"
        )
      if not _is_floating(lr.dtype):
        raise ValueError(f"PixelSet learned lr has dtype {lr.dtype}; cast it to float32")

  @property
  def num_examples(self) -> int:
    """N, the number of synthetic images."""
    return int(self.x.shape[-4])

  def draw(self, indices: Any, *, key: Any = None, epoch: Any = None,
           run_key: Any = None) -> tuple[Any, Any]:
    """`(x[indices], y[indices])`: pixels need neither keys nor the epoch."""
    del key, epoch, run_key
    return self.x[indices], self.y[indices]

  def class_ids(self) -> np.ndarray:
    """`(N,)` int32: `y`, or the argmax of soft/learned labels."""
    y = np.asarray(self.y)
    return (y if self.label_kind == "class_ids" else np.argmax(y, axis=-1)).astype(np.int32)

  def preview(self) -> tuple[Any, np.ndarray]:
    return self.x, self.class_ids()

  def training_lr(self) -> float | None:
    return None if self.lr is None else float(np.asarray(self.lr))
