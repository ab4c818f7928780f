"""The main jobs behind the launchers: distil, evaluate, and write the workdir.

`launch/distill.py` and `launch/evaluate.py` are thin absl wrappers around `distill_and_evaluate`
and `evaluate_baseline`; notebooks call these functions directly. Every stage leaves its result in
the workdir (DESIGN.md section 6) and is skipped when a rerun finds it there, so running the same
command again after a kill resumes where the run stopped:

  config.json            the whole experiment record (a rerun must use the same config)
  checkpoints/           the run loop's Orbax checkpoints (state, run seconds)
  distill_time.json      the distillation's seconds, written before the set
  distilled/             the final distilled set (Orbax), written once distillation finishes
  eval/<name>.json       each finished evaluation (protocol x {set, each baseline, full data})
  images/                grids of the distilled set and of the random subset
  report.json            storage, downstream cost and accuracy side by side

Each job runs on the mesh of `config.mesh` (`distill_jax.parallel`). In a run of several
processes every process computes everything and only process 0 writes files (Orbax checkpoints
are written by all processes together).

Nothing here reads a set's arrays directly: evaluation, grids and the report go through the set
protocol of `distill_jax.distilled.DistilledSet`, so every kind is handled the same way.
"""

import functools
import json
import math
import os
import resource
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from distill_jax import data as data_lib
from distill_jax import distilled as distilled_lib
from distill_jax import evaluation
from distill_jax import io as io_lib
from distill_jax import methods
from distill_jax import parallel


def _on_the_config_mesh(job: Callable[..., Any]) -> Callable[..., Any]:
  """Runs `job(config, ...)` with the mesh of `config.mesh` active (`parallel.use_mesh`)."""

  @functools.wraps(job)
  def run(config: ml_collections.ConfigDict, *args, **kwargs):
    with parallel.use_mesh(parallel.mesh_from_config(config)):
      return job(config, *args, **kwargs)

  return run


def distill_and_evaluate(config: ml_collections.ConfigDict, workdir_path: str) -> dict[str, Any]:
  """Distils `config.dataset` with `config.method`, evaluates the set and writes the report.

  Returns the report dictionary (also written to `report.json`).
  """
  method, data, distilled_set, distill_seconds = distill(config, workdir_path)
  return report_set(config, data, distilled_set, workdir_path, distill_seconds, method=method)


@_on_the_config_mesh
def distill(config: ml_collections.ConfigDict, workdir_path: str):
  """Distils (or finds the finished set in the workdir); no evaluation.

  Returns:
    `(method, data, distilled_set, distill_seconds)`: the method object (validated and, when
    it distilled, prepared), the `RealData`, the set and the distillation's seconds.
  """
  method_class = methods.get_method(config.method)
  _protocol_names(config)  # Protocol names and overrides fail here, before any work.
  data = load_data(config)
  data.check_ipc(config.ipc)
  method = method_class(config, data)  # Validates the method's settings before any work.
  workdir = io_lib.Workdir(workdir_path)
  write_config(workdir, config)

  timing_path = os.path.join(workdir.path, "distill_time.json")
  # Saves are atomic (distilled.save) and the timing is written first, so a set means both;
  # a set without its timing (the file deleted by hand) re-reads the seconds from the last
  # checkpoint, or distils again where the checkpoints are gone too.
  timing = read_json(timing_path)
  if os.listdir(workdir.distilled_dir) and timing is not None:
    distilled_set = distilled_lib.load(workdir.distilled_dir)
    distill_seconds = timing["seconds"]
    logging.info("Found the finished distilled set in %s; skipping distillation.",
                 workdir.distilled_dir)
  else:
    result = methods.run(method, workdir)
    distilled_set, distill_seconds = result.distilled_set, result.seconds
    timing = {"seconds": distill_seconds, "compile_seconds": result.compile_seconds,
              "steps": result.steps, "peak_host_rss_mb": _peak_host_rss_mb()}
    if math.isfinite(result.ms_per_step):
      timing["ms_per_step"] = result.ms_per_step
    _write_json(timing_path, timing)
    if parallel.is_writer() and not os.listdir(workdir.distilled_dir):  # A saved set stays.
      distilled_lib.save(workdir.distilled_dir, distilled_set)
  return method, data, distilled_set, distill_seconds


def is_distilled(workdir_path: str) -> bool:
  """Whether `distill` finished in this workdir (its set and timing are there)."""
  distilled_dir = os.path.join(workdir_path, "distilled")
  return (os.path.isdir(distilled_dir) and bool(os.listdir(distilled_dir))
          and os.path.isfile(os.path.join(workdir_path, "distill_time.json")))


