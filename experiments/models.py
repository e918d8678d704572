"""Flax Linen image classifiers for the fine-tuning experiments.

Every model maps a float32 NHWC batch to logits of shape ``(batch, num_classes)``
and ends in an ``nn.Dense`` named ``head``, so a freshly initialised head is the
path prefix ``params/head/`` (see ``experiments.weights.load_pretrained``).

Normalisation is GroupNorm (ResNets) or LayerNorm (ViT): there is no BatchNorm,
hence no mutable batch statistics, and ``{'params': ...}`` is the whole model
state. Parameter names follow depth: ``stem``, ``block1`` .. ``blockN``, ``head``
for ResNets (block numbers are zero-padded when there are ten or more, so the
sorted order of the paths is the depth order); ``embed``, ``encoder/block1`` ..
``encoder/blockN``, ``encoder/norm``, ``head`` for ViTs.

Dense and Conv kernels keep Flax's layout, output axis last: Dense ``(in, out)``,
Conv ``(kh, kw, in, out)``. The ViT attention uses one fused ``qkv`` Dense and
one ``out`` Dense (2-D kernels, as PyTorch's ``nn.MultiheadAttention`` and timm
store them), so "one norm per output channel" means the same thing as in the
PyTorch reference implementations.

Example:
  >>> import jax, jax.numpy as jnp
  >>> model = get_model("resnet_tiny", num_classes=10)
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  >>> model.apply(variables, jnp.zeros((4, 32, 32, 3))).shape
  (4, 10)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "ResNet",
    "ResNet50",
    "ViT",
    "default_image_size",
    "get_model",
    "model_names",
]


def _check_images(x: jax.Array) -> None:
  if x.ndim != 4:
    raise ValueError(f"expected a NHWC batch of images (4 dims), got shape {x.shape}")


def _block_names(count: int, prefix: str = "block") -> list[str]:
  """``block1`` .. ``blockN``, zero-padded so that sorting keeps depth order."""
  digits = len(str(count))
  return [f"{prefix}{i:0{digits}d}" for i in range(1, count + 1)]


def _group_norm(channels: int, max_groups: int, name: str) -> nn.GroupNorm:
  # The largest group count <= max_groups that divides the channels.
  return nn.GroupNorm(num_groups=math.gcd(max_groups, channels), name=name)


def _head(num_classes: int, zero_init: bool) -> nn.Dense:
  kernel_init = nn.initializers.zeros if zero_init else nn.linear.default_kernel_init
  return nn.Dense(num_classes, kernel_init=kernel_init, name="head")


class ConvNorm(nn.Module):
  """Conv (no bias) -> GroupNorm -> optional ReLU; parameters ``conv``, ``norm``."""

  features: int
  kernel_size: int = 3
  strides: int = 1
  norm_groups: int = 32
  relu: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s = self.kernel_size, self.strides
    x = nn.Conv(self.features, (k, k), (s, s), padding=[(k // 2, k // 2)] * 2,
                use_bias=False, name="conv")(x)
    x = _group_norm(self.features, self.norm_groups, "norm")(x)
    return nn.relu(x) if self.relu else x


class BasicBlock(nn.Module):
  """Residual block: two 3x3 ConvNorm units; 1x1 ConvNorm ``proj`` shortcut if the shape changes.

  ``out = relu(shortcut(x) + norm2(conv2(relu(norm1(conv1(x))))))``; the output has
  ``features`` channels.
  """

  features: int
  strides: int = 1
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    f, g = self.features, self.norm_groups
    y = ConvNorm(f, 3, self.strides, g, name="unit1")(x)
    y = ConvNorm(f, 3, 1, g, relu=False, name="unit2")(y)
    if x.shape[-1] != f or self.strides != 1:
      x = ConvNorm(f, 1, self.strides, g, relu=False, name="proj")(x)
    return nn.relu(x + y)


class BottleneckBlock(nn.Module):
  """ResNet-50 style bottleneck (stride on the 3x3, "v1.5"); output ``4 * features`` channels.

  ``unit1`` 1x1 -> ``features``, ``unit2`` 3x3 (strided) -> ``features``, ``unit3``
  1x1 -> ``4 * features``; 1x1 ConvNorm ``proj`` shortcut if the shape changes.
  """

  features: int
  strides: int = 1
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out = 4 * self.features
    y = ConvNorm(self.features, 1, 1, self.norm_groups, name="unit1")(x)
    y = ConvNorm(self.features, 3, self.strides, self.norm_groups, name="unit2")(y)
    y = ConvNorm(out, 1, 1, self.norm_groups, relu=False, name="unit3")(y)
    if x.shape[-1] != out or self.strides != 1:
      x = ConvNorm(out, 1, self.strides, self.norm_groups, relu=False, name="proj")(x)
    return nn.relu(x + y)


_BLOCKS = {"basic": BasicBlock, "bottleneck": BottleneckBlock}


class ResNet(nn.Module):
  """GroupNorm ResNet: ``stem`` -> residual blocks -> global average pool -> ``head``.

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
    head_zero_init: initialise the head kernel to zeros (common for fine-tuning).
  """

  num_classes: int
  stage_sizes: Sequence[int] = (1, 1, 1, 1)
  widths: Sequence[int] = (32, 64, 128, 256)
  strides: Sequence[int] = (1, 2, 2, 2)
  block: str = "basic"
  stem_width: int = 32
  stem_kernel: int = 3
  stem_stride: int = 1
  stem_pool: bool = False
  norm_groups: int = 32
  head_zero_init: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _check_images(x)
    if not len(self.stage_sizes) == len(self.widths) == len(self.strides):
      raise ValueError("stage_sizes, widths and strides must have the same length, got "
                       f"{self.stage_sizes}, {self.widths}, {self.strides}")
    if self.block not in _BLOCKS:
      raise ValueError(f"block must be one of {sorted(_BLOCKS)}, got {self.block!r}")
    x = ConvNorm(self.stem_width, self.stem_kernel, self.stem_stride, self.norm_groups,
                 name="stem")(x)
    if self.stem_pool:
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    names = iter(_block_names(sum(self.stage_sizes)))
    for size, width, stride in zip(self.stage_sizes, self.widths, self.strides):
      for i in range(size):
        x = _BLOCKS[self.block](width, stride if i == 0 else 1, self.norm_groups,
                                name=next(names))(x)
    x = jnp.mean(x, axis=(1, 2))
    return _head(self.num_classes, self.head_zero_init)(x)


def ResNet50(num_classes: int, **overrides: Any) -> ResNet:  # noqa: N802 (a model name)
  """ResNet-50 with GroupNorm: bottleneck stages [3, 4, 6, 3], 7x7/2 stem + max pool, 224x224."""
  return ResNet(num_classes=num_classes, **{**_PRESETS["resnet50"].kwargs, **overrides})


class Mlp(nn.Module):
  """Transformer MLP: ``fc2(gelu(fc1(x)))``."""

  hidden_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.xavier_uniform()
    y = nn.gelu(nn.Dense(self.hidden_dim, kernel_init=init, name="fc1")(x))
    return nn.Dense(x.shape[-1], kernel_init=init, name="fc2")(y)


class SelfAttention(nn.Module):
  """Multi-head self-attention with a fused ``qkv`` Dense (kernel ``(d, 3d)``) and an ``out`` Dense."""

  num_heads: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, tokens, dim = x.shape
    if dim % self.num_heads:
      raise ValueError(f"hidden size {dim} is not divisible by num_heads={self.num_heads}")
    init = nn.initializers.xavier_uniform()
    qkv = nn.Dense(3 * dim, kernel_init=init, name="qkv")(x)
    q, k, v = jnp.split(qkv.reshape(batch, tokens, 3 * self.num_heads, -1), 3, axis=2)
    y = jax.nn.dot_product_attention(q, k, v).reshape(batch, tokens, dim)
    return nn.Dense(dim, kernel_init=init, name="out")(y)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + SelfAttention(self.num_heads, name="attn")(nn.LayerNorm(name="norm1")(x))
    return x + Mlp(self.mlp_dim, name="mlp")(nn.LayerNorm(name="norm2")(x))


class Encoder(nn.Module):
  """``depth`` EncoderBlocks (``block1`` ..) and a final LayerNorm ``norm``."""

  depth: int
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for name in _block_names(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, name=name)(x)
    return nn.LayerNorm(name="norm")(x)


class PatchEmbed(nn.Module):
  """Patch embedding ``patch`` (a strided conv), optional class token ``cls``, learned ``pos``.

  The number of position embeddings is fixed by the image size seen at init.
  """

  patch_size: int
  hidden_size: int
  cls_token: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f"image size {x.shape[1:3]} is not divisible by patch_size={p}")
    x = nn.Conv(self.hidden_size, (p, p), (p, p), padding="VALID", name="patch")(x)
    x = x.reshape(x.shape[0], -1, self.hidden_size)
    if self.cls_token:
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden_size))
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.hidden_size)), x], 1)
    pos = self.param("pos", nn.initializers.normal(stddev=0.02), (1, *x.shape[1:]))
    return x + pos


class ViT(nn.Module):
  """Vision Transformer: ``embed`` -> ``encoder`` -> class token or mean pool -> ``head``.

  Attributes:
    num_classes: number of logits.
    patch_size: side of the square patches.
    hidden_size: token width.
    depth: number of transformer blocks.
    num_heads: attention heads (must divide ``hidden_size``).
    mlp_dim: hidden width of the MLPs.
    pool: ``"cls"`` (a learned class token) or ``"gap"`` (mean over patch tokens).
    head_zero_init: initialise the head kernel to zeros (common for fine-tuning).
  """

  num_classes: int
  patch_size: int = 16
  hidden_size: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  pool: str = "cls"
  head_zero_init: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _check_images(x)
    if self.pool not in ("cls", "gap"):
      raise ValueError(f"pool must be 'cls' or 'gap', got {self.pool!r}")
    x = PatchEmbed(self.patch_size, self.hidden_size, self.pool == "cls", name="embed")(x)
    x = Encoder(self.depth, self.num_heads, self.mlp_dim, name="encoder")(x)
    x = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
    return _head(self.num_classes, self.head_zero_init)(x)


@dataclasses.dataclass(frozen=True)
class _Preset:
  cls: type[nn.Module]
  kwargs: dict[str, Any]
  image_size: int


_PRESETS: dict[str, _Preset] = {
    # ~0.3 M parameters, for quick CPU runs.
    "resnet_tiny": _Preset(ResNet, dict(stage_sizes=(1, 1, 1, 1), widths=(16, 32, 64, 128),
                                        strides=(1, 2, 2, 2), stem_width=16, norm_groups=8), 32),
    # ~1.2 M parameters: the project's step-overhead benchmark model.
    "resnet_small": _Preset(ResNet, dict(stage_sizes=(1, 1, 1, 1), widths=(32, 64, 128, 256),
                                         strides=(1, 2, 2, 2), stem_width=32, norm_groups=8), 32),
    "resnet50": _Preset(ResNet, dict(stage_sizes=(3, 4, 6, 3), widths=(64, 128, 256, 512),
                                     strides=(1, 2, 2, 2), block="bottleneck", stem_width=64,
                                     stem_kernel=7, stem_stride=2, stem_pool=True,
                                     norm_groups=32), 224),
    "vit_tiny": _Preset(ViT, dict(patch_size=4, hidden_size=96, depth=6, num_heads=3,
                                  mlp_dim=384), 32),
    "vit_b16": _Preset(ViT, dict(patch_size=16, hidden_size=768, depth=12, num_heads=12,
                                 mlp_dim=3072), 224),
}


def model_names() -> tuple[str, ...]:
  """Names accepted by :func:`get_model`."""
  return tuple(_PRESETS)


def _preset(name: str) -> _Preset:
  if name not in _PRESETS:
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(_PRESETS)}")
  return _PRESETS[name]


def default_image_size(name: str) -> int:
  """Side of the square input images the preset ``name`` is meant for (32 or 224)."""
  return _preset(name).image_size


def get_model(name: str, num_classes: int, **overrides: Any) -> nn.Module:
  """Builds the preset ``name`` with ``num_classes`` logits.

  Args:
    name: one of :func:`model_names`.
    num_classes: size of the ``head``.
    **overrides: attributes of the model class that replace the preset's values,
      e.g. ``head_zero_init=True`` or ``depth=4``.

  Returns:
    An unbound Flax Linen module.

  Raises:
    ValueError: unknown ``name`` or an override that is not an attribute of the model.
  """
  preset = _preset(name)
  fields = {f.name for f in dataclasses.fields(preset.cls)} - {"parent", "name", "num_classes"}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"{name}: unknown override(s) {unknown}; valid: {sorted(fields)}")
  return preset.cls(num_classes=num_classes, **{**preset.kwargs, **overrides})
