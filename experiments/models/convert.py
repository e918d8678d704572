"""Pre-trained checkpoints (safetensors) converted into the experiments' Flax models.

Command line (reads the file with ``safetensors.numpy``, no torch needed)::

  python -m experiments.convert --format clip_vit --input model.safetensors --output DIR

writes the orbax params checkpoint ``DIR`` (``experiments.training.weights.save_params``,
``{'params': ...}``) that the configs load with ``--config.pretrain.checkpoint=DIR``.

========================  =====================  ==============================================
``--format``              model preset           source key layout
========================  =====================  ==============================================
``clip_vit``              ``clip_vit_b16``       Hugging Face ``CLIPModel`` /
                                                 ``CLIPVisionModelWithProjection``
                                                 (``openai/clip-vit-base-patch16``)
``clip_resnet``           ``clip_resnet50``      open_clip / OpenAI CLIP ``ModifiedResNet``
                                                 (``visual.*``; open_clip ``RN50`` ``openai``)
``timm_resnet``           ``timm_resnet50``      timm ``resnet50`` (= torchvision's layout)
========================  =====================  ==============================================

The conversion is driven by the model: every parameter of the preset is read
from named source tensors and checked against the shape the model expects.
Source tensors of another part of the checkpoint (CLIP's text tower,
``logit_scale``, BatchNorm's ``num_batches_tracked``, HF's ``position_ids``)
are ignored; every other key must be used. All problems (missing keys,
mis-shaped keys with the expected shape, unused keys) are reported in one
:class:`ConversionError`. CLIP checkpoints have no classifier, so their
checkpoint holds no ``head``: the head is always initialised by the
fine-tuning model (a fresh Dense, or the zero-shot head from class text
embeddings, ``experiments.models.zero_shot_kernel``).

Tensor layouts (PyTorch -> Flax)::

  Linear weight (out, in)                -> Dense kernel (in, out)            (transpose)
  Conv2d weight (out, in, kh, kw)        -> Conv kernel (kh, kw, in, out)
  q/k/v Linear weights, 3 x (d, d)       -> fused ``qkv`` kernel (d, 3d) = [Wq^T | Wk^T | Wv^T]
  class_embedding (d,)                   -> ``embed/cls`` (1, 1, d)
  position_embedding.weight (n, d)       -> ``embed/pos`` (1, n, d)
  LayerNorm weight, bias                 -> ``scale``, ``bias``
  BatchNorm weight g, bias b, running    -> :class:`experiments.models.Affine` ``scale`` =
    mean m, running var v                   g / sqrt(v + eps), ``bias`` = b - m * scale

**BatchNorm.** Our models keep no batch statistics (``{'params': ...}`` is the
whole state), so a pre-trained BatchNorm is folded into a per-channel affine
(computed in float64, eps 1e-5 as in PyTorch): the converted model computes
exactly what the source model computes in eval mode. Consequence for
fine-tuning: the network is fine-tuned as with frozen BatchNorm statistics
(torchvision's ``FrozenBatchNorm2d`` / open_clip's ``freeze_bn_stats``), with
the folded ``scale`` and ``bias`` trainable and constrained like any other
1-D tensor; batch statistics are never recomputed. PyTorch recipes that
fine-tune BatchNorm in train mode renormalise with each batch's statistics
instead, so results can differ from theirs. The distance of a norm layer to
its anchor (TPGM's and FTP's per-layer norms, L2-SP) is measured on the folded
``scale`` / ``bias``, i.e. PyTorch's ``gamma`` distance times
``1 / sqrt(var + eps)``, not on ``gamma`` / ``beta`` themselves.

Input normalisation: CLIP models expect images normalised with CLIP's mean and
std (:data:`CLIP_MEAN`, :data:`CLIP_STD`), timm's ResNet-50 ImageNet's; the
configs set ``config.model.input_mean`` / ``input_std`` accordingly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util

import tpgm_jax
from experiments import models
from experiments.training import weights

__all__ = [
  "CLIP_MEAN",
  "CLIP_STD",
  "FORMATS",
  "ConversionError",
  "convert",
  "convert_file",
  "default_model",
  "logit_scale",
  "read_safetensors",
]

# OpenAI CLIP's input normalisation (per channel, on the [0, 1] scale).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default, used by CLIP's and timm's ResNets


class ConversionError(ValueError):
  """A source checkpoint that does not fit the model: missing, mis-shaped or unused keys."""


@dataclasses.dataclass(frozen=True)
class _Rule:
  """How one Flax parameter is computed from source tensors.

  ``kind`` (see :func:`_source_shapes` and :func:`_apply`): ``copy``, ``dense``
  (transpose), ``conv``, ``reshape``, ``qkv`` (three tensors fused on the
  output axis, transposed if 2-D), ``bn_scale`` / ``bn_bias`` (BatchNorm
  weight, bias, running mean, running var folded into an affine).
  """

  keys: tuple[str, ...]
  kind: str


def _source_shapes(rule: _Rule, target: tuple[int, ...]) -> list[tuple[int, ...]] | None:
  """The shapes the source tensors must have for a Flax parameter of shape ``target``."""
  if rule.kind == "copy":
    return [target]
  if rule.kind == "dense":
    return [target[::-1]]
  if rule.kind == "conv":
    kh, kw, cin, cout = target
    return [(cout, cin, kh, kw)]
  if rule.kind == "reshape":
    return [tuple(d for d in target if d != 1) or (1,)]
  if rule.kind == "qkv":
    if target[-1] % 3:
      return None
    third = target[-1] // 3
    return [(third, *target[:-1])] * 3 if len(target) == 2 else [(third,)] * 3
  if rule.kind in ("bn_scale", "bn_bias"):
    return [target] * 4
  raise AssertionError(rule.kind)


def _apply(rule: _Rule, src: list[np.ndarray], target: tuple[int, ...]) -> np.ndarray:
  """The Flax value of a parameter from its (float64) source tensors."""
  if rule.kind == "copy":
    return src[0]
  if rule.kind == "dense":
    return src[0].T
  if rule.kind == "conv":
    return src[0].transpose(2, 3, 1, 0)
  if rule.kind == "reshape":
    return src[0].reshape(target)
  if rule.kind == "qkv":
    return np.concatenate([s.T if s.ndim == 2 else s for s in src], axis=-1)
  gamma, beta, mean, var = src
  scale = gamma / np.sqrt(var + BN_EPS)
  return scale if rule.kind == "bn_scale" else beta - mean * scale


def _block_locations(stage_sizes: Sequence[int]) -> list[tuple[int, int]]:
  """(stage, index in stage) of our globally numbered blocks (``block1`` .. ``blockN``)."""
  return [(s, i) for s, size in enumerate(stage_sizes) for i in range(size)]


def _dense(prefix: str, leaf: str) -> _Rule:
  return (
    _Rule((f"{prefix}.weight",), "dense")
    if leaf == "kernel"
    else _Rule((f"{prefix}.bias",), "copy")
  )


def _layer_norm(prefix: str, leaf: str) -> _Rule:
  return _Rule((f"{prefix}.{'weight' if leaf == 'scale' else 'bias'}",), "copy")


def _batch_norm(prefix: str, leaf: str) -> _Rule:
  keys = tuple(f"{prefix}.{n}" for n in ("weight", "bias", "running_mean", "running_var"))
  return _Rule(keys, "bn_scale" if leaf == "scale" else "bn_bias")


def _conv_norm(conv: str, norm: str, rest: str) -> _Rule | None:
  """A ConvNorm unit (``conv/kernel``, ``norm/scale``, ``norm/bias``) from a Conv2d + BatchNorm."""
  if rest == "conv/kernel":
    return _Rule((f"{conv}.weight",), "conv")
  if rest in ("norm/scale", "norm/bias"):
    return _batch_norm(norm, rest.split("/")[1])
  return None


def _clip_vit_rule(path: str, model: Any) -> _Rule | None:
  v = "vision_model."
  fixed = {
    "embed/patch/kernel": _Rule((v + "embeddings.patch_embedding.weight",), "conv"),
    "embed/cls": _Rule((v + "embeddings.class_embedding",), "reshape"),
    "embed/pos": _Rule((v + "embeddings.position_embedding.weight",), "reshape"),
    "proj/kernel": _Rule(("visual_projection.weight",), "dense"),
  }
  if path in fixed:
    return fixed[path]
  module, _, leaf = path.rpartition("/")
  if module == "embed/norm":
    return _layer_norm(v + "pre_layrnorm", leaf)  # sic: HF's name
  if module == "encoder/norm":
    return _layer_norm(v + "post_layernorm", leaf)
  m = re.fullmatch(r"encoder/block(\d+)/(.+)", module)
  if m is None:
    return None
  layer, part = f"{v}encoder.layers.{int(m[1]) - 1}.", m[2]
  if part in ("norm1", "norm2"):
    return _layer_norm(layer + f"layer_norm{part[-1]}", leaf)
  if part == "attn/qkv":
    suffix = "weight" if leaf == "kernel" else "bias"
    return _Rule(tuple(f"{layer}self_attn.{n}_proj.{suffix}" for n in "qkv"), "qkv")
  names = {"attn/out": "self_attn.out_proj", "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}
  return _dense(layer + names[part], leaf) if part in names else None


def _resnet_block_rule(model: Any, block: str, rest: str, prefix: str) -> _Rule | None:
  """A bottleneck block of a torchvision-layout ResNet (``layerS.I.conv1`` ...)."""
  stage, index = _block_locations(model.stage_sizes)[int(block) - 1]
  b = f"{prefix}layer{stage + 1}.{index}."
  unit, _, sub = rest.partition("/")
  if unit in ("unit1", "unit2", "unit3"):
    n = unit[-1]
    return _conv_norm(f"{b}conv{n}", f"{b}bn{n}", sub)
  if unit == "proj":
    return _conv_norm(f"{b}downsample.0", f"{b}downsample.1", sub)
  return None


def _clip_resnet_rule(path: str, model: Any, prefix: str = "visual.") -> _Rule | None:
  m = re.fullmatch(r"stem/unit([123])/(.+)", path)
  if m:
    return _conv_norm(f"{prefix}conv{m[1]}", f"{prefix}bn{m[1]}", m[2])
  m = re.fullmatch(r"block(\d+)/(.+)", path)
  if m:
    return _resnet_block_rule(model, m[1], m[2], prefix)
  if path == "pool/pos":
    return _Rule((f"{prefix}attnpool.positional_embedding",), "copy")
  m = re.fullmatch(r"pool/(query|key|value|out)/(kernel|bias)", path)
  if m:
    name = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "c_proj"}[m[1]]
    return _dense(f"{prefix}attnpool.{name}", m[2])
  return None


def _timm_resnet_rule(path: str, model: Any) -> _Rule | None:
  m = re.fullmatch(r"stem/(.+)", path)
  if m:
    return _conv_norm("conv1", "bn1", m[1])
  m = re.fullmatch(r"block(\d+)/(.+)", path)
  if m:
    return _resnet_block_rule(model, m[1], m[2], "")
  m = re.fullmatch(r"head/(kernel|bias)", path)
  return _dense("fc", m[1]) if m else None


# Keys of a checkpoint that the image model does not use (text tower, CLIP's
# temperature, bookkeeping buffers). Any other unused key is an error.
_CLIP_TEXT = (
  r"text_model\..*",
  r"text_projection(\.weight)?",
  r"logit_scale",
  r"transformer\..*",
  r"token_embedding\..*",
  r"positional_embedding",
  r"ln_final\..*",
  r"input_resolution",
  r"context_length",
  r"vocab_size",
  r"attn_mask",
)


@dataclasses.dataclass(frozen=True)
class Format:
  """A source checkpoint layout.

  Attributes:
    model: the preset (``experiments.models.get_model``) the layout converts to.
    rule: ``rule(path, model) -> _Rule | None``: the source of the Flax
      parameter ``path`` (without ``params/``); None: the source has no such
      parameter (allowed only for the head, which is then not written).
    ignored: regexes of source keys that are not part of the image model.
    head_key: the source's classifier weight (written as ``head``; its rows are
      the class count), or None: the source has no classifier.
    description: the layout, for the command-line help.
  """

  model: str
  rule: Callable[[str, Any], _Rule | None]
  ignored: tuple[str, ...]
  head_key: str | None
  description: str


FORMATS: dict[str, Format] = {
  "clip_vit": Format(
    "clip_vit_b16",
    _clip_vit_rule,
    _CLIP_TEXT + (r".*position_ids",),
    None,
    "Hugging Face CLIPModel / CLIPVisionModelWithProjection (vision_model.*, "
    "visual_projection.weight)",
  ),
  "clip_resnet": Format(
    "clip_resnet50",
    _clip_resnet_rule,
    _CLIP_TEXT + (r".*num_batches_tracked",),
    None,
    "open_clip / OpenAI CLIP ModifiedResNet (visual.conv1.weight, "
    "visual.layer1.0.*, visual.attnpool.*)",
  ),
  "timm_resnet": Format(
    "timm_resnet50",
    _timm_resnet_rule,
    (r".*num_batches_tracked",),
    "fc.weight",
    "timm / torchvision ResNet (conv1.weight, layer1.0.*, fc.*)",
  ),
}


def _get_format(name: str) -> Format:
  if name not in FORMATS:
    raise ValueError(f"unknown format {name!r}; valid formats: {', '.join(FORMATS)}")
  return FORMATS[name]


def _abstract_params(model: Any, image_size: int) -> dict[str, tuple[int, ...]]:
  """``{path without 'params/': shape}`` of the model's parameters at ``image_size``."""
  params = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), image_size))
  return dict(zip(tpgm_jax.leaf_paths(params), (tuple(p.shape) for p in jax.tree.leaves(params))))


