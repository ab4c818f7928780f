"""What every distilled-set kind shares: its metadata, the kind registry and the pytree plumbing.

A distilled set is a frozen dataclass whose array fields are pytree children (so `jax.jit`,
`jax.grad` and `jax.tree.map` see them) and whose `meta` field is static auxiliary data (so a
change of metadata is a change of program, never a traced value). Kinds register themselves in
`KINDS` with `register_kind(name)`; `distill_jax.distilled.save`/`load` and the storage accounting
only go through the methods of `DistilledSet`, so a new kind (latents, distributions, relabelled
sets) plugs in by registering a dataclass.
"""

import abc
import dataclasses
import hashlib
import types
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import jax
import numpy as np

from distill_jax.registry import Registry

# Separates a field name from the key path inside a nested field in `arrays()` names.
PATH_SEP = "/"

# What a set's labels are, which decides how a training loss uses them (never guessed from
# values): "class_ids" (N,) ints; "learned" (N, C) real-valued targets optimised with the set
# (FRePo), regressed as they are by MSE and read as logits by cross-entropy; "probabilities"
# (N, C) rows on the simplex; "logits" (N, C) or per-epoch teacher outputs (D3S, APM).
LABEL_KINDS = ("class_ids", "learned", "probabilities", "logits")


def _freeze_preprocessing(preprocessing: Mapping[str, Any]) -> Mapping[str, Any]:
  """A read-only copy of a preprocessing dict: read-only numpy arrays and strings."""
  if not isinstance(preprocessing, Mapping):
    raise ValueError(
        "SetMeta.preprocessing must be a dict with a 'kind' entry, got "
        f"{type(preprocessing).__name__}; "
        "pass {'kind': preprocessor_kind, **preprocessor.to_arrays()}"
    )
  if "kind" not in preprocessing:
    raise ValueError(
        f"SetMeta.preprocessing has no 'kind' entry (keys: {sorted(preprocessing)}); "
        "pass {'kind': preprocessor_kind, **preprocessor.to_arrays()}"
    )
  frozen = {}
  for name, value in preprocessing.items():
    if not isinstance(name, str) or not name:
      raise ValueError(f"SetMeta.preprocessing keys must be non-empty strings, got {name!r}")
    if isinstance(value, str):
      frozen[name] = value
      continue
    array = np.array(value)  # A copy: later edits of the caller's array must not leak in.
    if array.dtype.kind not in "biufcU":
      raise ValueError(
          f"SetMeta.preprocessing[{name!r}] has dtype {array.dtype}; "
          "use numeric or string numpy arrays (or str)"
      )
    array.flags.writeable = False
    frozen[name] = array
  kind = frozen["kind"]
  if not (
      isinstance(kind, str)
      or (isinstance(kind, np.ndarray) and kind.dtype.kind == "U" and kind.ndim == 0)
  ):
    raise ValueError(f"SetMeta.preprocessing['kind'] must be a string, got {kind!r}")
  # Read-only all the way down: the cached hash must stay true.
  return types.MappingProxyType(frozen)


def _fingerprint(value: Any) -> tuple:
  """A hashable summary of a preprocessing value that changes with every byte of an array."""
  if isinstance(value, str):
    return ("str", value)
  return ("array", value.dtype.str, value.shape, hashlib.sha256(value.tobytes()).hexdigest())


