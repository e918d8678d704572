"""The image classifiers: shapes, parameter counts and paths, the registry."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import models
from experiments.models import resnet
from experiments.training.weights import param_paths

CPU_PRESETS = ("resnet_tiny", "resnet_small", "vit_tiny")
PAPER_PRESETS = ("resnet50", "vit_b16", "clip_vit_b16", "clip_resnet50", "timm_resnet50")

# Exact counts (10 classes for the CPU presets, 1000 for the paper ones). ResNet-50
# and ViT-B/16 match torchvision's / the ViT paper's counts.
PARAM_COUNTS = {
  "resnet_tiny": 308_826,
  "resnet_small": 1_228_970,
  "vit_tiny": 683_242,
  "resnet50": 25_557_032,
  "vit_b16": 86_567_656,
  "clip_vit_b16": 86_705_640,
  "clip_resnet50": 39_341_896,
  "timm_resnet50": 25_557_032,
}
# Without the head, counted with torch on the source models: transformers'
# CLIPVisionModelWithProjection (ViT-B/16, projection 512), open_clip's
# ModifiedResNet((3, 4, 6, 3), output_dim=1024, heads=32) and timm's resnet50
# (which has its 1000-class head).
SOURCE_COUNTS = {
  "clip_vit_b16": 86_192_640,
  "clip_resnet50": 38_316_896,
  "timm_resnet50": 25_557_032,
}


def _rng(seed=0):
  # XLA:CPU compiles threefry-based initialisers ~3x slower than "rbg" ones.
  return jax.random.key(seed, impl="rbg")


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _abstract_init(model, image_size, batch=2):
  x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  return variables, jax.eval_shape(model.apply, variables, x)


def _classes(name):
  return 1000 if name in PAPER_PRESETS else 10


@functools.cache
def _preset_shapes(name):
  """``_abstract_init`` of the preset ``name`` as it is (``_classes(name)`` classes, its
  default image size), traced once for every test that reads it (a paper-scale model takes
  about a second to trace). Read it, never change it."""
  return _abstract_init(models.get_model(name, _classes(name)), models.default_image_size(name))


def test_registry_lists_all_presets():
  assert set(models.model_names()) == set(CPU_PRESETS + PAPER_PRESETS)


@pytest.mark.parametrize("name", CPU_PRESETS)
def test_cpu_preset_forward(name):
  model = models.get_model(name, num_classes=7)
  size = models.default_image_size(name)
  assert size == 32
  x = np.random.default_rng(0).normal(size=(3, size, size, 3)).astype(np.float32)

  @jax.jit  # one compilation for init and forward keeps the test fast
  def init_and_apply(rng, x):
    variables = model.init(rng, x[:1])
    return variables, model.apply(variables, x)

  variables, logits = init_and_apply(_rng(), x)
  assert list(variables) == ["params"]  # no BatchNorm statistics
  assert logits.shape == (3, 7) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  assert model.num_classes == 7


@pytest.mark.parametrize("name", CPU_PRESETS + PAPER_PRESETS)
def test_param_count_and_output_shape(name):
  variables, out = _preset_shapes(name)
  assert out.shape == (2, _classes(name))
  assert _count(variables) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", sorted(SOURCE_COUNTS))
def test_converted_presets_match_the_source_models(name):
  variables, _ = _preset_shapes(name)  # 1000 classes, 224 x 224
  assert models.default_image_size(name) == 224
  head = _count(variables["params"]["head"])
  assert _count(variables) - (0 if name == "timm_resnet50" else head) == SOURCE_COUNTS[name]


def test_clip_presets_layout():
  vit = _preset_shapes("clip_vit_b16")[0]["params"]  # 1000 classes
  assert "bias" not in vit["embed"]["patch"] and set(vit["embed"]["norm"]) == {"scale", "bias"}
  assert vit["embed"]["pos"].shape == (1, 197, 768)
  assert vit["proj"]["kernel"].shape == (768, 512) and "bias" not in vit["proj"]
  assert vit["head"]["kernel"].shape == (512, 1000)
  rn = _preset_shapes("clip_resnet50")[0]["params"]
  assert [rn["stem"][f"unit{i}"]["conv"]["kernel"].shape for i in (1, 2, 3)] == [
    (3, 3, 3, 32),
    (3, 3, 32, 32),
    (3, 3, 32, 64),
  ]
  assert set(rn["stem"]["unit1"]["norm"]) == {"scale", "bias"}  # affine, no statistics
  assert rn["pool"]["pos"].shape == (50, 2048) and rn["pool"]["out"]["kernel"].shape == (2048, 1024)
  assert rn["block04"]["unit2"]["conv"]["kernel"].shape == (3, 3, 128, 128)  # not strided
  assert rn["head"]["kernel"].shape == (1024, 1000)


def _np_affine_resnet_block(x, p, stride):
  """NumPy float64 oracle of the anti-aliased BottleneckBlock with affine norms (NHWC)."""

  def conv(y, k, pad):
    y = np.pad(y, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = k.shape[:2]
    h, w = y.shape[1] - kh + 1, y.shape[2] - kw + 1
    return sum(y[:, i : i + h, j : j + w] @ k[i, j] for i in range(kh) for j in range(kw))

  def unit(y, u, pad, relu=True):
    y = conv(y, u["conv"]["kernel"], pad) * u["norm"]["scale"] + u["norm"]["bias"]
    return np.maximum(y, 0) if relu else y

  def pool(y):
    n, h, w, c = y.shape
    y = y[:, : h // stride * stride, : w // stride * stride]
    return y.reshape(n, h // stride, stride, w // stride, stride, c).mean(axis=(2, 4))

  y = unit(unit(x, p["unit1"], 0), p["unit2"], 1)
  y = unit(pool(y), p["unit3"], 0, relu=False)
  return np.maximum(unit(pool(x), p["proj"], 0, relu=False) + y, 0)


def test_anti_aliased_block_matches_a_numpy_oracle():
  block = resnet.BottleneckBlock(features=3, strides=2, norm="affine", anti_alias=True)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, 7, 5)).astype(np.float32)  # odd size: the pools floor
  params = jax.tree.map(
    lambda a: rng.normal(size=a.shape).astype(np.float32), jax.eval_shape(block.init, _rng(), x)
  )
  got = jax.jit(block.apply)(params, x)
  want = _np_affine_resnet_block(
    x.astype(np.float64), jax.tree.map(np.float64, params["params"]), 2
  )
  assert got.shape == (2, 3, 3, 12)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_attention_pool_matches_a_numpy_oracle():
  pool = models.AttentionPool(num_heads=2, output_dim=3)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 2, 3, 4)).astype(np.float32)
  params = jax.tree.map(
    lambda a: rng.normal(size=a.shape).astype(np.float32), jax.eval_shape(pool.init, _rng(), x)
  )
  p = jax.tree.map(np.float64, params["params"])
  tokens = x.astype(np.float64).reshape(2, 6, 4)
  tokens = np.concatenate([tokens.mean(1, keepdims=True), tokens], 1) + p["pos"]

  def dense(name, t):
    return t @ p[name]["kernel"] + p[name]["bias"]

  q, k, v = (dense(n, tokens).reshape(2, 7, 2, 2) for n in ("query", "key", "value"))
  scores = np.einsum("bhd,bthd->bht", q[:, 0], k) / np.sqrt(2)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  want = dense("out", np.einsum("bht,bthd->bhd", weights, v).reshape(2, 4))
  np.testing.assert_allclose(jax.jit(pool.apply)(params, x), want, rtol=1e-5, atol=1e-5)


def test_zero_shot_head_is_clips_classifier(tmp_path):
  rng = np.random.default_rng(2)
  text = rng.normal(size=(4, 16)).astype(np.float32)
  np.save(tmp_path / "text.npy", text)
  small = dict(depth=1, patch_size=8, hidden_size=8, num_heads=2, mlp_dim=8, proj_dim=16)
  model = models.get_model(
    "vit_tiny", 4, zero_shot_head=str(tmp_path / "text.npy"), logit_scale=30.0, **small
  )
  x = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  variables = jax.jit(model.init)(_rng(), x[:1])
  head = variables["params"].pop("head")

  def unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)

  np.testing.assert_allclose(head["kernel"], 30.0 * unit(text.astype(np.float64)).T, rtol=1e-6)
  assert not np.any(head["bias"])
  features = jax.jit(models.get_model("vit_tiny", 16, **small).apply)(
    {
      "params": {
        **variables["params"],
        "head": {"kernel": np.eye(16, dtype=np.float32), "bias": np.zeros(16, np.float32)},
      }
    },
    x,
  )
  want = 30.0 * unit(np.float64(features)) @ unit(text.astype(np.float64)).T
  params = {"params": {**variables["params"], "head": head}}
  np.testing.assert_allclose(jax.jit(model.apply)(params, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "array, kwargs, match",
  [
    (
      np.ones((5, 16)),
      {},
      r"shape \(5, 16\); the model needs \(num_classes, embedding dim\) "
      r"= \(4, 16\)",
    ),
    (np.ones((4, 8)), {}, r"= \(4, 16\)"),
    (np.ones((4, 16), np.int32), {}, "must be floats"),
    (np.concatenate([np.ones((3, 16)), np.zeros((1, 16))]), {}, r"class\(es\) \[3\] are zero"),
    (np.ones((4, 16)), {"logit_scale": 0.0}, "logit_scale must be a positive number"),
    (np.ones((4, 16)), {"head_zero_init": True}, "exclude each other"),
    (None, {}, "cannot read the class text embeddings"),
  ],
)
def test_zero_shot_head_errors_name_the_file_and_shape(tmp_path, array, kwargs, match):
  path = tmp_path / "text.npy"
  if array is not None:
    np.save(path, array)
  model = models.get_model("vit_tiny", 4, depth=1, proj_dim=16, zero_shot_head=str(path), **kwargs)
  with pytest.raises(ValueError, match=match) as info:
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  assert "exclude" in match or str(path) in str(info.value)


def test_affine_norm_resnet_has_no_statistics():
  model = models.get_model(
    "resnet_tiny", 3, norm="affine", stage_sizes=(1,), widths=(8,), strides=(2,), stem_width=4
  )
  params = jax.jit(model.init)(_rng(), jnp.ones((1, 8, 8, 3)))["params"]
  assert set(params["stem"]["norm"]) == {"scale", "bias"}
  np.testing.assert_array_equal(params["stem"]["norm"]["scale"], np.ones(4))


def test_resnet_small_is_the_benchmark_model():
  variables, _ = _preset_shapes("resnet_small")  # 10 classes, 32 x 32
  params = variables["params"]
  assert 1.1e6 <= _count(variables) <= 1.3e6
  assert params["stem"]["conv"]["kernel"].shape == (3, 3, 3, 32)
  assert [params[f"block{i}"]["unit2"]["conv"]["kernel"].shape[-1] for i in range(1, 5)] == [
    32,
    64,
    128,
    256,
  ]
  assert "proj" not in params["block1"] and "proj" in params["block2"]
  assert params["head"]["kernel"].shape == (256, 10)


@pytest.mark.parametrize("name", CPU_PRESETS + PAPER_PRESETS)
def test_head_paths(name):
  variables, _ = _preset_shapes(name)
  paths = param_paths(variables)
  assert [p for p in paths if p.startswith("params/head/")] == [
    "params/head/bias",
    "params/head/kernel",
  ]
  assert all("/head" not in p for p in paths if not p.startswith("params/head/"))


def test_block_names_sort_in_depth_order():
  variables, _ = _preset_shapes("resnet50")
  blocks = [k for k in variables["params"] if k.startswith("block")]
  assert blocks == [f"block{i:02d}" for i in range(1, 17)]
  assert blocks == sorted(blocks)
  encoder = _preset_shapes("vit_b16")[0]["params"]["encoder"]
  assert list(encoder) == [f"block{i:02d}" for i in range(1, 13)] + ["norm"]


def test_vit_attention_kernels_are_2d():
  params = _preset_shapes("vit_tiny")[0]["params"]  # 32 x 32
  attn = params["encoder"]["block1"]["attn"]
  assert attn["qkv"]["kernel"].shape == (96, 288)
  assert attn["out"]["kernel"].shape == (96, 96)
  assert params["embed"]["pos"].shape == (1, 65, 96)  # 8x8 patches + class token


def test_vit_gap_has_no_class_token():
  model = models.get_model("vit_tiny", 10, pool="gap")
  params = _abstract_init(model, 32)[0]["params"]
  assert "cls" not in params["embed"]
  assert params["embed"]["pos"].shape == (1, 64, 96)


def test_overrides_and_head_zero_init():
  model = models.get_model(
    "resnet_tiny", 3, head_zero_init=True, stage_sizes=(1,), widths=(8,), strides=(2,), stem_width=4
  )
  variables = jax.jit(model.init)(_rng(), jnp.ones((1, 8, 8, 3)))
  assert list(variables["params"]) == ["block1", "head", "stem"]
  assert variables["params"]["head"]["kernel"].shape == (8, 3)
  assert not np.any(variables["params"]["head"]["kernel"])


def test_resnet50_helper_matches_registry():
  assert models.ResNet50(1000) == models.get_model("resnet50", 1000)


@pytest.mark.parametrize(
  "call, match",
  [
    (lambda: models.get_model("resnet18", 10), "valid names: resnet_tiny, resnet_small"),
    (lambda: models.default_image_size("vit_huge"), "unknown model 'vit_huge'"),
    (lambda: models.get_model("vit_tiny", 10, widths=(1,)), r"unknown override\(s\) \['widths'\]"),
  ],
)
def test_registry_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.parametrize(
  "model, shape, match",
  [
    (models.get_model("resnet_tiny", 10), (32, 32, 3), "NHWC"),
    (models.get_model("vit_tiny", 10), (1, 30, 30, 3), "not divisible by patch_size=4"),
    (models.get_model("vit_tiny", 10, num_heads=5), (1, 32, 32, 3), "num_heads=5"),
    (models.get_model("resnet_tiny", 10, block="wide"), (1, 32, 32, 3), "block must be"),
    (models.get_model("resnet_tiny", 10, strides=(1, 2)), (1, 32, 32, 3), "same length"),
    (models.get_model("resnet_tiny", 10, norm="batch"), (1, 32, 32, 3), "norm must be one of"),
    (models.get_model("vit_tiny", 10, act="relu"), (1, 32, 32, 3), "act must be one of"),
    (models.get_model("clip_resnet50", 10, num_heads=5), (1, 64, 64, 3), "num_heads=5"),
  ],
)
def test_bad_configs_or_inputs(model, shape, match):
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
