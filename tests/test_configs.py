"""The preset parser, the registry and every config file's presets."""

import functools
import glob
import importlib
import os

import ml_collections
import pytest

from configs import common
from distill_jax import data as data_lib
from distill_jax import methods, models, pipeline
from distill_jax.registry import Registry, UnknownNameError

CONFIG_FILES = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(os.path.dirname(common.__file__), "*.py"))
    if not p.endswith(("__init__.py", "common.py"))
)
METHOD_CONFIGS = [name for name in CONFIG_FILES if name != "evaluate"]
# Datasets every machine has (scikit-learn's digits, Debian's Fashion-MNIST package).
OFFLINE_DATASETS = ("digits", "fashion_mnist")


def test_parse_arg_splits_presets_and_literals():
  presets, overrides = common.parse_arg("fashion_mnist, ipc=10 ,cpu,lr=1e-3,name=run_a,flag=True")
  assert presets == ["fashion_mnist", "cpu"]
  assert overrides == {"ipc": 10, "lr": 1e-3, "name": "run_a", "flag": True}
  assert common.parse_arg(None) == ([], {})


def test_apply_arg_order_nesting_and_errors():
  config = ml_collections.ConfigDict({"ipc": 1, "lr": 0.1, "eval": {"num_models": 5, "overrides": {}}})
  presets = {"big": {"ipc": 50, "eval": {"num_models": 3}}}
  common.apply_arg(config, "big,ipc=10,lr=1,eval.overrides.mtt.epochs=7", presets)
  # Presets first, overrides last; an int literal for a float field stays a float.
  assert (config.ipc, config.lr, config.eval.num_models) == (10, 1.0, 3)
  assert config.eval.overrides.mtt.epochs == 7
  with pytest.raises(ValueError, match="unknown preset 'nope'.*valid presets: big"):
    common.apply_arg(config, "nope", presets)
  with pytest.raises(ValueError, match="unknown config key 'ipcc'.*valid keys here: eval, ipc, lr"):
    common.apply_arg(config, "ipcc=3", presets)
  with pytest.raises(ValueError, match="unknown config key 'eval.x.y'"):
    common.apply_arg(config, "eval.x.y=3", presets)


def test_registry_lists_valid_names():
  reg = Registry("widget")
  reg.register("b", 2)
  reg.register("a")(1)
  assert reg.get("a") == 1 and reg.names() == ["a", "b"] and "b" in reg
  with pytest.raises(UnknownNameError, match="unknown widget 'c'; valid names: a, b"):
    reg.get("c")
  with pytest.raises(ValueError, match="already registered"):
    reg.register("a", 3)


def _network_depth(config) -> int:
  """The depth of the network a method config distils with."""
  if config.method == "frepo":
    return config.pool.depth
  if config.method in ("mtt", "d3"):  # D3's student and MMD features: the experts' network.
    return config.experts.model_kwargs.depth
  if config.method == "latent":  # Networks on codes have pixel_depth - log2 f (LatentDD).
    return config.pixel_depth
  if config.method == "apm":  # Teachers and students share the released `--model`.
    return config.teachers.model_kwargs.depth
  return config.pool.model_kwargs.depth


@functools.cache
def _real_data(name: str, preprocessing: str):
  return data_lib.load_real(name, preprocessing)


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_preset_of_every_config_applies(name):
  module = importlib.import_module(f"configs.{name}")
  base = module.get_config()
  assert isinstance(base, ml_collections.ConfigDict)
  for preset in [None, *module.PRESETS]:
    config = module.get_config(preset)
    # Derived values are never written into a config.
    assert "num_classes" not in config and "image_shape" not in config
    config.to_json()  # config.json must be writable.
    pipeline._protocol_names(config)  # Every named protocol and override exists.
    if config.method == "random":  # configs/evaluate.py: no method to build.
      continue
    method_class = methods.get_method(config.method)
    if config.dataset in OFFLINE_DATASETS:
      # Construction validates the method's settings on its data (no training happens).
      data = _real_data(config.dataset, config.preprocessing)
      data.check_ipc(config.ipc)
      method = method_class(config, data)
      assert method.num_steps >= config.num_steps


def test_every_offline_dataset_is_reached_by_a_preset():
  """The construction test above covers digits and Fashion-MNIST for every method."""
  for name in METHOD_CONFIGS:
    module = importlib.import_module(f"configs.{name}")
    reached = {module.get_config(p).dataset for p in [None, *module.PRESETS]}
    assert set(OFFLINE_DATASETS) <= reached, name


@pytest.mark.parametrize("name", [n for n in METHOD_CONFIGS if n != "d3s"])
def test_the_headline_protocol_evaluates_with_the_distillation_depth(name):
  """Every preset, alone and combined with every dataset preset in both orders, distils and
  evaluates (the first protocol, the method's own) with the depth of its dataset's preset."""
  module = importlib.import_module(f"configs.{name}")
  datasets = [p for p in module.PRESETS if p in common.DATASETS]
  others = [p for p in module.PRESETS if p not in common.DATASETS]
  args = [*module.PRESETS, *(f"{d},{o}" for d in datasets for o in others),
          *(f"{o},{d}" for d in datasets for o in others)]
  for arg in args:
    config = module.get_config(arg)
    expected = _network_depth(module.get_config(config.dataset))
    assert _network_depth(config) == expected, arg
    headline = config.eval.protocols.split(",")[0]
    protocol = pipeline._protocol(config, headline)
    assert protocol.model_kwargs["depth"] == expected, (arg, headline)


def test_d3s_evaluates_with_its_teachers_architecture():
  """D3S distils from teachers and validates a network of the teachers' architecture (paper:
  ResNet-18 both); the CPU and smoke presets shrink both alike."""
  module = importlib.import_module("configs.d3s")
  for arg in ["tiny_imagenet", "fashion_mnist,cpu", "cpu,fashion_mnist", "smoke"]:
    config = module.get_config(arg)
    protocol = pipeline._protocol(config, config.eval.protocols.split(",")[0])
    assert protocol.model == config.teachers.model, arg
    evaluated = protocol.make_model(10)
    teacher = models.get_model(config.teachers.model, num_classes=10,
                               **dict(config.teachers.model_kwargs))
    for key in ("depth", "width"):
      assert getattr(evaluated, key, None) == getattr(teacher, key, None), (arg, key)


def test_merge_nests_presets():
  merged = common.merge({"pool": {"depth": 2, "model_kwargs": {"a": 1}}, "ipc": 1},
                        {"pool": {"model_kwargs": {"b": 2}}, "ipc": 2})
  assert merged == {"pool": {"depth": 2, "model_kwargs": {"a": 1, "b": 2}}, "ipc": 2}
