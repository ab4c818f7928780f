"""Federated (subtask) distillation: k independent jobs, then one merged set (D3 section 2.3).

D3 splits the classes into k contiguous subtasks, distils each with its own experts, decoder and
priors under local labels (`RealData.subtask`), and merges the k sets into one set of the whole
task (`distilled.merge_subtasks`: k decoders, priors concatenated, labels mapped back to
`j C/k + local`), which is then evaluated on all classes.

`run(config, workdir)` does that with jobs on submitit, not on a home-made scheduler:

  workdir/subtask_<j>/   subtask j's own run folder (config, checkpoints, set), written by
                         `pipeline.distill` inside job j
  workdir/submitit/      submitit's job folders (logs, pickled calls and results)
  workdir/distilled/     the merged set (with soft labels if `federated.soft_labels`)
  workdir/report.json    the merged set evaluated on the whole task beside the random subset at
                         equal storage (`pipeline.report_set`)

`federated.executor` picks submitit's executor: "slurm" submits a job array (array index i runs
the i-th unfinished subtask), "local" runs every job at once as a subprocess of this machine,
"debug" runs them one after the other in this process. A rerun of the same command skips the
subtasks whose set is already saved and resubmits the others, each resuming from its own last
checkpoint: killing one job and relaunching redoes only that job's missing steps.
"""

import copy
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from distill_jax import distilled as distilled_lib
from distill_jax import io as io_lib
from distill_jax import methods
from distill_jax import pipeline
from distill_jax.training import experts as experts_lib

EXECUTORS = ("local", "slurm", "debug")


class SubtaskFailedError(ValueError):
  """A subtask job failed; the message names its log and says that a rerun resumes it (a
  ValueError, so that the launchers show it as one line)."""


def subtask_config(config: ml_collections.ConfigDict, index: int) -> ml_collections.ConfigDict:
  """`config` with `subtask.index = index` (the config of job `index`)."""
  sub = copy.deepcopy(config)
  sub.subtask.index = index
  return sub


