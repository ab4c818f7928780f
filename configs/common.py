"""Shared pieces of the config files: the preset parser and the dataset table.

A config file's `get_config(arg)` receives what follows the colon in
`--config=configs/frepo.py:fashion_mnist,ipc=10,cpu`. The argument is a comma-separated list
of preset names (looked up in the file's preset tables, applied left to right) and `key=value`
overrides (values parsed as Python literals, applied last). Derived values such as the image
shape or the class count are never written into the config: `distill_jax.data.info(name)`
gives them.
"""

import ast
from collections.abc import Mapping
from typing import Any

import ml_collections

# Datasets every method config accepts as a preset name.
DATASETS = (
    "fashion_mnist",
    "digits",
    "mnist",
    "cifar10",
    "cifar100",
    "svhn_cropped",
    "tiny_imagenet",
    "imagenette",
)


def parse_arg(arg: str | None) -> tuple[list[str], dict[str, Any]]:
  """Splits `'fashion_mnist,ipc=10,cpu'` into presets `['fashion_mnist', 'cpu']` and overrides.

  >>> parse_arg("fashion_mnist,ipc=10,cpu,lr=3e-4,name=run")
  (['fashion_mnist', 'cpu'], {'ipc': 10, 'lr': 0.0003, 'name': 'run'})
  """
  presets, overrides = [], {}
  for token in (arg or "").split(","):
    token = token.strip()
    if not token:
      continue
    if "=" in token:
      key, value = token.split("=", 1)
      overrides[key.strip()] = literal(value.strip())
    else:
      presets.append(token)
  return presets, overrides


def literal(value: str) -> Any:
  """`value` as a Python literal, or the string itself for a bare word (`protocol=mtt`)."""
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value  # A bare word such as `protocol=mtt`.


def apply_arg(
    config: ml_collections.ConfigDict,
    arg: str | None,
    presets: Mapping[str, Mapping[str, Any]],
) -> ml_collections.ConfigDict:
  """Applies the presets named in `arg`, then its `key=value` overrides, to `config`.

  Keys may be dotted (`eval.num_models=3`). Unknown presets and unknown keys raise a
  `ValueError` that lists the valid choices.
  """
  names, overrides = parse_arg(arg)
  for name in names:
    if name not in presets:
      raise ValueError(
          f"unknown preset {name!r} in config argument {arg!r}; valid presets: "
          f"{', '.join(sorted(presets))}"
      )
    update(config, presets[name], source=f"preset {name!r}")
  update(config, overrides, source=f"config argument {arg!r}")
  return config


# Config fields whose sub-keys are free-form (any key may be added by a preset or override).
FREEFORM = ("eval.overrides", "full_data_overrides", "teachers.model_kwargs")


def update(
    config: ml_collections.ConfigDict,
    values: Mapping[str, Any],
    *,
    source: str,
    prefix: str = "",
) -> None:
  """Sets `values` (nested dicts or dotted keys) in `config`; unknown keys raise a `ValueError`
  naming `source` and the valid keys (sub-keys of `FREEFORM` fields may be new)."""
  for key, value in values.items():
    *parents, leaf = key.split(".")
    target, path = config, prefix
    for part in parents:
      path = f"{path}.{part}" if path else part
      if part not in target:
        if not path.startswith(FREEFORM):
          raise ValueError(f"unknown config key {key!r} in {source}")
        target[part] = ml_collections.ConfigDict()
      target = target[part]
    path = f"{path}.{leaf}" if path else leaf
    if leaf not in target:
      if not any(path.startswith(f + ".") for f in FREEFORM):
        raise ValueError(
            f"unknown config key {path!r} in {source}; valid keys here: "
            f"{', '.join(sorted(target.keys()))}"
        )
      target[leaf] = ml_collections.ConfigDict() if isinstance(value, Mapping) else value
    if isinstance(target[leaf], ml_collections.ConfigDict) and isinstance(value, Mapping):
      update(target[leaf], value, source=source, prefix=path)
    else:
      target[leaf] = _typed(target[leaf], value, path, source)


def _typed(current: Any, value: Any, path: str, source: str) -> Any:
  """`value` converted to the type of the field's `current` value, or a `ValueError` that names
  the key and the expected type (`ipc=two`, `ipc=2.5`, `learn_label=false`).

  >>> _typed(0.1, 1, "lr", "test")
  1.0
  >>> _typed(10, 2.5, "ipc", "config argument 'ipc=2.5'")
  Traceback (most recent call last):
  ...
  ValueError: config key 'ipc' expects an int, got 2.5 (float) in config argument 'ipc=2.5'
  """
  if current is None or value is None or isinstance(current, ml_collections.ConfigDict):
    return value
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)  # An int literal for a float field (`lr=1`).
  expected = type(current)
  if isinstance(current, bool) or isinstance(value, bool):
    ok = isinstance(current, bool) and isinstance(value, bool)
  else:
    ok = isinstance(value, expected)
  if ok:
    return value
  names = {bool: "a bool (True or False)", int: "an int", float: "a float", str: "a string",
           tuple: "a tuple", list: "a list"}
  hint = " (Python literals: True/False)" if expected is bool else ""
  raise ValueError(
      f"config key {path!r} expects {names.get(expected, expected.__name__)}, got {value!r} "
      f"({type(value).__name__}) in {source}{hint}"
  )


def merge(*presets: Mapping[str, Any]) -> dict[str, Any]:
  """Presets merged left to right, nested dicts key by key (later values win).

  For presets built from others: `{**a, **b}` would let b's `pool` block replace a's whole
  `pool` block instead of adding to it.

  >>> merge({"pool": {"depth": 2}, "ipc": 1}, {"pool": {"width": 8}, "ipc": 2})
  {'pool': {'depth': 2, 'width': 8}, 'ipc': 2}
  """
  merged: dict[str, Any] = {}
  for preset in presets:
    for key, value in preset.items():
      if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
        value = merge(merged[key], value)
      merged[key] = value
  return merged


def base_config(method: str) -> ml_collections.ConfigDict:
  """The fields every distillation config shares; method files add their own beside them."""
  config = ml_collections.ConfigDict()
  config.method = method
  config.dataset = "fashion_mnist"
  config.ipc = 10  # Images per class of the distilled set.
  config.seed = 0
  # One of distill_jax.data's preprocessor kinds: none, standardize, zca_frepo, zca_kornia.
  config.preprocessing = "standardize"
  config.num_steps = 1000  # Outer (synthetic-set) updates.
  config.log_every = 50
  config.checkpoint_every = 200
  config.eval = ml_collections.ConfigDict()
  # Protocols of distill_jax.evaluation, comma separated; the first is the report's headline.
  config.eval.protocols = "standard"
  config.eval.num_models = 5
  config.eval.random_subset = True  # Evaluate a random real subset of the same size beside the set.
  # Per-protocol field overrides, e.g. {"mtt": {"epochs": 300}}.
  config.eval.overrides = ml_collections.ConfigDict()
  # Devices (distill_jax.parallel): the run's mesh, devices per named axis; -1 = all the
  # devices the other axis leaves. `data` splits batches, `model` splits stacks of networks.
  # Ours (the authors' codes run on one device or pmap/DataParallel over one axis).
  config.mesh = ml_collections.ConfigDict({"data": -1, "model": 1})
  # Several processes/hosts (jax.distributed): empty = from the environment (JAX_COORDINATOR_
  # ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) or SLURM's srun, else one process.
  config.distributed = ml_collections.ConfigDict(
      {"coordinator_address": "", "num_processes": 0, "process_id": -1})
  return config
