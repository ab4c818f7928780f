"""ResNet-18 (He et al., 2016) with the small-image stem of DC/MTT/SRe2L/D3S, or ImageNet's.

Reference: `ResNet18BN` of VICO-UoE/DatasetCondensation `networks.py` (kuangliu's CIFAR
ResNet): 3x3 stride-1 stem without max-pool; D3S (Appendix B) uses the same stem for
Tiny-ImageNet and torchvision's 7x7 stride-2 stem + 3x3 max-pool for ImageNet.
"""

import flax.linen as nn
import jax

from distill_jax.models import common

STAGES = (2, 2, 2, 2)  # Basic blocks per stage of ResNet-18.
STEMS = ("cifar", "imagenet")
RESNET_NORMS = ("batch", "instance", "none")


class BasicBlock(nn.Module):
  """conv3x3(stride) -> norm -> ReLU -> conv3x3 -> norm, plus (projected) shortcut, ReLU.

  Attributes:
    features: output channels.
    strides: stride of the first conv and of the shortcut projection.
    norm: norm layer kind (see `common.norm`).
    init_scheme: "pytorch" or "flax".
    bn_momentum: Flax batch-norm momentum.
  """

  features: int
  strides: int
  norm: str
  init_scheme: str
  bn_momentum: float

  @nn.compact
  def __call__(
      self, x: jax.Array, train: bool = False
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Returns the block output (B, H', W', features) and its two conv outputs (pre-norm)."""
    norm_kwargs = dict(train=train, bn_momentum=self.bn_momentum)
    conv_kwargs = dict(init_scheme=self.init_scheme, use_bias=False)
    conv1 = common.conv(x, self.features, 3, strides=self.strides, padding=1, **conv_kwargs)
    y = nn.relu(common.norm(conv1, self.norm, **norm_kwargs))
    conv2 = common.conv(y, self.features, 3, padding=1, **conv_kwargs)
    y = common.norm(conv2, self.norm, **norm_kwargs)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = common.conv(
          x, self.features, 1, strides=self.strides, padding=0, name="shortcut_conv",
          **conv_kwargs,
      )
      shortcut = common.norm(shortcut, self.norm, name="shortcut_norm", **norm_kwargs)
    return nn.relu(y + shortcut), (conv1, conv2)


@common.MODELS.register("resnet18")
class ResNet18(common.Classifier):
  """ResNet-18: stem, 4 stages of 2 basic blocks (width, 2, 4, 8 x width), global average pool.

  Convolutions have no bias (each is followed by a norm). The head is global average pooling
  -> Dense, which for 32x32 inputs is DC's `avg_pool2d(out, 4)` on the 4x4 last map; 28x28
  inputs give a 4x4 last map too. With 10 classes, 3 input channels and width 64 the model has
  11,173,962 parameters (the familiar CIFAR ResNet-18 count).

  Attributes:
    num_classes: outputs of the final Dense.
    width: channels of the stem and first stage (64 in ResNet-18).
    norm: "batch" (default, DC's ResNet18BN), "instance" (DC's ResNet18) or "none".
    stem: "cifar" (3x3 stride-1 conv, no max-pool) or "imagenet" (7x7 stride-2 conv + 3x3
      stride-2 max-pool).
    init_scheme: "pytorch" (DC: PyTorch layer defaults) or "flax".
    bn_momentum: Flax batch-norm momentum (0.9 is PyTorch's 0.1).
  """

  num_classes: int
  width: int = 64
  norm: str = "batch"
  stem: str = "cifar"
  init_scheme: str = "pytorch"
  bn_momentum: float = 0.9

  def __post_init__(self) -> None:
    common.check_settings(self, norms=RESNET_NORMS)
    common.check_choice(self.stem, STEMS, "stem")
    super().__post_init__()

  @nn.compact
  def forward(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
    """`(logits, penultimate, blocks)` of images `x`: (B, H, W, C) float images. `penultimate` is the
    pooled feature (B, 8 * width); `blocks` holds the 17 conv outputs before their norms (stem,
    then two per basic block; shortcut projections excluded), D3S's L = 17 layers.
    """
    common.check_images(x, "resnet18")
    norm_kwargs = dict(train=train, bn_momentum=self.bn_momentum)
    conv_kwargs = dict(init_scheme=self.init_scheme, use_bias=False)
    if self.stem == "cifar":
      stem_out = common.conv(x, self.width, 3, padding=1, **conv_kwargs)
      x = nn.relu(common.norm(stem_out, self.norm, **norm_kwargs))
    else:
      stem_out = common.conv(x, self.width, 7, strides=2, padding=3, **conv_kwargs)
      x = nn.relu(common.norm(stem_out, self.norm, **norm_kwargs))
      # PyTorch's MaxPool2d(3, 2, padding=1) pads with -inf, as Flax's max_pool does.
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    conv_outputs = [stem_out]
    for stage, num_blocks in enumerate(STAGES):
      for block in range(num_blocks):
        x, block_convs = BasicBlock(
            features=self.width * 2**stage,
            strides=2 if stage > 0 and block == 0 else 1,
            norm=self.norm,
            init_scheme=self.init_scheme,
            bn_momentum=self.bn_momentum,
            name=f"stage{stage + 1}_block{block + 1}",
        )(x, train)
        conv_outputs.extend(block_convs)
    penultimate = x.mean(axis=(1, 2))
    logits = common.dense(penultimate, self.num_classes, init_scheme=self.init_scheme)
    return logits, penultimate, conv_outputs
