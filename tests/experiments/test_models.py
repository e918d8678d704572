"""The image classifiers: shapes, parameter counts and paths, the registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import models
from experiments.weights import param_paths

CPU_PRESETS = ("resnet_tiny", "resnet_small", "vit_tiny")
PAPER_PRESETS = ("resnet50", "vit_b16")

# Exact counts (10 classes for the CPU presets, 1000 for the paper ones). ResNet-50
# and ViT-B/16 match torchvision's / the ViT paper's counts.
PARAM_COUNTS = {
    "resnet_tiny": 308_826,
    "resnet_small": 1_228_970,
    "vit_tiny": 683_242,
    "resnet50": 25_557_032,
    "vit_b16": 86_567_656,
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
  classes = 1000 if name in PAPER_PRESETS else 10
  model = models.get_model(name, classes)
  variables, out = _abstract_init(model, models.default_image_size(name))
  assert out.shape == (2, classes)
  assert _count(variables) == PARAM_COUNTS[name]


def test_resnet_small_is_the_benchmark_model():
  variables, _ = _abstract_init(models.get_model("resnet_small", 10), 32)
  params = variables["params"]
  assert 1.1e6 <= _count(variables) <= 1.3e6
  assert params["stem"]["conv"]["kernel"].shape == (3, 3, 3, 32)
  assert [params[f"block{i}"]["unit2"]["conv"]["kernel"].shape[-1] for i in range(1, 5)] == [
      32, 64, 128, 256]
  assert "proj" not in params["block1"] and "proj" in params["block2"]
  assert params["head"]["kernel"].shape == (256, 10)


@pytest.mark.parametrize("name", CPU_PRESETS + PAPER_PRESETS)
def test_head_paths(name):
  variables, _ = _abstract_init(models.get_model(name, 5), models.default_image_size(name))
  paths = param_paths(variables)
  assert [p for p in paths if p.startswith("params/head/")] == [
      "params/head/bias", "params/head/kernel"]
  assert all("/head" not in p for p in paths if not p.startswith("params/head/"))


def test_block_names_sort_in_depth_order():
  variables, _ = _abstract_init(models.get_model("resnet50", 10), 64)
  blocks = [k for k in variables["params"] if k.startswith("block")]
  assert blocks == [f"block{i:02d}" for i in range(1, 17)]
  assert blocks == sorted(blocks)
  encoder = _abstract_init(models.get_model("vit_b16", 10), 32)[0]["params"]["encoder"]
  assert list(encoder) == [f"block{i:02d}" for i in range(1, 13)] + ["norm"]


def test_vit_attention_kernels_are_2d():
  params = _abstract_init(models.get_model("vit_tiny", 10), 32)[0]["params"]
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
  model = models.get_model("resnet_tiny", 3, head_zero_init=True, stage_sizes=(1,),
                           widths=(8,), strides=(2,), stem_width=4)
  variables = jax.jit(model.init)(_rng(), jnp.ones((1, 8, 8, 3)))
  assert list(variables["params"]) == ["block1", "head", "stem"]
  assert variables["params"]["head"]["kernel"].shape == (8, 3)
  assert not np.any(variables["params"]["head"]["kernel"])


def test_resnet50_helper_matches_registry():
  assert models.ResNet50(1000) == models.get_model("resnet50", 1000)


@pytest.mark.parametrize("call, match", [
    (lambda: models.get_model("resnet18", 10), "valid names: resnet_tiny, resnet_small"),
    (lambda: models.default_image_size("vit_huge"), "unknown model 'vit_huge'"),
    (lambda: models.get_model("vit_tiny", 10, widths=(1,)), r"unknown override\(s\) \['widths'\]"),
])
def test_registry_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.parametrize("model, shape, match", [
    (models.get_model("resnet_tiny", 10), (32, 32, 3), "NHWC"),
    (models.get_model("vit_tiny", 10), (1, 30, 30, 3), "not divisible by patch_size=4"),
    (models.get_model("vit_tiny", 10, num_heads=5), (1, 32, 32, 3), "num_heads=5"),
    (models.get_model("resnet_tiny", 10, block="wide"), (1, 32, 32, 3), "block must be"),
    (models.get_model("resnet_tiny", 10, strides=(1, 2)), (1, 32, 32, 3), "same length"),
])
def test_bad_configs_or_inputs(model, shape, match):
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
