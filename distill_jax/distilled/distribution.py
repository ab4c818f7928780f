"""`DistributionSet`: D3's latent Gaussian priors per class with the decoder(s) that sample them.

D3 (paper 000, section 2.2 and App. B.2) distils a class into LPC (latent priors per class)
diagonal Gaussians `N(mu, diag(exp(logvar)))` in a `z`-dimensional latent space and a decoder
`g_theta` trained with them; a network trained on the set sees fresh samples
`g_theta(mu + exp(logvar / 2) * eps)`, `eps ~ N(0, I)`, at every step (the released
`TinyVAE.forward`, called on every training batch by `utils.epoch`).

A set merged from k subtasks (federated distillation, section 2.3) keeps the k decoders: prior i
decodes with decoder `part[i]`, each decoder's batch-norm statistics taken over the rows of its
own part (`models.decoders.BatchStatNorm`'s mask).

Storage (D3 App. B.1, `distilled.storage`): every decoder parameter, the priors, the labels and
the learned lr, 4 bytes each; `part` is derived from the part sizes and is not counted. The
random subset evaluated beside the set stores at least as much (`storage.equal_storage_ipc`).
"""

import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.distilled import storage
from distill_jax.distilled.base import DistilledSet, SetMeta, register_kind

# Learned lr floor of the released evaluation: lr_net = relu(syn_lr) + 1e-4.
LR_FLOOR = 1e-4


@register_kind("distribution")
@dataclasses.dataclass(frozen=True)
class DistributionSet(DistilledSet):
  """Latent priors, labels, decoder parameters and an optional learned lr (kind
  `"distribution"`).

  Attributes:
    priors: `(N, z, 2)` float32: `[..., 0]` the means, `[..., 1]` the log-variances (the released
      `latent_syn` layout), sorted by class.
    y: `(N,)` int32 class ids, or `(N, C)` float targets per `meta.label_kind` (soft labels of a
      merged set, D3 App. E.3).
    decoders: `{"0": params, "1": params, ...}`, one decoder per subtask (one for a set distilled
      directly).
    part: `(N,)` int32, the decoder of every prior.
    lr: `()` float32 learned student lr (MTT's `syn_lr`), or None.
    meta: `SetMeta`; `ipc` is LPC, `decoder` the JSON spec shared by every decoder.
  """

  priors: Any
  y: Any
  decoders: Any
  part: Any
  lr: Any = None
  meta: SetMeta = dataclasses.field(kw_only=True)

  def __post_init__(self):
    if not self.meta.decoder:
      raise ValueError("a DistributionSet needs meta.decoder, the JSON spec of its decoder "
                       "(models.decoders.decoder_spec)")
    if getattr(self.priors, "ndim", 0) != 3 or self.priors.shape[-1] != 2:
      raise ValueError(f"DistributionSet priors must be (N, z, 2) (mean, log-variance), got "
                       f"shape {tuple(getattr(self.priors, 'shape', ()))}")
    n = self.priors.shape[0]
    hard = self.meta.label_kind == "class_ids"
    expected = (n,) if hard else (n, self.meta.num_classes)
    if tuple(self.y.shape) != expected:
      raise ValueError(f"DistributionSet labels y have shape {tuple(self.y.shape)}; expected "
                       f"{expected} for label_kind {self.meta.label_kind!r}")
    if tuple(self.part.shape) != (n,):
      raise ValueError(f"DistributionSet part has shape {tuple(self.part.shape)}; expected ({n},)")
    if not isinstance(self.decoders, dict) or not self.decoders:
      raise ValueError("DistributionSet decoders must be a non-empty dict {'0': params, ...}")
    if isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool):
      object.__setattr__(self, "lr", np.asarray(self.lr, np.float32))

  @property
  def num_examples(self) -> int:
    return int(self.priors.shape[0])

  @property
  def num_decoders(self) -> int:
    return len(self.decoders)

  def decode(self, z: Any, part: Any) -> Any:
    """`(B, z)` latents of parts `part (B,)` -> `(B, H, W, ch)` images, preprocessed space.

    Every decoder runs on the batch with batch-norm statistics over its own rows; each row
    keeps its own decoder's output.
    """
    decode = _decoder(self.meta.decoder)
    images = None
    for name, params in self.decoders.items():
      mine = part == int(name)
      out = decode(params, z, mask=mine if self.num_decoders > 1 else None)
      images = out if images is None else jnp.where(mine[:, None, None, None], out, images)
    if json.loads(self.meta.decoder)["kwargs"].get("output") == "pixels":
      from distill_jax.data import Preprocessor  # Sets depend on data only to preprocess.

      images = Preprocessor.from_arrays(self.meta.preprocessing_arrays(),
                                        kind=self.meta.preprocessing_kind).apply(images)
    return images

  def sample(self, indices: Any, key: Any) -> Any:
    """`(B, z)`: one draw `mu + exp(logvar / 2) * eps` of each prior in `indices (B,)`."""
    priors = jnp.asarray(self.priors)[indices]
    mean, logvar = priors[..., 0], priors[..., 1]
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)

  def draw(self, indices: Any, *, key: Any, epoch: Any = None,
           run_key: Any = None) -> tuple[Any, Any]:
    """A fresh sample of the priors `indices (B,)`, decoded: `(x (B, H, W, ch), y[indices])`."""
    del epoch, run_key
    indices = jnp.asarray(indices)
    z = self.sample(indices, key)
    return self.decode(z, jnp.asarray(self.part)[indices]), jnp.asarray(self.y)[indices]

  def mean_images(self) -> np.ndarray:
    """`(N, H, W, ch)`: every prior's mean decoded (the released `forward_fixed`)."""
    z = jnp.asarray(self.priors)[..., 0]
    return np.asarray(jax.jit(self.decode)(z, jnp.asarray(self.part)), np.float32)

  def with_soft_labels(self, logits_fn: Any) -> "DistributionSet":
    """This set relabelled with `y = softmax(logits_fn(mean_images()))`, `(N, C)` float32
    probabilities (`label_kind` "probabilities"; D3 App. E.3, the released `soft_label.py`: a
    full-task expert's softmax on every prior's mean decode). The labels count in storage.

    Args:
      logits_fn: `(N, H, W, ch)` preprocessed images -> `(N, C)` logits.
    """
    logits = np.asarray(logits_fn(jnp.asarray(self.mean_images())), np.float32)
    if logits.shape != (self.num_examples, self.meta.num_classes):
      raise ValueError(f"soft labels need ({self.num_examples}, {self.meta.num_classes}) logits "
                       f"(N, C), got {logits.shape}; label with a network of the whole task")
    probabilities = np.asarray(jax.nn.softmax(logits, axis=-1), np.float32)
    return dataclasses.replace(self, y=probabilities,
                               meta=dataclasses.replace(self.meta, label_kind="probabilities"))

  def class_ids(self) -> np.ndarray:
    y = np.asarray(self.y)
    return (y if y.ndim == 1 else y.argmax(-1)).astype(np.int32)

  def preview(self) -> tuple[Any, np.ndarray]:
    return self.mean_images(), self.class_ids()

  def training_lr(self) -> float | None:
    """The released evaluation's `relu(syn_lr) + 1e-4`, or None without a learned lr."""
    return None if self.lr is None else max(float(self.lr), 0.0) + LR_FLOOR

  def storage_leaves(self) -> dict[str, Any]:
    """Priors, labels, every decoder parameter and the lr; not `part` (implied by the parts'
    sizes)."""
    return {name: leaf for name, leaf in self.leaves().items() if name != "part"}

  def baseline_ipc(self) -> int:
    """The equal-storage IPC (`storage.equal_storage_ipc`)."""
    return storage.equal_storage_ipc(self)


