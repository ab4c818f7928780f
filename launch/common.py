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
  (`Unable to initialize backend 'tpu'`) on machines without one. Warnings and errors show."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    if record.levelno > logging_std.INFO:
      return True
    if "/orbax/" in record.pathname:
      return False
    return not (record.pathname.endswith("xla_bridge.py")
                and "Unable to initialize backend" in record.getMessage())


def _user_errors() -> tuple[type[Exception], ...]:
  # Errors that mean "the input is wrong": shown as one line that names the fix, not a traceback.
  from distill_jax.data import DataNotFoundError
  from distill_jax.io import CheckpointError
  from distill_jax.registry import UnknownNameError

  return (ValueError, UnknownNameError, DataNotFoundError, CheckpointError, FileNotFoundError)


def os_error_message(e: OSError) -> str | None:
  """One line for the machine's errors a rerun can recover from, or None for other errors."""
  where = e.filename or "the workdir"
  if e.errno == errno.ENOSPC:
    return (f"the disk is full (writing {where}); free some space and rerun the same command: "
            "it resumes from the last checkpoint")
  if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    return f"cannot write {where} ({e.strerror}); pass a writable --workdir or fix its permissions"
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
    try:
      job(CONFIG.value)
    except KeyboardInterrupt as e:
      print(f"interrupted{f' {e}' if str(e) else ''}; rerun the same command to resume",
            file=sys.stderr)
      sys.exit(130)
    except _user_errors() as e:
      sys.exit(f"error: {e}")
    except OSError as e:
      message = os_error_message(e)
      if message is None:
        raise
      sys.exit(f"error: {message}")

  app.run(main)
