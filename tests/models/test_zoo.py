"""The model registry, output and feature shapes, parameter counts, init schemes and vmapping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.models import MODELS, get_model, model_arguments
from distill_jax.registry import UnknownNameError
from tests.models.helpers import random_variables


def rbg_key(seed: int) -> jax.Array:
  """A key whose initialisers compile fast on CPU (threefry init of a model takes seconds)."""
  return jax.random.key(seed, impl="rbg")


def numpy_images(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)

# Tiny versions of every model, so shape tests compile fast.
TINY = {
    "convnet": dict(width=4, depth=3),
    "resnet18": dict(width=4),
    "vgg11": dict(width=4),
    "alexnet": dict(width=8),
    "vit_tiny": dict(dim=8, depth=2, num_heads=2, mlp_dim=16),
}
# Name of each model's final Dense layer.
HEAD = {"convnet": "Dense_0", "resnet18": "Dense_0", "vgg11": "Dense_0", "alexnet": "Dense_0",
        "vit_tiny": "head"}


def spatial(shapes):
  return [tuple(s[1:]) for s in shapes]


# Expected (H, W, C) of every reported block and the penultimate width, by model and input.
EXPECTED = {
    ("convnet", (32, 32, 3)): ([(32, 32, 4), (16, 16, 4), (8, 8, 4)], 4 * 4 * 4),
    # The first conv pads 1-channel images by 3: 28 -> 32 as in DC/MTT/FRePo.
    ("convnet", (28, 28, 1)): ([(32, 32, 4), (16, 16, 4), (8, 8, 4)], 4 * 4 * 4),
    ("convnet", (8, 8, 1)): ([(12, 12, 4), (6, 6, 4), (3, 3, 4)], 1 * 1 * 4),
    ("resnet18", (32, 32, 3)): (
        [(32, 32, 4)] * 5 + [(16, 16, 8)] * 4 + [(8, 8, 16)] * 4 + [(4, 4, 32)] * 4, 32),
    ("resnet18", (28, 28, 1)): (
        [(28, 28, 4)] * 5 + [(14, 14, 8)] * 4 + [(7, 7, 16)] * 4 + [(4, 4, 32)] * 4, 32),
    ("vgg11", (32, 32, 3)): (
        [(32, 32, 4), (16, 16, 8), (8, 8, 16), (8, 8, 16), (4, 4, 32), (4, 4, 32), (2, 2, 32),
         (2, 2, 32)], 32),
    ("vgg11", (28, 28, 1)): (
        [(32, 32, 4), (16, 16, 8), (8, 8, 16), (8, 8, 16), (4, 4, 32), (4, 4, 32), (2, 2, 32),
         (2, 2, 32)], 32),
    ("alexnet", (32, 32, 3)): (
        [(32, 32, 8), (16, 16, 12), (8, 8, 16), (8, 8, 12), (8, 8, 12)], 4 * 4 * 12),
    ("alexnet", (28, 28, 1)): (
        [(32, 32, 8), (16, 16, 12), (8, 8, 16), (8, 8, 12), (8, 8, 12)], 4 * 4 * 12),
    ("vit_tiny", (32, 32, 3)): ([(8, 8, 8)] * 3, 8),
    ("vit_tiny", (28, 28, 1)): ([(7, 7, 8)] * 3, 8),
}


def test_registry_names():
  assert MODELS.names() == ["alexnet", "convnet", "resnet18", "vgg11", "vit_tiny"]


def test_unknown_model_lists_valid_names():
  with pytest.raises(UnknownNameError) as error:
    get_model("resnet50", num_classes=10)
  message = str(error.value)
  assert "unknown model 'resnet50'" in message
  assert "alexnet, convnet, resnet18, vgg11, vit_tiny" in message


def test_unknown_argument_lists_valid_ones():
  with pytest.raises(ValueError, match="unknown argument.* norm_type .*valid arguments: depth"):
    get_model("convnet", num_classes=10, norm_type="batch")
  assert model_arguments("convnet") == (
      "depth", "width", "norm", "pooling", "width_doubling", "norm_position", "pad_grayscale",
      "init_scheme", "bn_momentum")


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("convnet", dict(norm="weight"), "unknown norm 'weight'; use one of none, batch"),
        ("convnet", dict(pooling="mean"), "unknown pooling 'mean'"),
        ("convnet", dict(norm_position="middle"), "unknown norm_position"),
        ("convnet", dict(init_scheme="xavier"), "unknown init_scheme 'xavier'"),
        ("convnet", dict(depth=0), "depth must be a positive int"),
        ("convnet", dict(norm="group", width=6), r"layers \(6 channels\) divide by 4"),
        ("convnet", dict(bn_momentum=1.0), "bn_momentum must lie in"),
        ("resnet18", dict(norm="layer"), "unknown norm 'layer'"),
        ("resnet18", dict(stem="tiny"), "unknown stem 'tiny'"),
        ("vgg11", dict(width=-1), "width must be a positive int"),
        ("alexnet", dict(norm="group", width=4), r"layers \(4, 6, 8, 6, 6 channels\) divide by 4"),
        ("vit_tiny", dict(dim=10, num_heads=3), "divisible by num_heads"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(name, kwargs, message):
  with pytest.raises(ValueError, match=message):
    get_model(name, num_classes=10, **kwargs)


def test_bad_num_classes_raises():
  with pytest.raises(ValueError, match="num_classes must be a positive int"):
    get_model("convnet", num_classes=0)


@pytest.mark.parametrize("name, image_shape", list(EXPECTED))
def test_logits_and_feature_shapes(name, image_shape):
  """Shapes of logits and features on 28x28x1, 32x32x3 (and 8x8x1 for the ConvNet)."""
  model = get_model(name, num_classes=5, **TINY[name])
  x = jax.ShapeDtypeStruct((2,) + image_shape, jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  logits, features = jax.eval_shape(
      lambda v, x: model.apply(v, x, return_features=True), variables, x)
  blocks, penultimate_dim = EXPECTED[(name, image_shape)]
  assert logits.shape == (2, 5)
  assert features["penultimate"].shape == (2, penultimate_dim)
  assert spatial(b.shape for b in features["blocks"]) == blocks
  assert all(b.shape[0] == 2 for b in features["blocks"])
  assert variables["params"][HEAD[name]]["kernel"].shape == (penultimate_dim, 5)


@pytest.mark.parametrize("name", list(TINY))
def test_logits_are_the_head_applied_to_penultimate(name):
  """Under jit: logits = penultimate @ W + b, and return_features does not change logits."""
  model = get_model(name, num_classes=5, **TINY[name])
  x = numpy_images((2, 32, 32, 3))
  variables = random_variables(model, x.shape)

  @jax.jit
  def forward(variables, x):
    return model.apply(variables, x), model.apply(variables, x, return_features=True)

  plain, (logits, features) = forward(variables, x)
  head = variables["params"][HEAD[name]]
  want = np.asarray(features["penultimate"]) @ np.asarray(head["kernel"]) + head["bias"]
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(plain, logits, rtol=1e-6, atol=1e-6)
  assert np.all(np.isfinite(logits)) and np.std(logits) > 1e-3


@pytest.mark.parametrize("name", ["resnet18", "vgg11"])
def test_batch_norm_models_train_mode_updates_statistics(name):
  kwargs = dict(TINY[name], norm="batch")
  model = get_model(name, num_classes=3, **kwargs)
  x = numpy_images((4, 32, 32, 3))
  variables = random_variables(model, x.shape)
  train_apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  logits, updates = train_apply(variables, x)
  assert logits.shape == (4, 3)
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
      variables["batch_stats"])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"],
                         variables["batch_stats"])
  assert all(jax.tree.leaves(changed))


def test_resnet_imagenet_stem_shapes():
  model = get_model("resnet18", num_classes=4, width=4, stem="imagenet")
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  logits, features = jax.eval_shape(
      lambda v, x: model.apply(v, x, return_features=True), variables, x)
  # 7x7 stride-2 conv: 32 -> 16; max-pool: 16 -> 8; stages: 8, 4, 2, 1.
  assert spatial(b.shape for b in features["blocks"]) == (
      [(16, 16, 4)] + [(8, 8, 4)] * 4 + [(4, 4, 8)] * 4 + [(2, 2, 16)] * 4 + [(1, 1, 32)] * 4)
  assert variables["params"]["Conv_0"]["kernel"].shape == (7, 7, 3, 4)
  assert logits.shape == (2, 4)


def count_params(params) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def params_shape(model, image_shape):
  x = jax.ShapeDtypeStruct((1,) + image_shape, jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def test_resnet18_parameter_count_on_cifar():
  """The familiar CIFAR ResNet-18 (3x3 stem, 10 classes) has 11,173,962 parameters."""
  params = params_shape(get_model("resnet18", num_classes=10), (32, 32, 3))
  assert count_params(params) == 11_173_962


def conv_norm_count(c_in: int, c_out: int, k: int, bias: bool, norm: bool) -> int:
  return k * k * c_in * c_out + (c_out if bias else 0) + (2 * c_out if norm else 0)


def test_convnet_and_vgg_parameter_counts_on_cifar():
  """Hand-counted: DC ConvNet (instance norm) and VGG-11 (instance norm), 10 classes."""
  convnet = conv_norm_count(3, 128, 3, True, True) + 2 * conv_norm_count(128, 128, 3, True, True)
  convnet += 4 * 4 * 128 * 10 + 10
  assert count_params(params_shape(get_model("convnet", num_classes=10), (32, 32, 3))) == convnet
  widths = [3, 64, 128, 256, 256, 512, 512, 512, 512]
  vgg = sum(conv_norm_count(a, b, 3, True, True) for a, b in zip(widths, widths[1:]))
  vgg += 512 * 10 + 10
  assert count_params(params_shape(get_model("vgg11", num_classes=10), (32, 32, 3))) == vgg
  alexnet_widths = [3, 128, 192, 256, 192, 192]
  kernels = [5, 5, 3, 3, 3]
  alexnet = sum(conv_norm_count(a, b, k, True, False)
                for a, b, k in zip(alexnet_widths, alexnet_widths[1:], kernels))
  alexnet += 4 * 4 * 192 * 10 + 10
  assert count_params(params_shape(get_model("alexnet", num_classes=10), (32, 32, 3))) == alexnet


def test_width_doubling_gives_frepo_widths():
  model = get_model("convnet", num_classes=10, width=128, width_doubling=True, norm="none",
                    init_scheme="flax")
  params = params_shape(model, (32, 32, 3))
  assert params["Conv_0"]["kernel"].shape == (3, 3, 3, 128)
  assert params["Conv_1"]["kernel"].shape == (3, 3, 128, 256)
  assert params["Conv_2"]["kernel"].shape == (3, 3, 256, 512)
  assert params["Dense_0"]["kernel"].shape == (4 * 4 * 512, 10)
  assert model.block_widths() == (128, 256, 512)
  plain = params_shape(get_model("convnet", num_classes=10, width=128), (32, 32, 3))
  assert plain["Conv_2"]["kernel"].shape == (3, 3, 128, 128)


def test_pytorch_init_scheme_statistics():
  """PyTorch defaults: kernels and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  model = get_model("convnet", num_classes=10, width=64, depth=2, norm="none")
  params = jax.jit(model.init)(rbg_key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  kernel, bias = np.asarray(params["Conv_1"]["kernel"]), np.asarray(params["Conv_1"]["bias"])
  bound = 1.0 / math.sqrt(3 * 3 * 64)
  assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
  np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3.0), rtol=0.03)
  assert np.abs(bias).max() > 0.5 * bound  # biases are random, not zero
  dense_bound = 1.0 / math.sqrt(2 * 2 * 64)
  assert np.abs(np.asarray(params["Dense_0"]["kernel"])).max() <= dense_bound


