"""Train-state checkpoints: exact resume, resharding, damaged and unfinished checkpoints,
signals."""

import gc
import glob
import os
import shutil
import signal
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
from experiments.training.checkpointing import Checkpointer, CheckpointError, PreemptionGuard

needs_8_devices = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
WORKER = os.path.join(os.path.dirname(__file__), "_checkpoint_worker.py")


def train_state(seed=0):
  """A train state like the loop's: Flax-like params, a TPGM optimizer state, counters."""
  rng = np.random.default_rng(seed)
  params = {
    "params": {
      "block1": {
        "kernel": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
        "scale": jnp.asarray(rng.normal(size=(16,)), jnp.bfloat16),
      },
      "head": {"kernel": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)},
    }
  }
  tx = optax.chain(optax.adamw(1e-3), tpgm_jax.tpgm(mask=tpgm_jax.path_mask(exclude=".*head.*")))
  opt_state = tx.init(params)
  opt_state = jax.tree.map(lambda x: x + 1 if x.dtype != jnp.int32 else x + seed, opt_state)
  return {
    "params": params,
    "opt_state": opt_state,  # tuples, NamedTuples, EmptyState, MaskedNode
    "radii": {"block1": jnp.float32(0.5 + seed)},
    "radii_opt_state": None,
    "step": np.int32(7 + seed),
    "rng": jax.random.key_data(jax.random.key(seed)),
    "data_step": np.int32(3),
    "epoch": 2,
  }


def abstract(tree):
  """jax.Array leaves as ShapeDtypeStructs with their sharding; other leaves as they are."""
  return jax.tree.map(
    lambda x: (
      jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if isinstance(x, jax.Array) else x
    ),
    tree,
  )


