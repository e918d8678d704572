"""Checkpoint conversion against the source frameworks' outputs (fixtures made with torch).

``tests/fixtures/make_conversion_fixtures.py`` built tiny random models with
transformers (CLIPModel), open_clip (CLIP with a ModifiedResNet) and timm
(ResNet with Bottleneck blocks) and saved their safetensors, fixed inputs and
eval-mode outputs. These tests need no torch.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np
import pytest

from experiments import models
from experiments.models import convert
from experiments.training import weights

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "conversion"
INDEX = json.loads((FIXTURES / "fixtures.json").read_text())
FORMATS = ("clip_vit", "clip_resnet", "timm_resnet")
CLIP_FORMATS = ("clip_vit", "clip_resnet")
TOL = 1e-4


def _fixture(fmt):
  data = dict(np.load(FIXTURES / f"{fmt}.npz"))
  return convert.read_safetensors(FIXTURES / f"{fmt}.safetensors"), data, INDEX[fmt]


def _model(meta, num_classes, **kwargs):
  return models.get_model(meta["model"], num_classes, **meta["overrides"], **kwargs)


def _identity_head(params, dim):
  """CLIP checkpoints have no head: an identity head makes the logits the image embeddings."""
  return {
    "params": {
      **params["params"],
      "head": {"kernel": np.eye(dim, dtype=np.float32), "bias": np.zeros(dim, np.float32)},
    }
  }


def test_every_format_has_a_fixture_and_a_preset():
  assert set(convert.FORMATS) == set(FORMATS)
  for fmt in FORMATS:
    assert INDEX[fmt]["model"] == convert.FORMATS[fmt].model in models.model_names()


@pytest.mark.parametrize("fmt", FORMATS)
def test_converted_model_reproduces_the_source_outputs(fmt):
  tensors, data, meta = _fixture(fmt)
  expected = data["outputs"]
  model = _model(meta, meta.get("num_classes", expected.shape[1]))
  params = convert.convert(fmt, tensors, model, meta["image_size"])
  assert ("head" in params["params"]) == (fmt == "timm_resnet")
  if fmt in CLIP_FORMATS:
    params = _identity_head(params, expected.shape[1])
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
  got = np.asarray(jax.jit(model.apply)(params, data["images"]))
  assert np.abs(expected).max() > 0.5  # outputs of O(1): the bound is meaningful
  np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("fmt", CLIP_FORMATS)
def test_command_line_conversion_and_zero_shot_head(fmt, tmp_path, capsys):
  """convert CLI -> orbax checkpoint -> loaded as the configs load it, under a zero-shot head
  from the text embeddings: CLIP's own image-text logits (the source library's)."""
  tensors, data, meta = _fixture(fmt)
  out = tmp_path / "converted"
  overrides = [f"{k}={json.dumps(v)}" for k, v in meta["overrides"].items()]
  assert (
    convert.convert_command(
      fmt, FIXTURES / f"{fmt}.safetensors", out, image_size=meta["image_size"], overrides=overrides
    )
    == 0
  )
  printed = capsys.readouterr().out
  assert "no head" in printed and "logit scale is 42" in printed
  text = tmp_path / "text.npy"
  np.save(text, data["text"])
  scale = convert.logit_scale(tensors)
  assert scale == pytest.approx(42.0, rel=1e-6)
  model = _model(meta, len(data["text"]), zero_shot_head=str(text), logit_scale=scale)
  x = data["images"]
  # The head as model.init makes it (tests/experiments/test_models.py checks that init; a
  # jitted init of the whole model costs seconds to compile).
  init = jax.tree.map(
    lambda a: np.zeros(a.shape, a.dtype), jax.eval_shape(model.init, jax.random.key(0), x[:1])
  )
  classes, dim = init["params"]["head"]["kernel"].shape[::-1]
  init["params"]["head"]["kernel"] = models.zero_shot_kernel(text, classes, dim, scale)
  params = weights.load_pretrained(out, init)  # the default dont_load: the head stays at init
  got = np.asarray(jax.jit(model.apply)(params, x))
  np.testing.assert_allclose(got, data["zero_shot_logits"], rtol=0, atol=TOL)


def test_command_line_conversion_with_a_classifier(tmp_path, capsys):
  """timm: the head is converted too, its class count read from the checkpoint."""
  _, data, meta = _fixture("timm_resnet")
  out = tmp_path / "converted"
  overrides = [f"{k}={json.dumps(v)}" for k, v in meta["overrides"].items()]
  assert (
    convert.convert_command(
      "timm_resnet", FIXTURES / "timm_resnet.safetensors", out, image_size=64, overrides=overrides
    )
    == 0
  )
  assert "no head" not in capsys.readouterr().out
  model = _model(meta, meta["num_classes"])
  init = jax.tree.map(
    lambda a: np.zeros(a.shape, a.dtype),
    jax.eval_shape(model.init, jax.random.key(0), data["images"][:1]),
  )
  params = weights.load_pretrained(out, init, dont_load=())
  np.testing.assert_allclose(
    jax.jit(model.apply)(params, data["images"]), data["outputs"], rtol=0, atol=TOL
  )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints(tmp_path, dtype):
  """Checkpoints stored in float16 / bfloat16 (NumPy has no bfloat16: read via safetensors.flax)
  convert to the float32 values of their tensors."""
  import jax.numpy as jnp  # noqa: PLC0415
  from safetensors.flax import save_file  # noqa: PLC0415

  tensors, _, meta = _fixture("timm_resnet")
  half = {
    k: jnp.asarray(v).astype(dtype) if v.dtype == np.float32 else jnp.asarray(v)
    for k, v in tensors.items()
  }
  save_file(half, os.fspath(tmp_path / "half.safetensors"))
  read = convert.read_safetensors(tmp_path / "half.safetensors")
  assert read["fc.weight"].dtype == np.dtype(jnp.dtype(dtype))
  model = _model(meta, meta["num_classes"])
  got = convert.convert("timm_resnet", read, model, meta["image_size"])
  want = convert.convert(
    "timm_resnet",
    {k: np.asarray(v, np.float32) for k, v in half.items()},
    model,
    meta["image_size"],
  )
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, b)


def test_vision_only_checkpoint_converts_too():
  """CLIPVisionModelWithProjection files hold only the vision keys of CLIPModel's."""
  tensors, data, meta = _fixture("clip_vit")
  vision = {k: v for k, v in tensors.items() if k.startswith(("vision_model.", "visual_"))}
  assert len(vision) < len(tensors)
  model = _model(meta, data["outputs"].shape[1])
  full = convert.convert("clip_vit", tensors, model, meta["image_size"])
  only = convert.convert("clip_vit", vision, model, meta["image_size"])
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(only)):
    np.testing.assert_array_equal(a, b)


