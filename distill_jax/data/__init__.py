"""Datasets, preprocessing, real-data sampling and differentiable augmentation.

`load(name, split)` / `info(name)` / `DATASETS` (datasets.py), `fit_preprocessor` /
`Preprocessor` (preprocessing.py), `RealData` / `load_real` (real.py: the preprocessed dataset a
method distils and its fingerprint), `random_subset` / `balanced_indices` / `random_batch`
(sampling.py) and the DSA, FRePo and random-resized-crop augmentations (augment.py).
"""

from distill_jax.data import augment
from distill_jax.data import preprocessing
from distill_jax.data import sampling
from distill_jax.data.augment import AugParams
from distill_jax.data.augment import DEFAULT_STRATEGY
from distill_jax.data.augment import dsa
from distill_jax.data.augment import dsa_apply
from distill_jax.data.augment import dsa_params
from distill_jax.data.augment import frepo_apply
from distill_jax.data.augment import frepo_augment
from distill_jax.data.augment import frepo_params
from distill_jax.data.crops import rrc_apply
from distill_jax.data.crops import rrc_params
from distill_jax.data.datasets import DATASETS
from distill_jax.data.datasets import DataNotFoundError
from distill_jax.data.datasets import DatasetInfo
from distill_jax.data.datasets import DatasetSource
from distill_jax.data.datasets import fingerprint
from distill_jax.data.datasets import info
from distill_jax.data.datasets import load
from distill_jax.data.datasets import prepare
from distill_jax.data.files import read_idx
from distill_jax.data.preprocessing import Preprocessor
from distill_jax.data.preprocessing import fit_preprocessor
from distill_jax.data.sampling import balanced_indices
from distill_jax.data.real import RealData
from distill_jax.data.real import load_real
from distill_jax.data.sampling import random_batch
from distill_jax.data.sampling import class_indices
from distill_jax.data.sampling import random_subset

__all__ = [
    "AugParams",
    "DATASETS",
    "DEFAULT_STRATEGY",
    "DataNotFoundError",
    "DatasetInfo",
    "DatasetSource",
    "Preprocessor",
    "augment",
    "balanced_indices",
    "class_indices",
    "dsa",
    "dsa_apply",
    "dsa_params",
    "fingerprint",
    "fit_preprocessor",
    "frepo_apply",
    "frepo_augment",
    "frepo_params",
    "info",
    "load",
    "prepare",
    "preprocessing",
    "RealData",
    "load_real",
    "random_batch",
    "random_subset",
    "read_idx",
    "rrc_apply",
    "rrc_params",
    "sampling",
]
