"""The ConvNet of dataset distillation (DC/DSA/DM/MTT, and FRePo's width-doubling variant).

References: the `ConvNet` of VICO-UoE/DatasetCondensation `networks.py` (also used unchanged by
GeorgeCazenavette/mtt-distillation) and the `Conv` model of FRePo's released Flax code.
"""

import flax.linen as nn
import jax

from distill_jax.models import common


@common.MODELS.register("convnet")
class ConvNet(common.Classifier):
  """`depth` blocks of conv3x3 -> norm -> ReLU -> 2x2 pool, then one Dense on the flat map.

  DC/MTT's ConvNet (default): every block is conv3x3 (padding 1, bias) -> norm -> ReLU ->
  pool(2, 2); the final feature is the flattened last map, e.g. 4 x 4 x 128 = 2048 for 32x32
  inputs at depth 3. For 1-channel input the first conv pads 3 pixels (`pad_grayscale`), so
  28x28 Fashion-MNIST gives 32x32 maps as in the released codes.

  FRePo's Conv is `width_doubling=True` (block i has `width * 2**i` channels: 128/256/512 at
  width 128) with `norm_position="before_conv"`: FRePo normalises the input of every block but
  the first (conv -> ReLU -> pool, then norm at the start of the next block), so no norm follows
  the last conv. FRePo trains its model pool with norm="batch" and evaluates with norm="none",
  where the two positions coincide; its code uses Flax's default initialisers
  (`init_scheme="flax"`) and batch-norm momentum 0.1 in Flax's convention (running statistics
  follow the last batch; `bn_momentum=0.1` reproduces it).

  Attributes:
    num_classes: outputs of the final Dense.
    depth: number of conv blocks.
    width: channels of the first block (and of all blocks unless `width_doubling`).
    norm: "none", "batch", "instance", "layer" or "group" (see `common.norm`).
    pooling: "avg", "max" or "none".
    width_doubling: block i has `width * 2**i` channels (FRePo).
    norm_position: "after_conv" (DC/MTT) or "before_conv" (FRePo), see above.
    pad_grayscale: pad the first conv by 3 instead of 1 for 1-channel inputs (DC/MTT/FRePo).
    init_scheme: "pytorch" (DC/MTT) or "flax" (FRePo); see `common`.
    bn_momentum: Flax batch-norm momentum (0.9 is PyTorch's 0.1).
  """

  num_classes: int
  depth: int = 3
  width: int = 128
  norm: str = "instance"
  pooling: str = "avg"
  width_doubling: bool = False
  norm_position: str = "after_conv"
  pad_grayscale: bool = True
  init_scheme: str = "pytorch"
  bn_momentum: float = 0.9

  def __post_init__(self) -> None:
    common.check_positive(self.depth, "depth")
    common.check_choice(self.pooling, common.POOLINGS, "pooling")
    common.check_choice(self.norm_position, ("after_conv", "before_conv"), "norm_position")
    common.check_settings(self, widths=(self.width,))
    super().__post_init__()

  def block_widths(self) -> tuple[int, ...]:
    """Channels of each block: `width` each, or `width * 2**i` with `width_doubling`."""
    return tuple(
        self.width * (2**i if self.width_doubling else 1) for i in range(self.depth)
    )

  @nn.compact
  def forward(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
    """`(logits, penultimate, blocks)` of images `x`: (B, H, W, C) float images. `penultimate` is the
    flattened last map (B, H_L * W_L * C_L); `blocks` has `depth` conv outputs (B, H_i, W_i, C_i)
    before norm and ReLU.
    """
    common.check_images(x, "convnet")
    conv_outputs = []
    for i, features in enumerate(self.block_widths()):
      if self.norm_position == "before_conv" and i > 0:
        x = common.norm(x, self.norm, train=train, bn_momentum=self.bn_momentum)
      padding = common.first_conv_padding(x, 1, self.pad_grayscale) if i == 0 else 1
      x = common.conv(x, features, 3, init_scheme=self.init_scheme, padding=padding)
      conv_outputs.append(x)
      if self.norm_position == "after_conv":
        x = common.norm(x, self.norm, train=train, bn_momentum=self.bn_momentum)
      x = nn.relu(x)
      x = common.pool2x2(x, self.pooling, model="convnet")
    penultimate = x.reshape((x.shape[0], -1))
    logits = common.dense(penultimate, self.num_classes, init_scheme=self.init_scheme)
    return logits, penultimate, conv_outputs

