"""Test-session setup, loaded before any test module imports JAX.

- The tests run on the CPU (`JAX_PLATFORMS` defaults to "cpu"): their tolerances are the CPU's,
  and the pytest-xdist workers (`-n` in pytest.ini) must not each preallocate an accelerator.
- Tests that read the session's smoke runs (`tests/methods/conftest.py`, `smoke_runs`) share one
  xdist group, so one worker runs those child processes once and the other workers take the rest.
"""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.hookimpl(tryfirst=True)  # Before xdist's own hook reads the groups.
def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if "smoke_runs" in getattr(item, "fixturenames", ()):
      item.add_marker(pytest.mark.xdist_group("smoke_runs"))
