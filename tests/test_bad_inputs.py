"""A catalog of bad inputs and faults, each run through a launcher as a user would run it.

Every case asserts the exit status, that the last line of stderr names the problem (and the fix),
that no traceback is printed, and that nothing the workdir already held (checkpoints, the
distilled set, evaluation results, the config) was lost or changed. Cases that need a finished
run start from a copy of one DM smoke run on digits.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DM = "configs/dm.py:smoke"


def _env(**extra) -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0",
          **extra}


def _launch(module: str, *args: str, env=None, timeout=600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", f"launch.{module}", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=env or _env())


def _snapshot(folder) -> dict[str, str]:
  """sha256 of every file under `folder` except TensorBoard events (a failed start may open one)."""
  out = {}
  for directory, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(directory, name)
      if "tensorboard" in path:
        continue
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished `launch.distill` DM smoke run (30 steps, checkpoints at 15 and 30)."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  result = _launch("distill", f"--config={DM}", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@dataclasses.dataclass(frozen=True)
class Case:
  """One bad input: the launcher, its arguments (`{run}`: the workdir, `{finished}`: a copy of
  the finished run, used as the workdir or as a source), the text the last line must hold, and
  an optional `setup(run_folder)` that breaks something first."""

  module: str
  args: tuple[str, ...]
  message: tuple[str, ...]
  setup: Callable | None = None
  workdir: str = "fresh"  # "fresh": a new folder; "finished": a copy of the finished run.
  returncode: int = 1


def _corrupt_latest_checkpoint(run):
  checkpoints = os.path.join(run, "checkpoints")
  latest = max((d for d in os.listdir(checkpoints) if d.isdigit()), key=int)
  for directory, _, files in os.walk(os.path.join(checkpoints, latest)):
    for name in files:
      with open(os.path.join(directory, name), "r+b") as f:
        f.truncate(max(0, os.path.getsize(f.name) // 2))
  shutil.rmtree(os.path.join(run, "distilled"))
  os.makedirs(os.path.join(run, "distilled"))
  os.remove(os.path.join(run, "distill_time.json"))


def _make_file(run):
  os.makedirs(os.path.dirname(run), exist_ok=True)
  with open(run, "w") as f:
    f.write("not a folder\n")


CASES = {
    # The config argument and its overrides.
    "missing_config_file": Case("distill", ("--config=configs/nope.py:smoke", "--workdir={run}"),
                                ("config file 'configs/nope.py' does not exist", "pass e.g.")),
    "unknown_preset": Case("distill", ("--config=configs/dc.py:nope", "--workdir={run}"),
                           ("unknown preset 'nope'", "valid presets:")),
    "unknown_key_in_argument": Case("distill", (f"--config={DM},not_a_key=1", "--workdir={run}"),
                                    ("unknown config key 'not_a_key'", "valid keys here:")),
    "unknown_key_flag": Case("distill", (f"--config={DM}", "--config.foo=1", "--workdir={run}"),
                             ("unknown config key 'foo'", "--config.foo=1", "valid keys here:")),
    "unknown_nested_key_flag": Case(
        "distill", (f"--config={DM}", "--config.outer.lrr=1", "--workdir={run}"),
        ("unknown config key 'outer.lrr'", "valid keys here:")),
    "word_for_int_flag": Case("distill", (f"--config={DM}", "--config.ipc=two", "--workdir={run}"),
                              ("config key 'ipc' expects an int, got 'two'",)),
    "word_for_int": Case("distill", (f"--config={DM},ipc=two", "--workdir={run}"),
                         ("config key 'ipc' expects an int, got 'two'",)),
    "float_for_int": Case("distill", (f"--config={DM},ipc=2.5", "--workdir={run}"),
                          ("config key 'ipc' expects an int, got 2.5",)),
    "lowercase_bool": Case("distill", ("--config=configs/frepo.py:smoke,outer.learn_label=false",
                                       "--workdir={run}"),
                           ("'outer.learn_label' expects a bool", "True/False")),
    "config_with_a_space": Case("distill", ("--config", "configs/dc.py:nope", "--workdir={run}"),
                                ("unknown preset 'nope'",)),
    # Names and sizes checked against the data and the registries, before anything is written.
    "unknown_dataset": Case("distill", (f"--config={DM},dataset=nope", "--workdir={run}"),
                            ("unknown dataset 'nope'; valid names:",)),
    "unknown_method": Case("distill", (f"--config={DM},method=dn", "--workdir={run}"),
                           ("unknown method 'dn'; valid names:",)),
    "ipc_zero": Case("distill", (f"--config={DM},ipc=0", "--workdir={run}"),
                     ("ipc=0 is impossible for digits", "set ipc to a value in that range")),
    "ipc_too_large": Case("distill", (f"--config={DM},ipc=100000", "--workdir={run}"),
                          ("ipc=100000 is impossible",)),
    "unknown_protocol": Case("distill", (f"--config={DM},eval.protocols=frepoo", "--workdir={run}"),
                             ("unknown evaluation protocol 'frepoo'; valid names:",)),
    "no_protocol": Case("distill", (f"--config={DM},eval.protocols=''", "--workdir={run}"),
                        ("config.eval.protocols is empty",)),
    "unknown_protocol_field": Case(
        "distill", (f"--config={DM}", "--config.eval.overrides.dsa.epochz=3", "--workdir={run}"),
        ("epochz",)),
    "bad_method_setting": Case("distill", ("--config=configs/frepo.py:smoke,outer.order=v3",
                                           "--workdir={run}"),
                               ("unknown config.outer.order 'v3'",)),
    "impossible_real_batch": Case("distill", (f"--config={DM},outer.real_batch_size=500",
                                              "--workdir={run}"),
                                  ("config.outer.real_batch_size=500 exceeds the",)),
    # The workdir.
    "empty_workdir": Case("distill", (f"--config={DM}", "--workdir="),
                          ("the workdir is empty", "--workdir=runs/my_run")),
    "workdir_is_a_file": Case("distill", (f"--config={DM}", "--workdir={run}"),
                              ("is a file, not a folder",), setup=_make_file),
    "workdir_inside_a_file": Case("distill", (f"--config={DM}", "--workdir={run}/sub"),
                                  ("is a file; pass another --workdir",), setup=_make_file),
    "missing_workdir_flag": Case("distill", (f"--config={DM}",),
                                 ("--workdir is missing; pass e.g. --workdir=runs/my_run",)),
    "missing_config_flag": Case("distill", ("--workdir={run}",),
                                ("--config is missing; pass e.g. --config=configs/frepo.py:smoke",)),
    "unexpected_argument": Case("distill", (f"--config={DM}", "--workdir={run}", "extra"),
                                ("unexpected arguments: ['extra']",)),
    # A finished run rerun with another distillation setting, or with a broken checkpoint.
    "other_config_in_finished_run": Case(
        "distill", (f"--config={DM},num_steps=11", "--workdir={run}"),
        ("holds a different config (num_steps: 30 -> 11)", "pass a new --workdir"),
        workdir="finished"),
    "corrupt_checkpoint": Case(
        "distill", (f"--config={DM}", "--workdir={run}"),
        ("checkpoint",), setup=_corrupt_latest_checkpoint, workdir="finished"),
    # launch.evaluate's sources.
    "source_is_a_run_folder": Case(
        "evaluate", ("--config=configs/evaluate.py:smoke,source='{finished}'", "--workdir={run}"),
        ("is a run folder; pass its set: source=", "/distilled")),
    "source_does_not_exist": Case(
        "evaluate", ("--config=configs/evaluate.py:smoke,source='/nonexistent/set'",
                     "--workdir={run}"),
        ("/nonexistent/set",)),
    "source_of_another_dataset": Case(
        "evaluate", ("--config=configs/evaluate.py:smoke,dataset=fashion_mnist,"
                     "source='{finished}/distilled'", "--workdir={run}"),
        ("was distilled from 'digits'", "pass dataset=digits")),
    # launch.train_experts.
    "experts_without_block": Case("train_experts", ("--config=configs/frepo.py:smoke",),
                                  ("has no `experts` block",)),
    "zero_experts": Case("train_experts", ("--config=configs/mtt.py:smoke,experts.num_experts=0",),
                         ("experts.num_experts must be a positive int, got 0",)),
    # D3S and launch.train_teachers.
    "d3s_batch_not_dividing_classes": Case(
        "distill", ("--config=configs/d3s.py:smoke,outer.batch_size=4", "--workdir={run}"),
        ("config.outer.batch_size=4 does not divide the 10 classes", "set it to 2")),
    "d3s_unknown_statistic_loss": Case(
        "distill", ("--config=configs/d3s.py:smoke,statistic_loss=wasserstein", "--workdir={run}"),
        ("unknown config.statistic_loss 'wasserstein'; use one of kl, bn",)),
    "d3s_unknown_teacher_model_argument": Case(
        "distill", ("--config=configs/d3s.py:smoke,teachers.model_kwargs.stem=x",
                    "--workdir={run}"),
        ("unknown argument(s) stem for model 'convnet'",)),
    # APM.
    "apm_segments_not_dividing_the_minibatch": Case(
        "distill", ("--config=configs/apm.py:smoke,outer.segments=3", "--workdir={run}"),
        ("config.outer.segments=3 does not divide the minibatch of 20 images",
         "set it to a divisor such as 2")),
    "apm_checkpoints_not_dividing_the_epochs": Case(
        "distill", ("--config=configs/apm.py:smoke,inner.checkpoints=3", "--workdir={run}"),
        ("config.inner.checkpoints=3 does not divide config.inner.epochs=4",)),
    "apm_minibatch_larger_than_the_set": Case(
        "distill", ("--config=configs/apm.py:smoke,outer.batch_size=50", "--workdir={run}"),
        ("config.outer.batch_size=50 exceeds the 20 synthetic images",)),
    # LatentDD.
    "latent_unknown_algorithm": Case(
        "distill", ("--config=configs/latent.py:smoke,algorithm=gm", "--workdir={run}"),
        ("unknown algorithm='gm'", "use one of dc, dm, mtt")),
    "latent_factor_not_a_power_of_two": Case(
        "distill", ("--config=configs/latent.py:smoke,autoencoder.factor=3", "--workdir={run}"),
        ("autoencoder factor f=3 must be a power of two",)),
    "latent_decoder_larger_than_the_budget": Case(
        "distill", ("--config=configs/latent.py:smoke,ipc=1,autoencoder.width=64",
                    "--workdir={run}"),
        ("parameters exceed the storage of ipc=1 images per class", "set lpc explicitly")),
    "latent_pretrained_folder_without_config": Case(
        "distill", ("--config=configs/latent.py:smoke,autoencoder.pretrained_dir='/nonexistent'",
                    "--workdir={run}"),
        ("no config.json in", "diffusers AutoencoderKL")),
    # D3.
    "d3_too_few_mmd_samples": Case(
        "distill", ("--config=configs/d3.py:smoke,outer.mmd_samples=1", "--workdir={run}"),
        ("under the 2 samples per class the unbiased MMD needs", "raise mmd_samples")),
    "d3_unknown_decoder_size": Case(
        "distill", ("--config=configs/d3.py:smoke,decoder.size='xxl'", "--workdir={run}"),
        ("unknown decoder size 'xxl'",)),
    "federated_one_subtask": Case(
        "federated", ("--config=configs/d3.py:smoke", "--workdir={run}"),
        ("needs subtask.count >= 2", "run launch.distill")),
    "federated_uneven_split": Case(
        "federated", ("--config=configs/d3.py:smoke,subtask.count=3", "--workdir={run}"),
        ("subtask.count=3 must divide the 10 classes",)),
    "merge_a_missing_set": Case("merge", ("--sets={run}/a,{run}/b", "--out={run}/merged"),
                                ("no distilled set at",)),
    "teachers_without_block": Case("train_teachers", ("--config=configs/dm.py:smoke",),
                                   ("has no `teachers` block",)),
    "zero_teachers": Case("train_teachers",
                          ("--config=configs/d3s.py:smoke,teachers.num_teachers=0",),
                          ("teachers.num_teachers must be a positive int, got 0",)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_and_loses_nothing(name, finished, tmp_path):
  case = CASES[name]
  run = tmp_path / "run"
  if case.workdir == "finished":
    shutil.copytree(finished, run)
  if case.setup is not None:
    case.setup(str(run))
  before = _snapshot(run) if os.path.isdir(run) else {}
  args = [a.format(run=run, finished=finished) for a in case.args]
  result = _launch(case.module, *args)
  output = result.stdout + result.stderr
  lines = result.stderr.strip().splitlines()
  assert result.returncode == case.returncode, output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  for text in case.message:
    assert text in lines[-1], output[-3000:]
  after = _snapshot(run) if os.path.isdir(run) else {}
  assert {k: after.get(k) for k in before} == before  # Nothing written before was changed.
  if case.workdir == "fresh" and os.path.isdir(run):
    assert not os.path.exists(run / "config.json")  # Refused before anything was written.


def test_the_catalog_has_at_least_30_cases():
  assert len(CASES) >= 30


# Faults a rerun recovers from.


def test_evaluation_settings_changed_after_distillation_reevaluate_the_saved_set(finished, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(finished, run)
  set_before = _snapshot(run / "distilled")
  result = _launch("distill", f"--config={DM},eval.num_models=1", f"--workdir={run}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert _snapshot(run / "distilled") == set_before
  with open(run / "report.json") as f:
    assert json.load(f)["accuracy"]["n"] == 1
  with open(run / "config.json") as f:
    assert json.load(f)["eval"]["num_models"] == 1


def test_a_corrupt_evaluation_is_evaluated_again(finished, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(finished, run)
  with open(run / "eval" / "dsa.json") as f:
    good = json.load(f)
  with open(run / "eval" / "dsa.json", "w") as f:
    f.write("{not json")
  result = _launch("distill", f"--config={DM}", f"--workdir={run}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "dsa.json is not valid JSON; evaluating dsa again" in result.stderr
  with open(run / "eval" / "dsa.json") as f:
    assert json.load(f)["mean"] == good["mean"]  # The same networks, trained again.


def test_a_missing_timing_is_read_back_from_the_last_checkpoint(finished, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(finished, run)
  with open(run / "distill_time.json") as f:
    timing = json.load(f)
  os.remove(run / "distill_time.json")
  set_before = _snapshot(run / "distilled")
  result = _launch("distill", f"--config={DM}", f"--workdir={run}")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(run / "distill_time.json") as f:
    # The last checkpoint holds the seconds up to its save, the file those after it too.
    assert json.load(f)["seconds"] == pytest.approx(timing["seconds"], abs=2.0)
  assert _snapshot(run / "distilled") == set_before


def test_tilde_in_the_workdir_is_the_home_folder(tmp_path):
  result = _launch("evaluate", "--config=configs/evaluate.py:smoke,eval.protocols=standard",
                   "--workdir=~/random", env=_env(HOME=str(tmp_path)))
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.exists(tmp_path / "random" / "report.json")


def test_files_are_written_with_the_umask_permissions(finished):
  mask = os.umask(0)
  os.umask(mask)
  for name in ("config.json", "report.json", os.path.join("images", "distilled.png")):
    assert os.stat(finished / name).st_mode & 0o777 == 0o666 & ~mask, name


def _has_checkpoint(run) -> bool:
  folder = os.path.join(run, "checkpoints")
  return os.path.isdir(folder) and any(d.isdigit() for d in os.listdir(folder))


def test_ctrl_c_says_where_it_stopped_and_the_rerun_resumes(tmp_path):
  run = tmp_path / "run"
  config = f"--config={DM},num_steps=1000,checkpoint_every=10"  # Seconds of margin under load.
  # A terminal's foreground job: Ctrl-C not ignored, whatever this test worker inherited (in
  # the full xdist suite a worker's children once ignored SIGINT and ran to the end).
  process = subprocess.Popen([sys.executable, "-m", "launch.distill", config, f"--workdir={run}"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_env(),
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  deadline = time.time() + 300
  while time.time() < deadline and not _has_checkpoint(run):
    time.sleep(0.05)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=300)
  last = stderr.strip().splitlines()[-1]
  assert process.returncode == 130, stderr[-3000:]
  assert "Traceback" not in stderr
  assert last.startswith("interrupted at step ") and "rerun the same command to resume" in last
  result = _launch("distill", config, f"--workdir={run}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from the checkpoint of step" in result.stderr


def test_help_shows_the_flags_the_syntax_and_the_presets():
  result = _launch("distill", "--help")
  text = result.stdout + result.stderr
  assert "--config" in text and "--workdir" in text
  assert "configs/dm.py" in text and "presets" in text and "smoke" in text
  assert "keys:" in text and "Traceback" not in text


def test_no_tpu_probe_line_on_cpu(finished):
  result = _launch("distill", f"--config={DM}", f"--workdir={finished}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Unable to initialize backend" not in result.stderr
  assert "names no preset" not in result.stderr  # A preset was given.


def test_a_run_without_a_preset_says_it_is_paper_scale(tmp_path):
  # The workdir is a file, so the run stops right after the notice (no hours of distillation).
  blocker = tmp_path / "file"
  blocker.write_text("")
  result = _launch("distill", "--config=configs/dm.py", f"--workdir={blocker}")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert ("--config=configs/dm.py names no preset, so this is the papers' full-scale default "
          "(20000 steps on fashion_mnist)") in result.stderr
  assert "--config=configs/dm.py:smoke (about a minute)" in result.stderr


@pytest.mark.parametrize("config, fix", [
    # lr 1e6 keeps every loss finite (no divergence stop) but drives the pixels to ~1e5.
    (f"{DM},outer.lr=1e6", "lower outer.lr (now 1000000.0)"),
    # The case: MTT's lr_img 1e12 takes the pixels to ~6e9 with finite losses and the
    # set far below the random subset.
    ("configs/mtt.py:smoke,outer.lr_img=1e12", "lower outer.lr_img (now 1000000000000.0)"),
], ids=["dm_lr", "mtt_lr_img"])
def test_a_blown_up_set_is_reported_with_the_fix(config, fix, tmp_path):
  result = _launch("distill", f"--config={config},eval.num_models=1",
                   f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert f"the set has likely blown up; {fix}" in result.stderr


def test_os_errors_are_one_line_naming_the_path():
  # The launcher's handler given the errors of each fault; tests/test_faults_machine.py makes
  # them happen for real (a disk that fills during a run, read-only folders, as root too).
  import errno

  from launch import common

  resumes = "free some space and rerun the same command: it resumes from the last checkpoint"
  message = common.os_error_message(OSError(errno.ENOSPC, "No space left on device", "/r/ckpt"))
  assert message == f"the disk is full (writing /r/ckpt); {resumes}"
  # Orbax's checkpoint writes fail with tensorstore's ValueError: the errno and the file are in
  # the text (before the spec, whose paths are not the file).
  tensorstore = ValueError(
      'RESOURCE_EXHAUSTED: Error writing "x/.zarray" in OCDBT database at local file "/r/c/": '
      'Failed writing: "/r/c/d/9f": Failed to write 187 bytes to file 14: No space left on '
      'device [os_error_code=\'28\'] [tensorstore_spec=\'{"path":"/r/c/"}\']')
  assert common.os_error_message(tensorstore) == f"the disk is full (writing /r/c/d/9f); {resumes}"
  try:  # Raised while handling a full disk: still the full disk.
    try:
      raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as e:
      raise RuntimeError("save failed") from e
  except RuntimeError as e:
    assert common.os_error_message(e) == f"the disk is full (writing the workdir); {resumes}"
  assert common.os_error_message(OSError(errno.EDQUOT, "Disk quota exceeded", "/r")).startswith(
      "the disk quota is exceeded (writing /r); free some space")
  assert common.os_error_message(PermissionError(errno.EACCES, "Permission denied", "/r")) == (
      "cannot write /r (Permission denied); pass a writable --workdir or fix its permissions")
  assert common.os_error_message(OSError(errno.EROFS, "Read-only file system", "/r")) == (
      "cannot write /r: its file system is read-only; pass a --workdir on a writable disk")
  assert common.os_error_message(OSError(errno.EIO, "I/O error")) is None  # Not ours: traceback.
