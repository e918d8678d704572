"""ResNets (GroupNorm or folded BatchNorm): ``stem``, ``block1`` .. ``blockN``, ``head``."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models.layers import Classifier, ConvNorm, block_names, check_images, classify


class BasicBlock(nn.Module):
  """Residual block: two 3x3 ConvNorm units; 1x1 ConvNorm ``proj`` shortcut if the shape changes.

  ``out = relu(shortcut(x) + norm2(conv2(relu(norm1(conv1(x))))))``; the output has
  ``features`` channels.
  """

  features: int
  strides: int = 1
  norm_groups: int = 32
  norm: str = "group"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    f, g, n = self.features, self.norm_groups, self.norm
    y = ConvNorm(f, 3, self.strides, g, norm=n, name="unit1")(x)
    y = ConvNorm(f, 3, 1, g, relu=False, norm=n, name="unit2")(y)
    if x.shape[-1] != f or self.strides != 1:
      x = ConvNorm(f, 1, self.strides, g, relu=False, norm=n, name="proj")(x)
    return nn.relu(x + y)


class BottleneckBlock(nn.Module):
  """ResNet-50 style bottleneck (stride on the 3x3, "v1.5"); output ``4 * features`` channels.

  ``unit1`` 1x1 -> ``features``, ``unit2`` 3x3 (strided) -> ``features``, ``unit3``
  1x1 -> ``4 * features``; 1x1 ConvNorm ``proj`` shortcut if the shape changes.

  With ``anti_alias`` (CLIP's ResNets) no convolution strides: ``unit2`` has
  stride 1 and a ``strides x strides`` average pool comes before ``unit3`` and,
  on the shortcut, before ``proj``.
  """

  features: int
  strides: int = 1
  norm_groups: int = 32
  norm: str = "group"
  anti_alias: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out, f, g, n, s = 4 * self.features, self.features, self.norm_groups, self.norm, self.strides
    pool = (
      (lambda y: nn.avg_pool(y, (s, s), (s, s))) if self.anti_alias and s > 1 else (lambda y: y)
    )
    conv_stride = 1 if self.anti_alias else s
    y = ConvNorm(f, 1, 1, g, norm=n, name="unit1")(x)
    y = ConvNorm(f, 3, conv_stride, g, norm=n, name="unit2")(y)
    y = ConvNorm(out, 1, 1, g, relu=False, norm=n, name="unit3")(pool(y))
    if x.shape[-1] != out or s != 1:
      x = ConvNorm(out, 1, conv_stride, g, relu=False, norm=n, name="proj")(pool(x))
    return nn.relu(x + y)


_BLOCKS = {"basic": BasicBlock, "bottleneck": BottleneckBlock}


class ResNet(Classifier):
  """ResNet (GroupNorm by default): ``stem`` -> residual blocks -> global average pool -> ``head``.

  Stage ``i`` has ``stage_sizes[i]`` blocks of ``widths[i]`` features; its first
  block has stride ``strides[i]``. Blocks are numbered through all stages
  (``block1`` .. ``blockN``), so the parameter paths are flat and in depth order.

  Attributes:
    num_classes: number of logits.
    stage_sizes: blocks per stage.
    widths: features per stage (bottleneck blocks output 4x this).
    strides: stride of the first block of each stage.
    block: ``"basic"`` (two 3x3 convs) or ``"bottleneck"`` (1x1-3x3-1x1).
    stem_width: output channels of the stem conv.
    stem_kernel: stem conv kernel size.
    stem_stride: stem conv stride.
    stem_pool: 3x3 stride-2 max pool after the stem (ImageNet ResNets).
    norm_groups: at most this many GroupNorm groups (the largest divisor of the
      channels that is <= ``norm_groups`` is used).
    norm: ``"group"`` (GroupNorm) or ``"affine"`` (:class:`Affine`: a converted
      BatchNorm; an untrained ``"affine"`` ResNet is not normalised at all).
    head_zero_init, zero_shot_head, logit_scale: the head (:class:`Classifier`).
  """

  stage_sizes: Sequence[int] = (1, 1, 1, 1)
  widths: Sequence[int] = (32, 64, 128, 256)
  strides: Sequence[int] = (1, 2, 2, 2)
  block: str = "basic"
  stem_width: int = 32
  stem_kernel: int = 3
  stem_stride: int = 1
  stem_pool: bool = False
  norm_groups: int = 32
  norm: str = "group"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    check_images(x)
    if not len(self.stage_sizes) == len(self.widths) == len(self.strides):
      raise ValueError(
        "stage_sizes, widths and strides must have the same length, got "
        f"{self.stage_sizes}, {self.widths}, {self.strides}"
      )
    if self.block not in _BLOCKS:
      raise ValueError(f"block must be one of {sorted(_BLOCKS)}, got {self.block!r}")
    x = ConvNorm(
      self.stem_width,
      self.stem_kernel,
      self.stem_stride,
      self.norm_groups,
      norm=self.norm,
      name="stem",
    )(x)
    if self.stem_pool:
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    names = iter(block_names(sum(self.stage_sizes)))
    for size, width, stride in zip(self.stage_sizes, self.widths, self.strides):
      for i in range(size):
        x = _BLOCKS[self.block](
          width, stride if i == 0 else 1, self.norm_groups, norm=self.norm, name=next(names)
        )(x)
    return classify(self, jnp.mean(x, axis=(1, 2)))