def assert_exact(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert type(a) is type(e) or (isinstance(a, jax.Array) and isinstance(e, jax.Array))
    assert np.asarray(a).dtype == np.asarray(e).dtype and np.shape(a) == np.shape(e)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def save_steps(directory, steps, **kwargs):
  with Checkpointer(directory, save_interval_steps=1, **kwargs) as ckpt:
    for step in steps:
      assert ckpt.save(step, train_state(step))


@pytest.mark.parametrize("target_kind", ["concrete", "abstract"])
def test_round_trip_is_exact(tmp_path, target_kind):
  state = train_state(seed=1)
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.save(100, state, metadata={"config_hash": "abc", "lr": 0.1})
    assert ckpt.manager.latest_step() is None or ckpt.manager.latest_step() == 100
    ckpt.manager.wait_until_finished()
    assert ckpt.manager.latest_step() == 100
  target = train_state(seed=0) if target_kind == "concrete" else abstract(train_state(0))
  with Checkpointer(tmp_path) as ckpt:
    restored = ckpt.restore(target)
    assert ckpt.restore_metadata() == {"config_hash": "abc", "lr": 0.1}
  assert_exact(restored, state)
  assert isinstance(restored["opt_state"][1], tpgm_jax.TPGMState)
  assert isinstance(restored["opt_state"][1].anchor["params"]["head"]["kernel"], optax.MaskedNode)
  assert isinstance(restored["step"], np.int32) and type(restored["epoch"]) is int


@needs_8_devices
@pytest.mark.parametrize("save_on, restore_on", [(8, 1), (1, 8)])
def test_restore_onto_other_shardings(tmp_path, save_on, restore_on):
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  single = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def place(tree, n):
    def put(x):
      if not isinstance(x, jax.Array):
        return x
      spec = P("data", "model") if x.ndim == 2 else P()
      return jax.device_put(x, NamedSharding(mesh, spec) if n == 8 else single)

    return jax.tree.map(put, tree)

  state = place(train_state(seed=2), save_on)
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(5, state, force=True)
  target = abstract(place(train_state(0), restore_on))
  with Checkpointer(tmp_path) as ckpt:
    restored = ckpt.restore(target)
  assert_exact(restored, state)
  for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    if isinstance(r, jax.Array):
      assert r.sharding == t.sharding


def test_schedule_and_max_to_keep(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=10) as ckpt:
    assert [s for s in range(31) if ckpt.manager.should_save(s)] == [0, 10, 20, 30]
    saved = [s for s in range(1, 31) if ckpt.save(s, train_state(s))]
    assert saved == [10, 20, 30]
    assert ckpt.save(35, train_state(35), force=True)
    ckpt.manager.wait_until_finished()
    assert ckpt.all_steps() == [30, 35] and ckpt.manager.latest_step() == 35
    assert not ckpt.manager.should_save(30)
  assert sorted(os.listdir(tmp_path)) == ["30", "35"]


def test_saving_an_existing_step_keeps_it(tmp_path):
  save_steps(tmp_path, [4])
  with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    assert not ckpt.manager.should_save(4)
    assert not ckpt.save(4, train_state(99), force=True)
    assert not ckpt.save(4, train_state(99))
    assert_exact(ckpt.restore(train_state(0)), train_state(4))


def test_no_checkpoint(tmp_path):
  with Checkpointer(tmp_path / "new") as ckpt:
    assert ckpt.manager.latest_step() is None
    with pytest.raises(CheckpointError, match="no checkpoint in .*new"):
      ckpt.restore(train_state(0))
    with pytest.raises(CheckpointError, match="step 3"):
      ckpt.restore(train_state(0), step=3)


@pytest.mark.parametrize("broken", ["_CHECKPOINT_METADATA", "state/_METADATA"])
def test_damaged_step_is_reported_and_kept(tmp_path, broken):
  """A finalized step that lost a file is orbax's latest step: restoring it is an error naming
  it and the previous step (no silent fallback); it is never deleted or overwritten."""
  with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, train_state(step), metadata={"step": step})
  os.remove(tmp_path / "3" / broken)
  with Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=1) as ckpt:
    assert ckpt.manager.latest_step() == 3
    message = (
      rf"step 3 at \S*{tmp_path.name}/3 \(damaged .*previous checkpoint is step 2: "
      rf"move \S*{tmp_path.name}/3 away"
    )
    with pytest.raises(CheckpointError, match=message):
      ckpt.restore(train_state(0))
    with pytest.raises(CheckpointError, match=message):
      ckpt.restore(train_state(0), step=3)
    if broken == "_CHECKPOINT_METADATA":
      with pytest.raises(CheckpointError, match=message):
        ckpt.restore_metadata()
    assert_exact(ckpt.restore(train_state(0), step=2), train_state(2))
    assert ckpt.restore_metadata(2) == {"step": 2}
    assert not ckpt.manager.should_save(3)
    assert not ckpt.save(3, train_state(3), force=True)  # kept as it is
  assert sorted(os.listdir(tmp_path)) == ["2", "3"]
  # Moved away, the previous step is the latest again.
  os.rename(tmp_path / "3", tmp_path.parent / f"{tmp_path.name}-bad-3")
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.manager.latest_step() == 2
    assert_exact(ckpt.restore(train_state(0)), train_state(2))


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_a_stray_step_name_is_never_overwritten(tmp_path, kind):
  """An empty directory named like a step is a (damaged) step to orbax; a file is not a step:
  neither is written over."""
  save_steps(tmp_path, [1])
  (tmp_path / "2").mkdir() if kind == "directory" else (tmp_path / "2").write_text("notes")
  with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    if kind == "directory":
      assert ckpt.manager.latest_step() == 2 and not ckpt.save(2, train_state(2), force=True)
      with pytest.raises(CheckpointError, match="step 2 .*damaged.*previous checkpoint is step 1"):
        ckpt.restore(train_state(0))
    else:
      assert ckpt.manager.latest_step() == 1
      with pytest.raises(CheckpointError, match="cannot save step 2: .* left untouched"):
        ckpt.save(2, train_state(2), force=True)
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]
  assert (
    os.listdir(tmp_path / "2") == []
    if kind == "directory"
    else (tmp_path / "2").read_text() == "notes"
  )


def test_unfinished_save_directory_is_ignored(tmp_path):
  save_steps(tmp_path, [1, 2])
  shutil.copytree(tmp_path / "2", tmp_path / "3.orbax-checkpoint-tmp-1234567")
  with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    assert ckpt.manager.latest_step() == 2
    assert ckpt.save(3, train_state(3))
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.manager.latest_step() == 3
    assert_exact(ckpt.restore(train_state(0)), train_state(3))
  assert not glob.glob(str(tmp_path / "*tmp*"))


def test_read_only_leaves_unfinished_saves_alone(tmp_path):
  save_steps(tmp_path, [1])
  unfinished = tmp_path / "2.orbax-checkpoint-tmp-1234567"  # say, another job's save
  shutil.copytree(tmp_path / "1", unfinished)
  with Checkpointer(tmp_path, read_only=True) as ckpt:
    assert ckpt.manager.latest_step() == 1
    assert_exact(ckpt.restore(train_state(0)), train_state(1))
    with pytest.raises(CheckpointError, match="read-only"):
      ckpt.save(2, train_state(2), force=True)
  assert unfinished.exists()
  with Checkpointer(tmp_path / "missing", read_only=True) as ckpt:
    assert ckpt.manager.latest_step() is None
  assert not (tmp_path / "missing").exists()


