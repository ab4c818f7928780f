"""Distilled-set representations, their storage accounting (D3 Appendix B.1) and Orbax save/load.

Kinds register in `KINDS`; this package ships `pixels` (`PixelSet`), `relabelled`
(`RelabelledSet`, D3S's images with per-epoch teacher logits under recorded crops), `latents`
(`LatentSet`, LatentDD's codes with their decoder) and `distribution` (`DistributionSet`, D3's
latent priors with their decoders). A kind is a `DistilledSet` dataclass decorated with
`register_kind(name)`; `save`, `load`, `storage_bytes` and `ipc_equivalent` then work for it
unchanged.
"""

from distill_jax.distilled.base import KINDS, DistilledSet, SetMeta, register_kind
from distill_jax.distilled.pixels import PixelSet
from distill_jax.distilled.latents import LatentSet
from distill_jax.distilled.distribution import DistributionSet, merge_subtasks
from distill_jax.distilled.merge import merge
from distill_jax.distilled.relabelled import RelabelledSet, relabel
from distill_jax.distilled.serialization import DistilledSetError, load, save
from distill_jax.distilled.storage import ipc_equivalent, storage_bytes, storage_mb

__all__ = [
    "KINDS",
    "DistilledSet",
    "DistilledSetError",
    "DistributionSet",
    "LatentSet",
    "PixelSet",
    "RelabelledSet",
    "SetMeta",
    "ipc_equivalent",
    "load",
    "merge",
    "merge_subtasks",
    "register_kind",
    "relabel",
    "save",
    "storage_bytes",
    "storage_mb",
]
