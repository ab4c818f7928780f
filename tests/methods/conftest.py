"""Every method's smoke preset run end to end in child processes, once per test session.

`smoke_runs` runs `tests/methods/smoke_child.py` (digits, each method's `smoke` preset):

1. one child runs FRePo, MTT, DC, DM, D3S and APM straight through (the reference sets, FRePo's and MTT's
   report extras) in `reference/<method>`;
2. a chain of children runs each method again in `killed/<method>`, killed with SIGKILL
   once its first checkpoint is on disk; the next child resumes it to the end and starts the
   next method (so six kills cost seven processes, not twelve). D3S's smoke run is killed inside
   its second batch (checkpoint at iteration 15 of 2 x 20).

The children share one persistent compilation cache (each step compiles once for all runs) and
compile with LLVM -O0, which compiles several times faster on CPU; every child uses the same
flags, so the reference and the resumed runs execute the same code and must agree bit for bit.
The in-process tests only read these workdirs (restoring a finished run compiles no step).
"""

import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from tests.methods.smoke_child import METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHILD = os.path.join(ROOT, "tests", "methods", "smoke_child.py")
TIMEOUT = 600


@dataclasses.dataclass(frozen=True)
class SmokeRuns:
  """Where the smoke runs left their workdirs.

  Attributes:
    reference: `<method>/` workdirs, `<method>.npz` sets and `<method>_extras.json` of the
      uninterrupted runs.
    killed: `<method>/` workdirs and `<method>.npz` sets of the runs killed and resumed.
    killed_at: the checkpoint step each killed run had on disk when it was killed.
    cache: the `DISTILL_JAX_CACHE` holding MTT's smoke expert buffer.
  """

  reference: pathlib.Path
  killed: pathlib.Path
  killed_at: dict
  cache: pathlib.Path


def _env(tmp):
  return {
      **os.environ,
      "PYTHONPATH": ROOT,
      "JAX_PLATFORMS": "cpu",
      "DISTILL_JAX_CACHE": str(tmp / "cache"),
      "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax_cache"),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
      "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0",
  }


def _latest_checkpoint(workdir: pathlib.Path):
  steps = [int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
  return max(steps) if steps else None


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory) -> SmokeRuns:
  tmp = tmp_path_factory.mktemp("smoke_runs")
  env = _env(tmp)
  reference, killed = tmp / "reference", tmp / "killed"
  reference.mkdir()
  killed.mkdir()
  done = subprocess.run([sys.executable, CHILD, "reference", str(reference)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=TIMEOUT)
  assert done.returncode == 0, done.stderr[-4000:]

  killed_at = {}
  chain = ["-", *METHODS, "-"]
  for resume, stall in zip(chain[:-1], chain[1:]):
    log_path = tmp / f"chain_{resume}_{stall}.log"  # A file: a full pipe would block the child.
    with open(log_path, "w") as log:
      child = subprocess.Popen([sys.executable, CHILD, "resume", str(killed), resume, stall],
                               cwd=ROOT, env=env, stdout=log, stderr=log)
      if stall == "-":
        assert child.wait(timeout=TIMEOUT) == 0, log_path.read_text()[-4000:]
        continue
      marker = killed / f"{stall}.saved"
      try:
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists():
          assert child.poll() is None, log_path.read_text()[-4000:]
          assert time.monotonic() < deadline, f"{stall} never wrote its first checkpoint"
          time.sleep(0.1)
      finally:
        child.send_signal(signal.SIGKILL)  # kill -9; a no-op if the child already ended.
        child.wait()
      assert child.returncode == -signal.SIGKILL, log_path.read_text()[-4000:]
      assert not (killed / f"{stall}.npz").exists()
      killed_at[stall] = _latest_checkpoint(killed / stall)
  return SmokeRuns(reference=reference, killed=killed, killed_at=killed_at, cache=tmp / "cache")
