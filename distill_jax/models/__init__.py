"""Flax linen models looked up by name: `get_model(name, num_classes=..., **kwargs)`.

Registered names: convnet, resnet18, vgg11, alexnet, vit_tiny. Every model is called as

  model.apply(variables, x, train=False, return_features=False, mutable=...)

with `x` NHWC float32; it returns logits `(B, num_classes)`, or with `return_features=True`
`(logits, {"penultimate": (B, D), "blocks": tuple of NHWC tensors})`:

- "penultimate" is the tensor fed to the final Dense layer (FRePo's kernel feature, D3's MMD
  feature, DM's embedding).
- "blocks" holds the output of every convolution layer in forward order, taken before its
  norm layer and activation (the norm layer's input), which is what D3S (Appendix A.1) takes
  its per-layer mean and covariance from ("after each convolutional layer", L = 17 for a
  ResNet-18; 1x1 shortcut projections are not reported). The ViT reports its patch embedding
  and every encoder block's tokens on the patch grid instead.

Models with norm="batch" keep running statistics in the "batch_stats" collection and need
`mutable=["batch_stats"]` when `train=True`. All models are pure functions of their variables,
so `jax.vmap` over stacked variables trains several networks at once (batch norm statistics
stay per network: no axis name is used).

>>> import jax, jax.numpy as jnp
>>> model = get_model("convnet", num_classes=10, width=8, depth=2)
>>> x = jnp.zeros((2, 28, 28, 1))
>>> variables = model.init(jax.random.key(0), x)
>>> logits, features = model.apply(variables, x, return_features=True)
>>> logits.shape, features["penultimate"].shape, [b.shape for b in features["blocks"]]
((2, 10), (2, 512), [(2, 32, 32, 8), (2, 16, 16, 8)])
"""

import dataclasses

import flax.linen as nn

# Importing the model modules registers them in MODELS.
from distill_jax.models import alexnet, common, convnet, resnet, vgg, vit  # noqa: F401
# Decoders a latent set can name (`autoencoder.DECODERS`).
from distill_jax.models import autoencoder, autoencoder_kl, decoders  # noqa: F401
from distill_jax.models.alexnet import AlexNet
from distill_jax.models.common import MODELS
from distill_jax.models.convnet import ConvNet
from distill_jax.models.resnet import ResNet18
from distill_jax.models.vgg import VGG11
from distill_jax.models.vit import ViT

__all__ = [
    "MODELS",
    "AlexNet",
    "ConvNet",
    "ResNet18",
    "VGG11",
    "ViT",
    "get_model",
    "model_arguments",
]

_NOT_ARGUMENTS = ("num_classes", "parent", "name")


def model_arguments(name: str) -> tuple[str, ...]:
  """The keyword arguments `get_model(name, ...)` accepts besides `num_classes`.

  Raises:
    distill_jax.registry.UnknownNameError: `name` is not registered (lists valid names).
  """
  module_class = MODELS.get(name)
  return tuple(
      field.name
      for field in dataclasses.fields(module_class)
      if field.init and field.name not in _NOT_ARGUMENTS
  )


def get_model(name: str, *, num_classes: int, **kwargs) -> nn.Module:
  """Builds the registered model `name` with `num_classes` outputs.

  Args:
    name: one of `MODELS.names()`: alexnet, convnet, resnet18, vgg11, vit_tiny.
    num_classes: outputs of the final Dense layer.
    **kwargs: the model's hyperparameters (see `model_arguments(name)` and the class
      docstrings), e.g. `get_model("convnet", num_classes=10, width_doubling=True)`.

  Returns:
    An unbound Flax linen module.

  Raises:
    distill_jax.registry.UnknownNameError: unknown `name` (the message lists valid names).
    ValueError: an unknown keyword argument (the message lists the valid ones) or a bad value.

  >>> get_model("resnet18", num_classes=10, depth=3)  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ValueError: unknown argument(s) depth for model 'resnet18'; valid arguments: width, norm, ...
  """
  valid = model_arguments(name)
  unknown = sorted(set(kwargs) - set(valid))
  if unknown:
    raise ValueError(
        f"unknown argument(s) {', '.join(unknown)} for model {name!r}; "
        f"valid arguments: {', '.join(valid)}"
    )
  return MODELS.get(name)(num_classes=num_classes, **kwargs)