def test_batch_norm_is_folded_into_the_affine():
  """NumPy float64 oracle: scale = g / sqrt(v + 1e-5), bias = b - m * scale."""
  tensors, _, meta = _fixture("timm_resnet")
  params = convert.convert(
    "timm_resnet", tensors, _model(meta, meta["num_classes"]), meta["image_size"]
  )["params"]
  g, b, m, v = (
    tensors[f"layer2.0.bn3.{n}"].astype(np.float64)
    for n in ("weight", "bias", "running_mean", "running_var")
  )
  scale = g / np.sqrt(v + 1e-5)
  norm = params["block3"]["unit3"]["norm"]
  np.testing.assert_allclose(norm["scale"], scale, rtol=1e-6)
  np.testing.assert_allclose(norm["bias"], b - m * scale, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(
    params["block3"]["proj"]["conv"]["kernel"],
    tensors["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(params["head"]["kernel"], tensors["fc.weight"].T)


def _convert_clip_vit(tensors):
  _, data, meta = _fixture("clip_vit")
  return convert.convert(
    "clip_vit", tensors, _model(meta, 16), meta["image_size"], source="ckpt.safetensors"
  )


def test_missing_misshaped_and_unmapped_keys_are_all_named():
  tensors, _, _ = _fixture("clip_vit")
  del tensors["vision_model.encoder.layers.1.mlp.fc1.weight"]
  tensors["visual_projection.weight"] = tensors["visual_projection.weight"].T
  tensors["vision_model.encoder.layers.1.self_attn.k_proj.bias"] = np.zeros(7, np.float32)
  tensors["vision_model.extra.weight"] = np.zeros((2, 3), np.float32)
  with pytest.raises(convert.ConversionError) as info:
    _convert_clip_vit(tensors)
  message = str(info.value)
  assert "ckpt.safetensors does not fit the 'clip_vit' layout" in message
  assert (
    "1 key(s) missing:\n    vision_model.encoder.layers.1.mlp.fc1.weight (expected shape "
    "(64, 32), for params/encoder/block2/mlp/fc1/kernel)"
  ) in message
  assert "2 key(s) mis-shaped" in message
  assert (
    "visual_projection.weight: shape (32, 16), expected (16, 32) (for params/proj/kernel)"
    in message
  )
  assert (
    "vision_model.encoder.layers.1.self_attn.k_proj.bias: shape (7,), expected (32,) "
    "(for params/encoder/block2/attn/qkv/bias)"
  ) in message
  assert (
    "1 key(s) not used by the model (unmapped):\n    vision_model.extra.weight (shape (2, 3))"
  ) in message


def test_text_tower_and_buffers_are_ignored_but_nothing_else():
  tensors, _, _ = _fixture("clip_resnet")
  assert any(k.startswith("transformer.") for k in tensors) and "logit_scale" in tensors
  assert any(k.endswith("num_batches_tracked") for k in tensors)
  tensors["visual.attnpool.extra"] = np.zeros(3, np.float32)
  _, _, meta = _fixture("clip_resnet")
  with pytest.raises(convert.ConversionError, match=r"unmapped\):\n    visual.attnpool.extra "):
    convert.convert("clip_resnet", tensors, _model(meta, 16), meta["image_size"])


def test_wrong_architecture_and_preset_size_are_explained():
  tensors, _, meta = _fixture("timm_resnet")
  with pytest.raises(
    convert.ConversionError,
    match=r"format 'clip_vit' cannot produce \d+ "
    r"parameter\(s\) of the model ResNet .*\n    block1/proj/conv/kernel",
  ):
    convert.convert("clip_vit", tensors, _model(meta, 7), meta["image_size"])
  # The tiny fixture against the full-size preset: every mismatch with its expected shape.
  with pytest.raises(
    convert.ConversionError,
    match=r"layer1.0.conv1.weight: shape "
    r"\(4, 64, 1, 1\), expected \(64, 64, 1, 1\) \(for "
    r"params/block01/unit1/conv/kernel\)",
  ):
    convert.convert("timm_resnet", tensors)
  with pytest.raises(
    ValueError, match="unknown format 'onnx'; valid formats: clip_vit, clip_resnet, timm_resnet"
  ):
    convert.convert("onnx", tensors)


def test_command_line_errors_leave_existing_output_alone(tmp_path, capsys):
  src = os.fspath(FIXTURES / "timm_resnet.safetensors")
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep").write_text("x")
  assert convert.convert_command("timm_resnet", src, out) == 1
  assert "already exists" in capsys.readouterr().err and (out / "keep").read_text() == "x"
  assert convert.convert_command("timm_resnet", tmp_path / "nope", tmp_path / "a") == 1
  assert "no such file" in capsys.readouterr().err
  (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
  assert convert.convert_command("timm_resnet", tmp_path / "bad.safetensors", tmp_path / "b") == 1
  assert "cannot read it as a safetensors file" in capsys.readouterr().err
  assert convert.convert_command("timm_resnet", src, tmp_path / "c", overrides=["widths"]) == 1
  assert "--override widths: expected KEY=VALUE" in capsys.readouterr().err
  assert not any((tmp_path / n).exists() for n in "abc")


def test_main_job_fine_tunes_a_converted_clip_from_its_zero_shot_head(tiny_config, tmp_path):
  """The configs' path: --config.pretrain.checkpoint=<converted>, a zero-shot head, FT and
  WiSE-FT on the tiny benchmark. WiSE-FT at alpha 0 is the zero-shot model itself."""
  from experiments import runner  # noqa: PLC0415

  _, data, meta = _fixture("clip_vit")
  checkpoint = tmp_path / "clip"
  convert.convert_file(
    "clip_vit",
    FIXTURES / "clip_vit.safetensors",
    checkpoint,
    _model(meta, 1000),
    meta["image_size"],
  )
  text = tmp_path / "text.npy"
  np.save(text, np.random.default_rng(0).normal(size=(10, data["outputs"].shape[1])))
  config = tiny_config
  config.model.name = meta["model"]
  config.model.overrides = {
    **meta["overrides"],
    "zero_shot_head": os.fspath(text),
    "logit_scale": 42.0,
  }
  config.model.input_mean, config.model.input_std = convert.CLIP_MEAN, convert.CLIP_STD
  config.pretrain.checkpoint = os.fspath(checkpoint)
  config.train.constrained = ("backbone", "head")
  config.methods = ("ft", "wise_ft")
  config.wise_ft.source, config.wise_ft.base = "ft", ""  # from the zero-shot model to FT
  config.wise_ft.alphas = (0.0, 0.5)
  out = runner.train_and_evaluate(config, tmp_path / "work", progress=False)
  results = out["results"]
  assert list(results) == ["zero_shot", "ft", "wise_ft_0", "wise_ft_0.5"]
  assert results["wise_ft_0"] == results["zero_shot"]
  assert results["ft"] != results["zero_shot"]
