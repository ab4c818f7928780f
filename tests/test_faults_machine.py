"""Faults of the machine, made real: a disk that fills up during a run, and a workdir that
cannot be written, also when the tests run as root (as in CI), which `chmod` does not stop.

The catalog style of `test_bad_inputs.py`: the exit status, one last line of stderr naming the
problem and the fix, no traceback, nothing already written lost, and the rerun the message
advises works. A small disk and a read-only folder come from a private mount namespace (a
`tmpfs` of a few MiB, a read-only bind mount) that a holder process keeps while the launcher
runs inside it (`nsenter`); nothing is mounted where other processes see it, and killing the
holder removes it all. As root that needs CAP_SYS_ADMIN, otherwise unprivileged user
namespaces; where neither is allowed (e.g. a default Docker seccomp profile) the tests that
need one skip and say so.
"""

import ctypes
import errno
import hashlib
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.test_bad_inputs import DM, ROOT, _env, _launch, _snapshot

# 400 steps of 10 per checkpoint: the disk fills right after the first checkpoint, seconds
# before the run could end, even on a loaded machine.
_LONG_DM = f"--config={DM},num_steps=400,checkpoint_every=10"


class _MountNamespace:
  """A process holding a private mount namespace in which `script` (shell) mounted something.

  `launch(...)` runs a launcher inside it; `view(path)` is where this process sees `path` as the
  namespace sees it (`/proc/<holder>/root/...`)."""

  def __init__(self, script: str):
    attempts = ([["unshare", "--mount", "--propagation", "private"]] if os.geteuid() == 0 else [])
    attempts.append(["unshare", "--user", "--map-root-user", "--mount", "--propagation",
                     "private"])
    reasons = []
    self.holder = None
    for prefix in attempts:
      if shutil.which(prefix[0]) is None or shutil.which("nsenter") is None:
        reasons.append("no unshare/nsenter (util-linux)")
        break
      holder = subprocess.Popen(
          [*prefix, "sh", "-c", f"{script} && echo ready && exec sleep 3600"],
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      if holder.stdout.readline().strip() == "ready":
        self.holder, self.user_namespace = holder, "--user" in prefix
        return
      holder.kill()
      reasons.append(f"{' '.join(prefix)}: {holder.communicate()[1].strip()[-200:]}")
    pytest.skip("no private mount namespace here (" + "; ".join(reasons) + ")")

  def close(self):
    if self.holder is not None:
      self.holder.kill()
      self.holder.communicate()

  def view(self, path) -> str:
    return f"/proc/{self.holder.pid}/root{os.path.abspath(path)}"

  def command(self, module: str, *args: str) -> list[str]:
    # In a user namespace: its root is this user (`--map-root-user`); keeping this process's
    # credentials needs no setgroups, which that namespace denies.
    user = ["-U", "--preserve-credentials"] if self.user_namespace else []
    return ["nsenter", "-t", str(self.holder.pid), *user, "-m", f"--wd={ROOT}", sys.executable,
            "-m", f"launch.{module}", *args]

  def launch(self, module: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(self.command(module, *args), capture_output=True, text=True,
                          timeout=600, env=_env(), **kwargs)


def _checkpoints(folder) -> list[str]:
  path = os.path.join(folder, "checkpoints")
  return sorted(d for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def _written(run) -> dict[str, str]:
  """sha256 of the config and the finished checkpoints of a run that is still running (the
  folders of checkpoints being saved come and go)."""
  kept = [os.path.join(run, "config.json")]
  for step in _checkpoints(run):
    for directory, _, files in os.walk(os.path.join(run, "checkpoints", step)):
      kept.extend(os.path.join(directory, name) for name in files)
  out = {}
  for path in kept:
    with open(path, "rb") as f:
      out[os.path.relpath(path, run)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _assert_one_line(result, returncode: int, *texts: str) -> str:
  output = result.stdout + result.stderr
  assert result.returncode == returncode, output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  for text in texts:
    assert text in last, output[-3000:]
  return last


def test_a_disk_that_fills_during_a_run_is_one_line_and_the_rerun_resumes(tmp_path):
  disk = tmp_path / "disk"
  disk.mkdir()
  space = _MountNamespace(f"mount -t tmpfs -o size=32m tmpfs {disk}")
  run, view = disk / "run", space.view(disk / "run")
  process = None
  try:
    process = subprocess.Popen(space.command("distill", _LONG_DM, f"--workdir={run}"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=_env())
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline and not _checkpoints(view):
      time.sleep(0.02)
    assert process.poll() is None, process.communicate()[1][-3000:]
    before = _written(view)  # What the run has written so far.
    assert any(k.startswith("checkpoints") for k in before), before
    filler = os.open(space.view(disk / "filler"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:  # Everything left, as another job on the disk would.
      while True:
        os.write(filler, b"\0" * (1 << 16))
    except OSError as e:
      assert e.errno == errno.ENOSPC, e
    finally:
      os.close(filler)
    stdout, stderr = process.communicate(timeout=300)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    last = _assert_one_line(result, 1, "error: the disk is full (writing ", str(run),
                            "free some space and rerun the same command: it resumes from the "
                            "last checkpoint")
    print(last)
    after = _snapshot(view)
    assert {k: after.get(k) for k in before} == before  # Nothing written before was lost.

    os.remove(space.view(disk / "filler"))
    result = space.launch("distill", _LONG_DM, f"--workdir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from the checkpoint of step" in result.stderr
    assert os.path.exists(os.path.join(view, "report.json"))
  finally:
    if process is not None and process.poll() is None:  # A failed assertion above: do not leave the run behind.
      process.kill()
      process.communicate()
    space.close()


# A workdir that cannot be written. Root writes through any mode bits (and `os.access` says so),
# so as root the launcher runs without the capabilities that override them: then root meets the
# permissions as every other user does (it owns the folder, whose owner bits deny writing).
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _CAP_FOWNER = 1, 2, 3
_PR_CAPBSET_DROP = 24


def _without_override():
  """For `preexec_fn`: drop root's permission overrides from the bounding set, so the launcher
  (after exec) lacks them; a no-op for other users."""
  if os.geteuid() != 0:
    return
  libc = ctypes.CDLL(None, use_errno=True)
  for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _CAP_FOWNER):
    if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
      os._exit(99)  # pylint: disable=protected-access


def _read_only(folder) -> None:
  for directory, _, files in os.walk(folder):
    os.chmod(directory, 0o555)
    for name in files:
      os.chmod(os.path.join(directory, name), 0o444)


def _writable(folder) -> None:
  for directory, _, _ in os.walk(folder):
    os.chmod(directory, 0o755)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("finished_faults") / "run"
  result = _launch("distill", f"--config={DM}", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _workdir(kind: str, finished_run, tmp_path):
  """A fresh copy of the finished run (`kind="finished"`) or an empty folder."""
  run = tmp_path / "run"
  if kind == "finished":
    shutil.copytree(finished_run, run)
  else:
    run.mkdir()
  return run


# The tests of `finished_run` in one xdist worker (pytest.ini: --dist loadgroup): one run to copy.
_ONE_WORKER = pytest.mark.xdist_group("finished_faults")


@_ONE_WORKER
@pytest.mark.parametrize("workdir", ["empty", "finished"])
def test_a_read_only_workdir_is_one_line_also_for_root(workdir, finished_run, tmp_path):
  run = _workdir(workdir, finished_run, tmp_path)
  before = _snapshot(run)
  _read_only(run)
  try:
    result = subprocess.run(
        [sys.executable, "-m", "launch.distill", f"--config={DM}", f"--workdir={run}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env(),
        preexec_fn=_without_override)
    last = _assert_one_line(result, 1, str(run), "not writable" if workdir == "finished"
                            else "Permission denied", "pass a writable --workdir or fix its "
                            "permissions")
    print(last)
    assert _snapshot(run) == before
  finally:
    _writable(run)
  # Following the advice (fixing the permissions) works.
  result = _launch("distill", f"--config={DM}", f"--workdir={run}")
  assert result.returncode == 0, result.stderr[-3000:]


@_ONE_WORKER
@pytest.mark.parametrize("workdir", ["empty", "finished"])
def test_a_workdir_on_a_read_only_disk_is_one_line_also_for_root(workdir, finished_run, tmp_path):
  # A read-only mount stops root too: the case root meets (a read-only share or bind mount).
  run = _workdir(workdir, finished_run, tmp_path)
  before = _snapshot(run)
  mounts = _MountNamespace(f"mount --bind {run} {run} && mount -o remount,bind,ro {run}")
  try:
    result = mounts.launch("distill", f"--config={DM}", f"--workdir={run}")
    last = _assert_one_line(result, 1, str(run), "read-only",
                            "pass a --workdir on a writable disk")
    print(last)
    assert _snapshot(run) == before
  finally:
    mounts.close()
