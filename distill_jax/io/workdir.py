"""The workdir contract (DESIGN.md section 6): one folder per run, rerunning the command resumes.

```
<workdir>/
  config.json      the experiment config, written once; a rerun must bring the same config
  metrics.jsonl    one JSON object per logged step (`MetricWriter`)
  tensorboard/     TensorBoard event files of the same scalars
  checkpoints/     Orbax checkpoints (`Checkpointer`)
  images/          grids of the distilled set (`save_grid`, `save_heatmap`)
  distilled/       the final distilled set (`distill_jax.distilled.save`)
  report.json      the run's result (accuracy, storage, timings), written atomically
```
"""

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from distill_jax.io._atomic import atomic_write_text


class ConfigMismatchError(ValueError):
  """`config.json` of a workdir holds a different config than the one being run."""


def _to_jsonable(value: Any, where: str) -> Any:
  """Converts configs, tuples and numpy/jax scalars into plain JSON values."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _to_jsonable(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
  if value is None or isinstance(value, (bool, int, str)):
    return value
  if isinstance(value, float):
    if not math.isfinite(value):
      return repr(value)  # JSON has no nan/inf; keep them readable rather than invalid.
    return value
  if hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy / jax arrays and scalars.
    array = np.asarray(value)
    return _to_jsonable(array.tolist(), where) if array.dtype.kind in "biuf" else str(array)
  raise ValueError(
      f"config value {where}={value!r} of type {type(value).__name__} cannot be written to JSON; "
      "use numbers, strings, bools, lists or nested configs"
  )


def _differences(old: Any, new: Any, where: str = "") -> list[tuple[str, str]]:
  """(dotted key, description) of every difference between two JSON configs."""
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new)):
      sub = f"{where}.{key}" if where else key
      if key not in old:
        out.append((sub, f"{sub} added"))
      elif key not in new:
        out.append((sub, f"{sub} removed"))
      else:
        out.extend(_differences(old[key], new[key], sub))
    return out
  return [] if old == new else [(where, f"{where or 'config'}: {old!r} -> {new!r}")]


def _read_json(path: str, what: str, fix: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"no {what} at {path}; {fix}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{what} at {path} is not valid JSON ({e}); delete it and {fix}") from e


class Workdir:
  """A run's folder with the layout above; created (with its subfolders) on construction.

  >>> import tempfile, ml_collections
  >>> wd = Workdir(tempfile.mkdtemp())
  >>> wd.write_config(ml_collections.ConfigDict({"ipc": 10, "eval": {"n": 5}}))
  []
  >>> wd.write_config(ml_collections.ConfigDict({"ipc": 10, "eval": {"n": 5}}))  # a rerun: fine
  []
  >>> wd.write_config(ml_collections.ConfigDict({"ipc": 10, "eval": {"n": 3}}),
  ...                 may_change=("eval",))  # accepted and rewritten
  ['eval.n: 5 -> 3']
  >>> wd.write_config(ml_collections.ConfigDict({"ipc": 50, "eval": {"n": 3}}))  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  distill_jax.io.workdir.ConfigMismatchError: ... holds a different config (ipc: 10 -> 50); ...
  """

  def __init__(self, path: str | os.PathLike):
    """Creates the folder `path` (`~` expanded) and its subfolders.

    Raises:
      ValueError: `path` is empty, is a file, or cannot be written (the message names the fix).
    """
    if not os.fspath(path).strip():
      raise ValueError("the workdir is empty; pass a folder for the run, e.g. --workdir=runs/my_run")
    self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(self.path) and not os.path.isdir(self.path):
      raise ValueError(f"workdir {self.path} is a file, not a folder; pass a folder for the run")
    try:
      for directory in (self.tensorboard_dir, self.checkpoint_dir, self.images_dir,
                        self.distilled_dir):
        os.makedirs(directory, exist_ok=True)
    except (NotADirectoryError, FileExistsError) as e:
      raise ValueError(f"cannot create the workdir {self.path}: {e.filename} is a file; pass "
                       "another --workdir") from None
    if not os.access(self.path, os.W_OK) or not os.access(self.checkpoint_dir, os.W_OK):
      if os.statvfs(self.path).f_flag & os.ST_RDONLY:  # No permission can fix this one.
        raise ValueError(f"workdir {self.path} is on a read-only file system; pass a --workdir "
                         "on a writable disk")
      raise ValueError(f"workdir {self.path} is not writable; pass a writable --workdir or fix "
                       "its permissions")

  def __repr__(self) -> str:
    return f"Workdir({self.path!r})"

  @property
  def config_path(self) -> str:
    return os.path.join(self.path, "config.json")

  @property
  def metrics_path(self) -> str:
    return os.path.join(self.path, "metrics.jsonl")

  @property
  def tensorboard_dir(self) -> str:
    return os.path.join(self.path, "tensorboard")

  @property
  def checkpoint_dir(self) -> str:
    return os.path.join(self.path, "checkpoints")

  @property
  def images_dir(self) -> str:
    return os.path.join(self.path, "images")

  @property
  def distilled_dir(self) -> str:
    return os.path.join(self.path, "distilled")

  @property
  def report_path(self) -> str:
    return os.path.join(self.path, "report.json")

  def write_config(self, config: ml_collections.ConfigDict | Mapping[str, Any], *,
                   may_change: tuple[str, ...] = ()) -> list[str]:
    """Writes `config` to `config.json`, or checks it equals the one already there.

    Args:
      config: the run's config.
      may_change: top-level blocks a rerun may change (e.g. `("eval",)`: evaluation settings
        do not touch what was distilled); such a change rewrites `config.json`.

    Returns:
      The differences from the stored config that were accepted (empty for a new or equal one).

    Raises:
      ConfigMismatchError: `config.json` exists and holds a different config outside
        `may_change` (a rerun must use the same config to resume; a new experiment needs a new
        workdir).
    """
    new = _to_jsonable(config, "")
    diffs = []
    if os.path.exists(self.config_path):
      old = _read_json(self.config_path, "config", "rerun")
      diffs = _differences(old, new)
      if any(key.split(".")[0] not in may_change for key, _ in diffs):
        shown = ", ".join(text for _, text in diffs[:5]) + (
            f", ... ({len(diffs)} differences)" if len(diffs) > 5 else ""
        )
        raise ConfigMismatchError(
            f"workdir {self.path} holds a different config ({shown}); rerun with the same config "
            "to resume, or pass a new --workdir for a new experiment"
        )
      if not diffs:
        return []
    atomic_write_text(self.config_path, json.dumps(new, indent=2, sort_keys=True) + "\n")
    return [text for _, text in diffs]

  def read_config(self) -> dict[str, Any]:
    """The config stored in `config.json` as a plain dict."""
    return _read_json(self.config_path, "config", "run the experiment first")

  def write_report(self, report: Mapping[str, Any]) -> None:
    """Writes `report.json` atomically (temporary file + `os.replace`), replacing any old one."""
    atomic_write_text(
        self.report_path, json.dumps(_to_jsonable(report, ""), indent=2, sort_keys=True) + "\n"
    )

  def read_report(self) -> dict[str, Any]:
    """The run's `report.json` as a dict.

    Raises:
      FileNotFoundError: the run has not finished (no report yet).
    """
    return _read_json(
        self.report_path, "report", "let the run finish (rerun the same command to resume it)"
    )
