"""Mesh, shardings and batches on 8 CPU devices, and a 2-process x 4-device run."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tpgm_jax
from experiments import models
from experiments.training import distributed
from experiments.training.checkpointing import Checkpointer
from tests.experiments import _multiprocess_worker as toy
from tests.experiments.helpers import subprocess_env

needs_8_devices = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")


def mesh_of(shape):
  return distributed.make_mesh(shape)


def test_initialize_is_a_no_op_for_one_process(monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  distributed.initialize()
  distributed.initialize(num_processes=1, process_id=0)
  assert not jax.distributed.is_initialized() and jax.process_count() == 1


@needs_8_devices
@pytest.mark.parametrize(
  "shape, axes",
  [
    (None, {"data": 8}),
    ({"data": -1, "model": 2}, {"data": 4, "model": 2}),
    ({"replica": 2, "data": -1}, {"replica": 2, "data": 4}),
    ({"data": 2, "model": 4}, {"data": 2, "model": 4}),
  ],
)
def test_make_mesh(shape, axes):
  mesh = distributed.make_mesh(shape)
  assert dict(mesh.shape) == axes and list(mesh.shape) == list(axes)
  assert mesh.devices.size == 8
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}


@needs_8_devices
@pytest.mark.parametrize(
  "shape, match",
  [
    ({"data": 3}, "needs 3 devices; there are 8"),
    ({"data": -1, "model": 3}, "not divisible by 3"),
    ({"data": -1, "model": -1}, "at most one -1"),
    ({"data": 0}, "positive sizes"),
  ],
)
def test_make_mesh_errors(shape, match):
  with pytest.raises(ValueError, match=match):
    distributed.make_mesh(shape)


@needs_8_devices
@pytest.mark.parametrize(
  "shape, mesh_shape, expected",
  [
    ((128, 256), {"data": 4, "model": 2}, P("data", "model")),
    ((3, 3, 64, 128), {"data": 4, "model": 2}, P(None, None, "data", "model")),
    ((256, 129), {"data": 4, "model": 2}, P("data", None)),  # 129 % 2 != 0: no TP
    ((130, 256), {"data": 4, "model": 2}, P(None, "model")),  # 130 % 4 != 0: no FSDP
    ((128, 256), {"data": 8}, P(None, "data")),  # no model axis
    ((256, 256), {"data": 8}, P("data", None)),  # ties: the first axis
    ((128, 256), {"data": 1, "model": 8}, P(None, "model")),  # size-1 FSDP axis
    ((8, 130, 96), {"data": 4, "model": 2}, P("data", None, "model")),  # 130 % 4: next largest
    ((64, 64), {"data": 4, "model": 2}, P()),  # < min_size elements
    ((2**16,), {"data": 4, "model": 2}, P()),  # 1-D
    ((), {"data": 4, "model": 2}, P()),
  ],
)
def test_param_sharding_rules(shape, mesh_shape, expected):
  mesh = mesh_of(mesh_shape)
  sharding = distributed.param_sharding({"w": jax.ShapeDtypeStruct(shape, jnp.float32)}, mesh)
  assert sharding["w"].spec == expected and sharding["w"].mesh == mesh


def assert_valid(sharding, shape):
  axes = [a for a in sharding.spec if a is not None]
  assert len(axes) == len(set(axes)) and len(sharding.spec) <= len(shape)
  for dim, axis in zip(shape, sharding.spec):
    assert axis is None or dim % sharding.mesh.shape[axis] == 0
  sharding.shard_shape(shape)  # raises on an invalid spec


@needs_8_devices
@pytest.mark.parametrize("name", ["resnet_tiny", "vit_tiny"])
@pytest.mark.parametrize(
  "mesh_shape", [{"data": 4, "model": 2}, {"data": 8}, {"data": 1, "model": 8}]
)
def test_param_sharding_of_real_models(name, mesh_shape):
  model = models.get_model(name, 10)
  abstract = jax.eval_shape(
    model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  )
  mesh = mesh_of(mesh_shape)
  shardings = distributed.param_sharding(abstract, mesh)
  assert jax.tree.structure(shardings) == jax.tree.structure(abstract)
  specs = []
  for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    assert_valid(s, x.shape)
    if x.ndim < 2 or x.size < 2**14:
      assert s.spec == P()
    specs.append(s.spec)
  assert sum(spec != P() for spec in specs) >= 4


@needs_8_devices
def test_state_sharding_follows_params():
  mesh = mesh_of({"data": 4, "model": 2})
  params = {
    "params": {
      "fc": {"kernel": jnp.zeros((128, 256)), "bias": jnp.zeros(256)},
      "head": {"kernel": jnp.zeros((256, 128))},
    }
  }
  tx = optax.chain(optax.adam(1e-3), tpgm_jax.tpgm(mask=tpgm_jax.path_mask(exclude=".*head.*")))
  state = jax.eval_shape(
    lambda: {
      "params": params,
      "opt_state": tx.init(params),
      "step": jnp.int32(0),
      "radii": jax.tree.map(lambda _: jnp.float32(1), params),
      "buffer": jnp.zeros((128, 256)),
      "other": jnp.zeros((512, 64)),
    }
  )
  shardings = distributed.state_sharding(state, mesh)
  assert jax.tree.structure(shardings) == jax.tree.structure(state)
  fc = head = P("data", "model")
  adam, projection = shardings["opt_state"]
  assert isinstance(projection.anchor["params"]["head"]["kernel"], optax.MaskedNode)
  assert projection.anchor["params"]["fc"]["kernel"].spec == fc
  for moments in (adam[0].mu, adam[0].nu):
    assert moments["params"]["fc"]["kernel"].spec == fc
    assert moments["params"]["head"]["kernel"].spec == head
    assert moments["params"]["fc"]["bias"].spec == P()
  assert shardings["buffer"].spec == fc  # a param's shape, elsewhere
  assert shardings["other"].spec == P()  # no param has this shape
  assert adam[0].count.spec == P() and shardings["step"].spec == P()
  assert all(s.spec == P() for s in jax.tree.leaves(shardings["radii"]))


@needs_8_devices
def test_state_sharding_by_path_before_shape():
  mesh = mesh_of({"data": 4, "model": 2})
  params = {"a": jnp.zeros((128, 256)), "b": jnp.zeros((128, 256))}

  def by_name(p, m):
    return {"a": NamedSharding(m, P("data")), "b": NamedSharding(m, P("model"))}

  state = {"params": params, "mu": params, "same_shape": jnp.zeros((128, 256))}
  shardings = distributed.state_sharding(state, mesh, by_name)
  assert shardings["mu"]["a"].spec == P("data") and shardings["mu"]["b"].spec == P("model")
  assert shardings["same_shape"].spec == P()  # ambiguous: replicated


@needs_8_devices
def test_global_batch_and_process_slice():
  mesh = mesh_of({"data": 4, "model": 2})
  assert distributed.process_slice(16, mesh) == slice(0, 16)
  assert distributed.process_slice(16) == slice(0, 16)
  local = toy.batch_at(1)
  batch = distributed.global_batch(local, mesh)
  for name in local:
    assert batch[name].sharding == NamedSharding(mesh, P("data"))
    np.testing.assert_array_equal(np.asarray(batch[name]), local[name])
    for shard in batch[name].addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), local[name][shard.index])
      assert shard.data.shape[0] == 4
  with pytest.raises(ValueError, match="not divisible by the 4 devices of mesh axis 'data'"):
    distributed.process_slice(10, mesh)
  with pytest.raises(ValueError, match="'n' must have a leading batch axis"):
    distributed.global_batch({"n": np.float32(1)}, mesh)


def flat_params(state):
  return {"/".join(k): np.asarray(v) for k, v in toy._flat(state["params"])}


def assert_close(actual, expected):
  assert sorted(actual) == sorted(expected)
  for k in expected:
    np.testing.assert_allclose(actual[k], expected[k], rtol=2e-5, atol=2e-6, err_msg=k)


@pytest.fixture(scope="module")
def reference():
  """The toy run on one device: 4 steps (where the multi-process run stops)."""
  mesh = distributed.make_mesh({"data": 1}, devices=jax.devices()[:1])
  state, losses = toy.train(mesh, 4)
  return mesh, state, losses


@needs_8_devices
def test_sharded_train_step_matches_one_device(reference):
  _, state1, losses1 = reference
  mesh = mesh_of(toy.MESH_SHAPE)
  state8, losses8 = toy.train(mesh, 4)
  kernel = state8["params"]["params"]["fc1"]["kernel"]
  assert kernel.sharding.spec == P("data", "model") and len(kernel.addressable_shards) == 8
  np.testing.assert_allclose(losses8, losses1, rtol=2e-5)
  assert_close(flat_params(state8), flat_params(state1))


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_device(tmp_path, reference):
  env = subprocess_env(devices=4)  # this session's XLA flags with 4 devices
  coordinator = f"localhost:{free_port()}"
  script = os.path.join(os.path.dirname(__file__), "_multiprocess_worker.py")
  procs = [
    subprocess.Popen(
      [sys.executable, script, coordinator, "2", str(i), str(tmp_path)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=120)[0])
  except subprocess.TimeoutExpired:
    pytest.fail("the 2-process run hung for 120 s")
  finally:
    for proc in procs:
      proc.kill()
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[-3000:]

  results = [json.loads((tmp_path / f"result_{i}.json").read_text()) for i in range(2)]
  # SIGTERM on process 1 after step 3: JAX's preemption service stops both at one later step.
  stopped = results[0]["stopped_at"]
  assert toy.STOP_SIGNAL_STEP < stopped < toy.MAX_STEPS
  mesh1 = reference[0]
  state1, losses1 = toy.train(mesh1, stopped)
  for i, result in enumerate(results):
    assert result["devices"] == 8 and result["local_devices"] == 4
    assert result["rows"] == [8 * i, 8 * i + 8]  # each process feeds half the batch
    assert result["stopped_at"] == stopped
    assert result["restored_equal"]
    assert "P('data', 'model')" in result["shardings"]
    np.testing.assert_allclose(result["losses"], losses1, rtol=2e-5)
  params = dict(np.load(tmp_path / "params.npz"))
  assert_close(params, flat_params(state1))

  # The 8-device, 2-process checkpoint restores in this single process onto 1 device.
  abstract, _, _ = toy.compile_run(mesh1)
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.manager.latest_step() == stopped
    assert ckpt.restore_metadata()["losses"] == results[0]["losses"]
    restored = ckpt.restore(abstract)
  assert int(restored["step"]) == stopped
  for k, v in flat_params(restored).items():
    np.testing.assert_array_equal(v, params[k], err_msg=k)
