"""Every benchmark starts as the command its docstring shows, from any working directory.

The figures themselves are measured by running the benchmarks, never in tests; this only checks
that `python benchmarks/<name>.py --help` gets past its imports and flag definitions.
"""

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.py")))


def test_there_are_benchmarks():
  names = {os.path.basename(p) for p in BENCHMARKS}
  assert {"frepo_step.py", "mtt_step.py", "objectives.py", "eval_throughput.py"} <= names


@pytest.mark.parametrize("path", BENCHMARKS, ids=os.path.basename)
def test_benchmark_script_starts_outside_the_repository(path, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run([sys.executable, path, "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
  output = result.stdout + result.stderr
  assert "Traceback" not in output, output
  # argparse exits 0 after --help, absl exits 1; both print the flags.
  assert result.returncode in (0, 1), output
  assert "--help" in output or "--steps" in output, output