def _values_equal(a: Any, b: Any) -> bool:
  if isinstance(a, str) or isinstance(b, str):
    return isinstance(a, str) and isinstance(b, str) and a == b
  # Bytes comparison: exact and NaN-safe, unlike `==`.
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@dataclasses.dataclass(frozen=True, eq=False)
class SetMeta:
  """Static description of a distilled set: where it came from and how to turn it into images.

  It is the static (hashable) part of a set's pytree, so it must not hold traced values; equal
  metadata means an equal jit cache key. Preprocessing arrays (e.g. a ZCA matrix) are copied
  into read-only numpy arrays and hashed once.

  Attributes:
    method: distillation method name (e.g. "frepo").
    dataset: dataset name in `distill_jax.data.DATASETS`.
    ipc: images (or latents) per class the set was distilled with.
    num_classes: number of classes C.
    image_shape: `(H, W, channels)` of the images the set stands for.
    preprocessing: `{"kind": str, **arrays}`: the preprocessor that maps images to the space the
      set lives in, as `Preprocessor.to_arrays()` gives it plus its kind; values are numpy arrays
      (numeric or string) or str, round-tripped exactly by `save`/`load`.
    label_kind: one of `LABEL_KINDS`: what the set's labels are.
    decoder: for kinds that decode their examples (latents, distributions), the JSON text of
      the decoder's spec (`models.autoencoder.decoder_from_spec`); "" for the other kinds.

  >>> meta = SetMeta(method="frepo", dataset="digits", ipc=1, num_classes=10, image_shape=(8, 8, 1))
  >>> meta.preprocessing_kind
  'none'
  >>> meta == SetMeta(
  ...     method="frepo", dataset="digits", ipc=1, num_classes=10, image_shape=[8, 8, 1])
  True
  """

  method: str
  dataset: str
  ipc: int
  num_classes: int
  image_shape: tuple[int, int, int]
  preprocessing: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"kind": "none"})
  label_kind: str = "class_ids"
  decoder: str = ""

  def __post_init__(self):
    if not isinstance(self.decoder, str):
      raise ValueError(f"SetMeta.decoder must be the JSON text of a decoder spec, got "
                       f"{type(self.decoder).__name__}; pass json.dumps(spec)")
    if self.label_kind not in LABEL_KINDS:
      raise ValueError(
          f"SetMeta.label_kind {self.label_kind!r} is unknown; use one of {', '.join(LABEL_KINDS)}"
      )
    for name in ("method", "dataset"):
      if not isinstance(getattr(self, name), str) or not getattr(self, name):
        raise ValueError(f"SetMeta.{name} must be a non-empty string, got {getattr(self, name)!r}")
    for name in ("ipc", "num_classes"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"SetMeta.{name} must be a positive int, got {value!r}")
      object.__setattr__(self, name, int(value))
    shape = tuple(self.image_shape) if isinstance(self.image_shape, (tuple, list)) else None
    if (
        shape is None
        or len(shape) != 3
        or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in shape
        )
    ):
      raise ValueError(
          f"SetMeta.image_shape must be (H, W, channels) of positive ints, got {self.image_shape!r}"
      )
    object.__setattr__(self, "image_shape", tuple(int(d) for d in shape))
    object.__setattr__(self, "preprocessing", _freeze_preprocessing(self.preprocessing))
    # Cached: jit hashes the static part of its arguments on every call.
    key = self._scalars() + tuple(
        (name, _fingerprint(value)) for name, value in sorted(self.preprocessing.items())
    )
    object.__setattr__(self, "_hash", hash(key))

  def _scalars(self) -> tuple:
    return (self.method, self.dataset, self.ipc, self.num_classes, self.image_shape,
            self.label_kind, self.decoder)

  @property
  def preprocessing_kind(self) -> str:
    """The preprocessor kind, e.g. "none", "standardize", "zca_frepo"."""
    return str(self.preprocessing["kind"])

  def preprocessing_arrays(self) -> dict[str, Any]:
    """The preprocessing entries without `kind`, e.g. for `Preprocessor.from_arrays`."""
    return {name: value for name, value in self.preprocessing.items() if name != "kind"}

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other: object) -> bool:
    if self is other:
      return True
    if not isinstance(other, SetMeta) or hash(self) != hash(other):
      return False
    return (
        self._scalars() == other._scalars()
        and self.preprocessing.keys() == other.preprocessing.keys()
        and all(_values_equal(v, other.preprocessing[k]) for k, v in self.preprocessing.items())
    )

  def __repr__(self) -> str:
    # Summarise arrays: a ZCA matrix would otherwise flood every error message and log line.
    entries = ", ".join(
        f"{k}={v!r}" if isinstance(v, str) or v.ndim == 0 else f"{k}={v.dtype}{list(v.shape)}"
        for k, v in self.preprocessing.items()
    )
    return (
        f"SetMeta(method={self.method!r}, dataset={self.dataset!r}, ipc={self.ipc}, "
        f"num_classes={self.num_classes}, image_shape={self.image_shape}, "
        f"label_kind={self.label_kind!r}, preprocessing={{{entries}}}"
        + (f", decoder={self.decoder!r})" if self.decoder else ")")
    )

  def to_json(self) -> dict[str, Any]:
    """The scalar fields as a JSON-serialisable dict (preprocessing is stored separately)."""
    return {
        "method": self.method,
        "dataset": self.dataset,
        "ipc": self.ipc,
        "num_classes": self.num_classes,
        "image_shape": list(self.image_shape),
        "label_kind": self.label_kind,
        **({"decoder": self.decoder} if self.decoder else {}),
    }


