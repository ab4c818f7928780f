"""Metric writers: `metrics.jsonl` plus TensorBoard events, and a console progress logger."""

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tensorboardX
import tqdm.auto
from absl import logging

from distill_jax.io._atomic import atomic_write_text
from distill_jax.io.workdir import Workdir


def _scalar(name: str, value: Any) -> int | float | bool:
  """A Python number from a Python, numpy or (one-element) jax value."""
  if isinstance(value, (bool, int, float)):
    return value
  if hasattr(value, "shape") and hasattr(value, "dtype"):
    array = np.asarray(jax.device_get(value))
    if array.size == 1 and array.dtype.kind in "biuf":
      return array.reshape(()).item()
  raise ValueError(
      f"metric {name!r} is {type(value).__name__} {getattr(value, 'shape', '')}; "
      "log one number per metric (reduce arrays with .mean() first)"
  )


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a `metrics.jsonl` file in file order, skipping a torn last line (killed writer).

  Raises:
    ValueError: a line other than the last is not valid JSON.
  """
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i >= len(lines) - 1:  # Only the last line can be torn by a kill mid-write.
        break
      raise ValueError(
          f"{path} line {i + 1} is not valid JSON ({e}); delete the line or the file"
      ) from e
  return records


def _drop_torn_tail(path: str) -> None:
  """Cuts a last line that lacks its newline (a killed write) so appends start on a fresh line."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    data = f.read()
    if data and not data.endswith(b"\n"):
      keep = data.rfind(b"\n") + 1
      logging.warning("dropping a torn last line of %s: %r", path, data[keep:][:200])
      f.truncate(keep)


class MetricWriter:
  """Appends `{"step": s, name: value, ...}` lines to `metrics.jsonl` and TensorBoard scalars.

  Each line is flushed as written, so a killed run loses at most the line being written. On
  resume, `truncate(restored_step)` drops the lines (and TensorBoard events) of steps that the
  killed run logged after its last checkpoint, so the rerun does not log them twice.

  >>> import tempfile
  >>> wd = Workdir(tempfile.mkdtemp())
  >>> with MetricWriter(wd) as writer:
  ...   writer.write(1, loss=0.5)
  ...   writer.write(2, loss=0.25, accuracy=0.75)
  >>> read_metrics(wd.metrics_path)
  [{'step': 1, 'loss': 0.5}, {'step': 2, 'loss': 0.25, 'accuracy': 0.75}]

  In multi-host runs, write from process 0 only (every process would append its own lines).

  Args:
    workdir: a `Workdir` or its path.
  """

  def __init__(self, workdir: Workdir | str | os.PathLike):
    self.workdir = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
    self._file = None
    self._tensorboard = None
    self._purge_step = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def write(self, step: int, /, **scalars: Any) -> None:
    """Logs scalar metrics of `step` (jax values are fetched from the device here).

    Non-finite values are written as JSON `NaN`/`Infinity` (Python's `json` reads them back).
    """
    if "step" in scalars:
      raise ValueError("'step' is the first argument of write(); do not pass it as a metric name")
    record = {"step": int(step)}
    record.update((name, _scalar(name, value)) for name, value in scalars.items())
    if self._file is None:
      _drop_torn_tail(self.workdir.metrics_path)
      self._file = open(self.workdir.metrics_path, "a", encoding="utf-8")
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tensorboard is None:
      # purge_step makes TensorBoard drop events a killed run logged past the restored step.
      # The suffix keeps event files of writers opened in the same second apart (tensorboardX
      # names files by whole seconds and would overwrite) and in creation order for TensorBoard.
      self._tensorboard = tensorboardX.SummaryWriter(
          self.workdir.tensorboard_dir,
          purge_step=self._purge_step,
          filename_suffix=f".{time.time_ns():020d}",
      )
      self._purge_step = None
    for name, value in record.items():
      if name != "step":
        self._tensorboard.add_scalar(name, float(value), global_step=record["step"])
    self._tensorboard.flush()

  def truncate(self, after_step: int) -> None:
    """Drops logged records with `step > after_step` (call it when resuming from `after_step`)."""
    self.close()
    path = self.workdir.metrics_path
    if os.path.exists(path):
      kept = [r for r in read_metrics(path) if r["step"] <= after_step]
      atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    self._purge_step = after_step + 1

  def close(self) -> None:
    """Flushes and closes the files (a later `write` reopens them)."""
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None


def format_duration(seconds: float) -> str:
  """`3725.0 -> '1h02m05s'`, `65 -> '1m05s'`, `4.2 -> '4s'`; unknown (inf/nan) -> `'?'`."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m{secs:02d}s"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


def _watched() -> bool:
  """Whether a person watches: a terminal on stderr, or a Jupyter kernel (where absl's INFO
  lines do not show)."""
  return "ipykernel" in sys.modules or (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())


class ProgressLogger:
  """Logs (absl, INFO) step, loss and other scalars, steps/s and ETA every `every` steps.

  The rate is measured over the steps since the previous log line (create the logger after
  compiling, as the run loop does, so that the ETA leaves the compilation out). Scalars may be
  jax values; they are only fetched on the steps that are logged. Where a person watches (a
  terminal, a notebook) a `tqdm` progress bar shows the same figures; `close()` ends it.

  Args:
    total_steps: the step count of the whole run.
    every: log when `step % every == 0`, on the first logged call and on the last step.
    start_step: the step a resumed run starts from (rates count from there).
    bar: show the progress bar; default: where a person watches.
  """

  def __init__(self, total_steps: int, *, every: int = 100, start_step: int = 0,
               bar: bool | None = None):
    if every < 1:
      raise ValueError(f"ProgressLogger every must be >= 1, got {every}")
    self.total_steps = int(total_steps)
    self.every = int(every)
    self._last_step = int(start_step)
    self._last_time = time.perf_counter()
    self._logged_once = False
    show = _watched() if bar is None else bar
    self._bar = (tqdm.auto.tqdm(total=self.total_steps, initial=self._last_step, unit="step",
                                dynamic_ncols=True) if show else None)

  def close(self) -> None:
    """Ends the progress bar (if shown)."""
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def should_log(self, step: int) -> bool:
    """Whether `log(step, ...)` would write a line."""
    return not self._logged_once or step % self.every == 0 or step >= self.total_steps

  def line(self, step: int, scalars: Mapping[str, Any], steps_per_second: float) -> str:
    """One log line, e.g. `step 50/100 (50.0%) | loss 0.1235 | 10.0 steps/s | ETA 5s`."""
    parts = [f"step {step}/{self.total_steps} ({100.0 * step / max(self.total_steps, 1):.1f}%)"]
    parts += [f"{name} {_scalar(name, value):.4g}" for name, value in scalars.items()]
    remaining = max(self.total_steps - step, 0)
    eta = (
        remaining / steps_per_second
        if steps_per_second > 0
        else (0.0 if remaining == 0 else math.inf)
    )
    parts += [f"{steps_per_second:.3g} steps/s", f"ETA {format_duration(eta)}"]
    return " | ".join(parts)

  def log(self, step: int, /, **scalars: Any) -> bool:
    """Logs a line if `should_log(step)`; returns whether it did."""
    if not self.should_log(step):
      return False
    now = time.perf_counter()
    elapsed = now - self._last_time
    rate = (step - self._last_step) / elapsed if elapsed > 0 else math.inf
    logging.info("%s", self.line(step, scalars, rate))
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix({name: f"{_scalar(name, v):.4g}" for name, v in scalars.items()})
    self._last_step, self._last_time, self._logged_once = step, now, True
    return True
