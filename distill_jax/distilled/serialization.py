"""`save`/`load` of distilled sets through Orbax, with their metadata, atomically.

On disk a set is one Orbax composite checkpoint directory:

```
<path>/
  _CHECKPOINT_METADATA, commit_success.txt   (Orbax)
  arrays/      the set's arrays and the numeric preprocessing arrays (StandardSave, OCDBT)
  meta/        JSON: format version, kind, SetMeta fields, array names/shapes/dtypes/sha256,
               string-valued preprocessing entries
```

Atomicity: Orbax writes into `<tmp>.orbax-checkpoint-tmp-*` and renames it when complete, so a
killed save never leaves a directory at the final name. `save` first saves to a hidden sibling
`.<name>.saving-<id>` and then swaps it in with two renames, so `<path>` is at every instant the
complete old set, the complete new set, or absent (never a mix). `load` checks the sha256 of
every array, so a damaged file cannot load as a valid set.
"""

import hashlib
import os
import uuid
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.handlers.composite_checkpoint_handler import CompositeOptions
from etils import epath

from distill_jax.distilled.base import KINDS, DistilledSet, SetMeta

FORMAT = "distill_jax.distilled_set"
FORMAT_VERSION = 1


class DistilledSetError(ValueError):
  """A distilled set that cannot be loaded (missing, incomplete or corrupt); says what to do."""