@functools.lru_cache(maxsize=8)
def _decoder(spec_text: str):
  from distill_jax.models import autoencoder  # Sets depend on models only to decode.

  return autoencoder.decoder_from_spec(json.loads(spec_text))


def merge_subtasks(sets: list[DistributionSet], meta: Any) -> DistributionSet:
  """One set over all classes from k subtask sets (D3 section 2.3, Figure 2).

  Subtask j distilled classes `j C/k .. (j+1) C/k - 1` under local ids `0 .. C/k - 1`; the
  merged set keeps every decoder (`part = j` for subtask j's priors), concatenates the priors
  and maps the labels back to `j C/k + local` (the released `soft_label.py`'s
  `batch_no * vae_batch + i`). The learned lr is the mean of the subtasks' (ours: the release
  passes the evaluation lr on the command line).

  Args:
    sets: the k subtask sets, in subtask order, with hard labels and one decoder each.
    meta: the full task's `SetMeta` (its `num_classes` is k times theirs).

  Raises:
    ValueError: parts that cannot be merged (the message names what differs).
  """
  if not sets:
    raise ValueError("merge_subtasks needs the subtask sets, got none")
  local = sets[0].meta.num_classes
  if meta.num_classes != local * len(sets):
    raise ValueError(f"{len(sets)} subtasks of {local} classes do not make the task's "
                     f"{meta.num_classes} classes; merge every subtask of one split")
  for j, part in enumerate(sets):
    if part.num_decoders != 1 or part.meta.label_kind != "class_ids":
      raise ValueError(f"subtask {j} is already merged or relabelled; merge the subtask sets "
                       "as distilled")
    for field in ("num_classes", "decoder", "image_shape"):
      if getattr(part.meta, field) != getattr(sets[0].meta, field):
        raise ValueError(f"subtask {j} has another {field} than subtask 0; merge subtasks "
                         "distilled with one config")
  lrs = [float(s.lr) for s in sets if s.lr is not None]
  merged_meta = dataclasses.replace(meta, decoder=sets[0].meta.decoder,
                                    ipc=sets[0].meta.ipc, label_kind="class_ids")
  return DistributionSet(
      priors=np.concatenate([np.asarray(s.priors, np.float32) for s in sets]),
      y=np.concatenate([np.asarray(s.y, np.int32) + j * local for j, s in enumerate(sets)]),
      decoders={str(j): jax.device_get(next(iter(s.decoders.values())))
                for j, s in enumerate(sets)},
      part=np.concatenate([np.full(s.num_examples, j, np.int32) for j, s in enumerate(sets)]),
      lr=np.float32(np.mean(lrs)) if lrs else None,
      meta=merged_meta,
  )
