"""`RelabelledSet`: images with teacher logits recorded under random crops, epoch by epoch.

SRe2L's relabelling, as D3S uses it (paper 001, Section 4.3, Algorithm 2 and Appendix A.3): for
each of E_L epochs, every image gets a RandomResizedCrop + horizontal flip whose parameters are
recorded, and the teachers' mean logits on that view (ensemble labelling, ENL; one teacher
without it). A network then trains on the recorded views with knowledge distillation against the
recorded logits (Algorithm 4); `draw(indices, epoch=e, run_key=k)` replays training epoch e as
recorded epoch `order(e)`: the E_L epochs in a random permutation per pass, passes concatenated
(Appendix D.7: E_T > E_L repeats the labels, E_T < E_L uses the first E_T of a permutation), the
permutations drawn from the network's `run_key` so every network sees its own order.

Storage (`storage_bytes`, D3 Appendix B.1) counts the images, the class ids, the `(E_L, N, C)`
logits and the `(E_L, N, 5)` crop parameters, each value 4 bytes: on Fashion-MNIST at IPC 10 with
E_L = 25 the set stores about 14.8 images per class.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.data import crops
from distill_jax.distilled.base import DistilledSet, SetMeta, register_kind

# Columns of `crops`: torchvision RandomResizedCrop's box, then the flip decision (0/1).
CROP_FIELDS = ("top", "left", "height", "width", "flip")


@register_kind("relabelled")
@dataclasses.dataclass(frozen=True)
class RelabelledSet(DistilledSet):
  """Images, their class ids, and per-epoch teacher logits under recorded crops.

  Attributes:
    x: `(N, H, W, ch)` float32 images in the preprocessed space.
    y: `(N,)` int32 class ids the images were made for (grids, balanced baselines).
    logits: `(E_L, N, C)` float32 teacher logits of each epoch's recorded view.
    crops: `(E_L, N, 5)` int32 views: top, left, height, width of the crop box, flip (0/1).
    meta: `SetMeta` with `label_kind="logits"`.
  """

  x: Any
  y: Any
  logits: Any
  crops: Any
  meta: SetMeta = dataclasses.field(kw_only=True)

  def __post_init__(self):
    n = self.x.shape[0]
    if self.meta.label_kind != "logits":
      raise ValueError(f"a RelabelledSet holds logits; build its meta with label_kind='logits', "
                       f"not {self.meta.label_kind!r}")
    if tuple(self.x.shape[1:]) != self.meta.image_shape:
      raise ValueError(f"RelabelledSet images have shape {tuple(self.x.shape)}; expected "
                       f"(N, *{self.meta.image_shape})")
    if self.y.shape != (n,):
      raise ValueError(f"RelabelledSet class ids y have shape {tuple(self.y.shape)}; expected ({n},)")
    epochs = self.logits.shape[0] if self.logits.ndim == 3 else -1
    if self.logits.shape != (epochs, n, self.meta.num_classes) or epochs < 1:
      raise ValueError(f"RelabelledSet logits have shape {tuple(self.logits.shape)}; expected "
                       f"(epochs, {n}, {self.meta.num_classes})")
    if self.crops.shape != (epochs, n, len(CROP_FIELDS)):
      raise ValueError(f"RelabelledSet crops have shape {tuple(self.crops.shape)}; expected "
                       f"({epochs}, {n}, {len(CROP_FIELDS)}) ({', '.join(CROP_FIELDS)})")

  @property
  def num_examples(self) -> int:
    return int(self.x.shape[0])

  @property
  def num_epochs(self) -> int:
    """E_L, the recorded epochs."""
    return int(self.logits.shape[0])

  def recorded_epoch(self, epoch: Any, run_key: Any = None) -> Any:
    """The recorded epoch a training epoch replays (see the module docstring); `run_key=None`
    replays the recorded order `epoch mod E_L`."""
    position = epoch % self.num_epochs
    if run_key is None:
      return position
    order = jax.random.permutation(jax.random.fold_in(run_key, epoch // self.num_epochs),
                                   self.num_epochs)
    return order[position]

  def draw(self, indices: Any, *, key: Any = None, epoch: Any = 0,
           run_key: Any = None) -> tuple[Any, Any]:
    """The recorded views of `indices` in training epoch `epoch` and their recorded logits."""
    del key
    recorded = self.recorded_epoch(epoch, run_key)
    views = jnp.asarray(self.crops)[recorded, indices]
    params = {name: views[:, i] for i, name in enumerate(CROP_FIELDS)}
    params["flip"] = params["flip"] > 0
    x = crops.rrc_apply(jnp.asarray(self.x)[indices], params, size=self.meta.image_shape[:2])
    return x, jnp.asarray(self.logits)[recorded, indices]

  def class_ids(self) -> np.ndarray:
    return np.asarray(self.y, np.int32)

  def preview(self) -> tuple[Any, np.ndarray]:
    return self.x, self.class_ids()


def relabel(x: Any, y: Any, label_fn: Callable[[Any], Any], *, epochs: int, key: jax.Array,
            meta: SetMeta, batch_size: int = 1000) -> RelabelledSet:
  """D3S Algorithm 2: record `epochs` random crops of every image and `label_fn`'s logits on them.

  Epoch e draws torchvision RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) + flip parameters
  for all N images from `fold_in(key, e)`.

  Args:
    x: `(N, H, W, ch)` images.
    y: `(N,)` class ids.
    label_fn: `views (B, H, W, ch) -> logits (B, C)` (e.g. `TeacherPool.ensemble_logits`).
    epochs: E_L.
    key: the relabelling key.
    meta: the set's metadata (its label_kind becomes "logits").
    batch_size: views per `label_fn` call.
  """
  if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
    raise ValueError(f"relabelling needs a positive number of epochs, got {epochs!r}")
  x = np.asarray(x, np.float32)
  n, size = len(x), x.shape[1:3]
  all_logits, all_crops = [], []
  for e in range(epochs):
    params = crops.rrc_params(jax.random.fold_in(key, e), n, image_shape=x.shape[1:])
    views = np.asarray(crops.rrc_apply(x, params, size=size))
    all_logits.append(np.concatenate([np.asarray(label_fn(views[s:s + batch_size]), np.float32)
                                      for s in range(0, n, batch_size)]))
    all_crops.append(np.stack([np.asarray(params[f], np.int32) for f in CROP_FIELDS], axis=-1))
  return RelabelledSet(x=x, y=np.asarray(y, np.int32), logits=np.stack(all_logits),
                       crops=np.stack(all_crops),
                       meta=dataclasses.replace(meta, label_kind="logits"))