@_on_the_config_mesh
def report_set(config: ml_collections.ConfigDict, data: data_lib.RealData, distilled_set,
               workdir_path: str, distill_seconds: float, *, method=None,
               extras: dict[str, Any] | None = None) -> dict[str, Any]:
  """Evaluates `distilled_set` beside the random subset at its `baseline_ipc()` (and the
  method's baselines), writes images and `report.json` (with the method's extras and `extras`)
  into the workdir, and returns the report."""
  protocols = _protocol_names(config)
  workdir = io_lib.Workdir(workdir_path)
  if method is not None:
    _warn_if_blown_up(distilled_set, data, method)
  baselines = {"random_subset": random_subset_set(data, distilled_set.baseline_ipc(),
                                                  seed=config.seed)}
  if method is not None:
    baselines.update(method.baselines())
  if not config.eval.random_subset:
    baselines.pop("random_subset")
  report = _evaluate_and_report(config, data, distilled_set, baselines, protocols, workdir,
                                distill_seconds)
  if method is not None:
    report.update(method.report_extras(distilled_set, workdir))
  report.update(extras or {})
  workdir.write_report(report)
  return report


def _peak_host_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB.


def resource_card(timing: dict[str, Any] | None) -> dict[str, Any]:
  """report.json's `resources`: what the run took and where it ran.

  `distill_seconds` (every resumed segment), `compile_seconds` and `ms_per_step` (the last
  segment's steps after compilation) and `peak_host_rss_mb` (of the process that finished the
  distillation, measured when it did; of this process when nothing was distilled) from
  `distill_time.json`;
  `peak_device_mb` where the backend reports `memory_stats` (accelerators); the device kind and
  the counts of devices and processes.
  """
  devices = jax.devices()
  card = {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
          "device_count": len(devices), "process_count": jax.process_count(),
          "peak_host_rss_mb": (timing or {}).get("peak_host_rss_mb") or _peak_host_rss_mb()}
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  if any(peaks):
    card["peak_device_mb"] = max(p for p in peaks if p) / 2**20
  if timing:
    card.update(distill_seconds=timing.get("seconds"), steps=timing.get("steps"),
                compile_seconds=timing.get("compile_seconds"),
                ms_per_step=timing.get("ms_per_step"))
  return card


@_on_the_config_mesh
def evaluate_baseline(config: ml_collections.ConfigDict, workdir_path: str) -> dict[str, Any]:
  """Evaluates a saved distilled set (`config.source` = its folder) or a random real subset.

  With `config.source == "random"` the evaluated set is a class-balanced random subset of
  `config.ipc` real images per class; a saved set is evaluated beside a random subset of
  `set.baseline_ipc()` images per class (its IPC; equal storage for latent sets). With
  `config.full_data` the whole training set is evaluated as the upper bound too.
  """
  protocols = _protocol_names(config)
  data = load_data(config)
  if config.source == "random":
    data.check_ipc(config.ipc)
    distilled_set = random_subset_set(data, config.ipc, seed=config.seed)
  else:
    if os.path.isdir(os.path.join(config.source, "distilled")):
      raise ValueError(f"source={config.source} is a run folder; pass its set: "
                       f"source={os.path.join(config.source, 'distilled')}")
    distilled_set = distilled_lib.load(config.source)
    if distilled_set.meta.dataset != config.dataset:
      raise ValueError(
          f"the set in {config.source} was distilled from {distilled_set.meta.dataset!r} but the "
          f"config evaluates on {config.dataset!r}; pass dataset={distilled_set.meta.dataset}"
      )
  workdir = io_lib.Workdir(workdir_path)
  write_config(workdir, config)
  baselines = {}
  if config.eval.random_subset and distilled_set.meta.method != "random":
    baselines["random_subset"] = random_subset_set(data, distilled_set.baseline_ipc(),
                                                   seed=config.seed)
  report = _evaluate_and_report(config, data, distilled_set, baselines, protocols, workdir,
                                distill_seconds=0.0)
  if config.full_data:
    full = distilled_lib.PixelSet(data.x_train, data.y_train, meta=data.set_meta("full_data", 1))
    report["full_data"] = {
        name: _cached_evaluation(workdir, f"{name}_full_data", lambda name=name: _evaluate(
            config, name, full, data, full_data=True), _settings(config, name, full_data=True))
        for name in protocols
    }
    workdir.write_report(report)
  return report