def test_flax_init_scheme_statistics():
  """Flax defaults (FRePo): lecun-normal kernels (std 1/sqrt(fan_in)), zero biases."""
  model = get_model("convnet", num_classes=10, width=64, depth=2, norm="none",
                    init_scheme="flax")
  params = jax.jit(model.init)(rbg_key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  kernel = np.asarray(params["Conv_1"]["kernel"])
  np.testing.assert_allclose(kernel.std(), 1.0 / math.sqrt(3 * 3 * 64), rtol=0.03)
  assert not np.any(np.asarray(params["Conv_1"]["bias"]))


def test_vmapped_init_and_apply_equal_a_loop():
  """Several networks at once (the evaluation's vmap): equal to building them one by one.

  Uses the default threefry keys: their bits do not depend on vmapping (rbg keys' do).
  """
  model = get_model("convnet", num_classes=3, width=4, depth=1, norm="batch")
  x = numpy_images((4, 8, 8, 1))
  keys = jax.random.split(jax.random.key(1), 3)

  def init_and_train_step(key):
    variables = model.init(key, x)
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return variables, logits, updates

  vmapped = jax.jit(jax.vmap(init_and_train_step))(keys)
  single = jax.jit(init_and_train_step)
  for i in range(3):
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-5),
        vmapped, single(keys[i]))
  # Different keys give different networks; batch statistics stay per network.
  assert not np.allclose(vmapped[1][0], vmapped[1][1])
  running_means = vmapped[2]["batch_stats"]["BatchNorm_0"]["mean"]
  assert running_means.shape == (3, 4) and not np.allclose(running_means[0], running_means[1])