def full_task_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` for the whole task (`subtask.count = 1`): how the merged set is evaluated."""
  full = copy.deepcopy(config)
  full.subtask.index, full.subtask.count = 0, 1
  return full


def subtask_dir(workdir: str, index: int) -> str:
  return os.path.join(workdir, f"subtask_{index}")


def run_subtask(config: dict[str, Any], workdir: str) -> str:
  """Job body: distils one subtask into `workdir` (resuming its checkpoints); returns it.

  Takes the config as a plain dict so that submitit pickles no ConfigDict. Progress goes to the
  job's stderr log (`workdir/submitit/<job>_0_log.err` of the federated run), as in launch.distill.
  """
  logging.set_verbosity(logging.INFO)  # A job process is not an absl app: INFO is off otherwise.
  pipeline.distill(ml_collections.ConfigDict(config), workdir)
  return workdir


def make_executor(config: ml_collections.ConfigDict, folder: str):
  """The submitit executor `config.federated` names, with its resources."""
  import submitit  # Imported here: only federated runs need it.

  fed = config.federated
  if fed.executor not in EXECUTORS:
    raise ValueError(f"unknown federated.executor {fed.executor!r}; use one of "
                     f"{', '.join(EXECUTORS)}")
  executor = submitit.AutoExecutor(folder=folder, cluster=fed.executor)
  count = config.subtask.count
  cpus = fed.cpus_per_task or max(1, (os.cpu_count() or 1) // count)
  params = {"timeout_min": fed.timeout_min, "cpus_per_task": cpus, "name": "d3_subtask"}
  if fed.gpus_per_node:
    params["gpus_per_node"] = fed.gpus_per_node
  if fed.executor == "slurm":
    params["slurm_array_parallelism"] = count
    if fed.slurm_partition:
      params["slurm_partition"] = fed.slurm_partition
  executor.update_parameters(**params)
  return executor


def soft_label_epoch(config: ml_collections.ConfigDict) -> int:
  """The labelling expert's epoch: `federated.soft_label_epoch`, or M = `inner.expert_epochs`
  (the released `soft_label.py` labels with `expert_trajectory[args.expert_epochs]`)."""
  epoch = config.federated.soft_label_epoch
  return config.inner.expert_epochs if epoch is None else epoch


def soft_labelled(merged, config: ml_collections.ConfigDict, data):
  """`merged` with soft labels from one expert of the whole task (D3 App. E.3, `soft_label.py`).

  The expert is drawn from `config.seed` out of the whole task's buffer (trained first where the
  cache has none: for the CPU preset it is MTT's cached `cpu` buffer) at `soft_label_epoch`; its
  softmax on every prior's mean decode becomes the prior's `(C,)` label
  (`DistributionSet.with_soft_labels`).

  Args:
    merged: the merged `DistributionSet` (class ids of the whole task).
    config: the whole task's config (`subtask.count = 1`).
    data: the whole task's `RealData`.
  """
  buffer = experts_lib.ensure_buffer(config, data)
  expert = int(np.random.default_rng(config.seed).integers(buffer.num_experts))
  variables = buffer.variables(expert, soft_label_epoch(config))
  model = experts_lib.expert_spec(config, data).make_model()
  logits_fn = jax.jit(lambda x: model.apply(variables, x, train=False))
  logging.info("federated: soft labels from expert %d at epoch %d", expert,
               soft_label_epoch(config))
  return merged.with_soft_labels(logits_fn)


def check(config: ml_collections.ConfigDict) -> None:
  """One-line errors before any job starts: the split, the executor, and the method's config on
  subtask 0's data."""
  count = config.subtask.count
  if isinstance(count, bool) or not isinstance(count, int) or count < 2:
    raise ValueError(f"federated distillation needs subtask.count >= 2 subtasks, got {count!r}; "
                     "for one task run launch.distill")
  if config.federated.executor not in EXECUTORS:
    raise ValueError(f"unknown federated.executor {config.federated.executor!r}; use one of "
                     f"{', '.join(EXECUTORS)}")
  epoch = soft_label_epoch(config)
  if config.federated.soft_labels and not 0 < epoch <= config.experts.num_epochs:
    raise ValueError(f"federated.soft_label_epoch {epoch} is outside the experts' 1.."
                     f"{config.experts.num_epochs} epochs; set it in that range")
  data = pipeline.load_data(subtask_config(config, 0))
  data.check_ipc(config.ipc)
  methods.get_method(config.method)(subtask_config(config, 0), data)


def _why(error: Exception) -> str:
  """One line on why a job failed: the last line of its error, or that it left no result."""
  import submitit

  failed = isinstance(error, submitit.core.utils.FailedJobError)  # Raised: it has a message.
  if isinstance(error, submitit.core.utils.UncompletedJobError) and not failed:
    return "the job ended without a result (killed, out of memory or out of time)"
  lines = str(error).strip().splitlines()
  return lines[-1] if lines else type(error).__name__


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Distils every subtask as its own job, merges the sets and evaluates the merged one.

  Returns the report (also in `workdir/report.json`).

  Raises:
    SubtaskFailedError: a job failed (the message names its log; a rerun resumes it).
  """
  check(config)
  count = config.subtask.count
  pipeline.write_config(io_lib.Workdir(workdir), config)
  pending = [j for j in range(count) if not pipeline.is_distilled(subtask_dir(workdir, j))]
  if pending:
    executor = make_executor(config, os.path.join(workdir, "submitit"))
    jobs = executor.map_array(run_subtask,
                              [subtask_config(config, j).to_dict() for j in pending],
                              [subtask_dir(workdir, j) for j in pending])
    logging.info("federated: submitted subtasks %s as jobs %s (%s executor)", pending,
                 [job.job_id for job in jobs], config.federated.executor)
    failed = []
    for j, job in zip(pending, jobs):
      try:
        job.result()
        logging.info("federated: subtask %d finished", j)
      except Exception as e:  # submitit raises its own error types (failed, timed out).
        failed.append(f"subtask {j} (job {job.job_id}, log {job.paths.stderr}): {_why(e)}")
    if failed:
      raise SubtaskFailedError(
          "; ".join(failed) + "; rerun the same command: finished subtasks are kept and the "
          "others resume from their last checkpoint")
  full = full_task_config(config)
  data = pipeline.load_data(full)
  workdir_obj = io_lib.Workdir(workdir)
  if os.listdir(workdir_obj.distilled_dir):
    merged = distilled_lib.load(workdir_obj.distilled_dir)
  else:
    parts = [distilled_lib.load(os.path.join(subtask_dir(workdir, j), "distilled"))
             for j in range(count)]
    merged = distilled_lib.merge_subtasks(parts, data.set_meta(config.method, config.ipc))
    if config.federated.soft_labels:
      merged = soft_labelled(merged, full, data)
    distilled_lib.save(workdir_obj.distilled_dir, merged)
  seconds = [pipeline.read_json(os.path.join(subtask_dir(workdir, j), "distill_time.json"))
             ["seconds"] for j in range(count)]
  extras = {"federated": {"subtasks": count, "executor": config.federated.executor,
                          "subtask_distill_seconds": seconds}}
  # distill_seconds: the jobs' total compute; they ran concurrently on the local executor.
  return pipeline.report_set(full, data, merged, workdir, sum(seconds), extras=extras)
