"""Distillation methods, one module each, found by name: `get_method("frepo")` imports
`distill_jax.methods.frepo`. `base.py` holds the interface, `loop.py` the one run loop."""

from distill_jax.methods.base import (
    METHODS, DistillMethod, DivergenceError, get_method, method_names, register_method,
)
from distill_jax.methods.loop import run

__all__ = [
    "METHODS",
    "DistillMethod",
    "DivergenceError",
    "get_method",
    "method_names",
    "register_method",
    "run",
]
