"""The launchers end to end on scikit-learn's digits: workdir contract, resume, one-line errors."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from distill_jax import distilled
from distill_jax import io as io_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT_KEYS = {
    "method", "dataset", "ipc", "protocol", "accuracy", "random_subset", "storage_mb",
    "ipc_equivalent", "distill_seconds", "downstream_seconds", "steps",
}
# What report.json says about the random subset beside a set (pipeline._with_storage).
RANDOM_SUBSET_KEYS = {"mean", "std", "n", "ipc", "storage_mb", "ipc_equivalent", "protocol",
                      "label_kind"}


def _launch(module, config, workdir, *extra, env=None):
  return subprocess.run(
      [sys.executable, "-m", f"launch.{module}", f"--config={config}", f"--workdir={workdir}", *extra],
      cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
  )


@pytest.fixture(scope="module")
def fast_env(tmp_path_factory):
  """The launchers' environment with one persistent compilation cache for the module's runs
  and LLVM -O0 code generation (compiles several times faster on CPU)."""
  cache = tmp_path_factory.mktemp("jax_cache")
  return {
      **os.environ,
      "JAX_COMPILATION_CACHE_DIR": str(cache),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
      "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0",
  }


@pytest.fixture(scope="module")
def dm_run(tmp_path_factory, fast_env):
  """`launch.distill` with DM's smoke preset: distil, evaluate, report."""
  workdir = tmp_path_factory.mktemp("dm_smoke")
  result = _launch("distill", "configs/dm.py:smoke", workdir, env=fast_env)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_distill_writes_the_workdir_contract(dm_run):
  report = io_lib.Workdir(dm_run).read_report()
  assert REPORT_KEYS <= set(report)
  assert (report["method"], report["dataset"], report["ipc"], report["protocol"]) == (
      "dm", "digits", 2, "dsa")
  assert report["accuracy"]["n"] == 2 and 0.0 <= report["accuracy"]["mean"] <= 1.0
  # The random subset beside the set: its accuracy and what it costs to store.
  subset = report["random_subset"]
  assert set(subset) == RANDOM_SUBSET_KEYS
  assert subset["n"] == 2 and subset["ipc"] == 2 and 0.0 <= subset["mean"] <= 1.0
  assert subset["storage_mb"] == report["storage_mb"] > 0
  assert report["evaluations"]["dsa"]["random_subset"]["mean"] == subset["mean"]
  for name in ("config.json", "metrics.jsonl", "distill_time.json", "eval/dsa.json",
               "eval/dsa_random_subset.json", "images/distilled.png", "images/random_subset.png"):
    assert os.path.getsize(dm_run / name) > 0, name
  saved = distilled.load(dm_run / "distilled")
  assert saved.meta.method == "dm" and saved.x.shape == (20, 8, 8, 1)
  with open(dm_run / "distill_time.json") as f:
    timing = json.load(f)
  assert timing["steps"] == 30 and timing["seconds"] == report["distill_seconds"]
  # The resource card: what the run took and where it ran.
  card = report["resources"]
  assert card["distill_seconds"] == timing["seconds"] and card["steps"] == 30
  assert card["ms_per_step"] == timing["ms_per_step"] > 0 and card["compile_seconds"] > 0
  assert (card["platform"], card["device_count"], card["process_count"]) == ("cpu", 1, 1)
  assert card["peak_host_rss_mb"] > 100  # JAX alone takes more.


def test_a_kill_after_the_timing_was_written_reruns_to_completion(dm_run, tmp_path, fast_env):
  """distill_time.json and the final checkpoint on disk but no distilled set (killed between
  the two writes): the rerun restores the checkpoint, saves the set and finishes the report."""
  workdir = tmp_path / "killed"
  shutil.copytree(dm_run, workdir)
  for name in ("distilled", "eval", "images"):
    shutil.rmtree(workdir / name)
  os.remove(workdir / "report.json")
  assert os.path.exists(workdir / "distill_time.json")
  result = _launch("distill", "configs/dm.py:smoke", workdir, env=fast_env)
  assert result.returncode == 0, result.stderr[-3000:]
  expected, rerun = distilled.load(dm_run / "distilled"), distilled.load(workdir / "distilled")
  np.testing.assert_array_equal(rerun.x, expected.x)
  report = io_lib.Workdir(workdir).read_report()
  assert report["accuracy"] == io_lib.Workdir(dm_run).read_report()["accuracy"]
  assert set(report["random_subset"]) == RANDOM_SUBSET_KEYS
  # No step ran again: the metrics still hold each logged step once.
  steps = [r["step"] for r in io_lib.read_metrics(workdir / "metrics.jsonl")]
  assert steps == [10, 20, 30]


@pytest.fixture(scope="module")
def random_baseline(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("random")
  result = _launch("evaluate", "configs/evaluate.py:smoke,eval.protocols=standard", workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_random_baseline_writes_the_workdir_contract(random_baseline):
  with open(random_baseline / "report.json") as f:
    report = json.load(f)
  assert REPORT_KEYS <= set(report)
  assert report["method"] == "random" and report["dataset"] == "digits" and report["ipc"] == 2
  # The evaluated set is itself the random subset.
  assert set(report["random_subset"]) == RANDOM_SUBSET_KEYS
  assert report["random_subset"]["mean"] == report["accuracy"]["mean"]
  assert report["accuracy"]["n"] == 2 and 0.0 <= report["accuracy"]["mean"] <= 1.0
  # 2 images per class of 8x8x1 pixels plus their labels, counted in float32.
  assert report["storage_mb"] * 2**20 == pytest.approx(20 * (64 + 1) * 4)
  assert os.path.getsize(random_baseline / "images" / "distilled.png") > 0
  with open(random_baseline / "config.json") as f:
    assert json.load(f)["dataset"] == "digits"


def test_rerun_resumes_from_cached_evaluations(random_baseline):
  before = os.path.getmtime(random_baseline / "eval" / "standard.json")
  result = _launch("evaluate", "configs/evaluate.py:smoke,eval.protocols=standard", random_baseline)
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.getmtime(random_baseline / "eval" / "standard.json") == before


def test_a_different_config_in_the_same_workdir_is_refused(random_baseline):
  result = _launch("evaluate", "configs/evaluate.py:smoke,eval.protocols=standard,seed=3", random_baseline)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith("error:")


@pytest.mark.parametrize(
    "arg, message",
    [
        ("smoke,ipc=0", "ipc=0 is impossible"),
        ("smoke,ipc=100000", "ipc=100000 is impossible"),
        ("smoke,dataset=nope", "unknown dataset 'nope'; valid names:"),
        ("smoke,eval.protocols=nope", "unknown evaluation protocol 'nope'; valid names:"),
        ("smoke,not_a_key=1", "unknown config key 'not_a_key'"),
    ],
)
def test_bad_input_is_one_line_naming_the_problem(tmp_path, arg, message):
  result = _launch("evaluate", f"configs/evaluate.py:{arg}", tmp_path)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert message in last, result.stderr[-2000:]