def load_data(config: ml_collections.ConfigDict) -> data_lib.RealData:
  """The config's dataset; with `validation_split` (configs that have it) N training images are
  held out and evaluated on instead of the test split (for choosing hyperparameters); with
  `subtask.count > 1` (D3's federated jobs) only subtask `subtask.index`'s classes."""
  data = data_lib.load_real(config.dataset, config.preprocessing,
                            validation=config.get("validation_split", 0))
  subtask = config.get("subtask")
  if subtask is not None and subtask.count > 1:
    data = data.subtask(subtask.index, subtask.count)
  return data


def _split_name(config: ml_collections.ConfigDict) -> str:
  held_out = config.get("validation_split", 0)
  return f"validation ({held_out} held-out training images)" if held_out else "test"


def _warn_if_blown_up(distilled_set, data: data_lib.RealData, method) -> None:
  """Warns when the set's inputs left the data's range by orders of magnitude (a too-large outer
  lr makes values up to 1e9 with finite losses: no divergence, but a useless set)."""
  x, _ = distilled_set.preview()
  peak = float(np.max(np.abs(np.asarray(x))))
  real = float(np.max(np.abs(data.x_train[:1000])))
  if peak > 100 * max(real, 1e-6):
    logging.warning(
        "the distilled inputs reach |x| = %.3g, %.0fx the real data's largest value (%.3g): the "
        "set has likely blown up; %s", peak, peak / max(real, 1e-6), real,
        method.divergence_hint())


def random_subset_set(data: data_lib.RealData, ipc: int, *, seed: int) -> distilled_lib.PixelSet:
  """A class-balanced random subset of the (preprocessed) training set as a `pixels` set."""
  x, y = data_lib.random_subset(data.x_train, data.y_train, ipc=ipc,
                                num_classes=data.num_classes, seed=seed)
  return distilled_lib.PixelSet(x=x, y=y, meta=data.set_meta("random", ipc))


def _protocol_names(config: ml_collections.ConfigDict) -> list[str]:
  names = [name.strip() for name in config.eval.protocols.split(",") if name.strip()]
  if not names:
    raise ValueError("config.eval.protocols is empty; name at least one protocol, e.g. 'standard'")
  for name in names:  # Unknown names and bad overrides fail here, before any training.
    _protocol(config, name)
  return names


def _protocol(config, name: str, *, full_data: bool = False) -> evaluation.Protocol:
  overrides = dict(config.eval.overrides.get(name, {}))
  if full_data:
    overrides.update(config.full_data_overrides.get(name, {}))
  return evaluation.get_protocol(name, **overrides)


def write_config(workdir: io_lib.Workdir, config: ml_collections.ConfigDict) -> None:
  # Evaluation settings and how federated jobs or devices run do not touch the distillation: a
  # rerun may change them, and every evaluation whose settings changed runs again (`_cached_evaluation`).
  changed = workdir.write_config(config, may_change=(
      "eval", "full_data_overrides", "federated", "mesh", "distributed"))
  if changed:
    logging.info("Evaluation settings changed (%s); evaluations that depend on them run again.",
                 ", ".join(changed))


def _evaluate(config, name: str, training_set, data, *, full_data: bool = False) -> dict:
  result = evaluation.evaluate(
      training_set, _protocol(config, name, full_data=full_data), data.x_test, data.y_test,
      seed=config.seed, num_models=config.eval.num_models,
  )
  return result.to_dict()


def _settings(config, name: str, *, full_data: bool = False) -> dict[str, Any]:
  """What an evaluation's result depends on besides the set: its cache key in `eval/*.json`."""
  return {"protocol": repr(_protocol(config, name, full_data=full_data)),
          "num_models": config.eval.num_models, "seed": config.seed}


def _cached_evaluation(workdir: io_lib.Workdir, name: str, run: Callable[[], dict],
                       settings: dict[str, Any]) -> dict:
  """`eval/<name>.json` when it was written with `settings`, else `run()` (written there).

  A file from other settings, or one that is not valid JSON, is evaluated again (logged).
  """
  path = os.path.join(workdir.path, "eval", f"{name}.json")
  if os.path.exists(path):
    cached = read_json(path)
    if cached is None:
      logging.warning("%s is not valid JSON; evaluating %s again.", path, name)
    elif cached.get("settings", settings) == settings:
      return cached
    else:
      logging.info("%s was evaluated with other settings; evaluating it again.", name)
  result = {**run(), "settings": settings}
  _write_json(path, result)
  logging.info("%s: %.2f%% +- %.2f over %d networks", name, 100 * result["mean"],
               100 * result["std"], result["n"])
  return result