def default_model(
  fmt: str, tensors: Mapping[str, np.ndarray], preset: str | None = None, **overrides: Any
) -> Any:
  """The model ``fmt`` converts to: ``preset`` (default: the format's) with ``overrides``, with
  as many classes as the source's classifier (1000 if it has none: no head is written)."""
  spec = _get_format(fmt)
  head = tensors.get(spec.head_key) if spec.head_key else None
  classes = np.shape(head)[0] if head is not None and np.ndim(head) == 2 else 1000
  return models.get_model(preset or spec.model, classes, **overrides)


def convert(
  fmt: str,
  tensors: Mapping[str, np.ndarray],
  model: Any = None,
  image_size: int | None = None,
  *,
  source: str = "the checkpoint",
) -> dict[str, Any]:
  """The Flax params of ``model`` from the source ``tensors`` in layout ``fmt``.

  Args:
    fmt: a key of :data:`FORMATS`.
    tensors: source key -> array (e.g. ``safetensors.numpy.load_file(path)``).
    model: the Flax model to fill; default: :func:`default_model`. Its head is
      written only if the source has a classifier.
    image_size: the input side the model is built for (it fixes the number of
      position embeddings); default: the format's preset's (224).
    source: how to name the checkpoint in error messages.

  Returns:
    ``{'params': ...}``: nested dicts of float32 NumPy arrays (no ``head`` for
    CLIP formats).

  Raises:
    ConversionError: missing, mis-shaped or unused source keys (all listed, with
      the expected shapes), or a model parameter the format cannot produce.
  """
  spec = _get_format(fmt)
  if image_size is None:
    image_size = models.default_image_size(spec.model)
  if model is None:
    model = default_model(fmt, tensors)
  targets = _abstract_params(model, image_size)

  rules, unmappable = {}, []
  for path in targets:
    rule = spec.rule(path, model)
    if rule is None and not (path.startswith("head/") and spec.head_key is None):
      unmappable.append(path)
    elif rule is not None:
      rules[path] = rule
  if unmappable:
    raise ConversionError(
      f"format {fmt!r} cannot produce {len(unmappable)} parameter(s) of the model "
      f"{type(model).__name__} (is it the {spec.model} architecture?):\n    "
      + weights.listing(unmappable, "\n    ")
    )

  # One message per source key (a BatchNorm's four tensors feed two parameters).
  missing, misshaped, used = {}, {}, set()
  for path, rule in rules.items():
    expected = _source_shapes(rule, targets[path])
    if expected is None:
      misshaped[path] = (
        f"params/{path}: model shape {targets[path]} cannot be fused from 3 tensors {rule.keys}"
      )
      continue
    # A BatchNorm's tensors feed the norm's scale and bias: name the module.
    target = (
      f"params/{path.rpartition('/')[0]}" if rule.kind.startswith("bn_") else (f"params/{path}")
    )
    for key, shape in zip(rule.keys, expected):
      used.add(key)
      if key not in tensors:
        missing.setdefault(key, f"{key} (expected shape {shape}, for {target})")
      elif tuple(np.shape(tensors[key])) != shape:
        misshaped.setdefault(
          key, f"{key}: shape {tuple(np.shape(tensors[key]))}, expected {shape} (for {target})"
        )
  ignored = [re.compile(p) for p in spec.ignored]
  unused = [
    f"{k} (shape {tuple(np.shape(v))})"
    for k, v in sorted(tensors.items())
    if k not in used and not any(r.fullmatch(k) for r in ignored)
  ]
  problems = []
  for what, items in (
    ("missing", list(missing.values())),
    ("mis-shaped", list(misshaped.values())),
    ("not used by the model (unmapped)", unused),
  ):
    if items:
      problems.append(
        f"{len(items)} key(s) {what}:\n    " + weights.listing(sorted(items), "\n    ")
      )
  if problems:
    raise ConversionError(
      f"{source} does not fit the {fmt!r} layout of {type(model).__name__} "
      f"({spec.description}):\n  " + "\n  ".join(problems)
    )

  flat = {}
  for path, rule in rules.items():
    src = [np.asarray(tensors[k], dtype=np.float64) for k in rule.keys]
    flat[path] = _apply(rule, src, targets[path]).astype(np.float32)
    assert flat[path].shape == targets[path], (path, flat[path].shape)
  return {"params": traverse_util.unflatten_dict(flat, sep="/")}


