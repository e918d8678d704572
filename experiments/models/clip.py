"""CLIP's image ResNet (OpenAI ``ModifiedResNet``): three-conv stem, anti-aliased blocks,
attention pooling."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models.layers import Classifier, ConvNorm, block_names, check_images, classify
from experiments.models.resnet import BottleneckBlock


class AttentionPool(nn.Module):
  """CLIP's attention pooling: the mean token queries all tokens; output ``(batch, output_dim)``.

  The ``h * w`` positions of the NHWC input, preceded by their mean, are the
  tokens; ``pos`` (shape ``(h * w + 1, channels)``, fixed by the image size at
  init) is added to them. One multi-head attention with the mean token as the
  only query: ``query``/``key``/``value`` Dense (channels -> channels), softmax
  scaled by ``1 / sqrt(channels / num_heads)``, then ``out`` Dense to
  ``output_dim`` (CLIP's projection to the joint image-text space).
  """

  num_heads: int
  output_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    if c % self.num_heads:
      raise ValueError(f"{c} channels are not divisible by num_heads={self.num_heads}")
    x = x.reshape(n, h * w, c)
    x = jnp.concatenate([jnp.mean(x, axis=1, keepdims=True), x], axis=1)
    x = x + self.param("pos", nn.initializers.normal(stddev=c**-0.5), (h * w + 1, c))

    def split(y):
      return y.reshape(n, y.shape[1], self.num_heads, c // self.num_heads)

    q = split(nn.Dense(c, name="query")(x[:, :1]))
    k = split(nn.Dense(c, name="key")(x))
    v = split(nn.Dense(c, name="value")(x))
    y = jax.nn.dot_product_attention(q, k, v).reshape(n, c)
    return nn.Dense(self.output_dim, name="out")(y)


class ClipStem(nn.Module):
  """CLIP's three-conv stem: 3x3/2 -> ``width // 2``, 3x3 -> ``width // 2``, 3x3 -> ``width``
  (ConvNorm ``unit1`` .. ``unit3``), then a 2x2 average pool."""

  width: int
  norm_groups: int = 32
  norm: str = "affine"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    g, n = self.norm_groups, self.norm
    x = ConvNorm(self.width // 2, 3, 2, g, norm=n, name="unit1")(x)
    x = ConvNorm(self.width // 2, 3, 1, g, norm=n, name="unit2")(x)
    x = ConvNorm(self.width, 3, 1, g, norm=n, name="unit3")(x)
    return nn.avg_pool(x, (2, 2), (2, 2))


class ModifiedResNet(Classifier):
  """CLIP's image ResNet ("ModifiedResNet"): ``stem`` -> blocks -> ``pool`` -> ``head``.

  Differs from :class:`ResNet`: a three-conv stem with an average pool
  (:class:`ClipStem`), anti-aliased strided blocks (:class:`BottleneckBlock` with
  ``anti_alias``) and attention pooling to ``output_dim`` features
  (:class:`AttentionPool`, ``pool``) instead of a global average pool. Stage ``i`` has
  ``stage_sizes[i]`` blocks of ``width * 2**i`` features (output 4x that),
  strides 1, 2, 2, 2. The ``pool`` positions are fixed by the image size at
  init (224 for the OpenAI weights: 7x7 + 1).

  Attributes:
    num_classes: number of logits.
    stage_sizes: blocks per stage.
    width: stem output channels and features of the first stage.
    num_heads: attention-pool heads (``width * 32 / 64`` for CLIP's models).
    output_dim: dimension of the image embedding (CLIP's joint space).
    norm: ``"affine"`` (converted BatchNorm, the default) or ``"group"``.
    norm_groups: at most this many GroupNorm groups (``norm="group"`` only).
    head_zero_init, zero_shot_head, logit_scale: the head (:class:`Classifier`).
  """

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  num_heads: int = 32
  output_dim: int = 1024
  norm: str = "affine"
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    check_images(x)
    g, n = self.norm_groups, self.norm
    x = ClipStem(self.width, g, n, name="stem")(x)
    names = iter(block_names(sum(self.stage_sizes)))
    for stage, size in enumerate(self.stage_sizes):
      for i in range(size):
        x = BottleneckBlock(
          self.width * 2**stage,
          2 if stage and not i else 1,
          g,
          n,
          anti_alias=True,
          name=next(names),
        )(x)
    x = AttentionPool(self.num_heads, self.output_dim, name="pool")(x)
    return classify(self, x)
