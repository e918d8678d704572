"""Pre-trained safetensors weights -> an orbax params checkpoint for the configs.

  python -m experiments.convert --format clip_vit --input model.safetensors --output DIR

``--format`` is one of ``clip_vit`` (Hugging Face CLIP ViT-B/16 ->
``clip_vit_b16``), ``clip_resnet`` (open_clip / OpenAI CLIP RN50 ->
``clip_resnet50``) and ``timm_resnet`` (timm / torchvision ResNet-50 ->
``timm_resnet50``); see :mod:`experiments.models.convert`. The output
directory is never overwritten. Load the result with
``--config.pretrain.checkpoint=DIR``.
"""

from __future__ import annotations

import sys

from absl import app, flags

from experiments.models.convert import FORMATS, convert_command

_FORMAT = flags.DEFINE_enum(
  "format",
  None,
  list(FORMATS),
  "Source key layout: "
  + "; ".join(f"{k} -> model {v.model}: {v.description}" for k, v in FORMATS.items()),
)
_INPUT = flags.DEFINE_string("input", None, "The .safetensors file.")
_OUTPUT = flags.DEFINE_string("output", None, "Checkpoint directory to create.")
_MODEL = flags.DEFINE_string("model", None, "Model preset (default: the format's).")
_OVERRIDE = flags.DEFINE_multi_string(
  "override",
  [],
  "Model attribute override KEY=VALUE, VALUE in JSON (e.g. depth=24); the "
  "fine-tuning config needs the same --config.model.overrides.",
)
_IMAGE_SIZE = flags.DEFINE_integer(
  "image_size", None, "Input side (fixes the position embeddings; default: the preset's)."
)
flags.mark_flags_as_required(["format", "input", "output"])


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}: every setting is a --flag")
  return convert_command(
    _FORMAT.value,
    _INPUT.value,
    _OUTPUT.value,
    model=_MODEL.value,
    overrides=_OVERRIDE.value,
    image_size=_IMAGE_SIZE.value,
  )


if __name__ == "__main__":
  sys.exit(app.run(main))