def _leaf_name(field: str, path: tuple) -> str:
  """`decoder/params/Dense_0/kernel` for the leaf at key `path` inside `field`."""
  parts = [field]
  for entry in path:
    part = str(next(getattr(entry, a) for a in ("key", "name", "idx") if hasattr(entry, a)))
    if PATH_SEP in part:
      raise ValueError(
          f"key {part!r} in field {field!r} contains {PATH_SEP!r}, which separates names in "
          "arrays(); rename the key"
      )
    parts.append(part)
  return PATH_SEP.join(parts)


class DistilledSet(abc.ABC):
  """Base class of the distilled-set kinds; subclasses are dataclasses made by `register_kind`.

  A subclass declares its array fields (arrays, nested dicts of arrays such as decoder
  parameters, or None for an absent optional array) and `meta: SetMeta` as a keyword-only field,
  and implements the training protocol below. Evaluation, image grids and reports use nothing
  else, so a new kind (decoded latents, distributions sampled anew each step, relabelled images
  replayed with recorded crops) is evaluated without any change outside its module:

  - `num_examples`: N, the examples an epoch visits.
  - `draw(indices, key=, epoch=, run_key=)`: a training batch `(x (B, H, W, C), y)` for
    `indices (B,)`, pure and jittable (the set is a pytree argument of the trainer's step);
    `key` is fresh per step (kinds that sample use it), `epoch` is the epoch of the step and
    `run_key` a key fixed for one network's whole run (kinds that replay per-epoch labels use
    them: D3S's relabelled sets draw their epoch order from `run_key`; None means the recorded
    order). `y` is `(B,)` class ids or `(B, C)` floats per `label_kind`.
  - `label_kind`: what `y` is (`LABEL_KINDS`, from `meta`).
  - `class_ids()`: `(N,)` hard labels, for grids and class-balanced baselines.
  - `preview()`: `(images (N, H, W, C) in the preprocessed space, class ids (N,))` to show.
  - `training_lr()`: a learned learning rate the set carries (MTT), or None.
  - `for_training()`: the set the trainer draws from (default itself; latents decode once).
  """

  kind: ClassVar[str]
  meta: SetMeta

  @property
  @abc.abstractmethod
  def num_examples(self) -> int:
    """N, the number of training examples one epoch visits."""

  @property
  def label_kind(self) -> str:
    """What the labels `draw` returns are: one of `LABEL_KINDS`."""
    return self.meta.label_kind

  @abc.abstractmethod
  def draw(self, indices: Any, *, key: Any, epoch: Any, run_key: Any = None) -> tuple[Any, Any]:
    """The training batch of examples `indices (B,)`: `(x (B, H, W, C), y)`; jittable."""

  @abc.abstractmethod
  def class_ids(self) -> np.ndarray:
    """`(N,)` int32 hard labels (the argmax of soft ones)."""

  def preview(self) -> tuple[Any, np.ndarray]:
    """`(x (N, H, W, C), class ids (N,))`: what an image grid of the set shows."""
    indices = np.arange(self.num_examples)
    x, _ = self.draw(indices, key=jax.random.key(0), epoch=0)
    return x, self.class_ids()

  def training_lr(self) -> float | None:
    """The learning rate the set was distilled for (MTT's learned lr), or None."""
    return None

  def baseline_ipc(self) -> int:
    """Images per class of the random real subset evaluated beside the set: `meta.ipc` for
    kinds whose examples are images (the subset stores the same images and labels); kinds that
    store something else (codes and a decoder) override it with an equal-storage IPC."""
    return self.meta.ipc

  def for_training(self) -> "DistilledSet":
    """The set as a network trains on it: itself, or an equivalent set that draws faster (a
    latent set decodes all its codes once and returns the images as a `pixels` set)."""
    return self

  def data_fields(self) -> tuple[str, ...]:
    """Names of the fields that are pytree children (every field but `meta`)."""
    return type(self)._data_fields

  def leaves(self) -> dict[str, Any]:
    """Flat `{name: array}` of the array leaves, without copying them off the device.

    Nested fields are named `field/key/...`; absent (None) fields are left out.
    """
    out = {}
    for field in self.data_fields():
      value = getattr(self, field)
      if value is None:
        continue
      for path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
        out[_leaf_name(field, path)] = leaf
    return out

  def arrays(self) -> dict[str, np.ndarray]:
    """Flat `{name: numpy array}` of every array of the set, in their own dtypes.

    >>> from distill_jax.distilled import PixelSet
    >>> meta = SetMeta(
    ...     method="random", dataset="digits", ipc=1, num_classes=2, image_shape=(2, 2, 1))
    >>> s = PixelSet(np.zeros((2, 2, 2, 1), np.float32), np.array([0, 1], np.int32), meta=meta)
    >>> {name: a.shape for name, a in s.arrays().items()}
    {'x': (2, 2, 2, 1), 'y': (2,)}
    """
    return {name: np.asarray(jax.device_get(leaf)) for name, leaf in self.leaves().items()}

  def storage_leaves(self) -> dict[str, Any]:
    """The arrays a downstream user must store to regenerate every training example.

    Defaults to all of them; a kind whose decoder is a named public model (not stored) overrides
    this to leave the decoder out.
    """
    return self.leaves()

  @classmethod
  def from_arrays(cls, arrays: Mapping[str, np.ndarray], meta: SetMeta) -> "DistilledSet":
    """Rebuilds a set from `arrays()` output; nested names `field/a/b` become nested dicts."""
    fields = {}
    for name, array in arrays.items():
      field, *rest = name.split(PATH_SEP)
      if field not in cls._data_fields:
        raise ValueError(
            f"array {name!r} does not belong to a {cls.kind!r} set "
            f"(fields: {', '.join(cls._data_fields)})"
        )
      if not rest:
        fields[field] = array
        continue
      node = fields.setdefault(field, {})
      for part in rest[:-1]:
        node = node.setdefault(part, {})
      node[rest[-1]] = array
    return cls(**fields, meta=meta)

  def replace(self, **changes: Any) -> "DistilledSet":
    """A copy with some fields replaced (validated like a new set)."""
    return dataclasses.replace(self, **changes)


