"""The package's examples are tests: `python -m pytest` collects the doctests of distill_jax and
configs, not only tests/ (a review found ~100 `>>>` lines that never ran)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plain_pytest_collects_the_package_doctests():
  collected = subprocess.run(
      [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
  ).stdout.splitlines()
  modules = {line.split("::")[0] for line in collected if "::" in line}
  for expected in ("distill_jax/registry.py", "distill_jax/objectives/krr.py",
                   "distill_jax/training/experts.py", "distill_jax/data/real.py",
                   "configs/common.py"):
    assert expected in modules, f"{expected}'s doctests are not collected by plain pytest"
