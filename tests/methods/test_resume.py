"""Every method's smoke run killed with SIGKILL after its first checkpoint and rerun gives the
bit-identical set of an uninterrupted run (the runs themselves: conftest.py `smoke_runs`)."""

import importlib

import numpy as np
import pytest

from distill_jax import io as io_lib
from tests.methods.smoke_child import METHODS



@pytest.mark.parametrize("name", METHODS)
def test_a_run_killed_after_its_first_checkpoint_resumes_bit_identically(smoke_runs, name):
  config = importlib.import_module(f"configs.{name}").get_config("smoke")
  # Killed right after its first checkpoint: the rest ran in the resumed process.
  assert smoke_runs.killed_at[name] == config.checkpoint_every
  expected = np.load(smoke_runs.reference / f"{name}.npz")
  resumed = np.load(smoke_runs.killed / f"{name}.npz")
  assert sorted(resumed.files) == sorted(expected.files)
  assert {"x", "z", "priors"} & set(expected.files)  # Images, latent codes or priors.
  for array in expected.files:
    np.testing.assert_array_equal(resumed[array], expected[array], err_msg=array)
  # Both segments logged, each step once, each segment compiled its step once.
  logged = io_lib.read_metrics(smoke_runs.killed / name / "metrics.jsonl")
  straight = io_lib.read_metrics(smoke_runs.reference / name / "metrics.jsonl")
  assert [r["step"] for r in logged] == [r["step"] for r in straight]
  assert all(r["step_traces"] == 1 for r in logged + straight)
  assert [r["loss"] for r in logged] == [r["loss"] for r in straight]
