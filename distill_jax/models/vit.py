"""A tiny Vision Transformer (Dosovitskiy et al., 2021) for cross-architecture evaluation.

`vit_tiny` keeps ViT-Tiny's width (dim 192, 3 heads, MLP 768) with half its depth (6 blocks)
and 4x4 patches, which suits 28x28 and 32x32 images (7x7 and 8x8 tokens). Pre-norm encoder
blocks, learned position embeddings, no class token: the head reads the mean token after a
final LayerNorm. No dropout, so `train` changes nothing. Initialisation follows the usual Flax
ViT choices: attention and MLP kernels Xavier-uniform with zero biases, patch embedding and
head with Flax defaults (lecun-normal, zero bias), position embeddings N(0, 0.02^2).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.models import common

LAYER_NORM_EPSILON = 1e-6


class EncoderBlock(nn.Module):
  """x + MHSA(LN(x)), then x + MLP(LN(x)) with a GELU MLP of width `mlp_dim`.

  Attributes:
    num_heads: attention heads.
    mlp_dim: hidden width of the MLP.
  """

  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Maps tokens (B, N, D) to (B, N, D)."""
    dim = tokens.shape[-1]
    y = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON)(tokens)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads,
        qkv_features=dim,
        kernel_init=nn.initializers.xavier_uniform(),
        deterministic=True,
    )(y)
    tokens = tokens + y
    y = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON)(tokens)
    y = nn.Dense(self.mlp_dim, kernel_init=nn.initializers.xavier_uniform())(y)
    y = nn.gelu(y)
    y = nn.Dense(dim, kernel_init=nn.initializers.xavier_uniform())(y)
    return tokens + y


@common.MODELS.register("vit_tiny")
class ViT(common.Classifier):
  """Patch embedding, `depth` pre-norm encoder blocks, LayerNorm, mean token, Dense.

  Attributes:
    num_classes: outputs of the final Dense.
    patch_size: side of the square patches; image sides must be multiples of it (4 suits
      28x28 and 32x32; use 2 for 8x8 digits).
    dim: token width.
    depth: encoder blocks.
    num_heads: attention heads (must divide `dim`).
    mlp_dim: hidden width of the MLPs.
  """

  num_classes: int
  patch_size: int = 4
  dim: int = 192
  depth: int = 6
  num_heads: int = 3
  mlp_dim: int = 768

  def __post_init__(self) -> None:
    for value, what in (
        (self.num_classes, "num_classes"),
        (self.patch_size, "patch_size"),
        (self.dim, "dim"),
        (self.depth, "depth"),
        (self.num_heads, "num_heads"),
        (self.mlp_dim, "mlp_dim"),
    ):
      common.check_positive(value, what)
    if self.dim % self.num_heads:
      raise ValueError(
          f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads}); change one"
      )
    super().__post_init__()

  @nn.compact
  def forward(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
    """`(logits, penultimate, blocks)` of images `x`: (B, H, W, C) float images, H and W multiples of
    `patch_size`. `penultimate` is the normalised mean token (B, dim); `blocks` holds the patch-
    embedding (conv) output and then every encoder block's output tokens, each laid out on the
    patch grid as (B, H / patch_size, W / patch_size, dim).
    """
    del train  # No dropout or batch norm.
    common.check_images(x, "vit_tiny")
    height, width = x.shape[1:3]
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(
          f"vit_tiny: image size {height}x{width} is not a multiple of patch_size="
          f"{self.patch_size}; pick a patch_size dividing both sides"
      )
    patches = nn.Conv(
        self.dim,
        (self.patch_size, self.patch_size),
        strides=(self.patch_size, self.patch_size),
        padding="VALID",
        name="patch_embedding",
    )(x)
    grid_shape = patches.shape
    tokens = patches.reshape((grid_shape[0], -1, self.dim))
    position_embedding = self.param(
        "position_embedding", nn.initializers.normal(stddev=0.02), (1,) + tokens.shape[1:]
    )
    tokens = tokens + position_embedding
    block_outputs = [patches]
    for i in range(self.depth):
      tokens = EncoderBlock(self.num_heads, self.mlp_dim, name=f"encoder_block{i + 1}")(tokens)
      block_outputs.append(tokens.reshape(grid_shape))
    tokens = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, name="final_norm")(tokens)
    penultimate = jnp.mean(tokens, axis=1)
    logits = nn.Dense(self.num_classes, name="head")(penultimate)
    return logits, penultimate, block_outputs