S = TypeVar("S", bound=type[DistilledSet])

KINDS: Registry[type[DistilledSet]] = Registry("distilled-set kind")


def register_kind(name: str):
  """Class decorator: makes a `DistilledSet` dataclass a pytree and registers it in `KINDS`.

  Array fields become pytree children with `GetAttrKey` paths; `meta` is static aux data.
  Unflattening bypasses `__init__`, so the shape checks of a kind run when a user builds a set
  but not when JAX rebuilds one from transformed leaves (tracers, `vmap` axes, cotangents).
  """

  def decorate(cls: S) -> S:
    if not (dataclasses.is_dataclass(cls) and issubclass(cls, DistilledSet)):
      raise ValueError(f"register_kind({name!r}) needs a DistilledSet dataclass, got {cls!r}")
    if name in KINDS:
      raise ValueError(f"distilled-set kind {name!r} is already registered; pick another name")
    names = tuple(f.name for f in dataclasses.fields(cls))
    if "meta" not in names:
      raise ValueError(f"{cls.__name__} needs a `meta: SetMeta` field")
    data_fields = tuple(n for n in names if n != "meta")
    cls.kind = name
    cls._data_fields = data_fields

    def flatten_with_keys(obj):
      children = tuple((jax.tree_util.GetAttrKey(f), getattr(obj, f)) for f in data_fields)
      return children, obj.meta

    def flatten(obj):
      return tuple(getattr(obj, f) for f in data_fields), obj.meta

    def unflatten(meta, children):
      obj = object.__new__(cls)
      for f, child in zip(data_fields, children):
        object.__setattr__(obj, f, child)
      object.__setattr__(obj, "meta", meta)
      return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    KINDS.register(name, cls)
    return cls

  return decorate
