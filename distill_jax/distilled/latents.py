"""`LatentSet`: latent codes with class labels and the decoder that turns them into images.

LatentDD (paper 002) distils codes `l = E(x)` of an autoencoder and hands the decoded images
`D(l)` to downstream training (section 3.2). A latent set stores the codes `z (N, h, w, c)`, the
labels, the decoder's parameters and, in `meta.decoder`, the decoder's spec (architecture and
arguments, `models.autoencoder.decoder_from_spec`), so a saved set decodes on its own.

Storage (D3 Appendix B.1, `distilled.storage`): the codes, the labels and the decoder's
parameters, 4 bytes each, when the decoder was trained for this set (the embedded autoencoder);
a public pretrained decoder (the spec's `"public"` entry names it and its weights' digest, the
paper's SD autoencoder) is not counted, the paper's convention, and `storage_without_decoder`
gives the other figure either way.

Training draws decoded images: `for_training()` decodes every code once (the paper: "decoding
latent codes into images ... only takes a few seconds once before evaluation") and returns them
as a `pixels` set.
"""

import dataclasses
import functools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.distilled import storage
from distill_jax.distilled.base import DistilledSet, SetMeta, register_kind
from distill_jax.distilled.pixels import PixelSet

_DECODE_BATCH = 500


@register_kind("latents")
@dataclasses.dataclass(frozen=True)
class LatentSet(DistilledSet):
  """Latent codes, class ids and decoder parameters (kind `"latents"`).

  Attributes:
    z: `(N, h, w, c)` float32 codes.
    y: `(N,)` int32 class ids.
    decoder: the decoder's "params" collection (a nested dict of arrays).
    meta: `SetMeta` with `decoder` = the JSON text of the decoder spec; `ipc` is the latents per
      class (LPC), `image_shape` the decoded images' shape.
  """

  z: Any
  y: Any
  decoder: Any
  meta: SetMeta = dataclasses.field(kw_only=True)

  def __post_init__(self):
    if not self.meta.decoder:
      raise ValueError("a LatentSet needs meta.decoder, the JSON spec of its decoder; build the "
                       "meta with decoder=json.dumps(autoencoder.decoder_spec())")
    if self.meta.label_kind != "class_ids":
      raise ValueError(f"a LatentSet holds class ids; build its meta with label_kind='class_ids', "
                       f"not {self.meta.label_kind!r}")
    if getattr(self.z, "ndim", 0) != 4:
      raise ValueError(f"LatentSet codes z must be (N, h, w, c), got shape "
                       f"{tuple(getattr(self.z, 'shape', ()))}")
    if tuple(self.y.shape) != (self.z.shape[0],):
      raise ValueError(f"LatentSet labels y have shape {tuple(self.y.shape)}; expected "
                       f"({self.z.shape[0]},), one class id per code")

  @property
  def num_examples(self) -> int:
    return int(self.z.shape[0])

  @property
  def spec(self) -> dict[str, Any]:
    """The decoder spec (`meta.decoder` parsed)."""
    return json.loads(self.meta.decoder)

  @property
  def decoder_is_public(self) -> bool:
    """Whether the decoder is a named public model (not counted in storage)."""
    return bool(self.spec.get("public"))

  def decode(self, z: Any) -> Any:
    """`(B, h, w, c)` codes -> `(B, H, W, ch)` images in the set's preprocessed space (a
    decoder whose spec says `"output": "pixels"` gives [0, 1] pixels, preprocessed here)."""
    images = _decode_fn(self.meta.decoder)(self.decoder, jnp.asarray(z, jnp.float32))
    if self.spec.get("output", "preprocessed") == "pixels":
      from distill_jax.data import Preprocessor  # Sets depend on data only to preprocess.

      images = Preprocessor.from_arrays(self.meta.preprocessing_arrays(),
                                        kind=self.meta.preprocessing_kind).apply(images)
    return images

  def draw(self, indices: Any, *, key: Any = None, epoch: Any = None,
           run_key: Any = None) -> tuple[Any, Any]:
    """`(decode(z[indices]), y[indices])` (jittable; training uses `for_training` instead)."""
    del key, epoch, run_key
    return self.decode(self.z[indices]), self.y[indices]

  def decoded(self) -> np.ndarray:
    """`(N, H, W, ch)` float32: every code decoded, in batches."""
    z = np.asarray(self.z, np.float32)
    parts = [np.asarray(self.decode(z[i:i + _DECODE_BATCH]))
             for i in range(0, len(z), _DECODE_BATCH)]
    return np.concatenate(parts).astype(np.float32)

  def for_training(self) -> PixelSet:
    """The decoded images with the labels, as a `pixels` set (decoded once)."""
    meta = dataclasses.replace(self.meta, decoder="")
    return PixelSet(self.decoded(), np.asarray(self.y, np.int32), meta=meta)

  def class_ids(self) -> np.ndarray:
    return np.asarray(self.y, np.int32)

  def preview(self) -> tuple[Any, np.ndarray]:
    return self.decoded(), self.class_ids()

  def storage_leaves(self) -> dict[str, Any]:
    """Codes and labels, plus the decoder unless it is a public pretrained one."""
    leaves = self.leaves()
    if self.decoder_is_public:
      leaves = {k: v for k, v in leaves.items() if not k.startswith("decoder/")}
    return leaves

  def baseline_ipc(self) -> int:
    """The equal-storage IPC (`storage.equal_storage_ipc`)."""
    return storage.equal_storage_ipc(self)

  def storage_without_decoder(self) -> int:
    """Bytes of the codes and labels alone (4 per value)."""
    return storage.BYTES_PER_VALUE * (math.prod(self.z.shape) + math.prod(self.y.shape))


@functools.lru_cache(maxsize=8)
def _decode_fn(spec_text: str):
  from distill_jax.models import autoencoder  # Sets depend on models only to decode.

  return jax.jit(autoencoder.decoder_from_spec(json.loads(spec_text)))
