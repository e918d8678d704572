"""Flax Linen image classifiers for the fine-tuning experiments.

Every model maps a float32 NHWC batch to logits of shape ``(batch, num_classes)``
and ends in an ``nn.Dense`` named ``head``, so a freshly initialised head is the
path prefix ``params/head/`` (see ``experiments.training.weights.load_pretrained``).

Normalisation is GroupNorm (ResNets) or LayerNorm (ViT): there is no BatchNorm,
hence no mutable batch statistics, and ``{'params': ...}`` is the whole model
state. Models converted from BatchNorm checkpoints (``timm_resnet50``,
``clip_resnet50``, see ``experiments.models.convert``) use ``norm="affine"``: each
BatchNorm becomes a per-channel affine ``x * scale + bias`` with the running
statistics folded in, i.e. BatchNorm in inference mode, trainable like any other
parameter. Parameter names follow depth: ``stem``, ``block1`` .. ``blockN``,
``head`` for ResNets (block numbers are zero-padded when there are ten or more,
so the sorted order of the paths is the depth order); ``embed``,
``encoder/block1`` .. ``encoder/blockN``, ``encoder/norm``, ``head`` for ViTs.

The head is either a fresh ``nn.Dense`` or, with ``zero_shot_head=PATH``, CLIP's
zero-shot classifier: the features are L2-normalised and the head kernel starts
at ``logit_scale * normalise(text_embeddings).T`` (bias zero), the text
embeddings being a ``(num_classes, embedding_dim)`` ``.npy`` file
(:func:`zero_shot_kernel`).

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
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models.clip import AttentionPool, ModifiedResNet
from experiments.models.layers import Affine, Classifier, zero_shot_kernel
from experiments.models.resnet import ResNet
from experiments.models.vit import ViT

__all__ = [
  "Affine",
  "AttentionPool",
  "Classifier",
  "ModifiedResNet",
  "ResNet",
  "ResNet50",
  "ViT",
  "default_image_size",
  "get_model",
  "model_names",
  "zero_shot_kernel",
]


@dataclasses.dataclass(frozen=True)
class _Preset:
  cls: type[nn.Module]
  kwargs: dict[str, Any]
  image_size: int


_PRESETS: dict[str, _Preset] = {
  # ~0.3 M parameters, for quick CPU runs.
  "resnet_tiny": _Preset(
    ResNet,
    dict(
      stage_sizes=(1, 1, 1, 1),
      widths=(16, 32, 64, 128),
      strides=(1, 2, 2, 2),
      stem_width=16,
      norm_groups=8,
    ),
    32,
  ),
  # ~1.2 M parameters: the project's step-overhead benchmark model.
  "resnet_small": _Preset(
    ResNet,
    dict(
      stage_sizes=(1, 1, 1, 1),
      widths=(32, 64, 128, 256),
      strides=(1, 2, 2, 2),
      stem_width=32,
      norm_groups=8,
    ),
    32,
  ),
  "resnet50": _Preset(
    ResNet,
    dict(
      stage_sizes=(3, 4, 6, 3),
      widths=(64, 128, 256, 512),
      strides=(1, 2, 2, 2),
      block="bottleneck",
      stem_width=64,
      stem_kernel=7,
      stem_stride=2,
      stem_pool=True,
      norm_groups=32,
    ),
    224,
  ),
  "vit_tiny": _Preset(
    ViT, dict(patch_size=4, hidden_size=96, depth=6, num_heads=3, mlp_dim=384), 32
  ),
  "vit_b16": _Preset(
    ViT, dict(patch_size=16, hidden_size=768, depth=12, num_heads=12, mlp_dim=3072), 224
  ),
  # The pre-trained models experiments.models.convert imports (see its module doc).
  # CLIP ViT-B/16 image tower (openai/clip-vit-base-patch16), 512-d joint space.
  "clip_vit_b16": _Preset(
    ViT,
    dict(
      patch_size=16,
      hidden_size=768,
      depth=12,
      num_heads=12,
      mlp_dim=3072,
      act="quick_gelu",
      norm_eps=1e-5,
      patch_bias=False,
      pre_norm=True,
      proj_dim=512,
    ),
    224,
  ),
  # CLIP ResNet-50 image tower (OpenAI RN50 / open_clip ModifiedResNet), 1024-d joint space.
  "clip_resnet50": _Preset(
    ModifiedResNet, dict(stage_sizes=(3, 4, 6, 3), width=64, num_heads=32, output_dim=1024), 224
  ),
  # ImageNet ResNet-50 (timm / torchvision layout) with its BatchNorms folded.
  "timm_resnet50": _Preset(
    ResNet,
    dict(
      stage_sizes=(3, 4, 6, 3),
      widths=(64, 128, 256, 512),
      strides=(1, 2, 2, 2),
      block="bottleneck",
      stem_width=64,
      stem_kernel=7,
      stem_stride=2,
      stem_pool=True,
      norm="affine",
    ),
    224,
  ),
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


def ResNet50(num_classes: int, **overrides: Any) -> ResNet:  # noqa: N802 (a model name)
  """ResNet-50 with GroupNorm: bottleneck stages [3, 4, 6, 3], 7x7/2 stem + max pool, 224x224."""
  return ResNet(num_classes=num_classes, **{**_PRESETS["resnet50"].kwargs, **overrides})


def init_params(model: nn.Module, key: jax.Array, image_size: int) -> Any:
  """The ``params`` of ``model.init`` on one zero image of ``image_size`` (NHWC, float32):
  the one place a model is initialised (under ``jax.eval_shape`` for shapes only)."""
  return model.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32))["params"]
