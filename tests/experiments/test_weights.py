"""Saving and loading pre-trained weights: round trips, dont_load, errors, resharding."""

import collections
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from experiments import models
from experiments.training.weights import (
  CheckpointError,
  CheckpointExistsError,
  load_pretrained,
  param_paths,
  save_params,
)

needs_8_devices = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")


def make_params(classes=10, width=8, seed=0, dtype=np.float32):
  """A small Flax-like variables dict: conv stem, one block, a head."""
  rng = np.random.default_rng(seed)
  shapes = {
    "stem": {"conv": {"kernel": (3, 3, 3, width)}, "norm": {"scale": (width,)}},
    "block1": {"conv": {"kernel": (3, 3, width, width)}, "norm": {"bias": (width,)}},
    "head": {"kernel": (width, classes), "bias": (classes,)},
  }
  return {
    "params": jax.tree.map(
      lambda s: rng.normal(size=s).astype(dtype), shapes, is_leaf=lambda s: isinstance(s, tuple)
    )
  }


def to_device(tree, sharding=None):
  return jax.device_put(tree, sharding or jax.devices()[0])


def assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert a.dtype == e.dtype and a.shape == e.shape
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_param_paths_convention():
  Pair = collections.namedtuple("Pair", "left right")
  tree = {"b": [1.0, (2.0, {"k": 3.0})], "a": Pair(4.0, 5.0)}
  assert param_paths(tree) == ["a/left", "a/right", "b/0", "b/1/0", "b/1/1/k"]
  assert param_paths(make_params())[:2] == ["params/block1/conv/kernel", "params/block1/norm/bias"]


def test_param_paths_rejects_ambiguous_paths():
  with pytest.raises(ValueError, match=r"share the path\(s\) \['a/b'\]"):
    param_paths({"a/b": 1.0, "a": {"b": 2.0}})


@pytest.mark.parametrize("on_device", [True, False])
def test_round_trip_is_exact(tmp_path, on_device):
  params = make_params()
  params["params"]["stem"]["norm"]["scale"] = params["params"]["stem"]["norm"]["scale"].astype(
    jnp.bfloat16
  )
  if on_device:
    params = to_device(params)
  save_params(tmp_path / "ckpt", params)
  loaded = load_pretrained(
    tmp_path / "ckpt",
    jax.tree.map(jnp.zeros_like, params) if on_device else jax.tree.map(np.zeros_like, params),
    dont_load=(),
  )
  assert_trees_equal(loaded, params)
  leaf_type = jax.Array if on_device else np.ndarray
  assert all(isinstance(x, leaf_type) for x in jax.tree.leaves(loaded))


def test_dtype_is_cast_to_the_init_dtype(tmp_path):
  save_params(tmp_path / "ckpt", make_params())
  init = make_params(seed=1, dtype=jnp.bfloat16)
  loaded = load_pretrained(tmp_path / "ckpt", init, dont_load=())
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(loaded))
  np.testing.assert_array_equal(
    loaded["params"]["head"]["bias"], make_params()["params"]["head"]["bias"].astype(jnp.bfloat16)
  )


@pytest.mark.parametrize("new_classes", [10, 5])
def test_dont_load_keeps_the_new_head(tmp_path, new_classes):
  pretrained = make_params(classes=10, seed=0)
  save_params(tmp_path / "ckpt", pretrained)
  init = make_params(classes=new_classes, seed=1)
  loaded = load_pretrained(tmp_path / "ckpt", init)  # default: ^params/head/.*
  assert loaded["params"]["head"]["kernel"] is init["params"]["head"]["kernel"]
  assert loaded["params"]["head"]["bias"].shape == (new_classes,)
  del pretrained["params"]["head"], loaded["params"]["head"]
  assert_trees_equal(loaded, pretrained)


