"""What the launchers share: the `--config` flag, `--help` text, and one-line errors for bad input.

A launcher defines its own flags beside `CONFIG`, adopts this module's flags for `--help`
(`flags.adopt_module_key_flags(common)`) and calls `run(job, doc)`. `run` checks the config
argument and every `--config.<key>=<value>` override before absl parses them (so a typo is one
line naming the key, not absl's traceback of the config file), and turns the errors that mean
"the input or the machine is wrong" into one line naming the problem and the fix.
"""

import errno
import glob
import importlib.util
import logging as logging_std
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from configs import common as config_common

CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "A config file and its argument: presets and key=value overrides, comma separated, e.g. "
    "configs/frepo.py:fashion_mnist,ipc=10,cpu",
    lock_config=True,
)
flags.mark_flags_as_required(["config"])

_CONFIG_DIR = os.path.dirname(os.path.abspath(config_common.__file__))


def define_workdir() -> flags.FlagHolder:
  """The required `--workdir` flag of the launchers that write a run folder."""
  holder = flags.DEFINE_string(
      "workdir", None, "Folder of the run; rerunning the same command resumes it."
  )
  flags.mark_flags_as_required(["workdir"])
  return holder


def _load_config_module(path: str):
  spec = importlib.util.spec_from_file_location(
      "_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def config_help() -> str:
  """The config syntax and, for every config file, its presets and top-level keys."""
  lines = [
      "Config: --config=<file>:<presets and key=value overrides, comma separated>; presets apply",
      "left to right, overrides last; --config.<key>=<value> sets one more field (dotted keys for",
      "nested blocks, e.g. --config.eval.num_models=3). Values are Python literals.",
      "",
      "Config files (presets; top-level keys):",
  ]
  for path in sorted(glob.glob(os.path.join(_CONFIG_DIR, "*.py"))):
    name = os.path.basename(path)
    if name in ("common.py", "__init__.py"):
      continue
    module = _load_config_module(path)
    config = module.get_config(None)
    presets = [p for p in module.PRESETS if p not in config_common.DATASETS]
    lines.append(f"  configs/{name}: datasets {', '.join(config_common.DATASETS)}; "
                 f"presets {', '.join(presets)}")
    lines.append(f"      keys: {', '.join(sorted(config.keys()))}")
  return "\n".join(lines)


def _config_value(argv: list[str]) -> str | None:
  """The value of `--config` in `argv` (`--config=X` or `--config X`), the last one winning."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      value = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def check_config_arguments(argv: list[str]) -> ml_collections.ConfigDict | None:
  """Builds the config of `argv` with its `--config.<key>=<value>` overrides, as absl will.

  Returns the config, or None when `argv` has no `--config` (absl then says it is required).

  Raises:
    ValueError: a missing config file, an unknown preset or key, or a value of the wrong type;
      the message names it and the valid choices.
  """
  value = _config_value(argv)
  if value is None:
    return None
  path, _, arg = value.partition(":")
  if not path:
    raise ValueError("--config is empty; pass e.g. --config=configs/frepo.py:smoke")
  if not os.path.isfile(path):
    raise ValueError(f"config file {path!r} does not exist; pass e.g. "
                     "--config=configs/frepo.py:smoke (files: configs/*.py)")
  config = _load_config_module(path).get_config(arg or None)
  for item in argv:
    if not item.startswith("--config.") or "=" not in item:
      continue
    key, raw = item[len("--config."):].split("=", 1)
    current = _field(config, key, f"--config.{key}={raw}", value)
    # absl reads strings verbatim and parses other fields by their type; so do we.
    parsed = raw if isinstance(current, str) else config_common.literal(raw)
    config_common.update(config, {key: parsed}, source=f"--config.{key}={raw}")
  return config


def paper_scale_notice(value: str | None, config: ml_collections.ConfigDict) -> str | None:
  """What to tell a user whose `--config` names no preset: the file's defaults are the papers'
  full settings, hours or days on a CPU; None when a preset was given.

  >>> print(paper_scale_notice("configs/dm.py:smoke", None))
  None
  """
  if not value:
    return None
  path, _, arg = value.partition(":")
  presets, _ = config_common.parse_arg(arg)
  if presets:
    return None
  steps = config.get("num_steps")
  size = f"{steps} steps on {config.dataset}" if steps else f"on {config.dataset}"
  return (f"--config={value} names no preset, so this is the papers' full-scale default "
          f"({size}): hours on a GPU and typically days on a CPU. For a first try pass a "
          f"preset: --config={path}:smoke (about a minute) or --config={path}:fashion_mnist,cpu "
          "(the CPU preset, tens of minutes on 2 cores); the progress line gives the ETA once "
          "the step has compiled")


def _field(config: ml_collections.ConfigDict, key: str, source: str, value: str) -> Any:
  """The config's value at the dotted `key`; a `ValueError` naming the valid keys if there is
  none (absl's `--config.<key>` can only change existing fields)."""
  target, path = config, ""
  for part in key.split("."):
    if not isinstance(target, ml_collections.ConfigDict) or part not in target:
      valid = ", ".join(sorted(target.keys())) if isinstance(target, ml_collections.ConfigDict) \
          else f"none ({path} is a value)"
      hint = (f"; new keys under {key.rsplit('.', 1)[0]} go in the config argument: "
              f"--config={value},{source[len('--config.'):]}"
              if key.startswith(config_common.FREEFORM) else "")
      raise ValueError(f"unknown config key {key!r} in {source}; valid keys here: {valid}{hint}")
    target, path = target[part], f"{path}.{part}" if path else part
  return target


class _QuietLibraries(logging_std.Filter):
  """Keeps library internals out of the run log: Orbax's INFO lines and JAX's probe for a TPU
  (`Unable to initialize backend 'tpu'`) on machines without one. Warnings and errors show; a
  library's error about a fault the launcher reports itself (a full disk, a read-only folder:
  Orbax's save threads log each with its traceback) shows as one line, without the traceback."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    if record.levelno > logging_std.INFO:
      if record.levelno >= logging_std.ERROR and _is_library(record.pathname):
        error = record.exc_info[1] if record.exc_info else None
        try:
          message = record.getMessage()
        except (TypeError, ValueError):  # A malformed record: the handler reports it.
          return True
        if _fault(error) is not None or _fault(message) is not None:
          global _fault_logged
          _fault_logged = True
          text = message.splitlines()[0] if message else ""
          cause = str(error).splitlines()[0] if error is not None and str(error) else ""
          record.msg = _shorten(f"{text}: {cause}" if cause and cause not in text else text)
          record.args = ()
          record.exc_info = record.exc_text = record.stack_info = None
      return True
    if "/orbax/" in record.pathname:
      return False
    return not (record.pathname.endswith("xla_bridge.py")
                and "Unable to initialize backend" in record.getMessage())


_OURS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name, "")
              for name in ("launch", "distill_jax"))
# Set once a library logged a fault the launcher reports: the asyncio callbacks of Orbax's
# aborted save then fail on their closed event loop, noise `_quiet_hooks` keeps out.
_fault_logged = False


def _is_library(pathname: str) -> bool:
  return not os.path.abspath(pathname).startswith(_OURS)


def _shorten(text: str, limit: int = 240) -> str:
  return text if len(text) <= limit else f"{text[:limit]}..."


def _closed_loop_noise(kind, value) -> bool:
  return _fault_logged and kind is RuntimeError and str(value) == "Event loop is closed"


def _quiet_hooks() -> None:
  """Keeps out the "Event loop is closed" errors that follow a fault a library logged: the
  tensorstore callbacks of Orbax's aborted save, printed through sys.unraisablehook (or
  sys.excepthook) as a traceback each."""
  unraisablehook, excepthook = sys.unraisablehook, sys.excepthook

  def quiet_unraisablehook(unraisable):
    if not _closed_loop_noise(unraisable.exc_type, unraisable.exc_value):
      unraisablehook(unraisable)

  def quiet_excepthook(kind, value, traceback):
    if not _closed_loop_noise(kind, value):
      excepthook(kind, value, traceback)

  sys.unraisablehook, sys.excepthook = quiet_unraisablehook, quiet_excepthook


def _user_errors() -> tuple[type[Exception], ...]:
  # Errors that mean "the input is wrong": shown as one line that names the fix, not a traceback.
  from distill_jax.data import DataNotFoundError
  from distill_jax.io import CheckpointError
  from distill_jax.registry import UnknownNameError

  return (ValueError, UnknownNameError, DataNotFoundError, CheckpointError, FileNotFoundError)


# tensorstore's errors (Orbax's checkpoint writes) reach Python as ValueError with the errno as
# `[os_error_code='28']` and the paths in double quotes.
_TENSORSTORE_ERRNO = re.compile(r"\[os_error_code='(\d+)'\]")
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')
_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded"}
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def _chain(error: BaseException | None):
  """`error` and the errors it was raised from or while handling, newest first."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ if error.__cause__ is not None else (
        None if error.__suppress_context__ else error.__context__)


