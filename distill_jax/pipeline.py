"""The main jobs behind the launchers: distil, evaluate, and write the workdir.

`launch/distill.py` and `launch/evaluate.py` are thin absl wrappers around `distill_and_evaluate`
and `evaluate_baseline`; notebooks call these functions directly. Every stage leaves its result in
the workdir (DESIGN.md section 6) and is skipped when a rerun finds it there, so running the same
command again after a kill resumes where the run stopped:

  config.json            the whole experiment record (a rerun must use the same config)
  checkpoints/           the method's Orbax checkpoints (set, optimiser state, step, PRNG key)
  distilled/             the final distilled set (Orbax), written once distillation finishes
  eval/<name>.json       each finished evaluation (protocol x {set, random subset, full data})
  images/                grids of the distilled set and of the random subset
  report.json            storage, downstream cost and accuracy side by side
"""

import json
import os
import time
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from distill_jax import data as data_lib
from distill_jax import distilled as distilled_lib
from distill_jax import evaluation
from distill_jax import io as io_lib
from distill_jax.methods import RealData, get_method


def load_real_data(dataset: str, preprocessing: str) -> RealData:
  """Loads `dataset`, fits `preprocessing` on its training split and applies it to both splits."""
  info = data_lib.info(dataset)
  x_train, y_train = data_lib.load(dataset, "train")
  x_test, y_test = data_lib.load(dataset, "test")
  preprocessor = data_lib.fit_preprocessor(x_train, preprocessing)
  return RealData(
      name=dataset,
      num_classes=info.num_classes,
      image_shape=tuple(info.image_shape),
      class_names=tuple(info.class_names),
      x_train=np.asarray(preprocessor.apply(x_train), np.float32),
      y_train=y_train,
      x_test=np.asarray(preprocessor.apply(x_test), np.float32),
      y_test=y_test,
      preprocessor=preprocessor,
      source_fingerprint=data_lib.fingerprint(x_train, y_train),
  )


def check_ipc(data: RealData, ipc: int) -> None:
  """Fails early, before any long work, when no set of `ipc` images per class can exist."""
  smallest = int(np.bincount(data.y_train, minlength=data.num_classes).min())
  if not 1 <= ipc <= smallest:
    raise ValueError(
        f"ipc={ipc} is impossible for {data.name}: each class must give 1 to {smallest} images "
        f"(its smallest class has {smallest}); set ipc to a value in that range"
    )


def distill_and_evaluate(config: ml_collections.ConfigDict, workdir_path: str) -> dict[str, Any]:
  """Distils `config.dataset` with `config.method`, evaluates the set and writes the report.

  Returns the report dictionary (also written to `report.json`).
  """
  method = get_method(config.method)
  workdir = io_lib.Workdir(workdir_path)
  workdir.write_config(config)
  data = load_real_data(config.dataset, config.preprocessing)
  check_ipc(data, config.ipc)

  timing_path = os.path.join(workdir.path, "distill_time.json")
  # Saves are atomic (distilled.save), so any content means a finished set.
  if os.listdir(workdir.distilled_dir):
    distilled_set = distilled_lib.load(workdir.distilled_dir)
    distill_seconds = _read_json(timing_path)["seconds"]
    logging.info("Found the finished distilled set in %s; skipping distillation.", workdir.distilled_dir)
  else:
    start = time.perf_counter()
    distilled_set = method.distill(config, data, workdir)
    distill_seconds = time.perf_counter() - start
    distilled_lib.save(workdir.distilled_dir, distilled_set)
    _write_json(timing_path, {"seconds": distill_seconds})

  report = _evaluate_and_report(config, data, distilled_set, workdir, distill_seconds)
  if method.report_extras is not None:
    report.update(method.report_extras(config, data, distilled_set, workdir))
    workdir.write_report(report)
  return report


def evaluate_baseline(config: ml_collections.ConfigDict, workdir_path: str) -> dict[str, Any]:
  """Evaluates a saved distilled set (`config.source` = its folder) or a random real subset.

  With `config.source == "random"` the evaluated set is a class-balanced random subset of
  `config.ipc` real images per class; with `config.full_data` the whole training set is evaluated
  as the upper bound as well.
  """
  workdir = io_lib.Workdir(workdir_path)
  workdir.write_config(config)
  data = load_real_data(config.dataset, config.preprocessing)
  if config.source == "random":
    check_ipc(data, config.ipc)
    distilled_set = random_subset_set(data, config.ipc, seed=config.seed)
  else:
    distilled_set = distilled_lib.load(config.source)
    if distilled_set.meta.dataset != config.dataset:
      raise ValueError(
          f"the set in {config.source} was distilled from {distilled_set.meta.dataset!r} but the "
          f"config evaluates on {config.dataset!r}; pass dataset={distilled_set.meta.dataset}"
      )
  report = _evaluate_and_report(config, data, distilled_set, workdir, distill_seconds=0.0)
  if config.full_data:
    report["full_data"] = {
        name: _cached_evaluation(
            workdir,
            f"{name}_full_data",
            lambda name=name: _evaluate(
                config, name, data.x_train, data.y_train, data, lr=None, full_data=True
            ),
        )
        for name in _protocol_names(config)
    }
    workdir.write_report(report)
  return report


def random_subset_set(data: RealData, ipc: int, *, seed: int) -> distilled_lib.PixelSet:
  """A class-balanced random subset of the (preprocessed) training set as a `pixels` set."""
  x, y = data_lib.random_subset(
      data.x_train, data.y_train, ipc=ipc, num_classes=data.num_classes, seed=seed
  )
  return distilled_lib.PixelSet(x=x, y=y, meta=data.set_meta("random", ipc))