def test_fine_tune_a_real_model_with_a_new_head(tmp_path):
  """Pre-train 10 classes, fine-tune 5: backbone loaded, head kept, forward works."""
  kwargs = dict(stage_sizes=(1,), widths=(8,), strides=(2,), stem_width=4)
  x = jnp.ones((2, 8, 8, 3))

  def init(classes, seed):
    model = models.get_model("resnet_tiny", classes, **kwargs)
    return model, jax.jit(model.init)(jax.random.key(seed, impl="rbg"), x)

  _, pretrained = init(10, 0)
  save_params(tmp_path / "pretrained", pretrained)
  model, fresh = init(5, 1)
  loaded = load_pretrained(tmp_path / "pretrained", fresh)
  assert_trees_equal(loaded["params"]["stem"], pretrained["params"]["stem"])
  assert_trees_equal(loaded["params"]["block1"], pretrained["params"]["block1"])
  assert_trees_equal(loaded["params"]["head"], fresh["params"]["head"])
  assert model.apply(loaded, x).shape == (2, 5)


def test_shape_mismatch_names_the_path_and_both_shapes(tmp_path):
  save_params(tmp_path / "ckpt", make_params(width=8))
  with pytest.raises(
    ValueError,
    match=r"params/stem/conv/kernel: checkpoint \(3, 3, 3, 8\) "
    r"vs model \(3, 3, 3, 4\)",
  ):
    load_pretrained(tmp_path / "ckpt", make_params(width=4))


def test_missing_parameters_are_listed(tmp_path):
  save_params(tmp_path / "ckpt", make_params())
  init = make_params()
  init["params"]["block2"] = {"conv": {"kernel": np.zeros((3, 3, 8, 8), np.float32)}}
  with pytest.raises(
    ValueError,
    match=r"1 parameter\(s\) of the model missing from the "
    r"checkpoint: params/block2/conv/kernel",
  ):
    load_pretrained(tmp_path / "ckpt", init)
  # ... unless they are not loaded.
  loaded = load_pretrained(
    tmp_path / "ckpt", init, dont_load=("params/head/.*", "params/block2/.*")
  )
  assert loaded["params"]["block2"]["conv"]["kernel"] is init["params"]["block2"]["conv"]["kernel"]


def test_unexpected_checkpoint_parameters_are_listed(tmp_path):
  pretrained = make_params()
  pretrained["params"]["aux"] = {"kernel": np.ones((2, 2), np.float32)}
  save_params(tmp_path / "ckpt", pretrained)
  with pytest.raises(
    ValueError,
    match=r"1 checkpoint parameter\(s\) not used by the model: "
    r"params/aux/kernel",
  ):
    load_pretrained(tmp_path / "ckpt", make_params())
  loaded = load_pretrained(tmp_path / "ckpt", make_params(), dont_load="params/(head|aux)/.*")
  assert "aux" not in loaded["params"]


def test_unmatched_dont_load_pattern_warns(tmp_path):
  save_params(tmp_path / "ckpt", make_params())
  with pytest.warns(UserWarning, match="'head/.*' matches no parameter"):
    load_pretrained(tmp_path / "ckpt", make_params(), dont_load=("params/head/.*", "head/.*"))


def test_save_never_overwrites(tmp_path):
  path = tmp_path / "ckpt"
  save_params(path, make_params(seed=0))
  with pytest.raises(CheckpointExistsError, match="refusing to overwrite .*ckpt"):
    save_params(path, make_params(seed=1))
  assert issubclass(CheckpointExistsError, FileExistsError)
  assert_trees_equal(load_pretrained(path, make_params(seed=2), dont_load=()), make_params(seed=0))
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointExistsError):
    save_params(tmp_path / "empty", make_params())


def test_bad_leaves_are_named_before_anything_is_written(tmp_path):
  bad = {"a": np.ones(3), "b": object(), "c": np.array(["x"])}
  with pytest.raises(TypeError, match=r"got b \(object\), c \(ndarray\)"):
    save_params(tmp_path / "ckpt", bad)
  assert os.listdir(tmp_path) == []


def test_a_killed_save_is_no_obstacle(tmp_path):
  stale = tmp_path / "ckpt.orbax-checkpoint-tmp"  # what a save killed part-way leaves
  stale.mkdir()
  (stale / "junk").write_text("partial")
  save_params(tmp_path / "ckpt", make_params())
  assert os.listdir(tmp_path) == ["ckpt"]
  assert_trees_equal(
    load_pretrained(tmp_path / "ckpt", make_params(seed=2), dont_load=()), make_params()
  )