def _sha256(array: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _describe(array: np.ndarray, key: str) -> dict[str, Any]:
  return {
      "key": key,
      "shape": list(array.shape),
      "dtype": array.dtype.str,
      "sha256": _sha256(array),
  }


def _checkpointer() -> ocp.Checkpointer:
  """Orbax's composite checkpointer for one process alone: a set is saved by process 0 and
  loaded by every process, so Orbax must not wait at barriers for the job's other processes
  (`jax.distributed`); with one process this is Orbax's default."""
  me = jax.process_index()
  alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
  return ocp.Checkpointer(
      ocp.CompositeCheckpointHandler(
          composite_options=CompositeOptions(multiprocessing_options=alone),
          arrays=ocp.StandardCheckpointHandler(multiprocessing_options=alone),
          meta=ocp.JsonCheckpointHandler(multiprocessing_options=alone),
      ),
      multiprocessing_options=alone,
  )


def save(path: str | os.PathLike, distilled_set: DistilledSet) -> None:
  """Saves `distilled_set` (arrays and `meta`, preprocessing included) to directory `path`.

  An existing set at `path` is replaced atomically (see the module docstring); the parent
  directory is created if needed.

  Args:
    path: directory to write, e.g. `workdir.distilled_dir`.
    distilled_set: any registered kind (`KINDS`), e.g. a `PixelSet`.
  """
  if not isinstance(distilled_set, DistilledSet) or distilled_set.kind not in KINDS:
    raise ValueError(
        f"save() needs a registered distilled set (kinds: {', '.join(KINDS.names())}), "
        f"got {type(distilled_set).__name__}"
    )
  final = epath.Path(os.path.abspath(os.fspath(path)))
  final.parent.mkdir(parents=True, exist_ok=True)
  # Leftovers of saves killed before their swap: nothing loads them, so they are only clutter.
  for stale in final.parent.glob(f".{final.name}.saving-*"):
    stale.rmtree()

  tree, array_entries = {}, {}
  for i, (name, array) in enumerate(distilled_set.arrays().items()):
    tree[f"a{i}"] = array
    array_entries[name] = _describe(array, f"a{i}")
  preprocessing_entries = {}
  for i, (name, value) in enumerate(distilled_set.meta.preprocessing.items()):
    if isinstance(value, str):
      preprocessing_entries[name] = {"type": "str", "value": value}
    elif value.dtype.kind == "U":  # Orbax stores numbers only; strings go to the JSON.
      preprocessing_entries[name] = {
          "type": "str_array",
          "value": value.tolist(),
          "shape": list(value.shape),
          "dtype": value.dtype.str,
      }
    else:
      tree[f"p{i}"] = value
      preprocessing_entries[name] = {"type": "array", **_describe(value, f"p{i}")}
  record = {
      "format": FORMAT,
      "version": FORMAT_VERSION,
      "kind": distilled_set.kind,
      "meta": distilled_set.meta.to_json(),
      "arrays": array_entries,
      "preprocessing": preprocessing_entries,
  }

  staging = final.parent / f".{final.name}.saving-{uuid.uuid4().hex}"
  checkpointer = _checkpointer()
  try:
    checkpointer.save(
        staging,
        ocp.args.Composite(arrays=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(record)),
    )
  finally:
    checkpointer.close()
  if final.exists():
    previous = final.parent / f".{final.name}.replaced-{uuid.uuid4().hex}"
    final.rename(previous)
    staging.rename(final)
    previous.rmtree()
  else:
    staging.rename(final)


def _load_error(path: epath.Path, problem: str) -> DistilledSetError:
  return DistilledSetError(
      f"{path} is not a complete distilled set ({problem}); delete it and save the set again "
      "(rerun the distillation: it resumes from its checkpoints)"
  )


def _restore(checkpointer: ocp.Checkpointer, final: epath.Path) -> tuple[dict, dict]:
  """The JSON record and the checksum-verified numeric arrays of the set at `final`."""
  try:
    record = checkpointer.restore(final, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # Orbax raises assorted types for unreadable JSON; all mean "corrupt".
    raise _load_error(final, f"unreadable metadata: {_first_line(e)}") from e
  if not isinstance(record, dict) or record.get("format") != FORMAT:
    raise _load_error(final, "metadata is not a distill_jax distilled set")
  if record.get("version") != FORMAT_VERSION:
    raise DistilledSetError(
        f"{final} has format version {record.get('version')}, this distill_jax reads version "
        f"{FORMAT_VERSION}; load it with the distill_jax version that saved it"
    )

  numeric = dict(record["arrays"])
  numeric.update(
      (f"preprocessing:{name}", entry)
      for name, entry in record["preprocessing"].items()
      if entry["type"] == "array"
  )
  target = {e["key"]: np.empty(e["shape"], np.dtype(e["dtype"])) for e in numeric.values()}
  try:
    restored = checkpointer.restore(
        final, ocp.args.Composite(arrays=ocp.args.StandardRestore(target))
    )["arrays"]
  except Exception as e:  # Tensorstore/Orbax errors of missing or damaged files.
    raise _load_error(final, f"unreadable arrays: {_first_line(e)}") from e
  values = {}
  for name, entry in numeric.items():
    array = np.asarray(restored[entry["key"]])
    if (
        array.dtype.str != entry["dtype"]
        or list(array.shape) != entry["shape"]
        or _sha256(array) != entry["sha256"]
    ):
      raise _load_error(final, f"array {name!r} does not match its recorded checksum")
    values[name] = array
  return record, values


def load(path: str | os.PathLike) -> DistilledSet:
  """Loads a set written by `save`; its arrays come back as numpy arrays of the saved dtypes.

  Raises:
    DistilledSetError: `path` is missing, or holds an incomplete or corrupt save.
  """
  final = epath.Path(os.path.abspath(os.fspath(path)))
  if not final.exists():
    replaced = (
        sorted(final.parent.glob(f".{final.name}.replaced-*")) if final.parent.exists() else []
    )
    hint = (
        f"; a save was interrupted while replacing it: the previous set is in {replaced[-1]}, "
        f"rename it to {final.name}"
        if replaced
        else "; run the distillation (or distill_jax.distilled.save) first, or fix the path"
    )
    raise DistilledSetError(f"no distilled set at {final}{hint}")
  if not (final / "meta").is_dir() or not (final / "arrays").is_dir():
    raise _load_error(final, "no meta/ and arrays/ folders")

  checkpointer = _checkpointer()
  try:
    record, values = _restore(checkpointer, final)
  finally:
    checkpointer.close()

  preprocessing = {}
  for name, entry in record["preprocessing"].items():
    if entry["type"] == "str":
      preprocessing[name] = entry["value"]
    elif entry["type"] == "str_array":
      preprocessing[name] = np.array(entry["value"], np.dtype(entry["dtype"])).reshape(
          entry["shape"]
      )
    else:
      preprocessing[name] = values[f"preprocessing:{name}"]
  set_arrays = {name: values[name] for name in record["arrays"]}
  fields = dict(record["meta"])
  if "label_kind" not in fields:  # Saved before sets said what their labels are.
    labels = set_arrays.get("y")
    fields["label_kind"] = "learned" if labels is not None and labels.ndim == 2 else "class_ids"
  meta = SetMeta(**fields, preprocessing=preprocessing)
  return KINDS.get(record["kind"]).from_arrays(set_arrays, meta)


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:200] if text else ''}"