def _summary(result: dict[str, Any]) -> dict[str, Any]:
  return {"mean": result["mean"], "std": result["std"], "n": result["n"]}


def _with_storage(summary: dict[str, Any], training_set) -> dict[str, Any]:
  return {**summary, "ipc": training_set.meta.ipc,
          "storage_mb": distilled_lib.storage_mb(training_set),
          "ipc_equivalent": float(distilled_lib.ipc_equivalent(training_set))}


def _evaluate_and_report(config, data, distilled_set, baselines: dict, protocols: list[str],
                         workdir: io_lib.Workdir, distill_seconds: float) -> dict[str, Any]:
  """Evaluates the set and every baseline under every protocol that can train it (a KD protocol
  cannot train hard labels: those pairs are left out) and assembles the report. A baseline's
  entry in the report is its accuracy under the first protocol that trained it, named there."""
  evaluations = {}
  for name in protocols:
    settings = _settings(config, name)
    protocol = _protocol(config, name)
    entry = {}
    if protocol.can_train(distilled_set.label_kind):
      entry["accuracy"] = _cached_evaluation(
          workdir, name, lambda name=name: _evaluate(config, name, distilled_set, data), settings)
    for key, baseline in baselines.items():
      if protocol.can_train(baseline.label_kind):
        entry[key] = _cached_evaluation(
            workdir, f"{name}_{key}",
            lambda name=name, b=baseline: _evaluate(config, name, b, data), settings)
    evaluations[name] = entry
  if "accuracy" not in evaluations[protocols[0]]:
    raise ValueError(
        f"the first protocol {protocols[0]!r} cannot train a set with {distilled_set.label_kind} "
        "labels; put a protocol that can first in eval.protocols")
  _write_images(data, distilled_set, baselines.get("random_subset"), workdir)

  headline = evaluations[protocols[0]]
  report = {
      "method": distilled_set.meta.method,
      "dataset": data.name,
      "ipc": distilled_set.meta.ipc,
      "protocol": protocols[0],
      "split": _split_name(config),
      "accuracy": _summary(headline["accuracy"]),
      "storage_mb": distilled_lib.storage_mb(distilled_set),
      "ipc_equivalent": float(distilled_lib.ipc_equivalent(distilled_set)),
      "label_kind": distilled_set.label_kind,
      "distill_seconds": float(distill_seconds),
      "downstream_seconds": headline["accuracy"]["seconds"],
      "steps": headline["accuracy"]["steps"],
      "evaluations": {
          name: {key: {**_summary(value), "seconds": value["seconds"], "steps": value["steps"]}
                 for key, value in entry.items()}
          for name, entry in evaluations.items()
      },
  }
  for key, baseline in baselines.items():
    first = next((name for name in protocols if key in evaluations[name]), None)
    if first is None:
      logging.warning("no protocol in eval.protocols can train the %s baseline (%s labels); add "
                      "one that can (e.g. 'mtt')", key, baseline.label_kind)
      continue
    report[key] = {**_with_storage(_summary(evaluations[first][key]), baseline),
                   "protocol": first, "label_kind": baseline.label_kind}
  if distilled_set.meta.method == "random":
    report["random_subset"] = {**_with_storage(report["accuracy"], distilled_set),
                               "protocol": protocols[0], "label_kind": distilled_set.label_kind}
  if distilled_set.training_lr() is not None:
    report["learned_lr"] = distilled_set.training_lr()
  report["resources"] = resource_card(read_json(os.path.join(workdir.path, "distill_time.json")))
  workdir.write_report(report)
  logging.info("Report written to %s:\n%s", workdir.report_path, json.dumps(report, indent=2))
  return report


def _write_images(data, distilled_set, subset, workdir: io_lib.Workdir) -> None:
  for name, training_set in (("distilled", distilled_set), ("random_subset", subset)):
    if training_set is None or (name == "random_subset" and training_set is distilled_set):
      continue
    x, labels = training_set.preview()
    io_lib.save_grid(os.path.join(workdir.images_dir, f"{name}.png"), data.to_images(x),
                     np.asarray(labels), class_names=data.class_names)


def read_json(path: str) -> Any:
  """The JSON value in `path`, or None when the file is missing or not valid JSON."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
    return None


def _write_json(path: str, value: Any) -> None:
  # Atomic: a kill never leaves half a file behind.
  io_lib.atomic_write_text(path, json.dumps(value, indent=2) + "\n")