def _errno(error: BaseException | str | None) -> int | None:
  if isinstance(error, OSError):
    return error.errno
  match = _TENSORSTORE_ERRNO.search(str(error)) if error is not None else None
  return int(match.group(1)) if match else None


def _fault(error: BaseException | str | None) -> int | None:
  """The errno of a full disk, a quota or a denied or read-only write in `error` or its chain."""
  items = [error] if isinstance(error, str) else list(_chain(error))
  return next((_errno(i) for i in items if _errno(i) in (*_FULL, *_DENIED)), None)


def _where(error: BaseException) -> str:
  """The file `error` (or its chain) names, else the run's --workdir, else "the workdir"."""
  for item in _chain(error):
    if isinstance(item, OSError) and item.filename:
      return os.fspath(item.filename)
    text = str(item).split("[os_error_code")[0]  # Not the paths of the spec after it.
    paths = _QUOTED_PATH.findall(text) if _errno(item) is not None else []
    if paths:
      return paths[-1]  # tensorstore names the folder first, then the file.
  if "workdir" in flags.FLAGS and flags.FLAGS.is_parsed() and flags.FLAGS.workdir:
    return f"in {os.path.abspath(os.path.expanduser(flags.FLAGS.workdir))}"
  return "the workdir"


def os_error_message(e: BaseException) -> str | None:
  """One line for the machine's errors a rerun can recover from (a full disk, a folder that
  cannot be written), found in `e` or the errors it was raised from; None for other errors."""
  for item in _chain(e):
    if _errno(item) in _FULL:
      return (f"{_FULL[_errno(item)]} (writing {_where(e)}); free some space and rerun the same "
              "command: it resumes from the last checkpoint")
  for item in _chain(e):
    if _errno(item) == errno.EROFS:
      return (f"cannot write {_where(e)}: its file system is read-only; pass a --workdir on a "
              "writable disk")
    if _errno(item) in (errno.EACCES, errno.EPERM):
      strerror = item.strerror if isinstance(item, OSError) else "Permission denied"
      return (f"cannot write {_where(e)} ({strerror}); pass a writable --workdir or fix its "
              "permissions")
  return None


