"""The method interface: what every distillation method provides to the one run loop.

A method is a `DistillMethod` subclass in its own module `distill_jax.methods.<name>`,
registered with `@register_method("<name>")`; `get_method(name)` imports that module, so no list
of methods is kept anywhere. `distill_jax.methods.loop.run` drives every method the same way
(restore, prefetch, donation, divergence stop, progress, checkpoints); a method only says what a
step is:

  prepare()            host work before the first step (train an expert buffer, a teacher pool)
  init(key)            the state at step 0: a pytree (what the checkpoints hold)
  inputs(step)         host-side inputs of step `step` (1-based), read one step ahead in a
                       thread (MTT's expert checkpoints); derived from the seed and the step, so
                       a resumed run reads what an uninterrupted run would
  step(state, inputs)  one pure, jitted update -> (state, scalar metrics); the loop donates
                       `state`
  result(state)        the distilled set (a `distill_jax.distilled.DistilledSet`) of the state
                       copied to host memory (numpy leaves)
  state_shardings(s)   where each state leaf lives on the run's mesh (default: replicated;
                       FRePo splits its pool over `model`); `step` splits its batches with
                       `parallel.constrain_leading` (see `distill_jax.parallel`)
  watched              metric names that must stay finite; `divergence_hint()` names the fix
  report_extras(...)   optional additions to report.json (FRePo's KRR accuracy)
  baselines()          optional further baselines beside the random subset (soft-label sets)

docs/adding_a_method.md walks through DM as the example.
"""

import abc
import functools
import importlib
import pkgutil
from typing import Any, ClassVar

import jax.numpy as jnp
import ml_collections

from distill_jax import parallel
from distill_jax.registry import Registry, UnknownNameError

PyTree = Any


class DivergenceError(ValueError):
  """A watched metric became NaN or infinite; the message names the likely fix."""


class DistillMethod(abc.ABC):
  """Base class of the distillation methods (see the module docstring for the contract).

  Args:
    config: the method's config (`configs/<name>.py`), already validated by its presets.
    data: the `distill_jax.data.RealData` to distil.

  Construction must be cheap and must validate the config: the pipeline builds the method
  before it writes anything, so a bad value fails in a second, not after hours.
  """

  name: ClassVar[str]
  watched: ClassVar[tuple[str, ...]] = ("loss",)

  def __init__(self, config: ml_collections.ConfigDict, data):
    self.config = config
    self.data = data

  @property
  def num_steps(self) -> int:
    """Steps of a whole run (default `config.num_steps`; DC counts matching updates)."""
    return int(self.config.num_steps)

  @functools.cached_property
  def device_train_set(self) -> tuple[Any, Any]:
    """`(x_train, y_train)` of the real data on the device, placed once: the `inputs` of
    methods whose step samples its real batches itself (the same arrays every step, no copy)."""
    arrays = (jnp.asarray(self.data.x_train, jnp.float32),
              jnp.asarray(self.data.y_train, jnp.int32))
    return parallel.place(arrays, parallel.replicated())  # Every device of the mesh holds it.

  def prepare(self) -> None:
    """Long host-side work needed before the first step (default: none)."""

  @abc.abstractmethod
  def init(self, key) -> PyTree:
    """The state at step 0 from the run's key (`jax.random.key(config.seed)`)."""

  def inputs(self, step: int) -> PyTree:
    """Host-side inputs of step `step` (1-based); default: none."""
    del step
    return None

  @abc.abstractmethod
  def step(self, state: PyTree, inputs: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """One pure update: `(state, inputs) -> (state, {name: scalar})` (jitted, state donated)."""

  @abc.abstractmethod
  def result(self, state: PyTree):
    """The distilled set of a state (whose array leaves the loop copied to numpy)."""

  def state_shardings(self, abstract_state: PyTree) -> PyTree:
    """Where each leaf of the state lives on the current mesh, from `jax.eval_shape(init)`
    (called only when a mesh of several devices is active); default: replicated."""
    return parallel.replicated_shardings(abstract_state)

  def divergence_hint(self) -> str:
    """What to change when a watched metric diverges (one clause, naming config keys)."""
    return "lower the outer learning rate"

  def report_extras(self, distilled_set, workdir) -> dict[str, Any]:
    """Additions to report.json, free to write images into `workdir.images_dir` (default: none)."""
    del distilled_set, workdir
    return {}

  def baselines(self) -> dict[str, Any]:
    """Further baselines evaluated beside the random subset: `{report key: DistilledSet}`
    (e.g. a random subset with the method's kind of labels); default: none."""
    return {}


METHODS: Registry[type[DistillMethod]] = Registry("method")


def register_method(name: str):
  """Class decorator: registers a `DistillMethod` subclass under `name` (its module's name)."""

  def decorate(cls: type[DistillMethod]) -> type[DistillMethod]:
    cls.name = name
    METHODS.register(name, cls)
    return cls

  return decorate


# Modules of this package that hold the machinery rather than a method.
_NOT_METHODS = ("base", "loop")


def method_names() -> list[str]:
  """The names of the method modules in `distill_jax.methods`."""
  from distill_jax import methods

  return sorted(m.name for m in pkgutil.iter_modules(methods.__path__)
                if m.name not in _NOT_METHODS and not m.name.startswith("_"))


def get_method(name: str) -> type[DistillMethod]:
  """The method class `name`, imported from `distill_jax.methods.<name>`.

  Raises:
    UnknownNameError: no such method module (the message lists the valid names).
  """
  if name not in METHODS:
    if name not in method_names():
      raise UnknownNameError(f"unknown method {name!r}; valid names: {', '.join(method_names())}")
    importlib.import_module(f"distill_jax.methods.{name}")
  return METHODS.get(name)