def test_vmapped_vit_apply_equals_a_loop():
  model = get_model("vit_tiny", num_classes=3, dim=8, depth=1, num_heads=2, mlp_dim=8)
  x = numpy_images((2, 8, 8, 1))
  stacked = [random_variables(model, x.shape, seed=seed) for seed in range(3)]
  batched = jax.tree.map(lambda *leaves: jnp.stack(leaves), *stacked)
  apply = jax.jit(lambda v: model.apply(v, x, train=True))
  vmapped_logits = jax.jit(jax.vmap(apply))(batched)
  for i in range(3):
    np.testing.assert_allclose(vmapped_logits[i], apply(stacked[i]), rtol=1e-5, atol=1e-6)


def test_pooling_a_one_pixel_map_raises_a_clear_error():
  model = get_model("convnet", num_classes=10, width=4, depth=4, pad_grayscale=False)
  with pytest.raises(ValueError, match="cannot 2x2-pool a 1x1 feature map; use fewer blocks"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


def test_vit_patch_size_must_divide_image():
  model = get_model("vit_tiny", num_classes=10, **TINY["vit_tiny"])
  with pytest.raises(ValueError, match="not a multiple of patch_size=4"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 30, 30, 3)))
  small = get_model("vit_tiny", num_classes=10, patch_size=2, **TINY["vit_tiny"])
  x = jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
  assert jax.eval_shape(small.init, jax.random.key(0), x)["params"][
      "position_embedding"].shape == (1, 16, 8)


@pytest.mark.parametrize("x, message", [
    (jnp.zeros((28, 28, 1)), "expects NHWC images"),
    (jnp.zeros((1, 28, 28, 1), jnp.int32), "expects floating images"),
])
def test_bad_inputs_raise(x, message):
  model = get_model("convnet", num_classes=10, width=4)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(model.init, jax.random.key(0), x)
