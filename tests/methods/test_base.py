"""The pieces every method shares (distill_jax.methods.base)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.methods import base, frepo, mtt


def test_finite_host_metrics_returns_python_floats():
  metrics = {"loss": jnp.float32(0.25), "lr": jnp.asarray(3e-3, jnp.float32), "n": jnp.int32(7)}
  host = base.finite_host_metrics(metrics, ("loss", "lr"), lambda h: "unused")
  assert host == {"loss": 0.25, "lr": float(np.float32(3e-3)), "n": 7.0}
  assert all(type(v) is float for v in host.values())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_finite_host_metrics_raises_on_a_watched_non_finite_value(bad):
  metrics = {"loss": jnp.float32(bad), "lr": jnp.float32(0.01)}
  with pytest.raises(base.DivergenceError, match=r"loss=(nan|inf|-inf) at 0.01"):
    base.finite_host_metrics(metrics, ("loss",), lambda h: f"loss={h['loss']} at {h['lr']:.2f}")


def test_finite_host_metrics_ignores_unwatched_values():
  metrics = {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(math.nan)}
  host = base.finite_host_metrics(metrics, ("loss",), lambda h: "unused")
  assert host["loss"] == 1.0 and math.isnan(host["grad_norm"])


def test_methods_raise_the_shared_divergence_error():
  assert frepo.DivergenceError is base.DivergenceError is mtt.DivergenceError
