"""Distilled-set representations, their storage accounting (D3 Appendix B.1) and Orbax save/load.

Kinds register in `KINDS`; this package ships `pixels` (`PixelSet`), `relabelled`
(`RelabelledSet`, D3S's images with per-epoch teacher logits under recorded crops) and `latents`
(`LatentSet`, LatentDD's codes with their decoder). Later kinds (latents,
distribution, relabelled) are `DistilledSet` dataclasses decorated with `register_kind(name)`;
`save`, `load`, `storage_bytes` and `ipc_equivalent` then work for them unchanged.
"""

from distill_jax.distilled.base import KINDS, DistilledSet, SetMeta, register_kind
from distill_jax.distilled.pixels import PixelSet
from distill_jax.distilled.latents import LatentSet
from distill_jax.distilled.merge import merge
from distill_jax.distilled.relabelled import RelabelledSet, relabel
from distill_jax.distilled.serialization import DistilledSetError, load, save
from distill_jax.distilled.storage import ipc_equivalent, storage_bytes, storage_mb

__all__ = [
    "KINDS",
    "DistilledSet",
    "DistilledSetError",
    "LatentSet",
    "PixelSet",
    "RelabelledSet",
    "SetMeta",
    "ipc_equivalent",
    "load",
    "merge",
    "register_kind",
    "relabel",
    "save",
    "storage_bytes",
    "storage_mb",
]
