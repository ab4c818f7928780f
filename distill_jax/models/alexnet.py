"""AlexNet for small images, as in DC's `networks.py`.

Reference: VICO-UoE/DatasetCondensation `networks.py` `AlexNet`: conv5x5(128, padding 2) ->
ReLU -> max-pool, conv5x5(192) -> ReLU -> max-pool, conv3x3(256) -> ReLU, conv3x3(192) ->
ReLU, conv3x3(192) -> ReLU -> max-pool, one Dense on the flattened 4x4x192 map of 32x32 inputs.
DC's AlexNet has no norm layers; `norm` inserts one after every conv (as its `AlexNetBN`).
"""

import flax.linen as nn
import jax

from distill_jax.models import common


def conv_widths(width: int) -> tuple[int, ...]:
  """Output channels of AlexNet's five convs: 128, 192, 256, 192, 192 at width 128."""
  wide = 3 * width // 2
  return (width, wide, 2 * width, wide, wide)


@common.MODELS.register("alexnet")
class AlexNet(common.Classifier):
  """DC's AlexNet: 5 convs (widths 1, 1.5, 2, 1.5, 1.5 x `width`), 3 max-pools, one Dense.

  1-channel inputs pad the first conv by 4 (`pad_grayscale`), so 28x28 images give the 4x4
  last map of 32x32 ones.

  Attributes:
    num_classes: outputs of the final Dense.
    width: channels of the first conv (128 in DC); the others are 192, 256, 192, 192 at 128.
    norm: "none" (DC's AlexNet, default), "batch", "instance", "layer" or "group", after
      every conv.
    pad_grayscale: pad the first conv by 4 instead of 2 for 1-channel inputs (as DC).
    init_scheme: "pytorch" (DC) or "flax".
    bn_momentum: Flax batch-norm momentum (0.9 is PyTorch's 0.1).
  """

  num_classes: int
  width: int = 128
  norm: str = "none"
  pad_grayscale: bool = True
  init_scheme: str = "pytorch"
  bn_momentum: float = 0.9

  def __post_init__(self) -> None:
    common.check_settings(self, widths=conv_widths(self.width))
    super().__post_init__()

  @nn.compact
  def forward(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
    """`(logits, penultimate, blocks)` of images `x`: (B, H, W, C) float images, at least 28x28 (1
    channel) or 32x32. `penultimate` is the flattened last map (B, 16 * 1.5 * width for 32x32
    inputs); `blocks` holds the 5 conv outputs before their norms.
    """
    common.check_images(x, "alexnet")
    kernel_sizes = (5, 5, 3, 3, 3)
    pool_after = (True, True, False, False, True)
    conv_outputs = []
    for i, features in enumerate(conv_widths(self.width)):
      padding = kernel_sizes[i] // 2
      if i == 0:
        padding = common.first_conv_padding(x, padding, self.pad_grayscale)
      x = common.conv(x, features, kernel_sizes[i], init_scheme=self.init_scheme, padding=padding)
      conv_outputs.append(x)
      x = common.norm(x, self.norm, train=train, bn_momentum=self.bn_momentum)
      x = nn.relu(x)
      if pool_after[i]:
        x = common.pool2x2(x, "max", model="alexnet")
    penultimate = x.reshape((x.shape[0], -1))
    logits = common.dense(penultimate, self.num_classes, init_scheme=self.init_scheme)
    return logits, penultimate, conv_outputs