# After a failed metadata read orbax leaves a callback on a closed asyncio loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("truncated", ["array data", "inline data"])
def test_unreadable_latest_step_is_an_error_naming_it(tmp_path, truncated):
  def state(step):  # one array large enough for a data file of its own
    w = np.random.default_rng(step).normal(size=(64, 1024)).astype(np.float32)
    return {"w": w, "step": np.int32(step)}

  with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(1, state(1))
    ckpt.save(2, state(2))
  files = glob.glob(str(tmp_path / "2" / "state" / "**" / "d" / "*"), recursive=True)
  data = max(files, key=os.path.getsize) if truncated == "array data" else min(files)
  with open(data, "r+b") as f:
    f.truncate(os.path.getsize(data) // 2)
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.manager.latest_step() == 2  # finalised: only reading the data tells
    with pytest.raises(
      CheckpointError,
      match=rf"{tmp_path.name}/2.*previous "
      rf"checkpoint is step 1: move \S*{tmp_path.name}/2 away",
    ):
      ckpt.restore(state(0))
    assert_exact(ckpt.restore(state(0), step=1), state(1))
  gc.collect()  # report the leftover callback here, where it is ignored


def test_target_mismatch_is_named(tmp_path):
  save_steps(tmp_path, [1])
  target = train_state(0)
  target["params"]["params"]["head"]["kernel"] = jnp.zeros((16, 5))
  target["step"] = np.int64(0)
  del target["radii"]
  target["extra"] = jnp.zeros(2)
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError) as e:
      ckpt.restore(target)
  message = str(e.value)
  assert "missing from the checkpoint: extra" in message
  assert "not in the target: radii/block1" in message
  assert "params/params/head/kernel: checkpoint (16, 4) float32 vs target (16, 5)" in message
  assert "step: checkpoint () int32 vs target () int64" in message


def test_typed_keys_are_rejected(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(TypeError, match="'rng' is a typed PRNG key.*key_data"):
      ckpt.save(1, {"rng": jax.random.key(0)}, force=True)


def run_worker(mode, directory, **kwargs):
  return subprocess.Popen(
    [sys.executable, WORKER, mode, str(directory)],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    **kwargs,
  )


def test_killed_save_leaves_previous_checkpoint(tmp_path):
  proc = run_worker("kill_mid_save", tmp_path)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == -signal.SIGKILL, out
  assert glob.glob(str(tmp_path / "2.orbax-checkpoint-tmp*")), os.listdir(tmp_path)
  assert not (tmp_path / "2").exists()
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.manager.latest_step() == 1
    restored = ckpt.restore({"w": np.zeros((4, 4), np.float32), "step": np.int32(0)})
  assert restored["step"] == 1 and np.all(restored["w"] == 1.0)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  proc = run_worker("train_until_sigterm", tmp_path)
  try:
    for line in proc.stdout:
      if line.startswith("step 3"):
        proc.send_signal(signal.SIGTERM)
        break
    out, _ = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0, out
  stopped = int(out.strip().splitlines()[-1].removeprefix("stopped "))
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.manager.latest_step() == stopped
    restored = ckpt.restore({"w": np.zeros((4, 4), np.float32), "step": np.int32(0)})
  assert restored["step"] == stopped and np.all(restored["w"] == stopped)


def test_guard_flags_signals_and_restores_handlers():
  # The handlers in place before (SIGINT is SIG_IGN in a job started in the background).
  previous, previous_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  with PreemptionGuard(signals=(signal.SIGTERM, signal.SIGINT)) as guard:
    assert not guard.requested and not guard.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.requested
    assert guard.should_stop(2)  # one process: at once
    os.kill(os.getpid(), signal.SIGTERM)  # repeated SIGTERMs only set the flag
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)  # a second interrupt gets out
  assert signal.getsignal(signal.SIGTERM) is previous
  assert signal.getsignal(signal.SIGINT) is previous_int


def test_guard_request():
  with PreemptionGuard() as guard:
    guard.request()
    assert guard.requested and guard.should_stop(0) and guard.should_stop(1)