def _protocol_names(config: ml_collections.ConfigDict) -> list[str]:
  names = [name.strip() for name in config.eval.protocols.split(",") if name.strip()]
  if not names:
    raise ValueError("config.eval.protocols is empty; name at least one protocol, e.g. 'standard'")
  for name in names:
    evaluation.PROTOCOLS.get(name)  # Unknown names fail here, before any training.
  return names


def _evaluate(
    config: ml_collections.ConfigDict,
    protocol_name: str,
    x: np.ndarray,
    y: np.ndarray,
    data: RealData,
    *,
    lr: float | None,
    full_data: bool = False,
) -> dict[str, Any]:
  overrides = dict(config.eval.overrides.get(protocol_name, {}))
  if full_data:
    overrides.update(config.full_data_overrides.get(protocol_name, {}))
  protocol = evaluation.get_protocol(protocol_name, **overrides)
  result = evaluation.evaluate(
      np.asarray(x),
      np.asarray(y),
      data.x_test,
      data.y_test,
      protocol,
      num_classes=data.num_classes,
      seed=config.seed,
      num_models=config.eval.num_models,
      lr=lr,
  )
  return {
      "mean": float(result.mean),
      "std": float(result.std),
      "n": int(result.n),
      "accuracies": [float(a) for a in result.accuracies],
      "seconds": float(result.seconds),
      "steps": int(result.steps),
  }


def _cached_evaluation(workdir: io_lib.Workdir, name: str, run) -> dict[str, Any]:
  path = os.path.join(workdir.path, "eval", f"{name}.json")
  if os.path.exists(path):
    return _read_json(path)
  result = run()
  _write_json(path, result)
  logging.info("%s: %.2f%% +- %.2f over %d networks", name, 100 * result["mean"], 100 * result["std"], result["n"])
  return result


def _evaluate_and_report(config, data, distilled_set, workdir, distill_seconds) -> dict[str, Any]:
  names = _protocol_names(config)
  x_syn, y_syn = distilled_set.x, distilled_set.y
  learned_lr = None if getattr(distilled_set, "lr", None) is None else float(distilled_set.lr)
  is_random = distilled_set.meta.method == "random"
  if is_random or config.eval.random_subset:
    subset = distilled_set if is_random else random_subset_set(data, config.ipc, seed=config.seed)
  evaluations = {}
  for name in names:
    entry = {
        "accuracy": _cached_evaluation(
            workdir,
            name,
            lambda name=name: _evaluate(
                config, name, x_syn, y_syn, data, lr=learned_lr if _uses_learned_lr(name) else None
            ),
        )
    }
    if is_random:
      entry["random_subset"] = entry["accuracy"]
    elif config.eval.random_subset:
      entry["random_subset"] = _cached_evaluation(
          workdir,
          f"{name}_random_subset",
          lambda name=name: _evaluate(config, name, subset.x, subset.y, data, lr=None),
      )
    evaluations[name] = entry

  _write_images(data, distilled_set, subset if config.eval.random_subset or is_random else None, workdir)
  headline = evaluations[names[0]]
  storage = distilled_lib.storage_bytes(distilled_set)
  report = {
      "method": distilled_set.meta.method,
      "dataset": data.name,
      "ipc": int(config.ipc),
      "protocol": names[0],
      "accuracy": _summary(headline["accuracy"]),
      "random_subset": _summary(headline["random_subset"]) if "random_subset" in headline else None,
      "storage_mb": storage / 2**20,
      "ipc_equivalent": float(distilled_lib.ipc_equivalent(distilled_set)),
      "distill_seconds": float(distill_seconds),
      "downstream_seconds": headline["accuracy"]["seconds"],
      "steps": headline["accuracy"]["steps"],
      "evaluations": {
          name: {
              key: {**_summary(value), "seconds": value["seconds"], "steps": value["steps"]}
              for key, value in entry.items()
          }
          for name, entry in evaluations.items()
      },
  }
  if learned_lr is not None:
    report["learned_lr"] = learned_lr
  workdir.write_report(report)
  logging.info("Report written to %s:\n%s", workdir.report_path, json.dumps(report, indent=2))
  return report


def _uses_learned_lr(protocol_name: str) -> bool:
  """Only protocols that train with a learned lr (MTT's) take it; `standard` treats all sets alike."""
  return evaluation.get_protocol(protocol_name).use_learned_lr


def _summary(result: dict[str, Any]) -> dict[str, Any]:
  return {"mean": result["mean"], "std": result["std"], "n": result["n"]}


def _write_images(data: RealData, distilled_set, subset, workdir: io_lib.Workdir) -> None:
  def to_images(x):
    return np.clip(np.asarray(data.preprocessor.invert(np.asarray(x))), 0.0, 1.0)

  labels = distilled_set.y if distilled_set.y.ndim == 1 else np.argmax(distilled_set.y, -1)
  io_lib.save_grid(
      os.path.join(workdir.images_dir, "distilled.png"),
      to_images(distilled_set.x),
      np.asarray(labels),
      class_names=data.class_names,
  )
  if subset is not None and subset is not distilled_set:
    io_lib.save_grid(
        os.path.join(workdir.images_dir, "random_subset.png"),
        to_images(subset.x),
        np.asarray(subset.y),
        class_names=data.class_names,
    )


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, value: Any) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)  # Atomic: a kill never leaves half a file behind.
