"""Runs `multi_device_cases.py` in a child process with 4 simulated CPU devices (the device
count is fixed when JAX starts, so it cannot change inside this test process)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_four_devices_and_a_2x2_mesh_equal_one_device():
  # LLVM -O0 compiles several times faster; both sides of every comparison use it.
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": ("--xla_force_host_platform_device_count=4 "
                       "--xla_backend_optimization_level=0")}
  done = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
       "-W", "error::DeprecationWarning", os.path.join("tests", "parallel",
                                                       "multi_device_cases.py")],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
  assert "7 passed" in done.stdout, done.stdout[-2000:]