def run(job: Callable[[ml_collections.ConfigDict], Any], doc: str) -> None:
  """Runs `job(config)` as an absl program whose `--help` shows `doc` and `config_help()`."""
  sys.modules["__main__"].__doc__ = doc
  if any(arg in ("--help", "-h", "--helpshort", "--helpfull", "--helpxml", "-?")
         for arg in sys.argv[1:]):
    sys.modules["__main__"].__doc__ = f"{doc}\n{config_help()}\n"
  else:
    for name, example in (("config", "configs/frepo.py:smoke"), ("workdir", "runs/my_run")):
      if name in flags.FLAGS and not any(a == f"--{name}" or a.startswith(f"--{name}=")
                                         for a in sys.argv[1:]):
        sys.exit(f"error: --{name} is missing; pass e.g. --{name}={example}")
    try:
      check_config_arguments(sys.argv[1:])
    except ValueError as e:
      sys.exit(f"error: {e}")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_QuietLibraries())
    _quiet_hooks()
    notice = paper_scale_notice(_config_value(sys.argv[1:]), CONFIG.value)
    if notice:
      logging.warning(notice)
    try:
      from distill_jax import parallel  # pylint: disable=g-import-not-at-top

      parallel.initialize(CONFIG.value)  # Several processes: before any other JAX call.
      job(CONFIG.value)
    except KeyboardInterrupt as e:
      print(f"interrupted{f' {e}' if str(e) else ''}; rerun the same command to resume",
            file=sys.stderr)
      sys.exit(130)
    except Exception as e:  # pylint: disable=broad-except
      # A full disk first, whatever error it surfaced as (Orbax raises tensorstore's ValueError).
      if isinstance(e, _user_errors()) and not any(_errno(i) in _FULL for i in _chain(e)):
        sys.exit(f"error: {e}")
      message = os_error_message(e)
      if message is None:
        raise
      sys.exit(f"error: {message}")

  app.run(main)