def read_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """All tensors of the safetensors file ``path`` as NumPy arrays (no torch needed).

  Read with ``safetensors.numpy``; a file holding bfloat16 tensors (which NumPy
  lacks) is read with ``safetensors.flax`` instead and its bfloat16 tensors come
  back as ``ml_dtypes.bfloat16`` NumPy arrays.
  """
  from safetensors import flax as st_flax  # noqa: PLC0415 (converter only)
  from safetensors import numpy as st_numpy  # noqa: PLC0415 (the converter's only)

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--input {path}: no such file")
  try:
    try:
      return st_numpy.load_file(path)
    except TypeError as e:
      if "bfloat16" not in str(e):
        raise
      return {k: np.asarray(v) for k, v in st_flax.load_file(path).items()}
  except Exception as e:  # safetensors raises its own error types for bad files
    raise ValueError(
      f"--input {path}: cannot read it as a safetensors file: {type(e).__name__}: {e}"
    ) from e


def logit_scale(tensors: Mapping[str, np.ndarray]) -> float | None:
  """CLIP's temperature ``exp(logit_scale)`` stored in a full CLIP checkpoint, else None."""
  value = tensors.get("logit_scale")
  return None if value is None else float(math.exp(float(np.asarray(value).reshape(()))))


def convert_file(
  fmt: str,
  input_path: str | os.PathLike[str],
  output: str | os.PathLike[str],
  model: Any = None,
  image_size: int | None = None,
  *,
  preset: str | None = None,
  overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Converts the safetensors file ``input_path`` and saves the params checkpoint ``output``.

  Args:
    fmt: a key of :data:`FORMATS`.
    input_path: the source ``.safetensors`` file.
    output: the orbax checkpoint directory to create (never overwritten).
    model: the Flax model to fill; default: :func:`default_model` with
      ``preset`` and ``overrides``.
    image_size: see :func:`convert`; default: the preset's.
    preset: a model preset other than the format's.
    overrides: model attribute overrides.

  Returns:
    A summary: ``parameters`` (count), ``tensors`` (Flax tensors written),
    ``model`` (the model's class), ``head`` (written or not), ``logit_scale``
    (CLIP's temperature if the file holds it, else None).

  Raises:
    FileExistsError: ``output`` exists (checked before reading; left untouched).
    ConversionError: the file does not fit the layout (see :func:`convert`).
  """
  spec = _get_format(fmt)
  if os.path.exists(output):
    raise FileExistsError(f"--output {os.fspath(output)} already exists; choose a new directory")
  tensors = read_safetensors(input_path)
  if model is None:
    model = default_model(fmt, tensors, preset, **(overrides or {}))
  if image_size is None:
    image_size = models.default_image_size(preset or spec.model)
  params = convert(fmt, tensors, model, image_size, source=os.fspath(input_path))
  weights.save_params(output, params)
  leaves = jax.tree.leaves(params)
  return {
    "model": type(model).__name__,
    "tensors": len(leaves),
    "parameters": int(sum(x.size for x in leaves)),
    "head": "head" in params["params"],
    "logit_scale": logit_scale(tensors),
  }


def parse_override(text: str) -> tuple[str, Any]:
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise ValueError(f"--override {text}: expected KEY=VALUE with a JSON value, e.g. depth=24")
  try:
    parsed = json.loads(value)
  except json.JSONDecodeError:
    parsed = value  # a bare string
  return key, tuple(parsed) if isinstance(parsed, list) else parsed


def convert_command(
  fmt: str,
  input_path: str,
  output: str,
  *,
  model: str | None = None,
  overrides: Sequence[str] = (),
  image_size: int | None = None,
) -> int:
  """What ``python -m experiments.convert`` does: converts, prints a summary; the exit status
  (1 with a one-line ``error:`` for a bad file, an existing output or a bad override)."""
  try:
    parsed = dict(parse_override(o) for o in overrides)
    info = convert_file(
      fmt, input_path, output, image_size=image_size, preset=model, overrides=parsed
    )
  except (ValueError, OSError) as e:  # ConversionError, missing input, existing output
    print(f"error: {e}", file=sys.stderr)
    return 1
  preset = model or FORMATS[fmt].model
  print(
    f"wrote {output}: {info['tensors']} tensors, {info['parameters']:,} parameters "
    f"of model {preset} ({info['model']})"
    + ("" if info["head"] else " (no head: the fine-tuning config initialises it)")
  )
  if info["logit_scale"] is not None:
    print(
      f"the checkpoint's CLIP logit scale is {info['logit_scale']:.4g} "
      "(--config.model.overrides.logit_scale for a zero-shot head)"
    )
  return 0
