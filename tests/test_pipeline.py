"""distill_and_evaluate's stages and report without training: the run loop and the evaluation
are replaced by stand-ins (the real ones run end to end in tests/test_launch.py)."""

import json
import os

import numpy as np
import pytest

from configs import dm as dm_config
from configs import evaluate as evaluate_config
from distill_jax import data as data_lib
from distill_jax import distilled
from distill_jax import evaluation
from distill_jax import io as io_lib
from distill_jax import methods, pipeline
from distill_jax.methods import loop

# Each evaluated set gets a made-up accuracy by its method (the random subset: 0.25).
ACCURACY = {"dm": 0.5, "random": 0.25}


@pytest.fixture(scope="module")
def digits():
  return data_lib.load_real("digits", "standardize")


@pytest.fixture
def stand_ins(monkeypatch, digits):
  """`methods.run` returns a fixed set (after checking the workdir's state) and
  `evaluation.evaluate` a made-up result; both record their calls."""
  calls = {"run": 0, "evaluate": []}
  x = np.asarray(digits.x_train[:20]) + 1.0
  the_set = distilled.PixelSet(x, np.repeat(np.arange(10, dtype=np.int32), 2),
                               meta=digits.set_meta("dm", 2))

  def run(method, workdir):
    calls["run"] += 1
    return loop.RunResult(the_set, seconds=12.5, compile_seconds=1.5, steps=method.num_steps)

  def evaluate(training_set, protocol, x_test, y_test, *, seed, num_models, **kwargs):
    calls["evaluate"].append((training_set.meta.method, protocol.name))
    mean = ACCURACY[training_set.meta.method]
    return evaluation.EvalResult(accuracies=np.full(num_models, mean), mean=mean, std=0.0,
                                 n=num_models, seconds=2.0, steps=7)

  monkeypatch.setattr(methods, "run", run)
  monkeypatch.setattr(evaluation, "evaluate", evaluate)
  return calls, the_set


def test_report_of_a_run(stand_ins, tmp_path, digits, monkeypatch):
  calls, the_set = stand_ins
  timing = tmp_path / "distill_time.json"
  save = distilled.save

  def save_after_the_timing(path, distilled_set):
    assert timing.exists()  # The timing is written before the set.
    save(path, distilled_set)

  monkeypatch.setattr(distilled, "save", save_after_the_timing)
  config = dm_config.get_config("smoke")
  report = pipeline.distill_and_evaluate(config, str(tmp_path))
  assert calls["run"] == 1
  assert sorted(calls["evaluate"]) == [("dm", "dsa"), ("random", "dsa")]
  with open(timing) as f:
    timing = json.load(f)
  assert timing.pop("peak_host_rss_mb") > 0
  assert timing == {"seconds": 12.5, "compile_seconds": 1.5, "steps": 30}
  np.testing.assert_array_equal(distilled.load(tmp_path / "distilled").x, the_set.x)

  subset = pipeline.random_subset_set(digits, 2, seed=config.seed)
  assert report["accuracy"] == {"mean": 0.5, "std": 0.0, "n": 2}
  assert report["random_subset"] == {
      "mean": 0.25, "std": 0.0, "n": 2, "ipc": 2,
      "storage_mb": distilled.storage_mb(subset),
      "ipc_equivalent": float(distilled.ipc_equivalent(subset)),
      "protocol": "dsa", "label_kind": "class_ids",
  }
  assert (report["method"], report["protocol"], report["distill_seconds"]) == ("dm", "dsa", 12.5)
  assert report["storage_mb"] == distilled.storage_mb(the_set)
  assert report == io_lib.Workdir(tmp_path).read_report()
  for name in ("distilled.png", "random_subset.png"):
    assert os.path.getsize(tmp_path / "images" / name) > 0


def test_a_rerun_uses_the_saved_set_and_evaluations(stand_ins, tmp_path):
  calls, _ = stand_ins
  config = dm_config.get_config("smoke")
  first = pipeline.distill_and_evaluate(config, str(tmp_path))
  again = pipeline.distill_and_evaluate(config, str(tmp_path))
  assert again == first and calls["run"] == 1 and len(calls["evaluate"]) == 2


def test_a_kill_between_the_timing_and_the_set_is_rerun(stand_ins, tmp_path):
  """A workdir with distill_time.json (and the run's checkpoints) but no set: the run loop runs
  again (it restores the final checkpoint) and the set is saved."""
  calls, the_set = stand_ins
  with open(tmp_path / "distill_time.json", "w") as f:
    json.dump({"seconds": 99.0, "compile_seconds": 0.0, "steps": 30}, f)
  report = pipeline.distill_and_evaluate(dm_config.get_config("smoke"), str(tmp_path))
  assert calls["run"] == 1 and report["distill_seconds"] == 12.5
  np.testing.assert_array_equal(distilled.load(tmp_path / "distilled").x, the_set.x)


def test_a_bad_method_setting_fails_before_the_workdir_is_written(stand_ins, tmp_path):
  calls, _ = stand_ins
  with pytest.raises(ValueError, match="config.outer.real_batch_size=500 exceeds"):
    pipeline.distill_and_evaluate(dm_config.get_config("smoke,outer.real_batch_size=500"),
                                  str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run") and calls["run"] == 0
  with pytest.raises(ValueError, match="config.eval.protocols is empty"):
    pipeline.distill_and_evaluate(dm_config.get_config("smoke,eval.protocols=''"),
                                  str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_evaluate_baseline_refuses_a_set_of_another_dataset(stand_ins, tmp_path, digits):
  _, the_set = stand_ins
  distilled.save(tmp_path / "set", the_set)
  config = evaluate_config.get_config(f"fashion_mnist,source={tmp_path / 'set'}")
  with pytest.raises(ValueError, match="distilled from 'digits' but the config evaluates on "
                                       "'fashion_mnist'; pass dataset=digits"):
    pipeline.evaluate_baseline(config, str(tmp_path / "eval"))
  # The right dataset: the set is evaluated beside a random subset of its ipc.
  report = pipeline.evaluate_baseline(
      evaluate_config.get_config(f"digits,source={tmp_path / 'set'},eval.protocols=dsa"),
      str(tmp_path / "eval"))
  assert report["accuracy"]["mean"] == 0.5 and report["random_subset"]["mean"] == 0.25
  assert report["random_subset"]["ipc"] == 2