def _corrupt(tmp_path, how):
  path = tmp_path / "ckpt"
  save_params(path, make_params())
  if how == "no metadata":
    os.remove(path / "_METADATA")
  elif how == "bad metadata":
    (path / "_METADATA").write_text(json.dumps({"tree_metadata": 3})[:-3])
  elif how == "truncated data":
    for f in glob.glob(str(path / "**" / "d" / "*"), recursive=True):
      os.truncate(f, os.path.getsize(f) // 2)
  elif how == "deleted data":
    for f in glob.glob(str(path / "**" / "d" / "*"), recursive=True):
      os.remove(f)
  return path


# Orbax's reader threads may still report to an already closed event loop after a failed read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
  "how, match",
  [
    ("no metadata", "not an orbax PyTree checkpoint"),
    ("bad metadata", "cannot read the checkpoint metadata"),
    ("truncated data", "corrupt or partial checkpoint"),
    ("deleted data", "corrupt or partial checkpoint"),
  ],
)
def test_corrupt_checkpoint_errors_name_the_path(tmp_path, how, match):
  path = _corrupt(tmp_path, how)
  with pytest.raises(CheckpointError, match=match) as info:
    load_pretrained(path, make_params())
  assert str(path) in str(info.value)


def test_missing_or_wrong_paths(tmp_path):
  with pytest.raises(
    CheckpointError, match=f"no checkpoint at {tmp_path / 'nope'}: the path does not exist"
  ):
    load_pretrained(tmp_path / "nope", make_params())
  (tmp_path / "file").write_text("x")
  with pytest.raises(CheckpointError, match="not a directory"):
    load_pretrained(tmp_path / "file", make_params())
  save_params(tmp_path / "step" / "params", make_params())
  with pytest.raises(CheckpointError, match=r"holds the checkpoint item\(s\) \['params'\]"):
    load_pretrained(tmp_path / "step", make_params())
  assert issubclass(CheckpointError, ValueError)


def _mesh_sharding(leaf):
  """Shard the last axis over 8 devices where it divides, else replicate."""
  mesh = jax.make_mesh((8,), ("d",), devices=jax.devices()[:8])
  spec = (
    PartitionSpec(*([None] * (leaf.ndim - 1)), "d") if leaf.shape[-1] % 8 == 0 else PartitionSpec()
  )
  return NamedSharding(mesh, spec)


@needs_8_devices
def test_checkpoint_from_8_devices_loads_onto_one(tmp_path):
  params = make_params(classes=16)
  sharded = jax.tree.map(lambda x: jax.device_put(x, _mesh_sharding(x)), params)
  assert len(sharded["params"]["head"]["kernel"].sharding.device_set) == 8
  save_params(tmp_path / "ckpt", sharded)
  device = jax.devices()[3]
  init = to_device(jax.tree.map(np.zeros_like, params), device)
  loaded = load_pretrained(tmp_path / "ckpt", init, dont_load=())
  assert_trees_equal(loaded, params)
  for leaf in jax.tree.leaves(loaded):
    assert leaf.sharding == SingleDeviceSharding(device)
  # NumPy init params give host arrays.
  host = load_pretrained(tmp_path / "ckpt", jax.tree.map(np.zeros_like, params), dont_load=())
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))
  assert_trees_equal(host, params)


@needs_8_devices
def test_checkpoint_from_one_device_loads_onto_8(tmp_path):
  params = make_params(classes=16)
  save_params(tmp_path / "ckpt", to_device(params))
  init = jax.tree.map(lambda x: jax.device_put(np.zeros_like(x), _mesh_sharding(x)), params)
  loaded = load_pretrained(tmp_path / "ckpt", init, dont_load=())
  assert_trees_equal(loaded, params)
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(init)):
    assert got.sharding == want.sharding
  # An abstract init (no allocation) with shardings is a valid target too.
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), init
  )
  assert_trees_equal(load_pretrained(tmp_path / "ckpt", abstract, dont_load=()), params)
