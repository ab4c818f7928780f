"""The method interface (distill_jax.methods.base): lookup by module name, registration, errors."""

import os
import sys

import pytest

from distill_jax import methods
from distill_jax.methods import base, dc, dm, frepo, mtt
from distill_jax.registry import UnknownNameError

METHODS_DIR = os.path.dirname(os.path.abspath(base.__file__))


def _method_modules():
  """Every module file of distill_jax/methods but the machinery and private helpers."""
  return sorted(
      name[:-3] for name in os.listdir(METHODS_DIR)
      if name.endswith(".py") and not name.startswith("_") and name not in ("base.py", "loop.py")
  )


def test_get_method_finds_every_method_module():
  names = _method_modules()
  assert {"frepo", "mtt", "dc", "dm"} <= set(names)
  assert methods.method_names() == names
  for name in names:
    cls = methods.get_method(name)
    assert issubclass(cls, base.DistillMethod) and cls.name == name
    assert cls.__module__ == f"distill_jax.methods.{name}"


def test_unknown_method_lists_the_valid_names():
  valid = ", ".join(_method_modules())
  with pytest.raises(UnknownNameError, match=f"unknown method 'nope'; valid names: {valid}$"):
    methods.get_method("nope")
  # Neither the machinery nor a private helper module is a method.
  for name in ("base", "loop", "_pixels"):
    with pytest.raises(UnknownNameError, match=f"unknown method '{name}'"):
      methods.get_method(name)


def test_a_new_module_is_found_without_a_hand_written_list(tmp_path, monkeypatch):
  """A module dropped into the package is a method by its name alone."""
  (tmp_path / "toy_method.py").write_text(
      "from distill_jax.methods.base import DistillMethod, register_method\n"
      "@register_method('toy_method')\n"
      "class Toy(DistillMethod):\n"
      "  def init(self, key): return {}\n"
      "  def step(self, state, inputs): return state, {}\n"
      "  def result(self, state): return None\n"
  )
  (tmp_path / "_toy_helper.py").write_text("")
  monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(tmp_path)])
  monkeypatch.setattr(base.METHODS, "_entries", dict(base.METHODS._entries))
  monkeypatch.delitem(sys.modules, "distill_jax.methods.toy_method", raising=False)
  try:
    assert "toy_method" in methods.method_names()
    assert "_toy_helper" not in methods.method_names()
    toy = methods.get_method("toy_method")
    assert toy.name == "toy_method" and issubclass(toy, base.DistillMethod)
  finally:
    sys.modules.pop("distill_jax.methods.toy_method", None)


def test_register_method_names_the_class_and_refuses_duplicates(monkeypatch):
  monkeypatch.setattr(base.METHODS, "_entries", dict(base.METHODS._entries))

  @base.register_method("another")
  class Another(base.DistillMethod):
    def init(self, key):
      return {}

    def step(self, state, inputs):
      return state, {}

    def result(self, state):
      return None

  assert Another.name == "another" and base.METHODS.get("another") is Another
  with pytest.raises(ValueError, match="already registered"):
    base.register_method("another")(Another)


def test_methods_share_one_divergence_error_and_defaults():
  assert methods.DivergenceError is base.DivergenceError
  assert issubclass(base.DivergenceError, ValueError)
  # The registered classes are the modules' classes.
  assert (methods.get_method("frepo"), methods.get_method("mtt"), methods.get_method("dc"),
          methods.get_method("dm")) == (frepo.FRePo, mtt.MTT, dc.DC, dm.DM)
  # Abstract: a method must say what init, step and result are.
  with pytest.raises(TypeError):
    base.DistillMethod(None, None)
