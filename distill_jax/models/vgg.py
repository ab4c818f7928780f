"""VGG-11 for small images, as in DC's `networks.py` (`VGG11` / `VGG11BN`).

Reference: VICO-UoE/DatasetCondensation `networks.py`: configuration
[64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M], each conv3x3 (padding 1, bias) -> norm
-> ReLU, M = 2x2 max-pool, one Dense on the flattened 1x1x512 map of 32x32 inputs.
"""

import flax.linen as nn
import jax

from distill_jax.models import common

# Channel multiples of `width` (64 in VGG-11); "M" is a 2x2 max-pool.
VGG11_LAYERS = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M")


@common.MODELS.register("vgg11")
class VGG11(common.Classifier):
  """VGG-11 of DC: 8 conv3x3 -> norm -> ReLU layers and 5 max-pools, then one Dense.

  1-channel inputs pad the first conv by 3 (`pad_grayscale`), so 28x28 images give a 1x1 last
  map as 32x32 ones do. Inputs must be at least 32x32 (28x28 for 1 channel): every max-pool
  halves the map.

  Attributes:
    num_classes: outputs of the final Dense.
    width: channels of the first conv (64 in VGG-11); later layers use 2, 4 and 8 times it.
    norm: "instance" (DC's VGG11, default), "batch" (DC's VGG11BN), "none", "layer" or "group".
    pad_grayscale: pad the first conv by 3 instead of 1 for 1-channel inputs (as DC).
    init_scheme: "pytorch" (DC) or "flax".
    bn_momentum: Flax batch-norm momentum (0.9 is PyTorch's 0.1).
  """

  num_classes: int
  width: int = 64
  norm: str = "instance"
  pad_grayscale: bool = True
  init_scheme: str = "pytorch"
  bn_momentum: float = 0.9

  def __post_init__(self) -> None:
    common.check_settings(self, widths=(self.width,))
    super().__post_init__()

  @nn.compact
  def forward(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
    """`(logits, penultimate, blocks)` of images `x`: (B, H, W, C) float images. `penultimate` is the
    flattened last map (B, 8 * width for 32x32 inputs); `blocks` holds the 8 conv outputs before
    their norms.
    """
    common.check_images(x, "vgg11")
    conv_outputs = []
    for layer in VGG11_LAYERS:
      if layer == "M":
        x = common.pool2x2(x, "max", model="vgg11")
        continue
      padding = common.first_conv_padding(x, 1, self.pad_grayscale) if not conv_outputs else 1
      x = common.conv(x, self.width * layer, 3, init_scheme=self.init_scheme, padding=padding)
      conv_outputs.append(x)
      x = common.norm(x, self.norm, train=train, bn_momentum=self.bn_momentum)
      x = nn.relu(x)
    penultimate = x.reshape((x.shape[0], -1))
    logits = common.dense(penultimate, self.num_classes, init_scheme=self.init_scheme)
    return logits, penultimate, conv_outputs
