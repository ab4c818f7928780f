"""Atomic file writes: write a sibling temporary file, then `os.replace` it over the target.

`os.replace` is atomic on POSIX and Windows within one filesystem, so a reader (or a rerun after
a kill) sees the old file or the new one, never a half-written one. The file gets the permissions
an ordinary `open(path, "w")` would give it (0666 less the umask; `mkstemp` alone gives 0600).

In a run of several processes (`jax.distributed`) only process 0 writes: the others compute the
same content, and their writes are skipped.
"""

import os
import tempfile
from collections.abc import Callable
from typing import IO

from distill_jax.parallel import distributed as parallel


def _read_umask() -> int:
  mask = os.umask(0)  # The only way to read it; set back at once, at import (one thread).
  os.umask(mask)
  return mask


_FILE_MODE = 0o666 & ~_read_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
  """Calls `write(file)` on a temporary file next to `path`, then renames it to `path` (on
  process 0 only; see the module docstring)."""
  if not parallel.is_writer():
    return
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(
      dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
  )
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp_path, _FILE_MODE)
    os.replace(tmp_path, path)
  except BaseException:
    # Not swallowed: the temporary file is removed and the error propagates.
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  atomic_write(path, lambda f: f.write(text.encode("utf-8")))
