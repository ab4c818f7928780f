"""The canonical-gradient convolution against `lax.conv_general_dilated`: values, first and
second derivatives under jit, inside scan and cond, under vmap, and the fallbacks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from distill_jax.models import convolution

SPEC = ("NHWC", "HWIO", "NHWC")
# (H, W, kernel, stride, padding): the model zoo's shapes (3x3 same, strided ResNet convs, the
# 7x7 stem, 1x1 shortcuts) and odd sizes where the last window does not reach the border.
# The grayscale first conv of DC's ConvNet pads a 3x3 kernel by 3 (wider than k - 1).
SHAPES = [(12, 12, 3, 1, 1), (9, 7, 3, 2, 1), (10, 10, 7, 2, 3), (8, 8, 1, 2, 0),
          (6, 5, 3, 2, 0), (11, 11, 3, 1, 0), (7, 9, 3, 3, 2), (10, 10, 3, 1, 3), (9, 9, 3, 2, 4)]


def lax_conv(x, w, stride, pad):
  return lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                  dimension_numbers=SPEC, precision=lax.Precision.HIGHEST)


def ours(x, w, stride, pad):
  return convolution.conv_general_dilated(
      x, w, (stride, stride), ((pad, pad), (pad, pad)),
      dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, SPEC),
      precision=lax.Precision.HIGHEST)


def _inputs(h, w, k, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, (3, h, w, 4)), jax.random.normal(kw, (k, k, 4, 5))


@pytest.mark.parametrize("h, w, k, stride, pad", SHAPES)
def test_values_and_gradients_equal_lax(h, w, k, stride, pad):
  x, kernel = _inputs(h, w, k)

  def grads(conv):
    loss = lambda x, kernel: jnp.sum(jnp.sin(conv(x, kernel, stride, pad)))  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, kernel)

  (value, (dx, dw)), (want, (want_dx, want_dw)) = grads(ours), grads(lax_conv)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("h, w, k, stride, pad", SHAPES[:4])
def test_second_derivatives_equal_lax(h, w, k, stride, pad):
  """MTT differentiates through a student's gradient: grad_x |d loss / d w|^2."""
  x, kernel = _inputs(h, w, k, seed=1)

  def meta(conv):
    def inner(x, kernel):
      return jnp.sum(jax.grad(lambda k_: jnp.sum(jnp.tanh(conv(x, k_, stride, pad))))(kernel) ** 2)
    return jax.jit(jax.grad(inner, argnums=(0, 1)))(x, kernel)

  for got, want in zip(meta(ours), meta(lax_conv)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * float(jnp.max(jnp.abs(want))))


def test_inside_scan_cond_and_vmap_equals_the_top_level():
  x, kernel = _inputs(10, 10, 3, seed=2)
  grad = jax.grad(lambda kernel, x: jnp.sum(ours(x, kernel, 1, 1) ** 2))
  top = jax.jit(grad)(kernel, x)
  in_scan = jax.jit(lambda k_, x: jax.lax.scan(lambda c, _: (c, grad(c, x)), k_, None,
                                              length=2)[1][1])(kernel, x)
  in_cond = jax.jit(lambda k_, x, p: jax.lax.cond(p, grad, lambda k_, x: k_, k_, x))(
      kernel, x, True)
  stacked = jnp.stack([kernel, 2 * kernel])
  in_vmap = jax.jit(jax.vmap(grad, in_axes=(0, None)))(stacked, x)
  want = jax.jit(jax.grad(lambda kernel: jnp.sum(lax_conv(x, kernel, 1, 1) ** 2)))(kernel)
  for got in (top, in_scan, in_cond, in_vmap[0]):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(in_vmap[1], jax.grad(
      lambda kernel: jnp.sum(lax_conv(x, kernel, 1, 1) ** 2))(2 * kernel), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("kwargs", [
    {"padding": "SAME"}, {"rhs_dilation": (2, 2)}, {"lhs_dilation": (2, 2)},
    {"feature_group_count": 2},
])
def test_unsupported_forms_fall_back_to_lax(kwargs, monkeypatch):
  calls = []
  monkeypatch.setattr(convolution, "canonical_conv", lambda *a: calls.append(a))
  x, kernel = _inputs(8, 8, 3, seed=3)
  if "feature_group_count" in kwargs:
    kernel = jnp.concatenate([kernel[:, :, :2], kernel[:, :, :2, :1]], axis=-1)  # (3, 3, 2, 6)
  args = {"padding": ((1, 1), (1, 1)), **kwargs}
  got = convolution.conv_general_dilated(
      x, kernel, (1, 1), dimension_numbers=lax.conv_dimension_numbers(x.shape, kernel.shape,
                                                                      SPEC), **args)
  want = lax.conv_general_dilated(x, kernel, (1, 1), dimension_numbers=SPEC, **args)
  assert not calls
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_the_model_zoo_uses_it(monkeypatch):
  from distill_jax import models

  calls = []
  original = convolution.canonical_conv
  monkeypatch.setattr(convolution, "canonical_conv",
                      lambda *a: calls.append(1) or original(*a))
  model = models.get_model("convnet", num_classes=3, width=4, depth=2)
  model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  assert len(calls) == 2
