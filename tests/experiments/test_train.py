"""Tests of the training loop (experiments.training.loop) through the runner (experiments.runner).

Everything runs on the tiny shapes data with a ~1.5k-parameter CNN
(``configs/tiny.py``): resume after SIGKILL and SIGTERM (bit-identical), moving a
checkpoint between 8 devices and 1, the same metrics on 1 and 8 devices and on
2 processes x 4 devices, corrupt checkpoints and non-finite losses.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from experiments import runner
from experiments.training import checkpointing, distributed, loop, weights
from tests.experiments.helpers import build_step, run_dir, subprocess_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def one_device_mesh():
  return distributed.make_mesh({"data": 1, "model": 1}, devices=jax.devices()[:1])


def read_params(path):
  """A params checkpoint (weights.save_params) as {path: NumPy array}, from any mesh."""
  with ocp.PyTreeCheckpointer() as checkpointer:
    meta = checkpointer.metadata(os.fspath(path)).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    tree = checkpointer.restore(os.fspath(path), args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  return dict(zip(weights.param_paths(tree), jax.tree.leaves(tree)))


def metrics(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def run_one(config, workdir, name, **kwargs):
  config.methods = (name,)
  return runner.train_and_evaluate(config, workdir, progress=False, **kwargs)


def test_train_logs_checkpoints_and_reuses_a_finished_run(tiny_config, tiny_runs, tmp_path):
  """The files of a finished TPGM run (trained once for the session: tiny_runs) and a second
  job that reuses it."""
  shutil.copytree(tiny_runs, tmp_path, dirs_exist_ok=True)
  out = run_one(tiny_config, tmp_path, "tpgm")
  root = run_dir(tiny_config, tmp_path, "tpgm")
  assert root.name.startswith("tpgm-") and root.parent == tmp_path / "tiny"
  rows = metrics(root / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for key in (
    "loss",
    "grad_norm",
    "lr",
    "distance_l2",
    "distance_mars_max",
    "radius_min",
    "radius_mean",
    "radius_max",
  ):
    assert all(np.isfinite(r[key]) for r in rows), key
  assert rows[0]["radius_max"] <= rows[0]["distance_mars_max"] + 1e-6  # radii start inside
  # Every projected layer lies inside its ball, so the largest distance is at most the
  # largest radius (the radii floor at 1e-8).
  assert all(r["distance_mars_max"] <= max(r["radius_max"], 1e-8) * (1 + 1e-5) + 1e-7 for r in rows)
  assert sorted(os.listdir(root / "ckpt")) == ["2", "4"]
  assert (root / "params").exists() and out["results"]["tpgm"]["test"] >= 0
  assert set(out["results"]) == {"tpgm"}  # pre-trained on other classes: no own-head row
  layers = out["layers"]["tpgm"]
  assert layers["paths"][0].startswith("stem/") and len(layers["radius"]) == len(layers["paths"])
  # Finished: a second job reuses the run (nothing is trained or rewritten).
  stamp = os.stat(root / "params").st_mtime_ns
  again = run_one(tiny_config, tmp_path, "tpgm")
  assert again["results"] == out["results"]
  assert os.stat(root / "params").st_mtime_ns == stamp
  assert len(metrics(root / "metrics.jsonl")) == 4


def test_train_state_is_sharded_like_the_params(tiny_config):
  env_mesh = distributed.make_mesh({"data": 4, "model": 2})
  built = build_step(
    tiny_config,
    "tpgm",
    env_mesh,
    param_sharding=lambda p, m: distributed.param_sharding(p, m, min_size=256),
  )
  kernel = built.shardings["params"]["block1"]["unit1"]["conv"]["kernel"]
  assert kernel.spec[-1] == "model" and "data" in kernel.spec, kernel.spec  # TP and FSDP
  # The anchor is kept once, in the method's state, sharded like the params.
  assert built.shardings["anchor"] is None
  assert built.shardings["opt_state"][1].anchor["block1"]["unit1"]["conv"]["kernel"] == kernel
  radius = built.shardings["opt_state"][1].radii["block1"]["unit1"]["conv"]["kernel"]
  assert radius.spec == jax.sharding.PartitionSpec()  # radii, step and RNG are replicated


@pytest.mark.parametrize(
  "name, own",
  [
    ("ft", True),
    ("l2sp", False),
    ("ftp", False),
    ("spd", False),
    ("digrap", False),
    ("mars_pgm", False),
  ],
)
def test_anchor_is_kept_once(tiny_config, name, own):
  built = build_step(
    tiny_config, name, distributed.make_mesh({"data": 1, "model": 1}, devices=jax.devices()[:1])
  )
  state = built.abstract_state
  in_opt_state = optax.tree.get(state["opt_state"], "anchor") is not None
  assert (state["anchor"] is not None) == own and in_opt_state != own
  assert loop.anchor_of(state) is not None


def test_distance_metrics_read_a_masked_anchor_like_a_full_one():
  params = {
    "a": {"kernel": np.ones((3, 4), np.float32)},
    "head": {"bias": np.ones(2, np.float32)},
    "z": {"scale": np.full(4, 2.0, np.float32)},
  }
  full = jax.tree.map(lambda x: x * 0.5, params)
  mask = {"a": {"kernel": True}, "head": {"bias": False}, "z": {"scale": True}}
  masked = dict(full, head={"bias": optax.MaskedNode()})
  want = loop.step_metrics(params, full, None, mask)
  got = loop.step_metrics(params, masked, None, mask)
  np.testing.assert_allclose(float(got["distance_l2"]), np.sqrt(12 * 0.25 + 4 * 1.0), rtol=1e-6)
  for key in want:
    np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-6)


def test_another_configuration_gets_its_own_run_and_never_resumes_another(
  tiny_config, tiny_runs, tmp_path
):
  shutil.copytree(tiny_runs, tmp_path, dirs_exist_ok=True)  # a finished FT run
  run_one(tiny_config, tmp_path, "ft")
  first = run_dir(tiny_config, tmp_path, "ft")
  tiny_config.train.optimizer.lr = 0.5
  second = run_dir(tiny_config, tmp_path, "ft")
  assert second != first and not second.exists()
  # A checkpoint directory of another configuration (here: copied over) is refused.
  shutil.copytree(first / "ckpt", second / "ckpt")
  with pytest.raises(checkpointing.CheckpointError, match="another configuration"):
    run_one(tiny_config, tmp_path, "ft")
  shutil.rmtree(second)
  run_one(tiny_config, tmp_path, "ft")
  assert (first / "params").exists() and (second / "params").exists()


def test_non_finite_loss_stops_with_a_clear_message(tiny_config, tmp_path):
  tiny_config.train.optimizer.lr = 1e30
  tiny_config.train.steps = 6
  tiny_config.train.checkpoint_every = 100
  with pytest.raises(loop.NonFiniteLossError, match="ft: the training loss is nan at step"):
    run_one(tiny_config, tmp_path, "ft")
  assert not os.listdir(run_dir(tiny_config, tmp_path, "ft") / "ckpt")  # nothing after NaN


def test_corrupt_checkpoint_is_reported_and_never_replaced(tiny_config, tiny_runs, tmp_path):
  shutil.copytree(tiny_runs, tmp_path, dirs_exist_ok=True)  # a finished FT run
  run_one(tiny_config, tmp_path, "ft")
  root = run_dir(tiny_config, tmp_path, "ft")
  shutil.rmtree(root / "params")
  (root / "results.json").unlink()
  for path in pathlib.Path(root / "ckpt" / "4" / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d":  # the array data files
      os.truncate(path, path.stat().st_size // 2)
  with pytest.raises(checkpointing.CheckpointError, match=r"step 4.*previous checkpoint is step 2"):
    run_one(tiny_config, tmp_path, "ft")
  assert sorted(os.listdir(root / "ckpt")) == ["2", "4"]
  assert not (root / "params").exists()


def _uninterrupted(config, workdir, mesh):
  run_one(config, workdir, "tpgm", mesh=mesh)
  root = run_dir(config, workdir, "tpgm")
  return read_params(root / "params"), metrics(root / "metrics.jsonl")


@pytest.fixture(scope="module")
def long_tpgm(tiny_shared, tmp_path_factory):
  """A longer tpgm run config (every field but paths) and its uninterrupted result on 8 devices."""
  from experiments.configs import tiny  # noqa: PLC0415

  config = tiny.get_config()
  config.data.data_dir = os.fspath(tiny_shared / "data")
  config.pretrain.cache_dir = os.fspath(tiny_shared / "cache")
  config.train.steps = 8
  config.train.log_every = 1
  config.train.checkpoint_every = 2
  config.train.max_to_keep = 10
  config.tpgm.proj_freq = 3
  workdir = tmp_path_factory.mktemp("long_tpgm")
  params, rows = _uninterrupted(config, workdir, None)
  return config, workdir, params, rows


def test_checkpoints_move_between_8_devices_and_1(long_tpgm, tmp_path):
  config, workdir, ref_params, ref_rows = long_tpgm
  # The same run on one device logs the same metrics.
  params1, rows1 = _uninterrupted(config, tmp_path / "one", one_device_mesh())
  for a, b in zip(rows1, ref_rows):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-6, err_msg=f"{k} step {a['step']}")
  for direction, (source, mesh) in {
    "8->1": (workdir, one_device_mesh()),
    "1->8": (tmp_path / "one", None),
  }.items():
    # Keep the checkpoint of step 4 of a finished run and resume on the other mesh.
    resumed = tmp_path / direction.replace(">", "")
    shutil.copytree(source / "tiny", resumed / "tiny")
    root = run_dir(config, resumed, "tpgm")
    for item in ("params", "results.json", "ckpt/6", "ckpt/8"):
      path = root / item
      shutil.rmtree(path) if path.is_dir() else path.unlink()
    out = run_one(config, resumed, "tpgm", mesh=mesh)
    params = read_params(root / "params")
    for k in ref_params:
      np.testing.assert_allclose(
        params[k], ref_params[k], rtol=1e-4, atol=1e-6, err_msg=f"{direction} {k}"
      )
    assert out["results"]["tpgm"]["test"] == pytest.approx(
      json.loads((run_dir(config, workdir, "tpgm") / "results.json").read_text())["results"][
        "tpgm"
      ]["test"],
      abs=10,
    )


def _main(config, workdir, *extra, env=None, interrupt=None):
  """``experiments.main`` on the long tpgm config in a subprocess; ``interrupt=(step, signal)``
  makes it signal itself once the save of ``step`` has started."""
  entry = (
    ["-m", "experiments.main"]
    if interrupt is None
    else [os.path.join(REPO, "tests", "experiments", "_main_worker.py"), *map(str, interrupt)]
  )
  args = [
    f"--workdir={workdir}",
    f"--config={os.path.join(REPO, 'experiments', 'configs', 'tiny.py')}",
    f"--config.data.data_dir={config.data.data_dir}",
    f"--config.pretrain.cache_dir={config.pretrain.cache_dir}",
    f"--config.train.steps={config.train.steps}",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=2",
    "--config.train.max_to_keep=10",
    f"--config.tpgm.proj_freq={config.tpgm.proj_freq}",
    "--config.methods=tpgm",
    *extra,
  ]
  return subprocess.Popen(
    [sys.executable, *entry, *args],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def test_killed_and_preempted_runs_resume_bit_identically(long_tpgm, tmp_path):
  """SIGKILL during the save of step 4, SIGTERM after the save of step 6, then run to the end:
  the same bits as the uninterrupted run."""
  config, _, ref_params, ref_rows = long_tpgm
  root = run_dir(config, tmp_path, "tpgm")
  out = _main(config, tmp_path, interrupt=(4, "SIGKILL")).communicate(timeout=120)[0]
  saved = sorted(int(s) for s in os.listdir(root / "ckpt") if s.isdigit())
  assert saved and saved[-1] <= 4 and not (root / "params").exists(), out[-3000:]

  proc = _main(config, tmp_path, interrupt=(6, "SIGTERM"))
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, out[-3000:]
  assert "stopped at step 7 on SIGTERM" in out and "run the same command again" in out
  assert "7" in os.listdir(root / "ckpt") and not (root / "params").exists()

  proc = _main(config, tmp_path)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, out[-3000:]
  assert "| tpgm |" in out
  params = read_params(root / "params")
  for k in ref_params:
    np.testing.assert_array_equal(params[k], ref_params[k], err_msg=k)
  rows = metrics(root / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, 9))
  assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_device(long_tpgm, tmp_path):
  config, _, ref_params, ref_rows = long_tpgm
  env = subprocess_env(devices=4)  # this session's XLA flags with 4 devices
  coordinator = f"localhost:{_free_port()}"
  procs = [
    _main(
      config,
      tmp_path,
      f"--coordinator_address={coordinator}",
      "--num_processes=2",
      f"--process_id={i}",
      "--config.mesh.data=4",
      "--config.mesh.model=2",
      env=env,
    )
    for i in range(2)
  ]
  try:
    outs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "| tpgm |" in outs[0] and "| tpgm |" not in outs[1]  # only process 0 reports
  root = run_dir(config, tmp_path, "tpgm")
  rows = metrics(root / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, 9))
  for a, b in zip(rows, ref_rows):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-4, atol=1e-6, err_msg=f"{k} step {a['step']}")
  params = read_params(root / "params")
  for k in ref_params:
    np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_run_store_resumes_a_fresh_workdir_and_retrains_what_a_step_needs(
  tiny_config, tiny_runs, tmp_path
):
  """A run store holds each finished run's results: another workdir (a fresh clone) reuses
  them without training, and a post-hoc step whose source's params are not there trains that
  source again, to the same params (the same post-hoc results)."""
  from experiments import environment  # noqa: PLC0415
  from experiments.plan import make_plan  # noqa: PLC0415

  tiny_config.methods = ("ft", "tpgm_post_hoc")
  tiny_config.tpgm_post_hoc.source, tiny_config.tpgm_post_hoc.base = "ft", ""  # FT's only
  store, first, fresh = tmp_path / "store", tmp_path / "first", tmp_path / "fresh"
  shutil.copytree(tiny_runs, first)  # FT finished there

  def execute(workdir):
    resolved = make_plan(tiny_config, workdir)
    return runner.execute(environment.setup(resolved, progress=False), resolved, store=store)

  done = execute(first).results
  stored = sorted(p.name for p in store.iterdir())
  assert [n.split("-")[0] for n in stored] == ["ft", "tpgm_post_hoc"]
  assert execute(fresh).results == done  # every run from the store
  for name in ("ft", "tpgm_post_hoc"):
    root = run_dir(tiny_config, fresh, name)
    assert os.listdir(root) == ["results.json"]  # restored, nothing trained
  (store / stored[1]).unlink()
  shutil.rmtree(run_dir(tiny_config, fresh, "tpgm_post_hoc"))
  again = execute(fresh).results
  assert (run_dir(tiny_config, fresh, "ft") / "params").exists()  # FT trained again
  assert again == done  # bit for bit: the same FT params, the same post-hoc step
  assert sorted(p.name for p in store.iterdir()) == stored
