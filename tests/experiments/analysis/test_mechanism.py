"""The radius-update trace replays the runner's TPGM run exactly and adds up."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from experiments import environment, plan, runner
from experiments.analysis import mechanism
from experiments.configs import study as study_config


def _config(tiny_config):
  config = study_config.get_config()
  for key in ("data", "model", "pretrain", "train", "shard_min_size"):
    config[key] = tiny_config[key]
  config.tpgm.proj_freq = 1
  config.train.steps = 3
  return config


def test_trace_replays_the_run_and_its_parts_add_up(tiny_config, tmp_path):
  config = _config(tiny_config)
  data = mechanism.trace(config, os.fspath(tmp_path))
  # The runner's own TPGM run of the same config ends at the same parameters.
  resolved = plan.make_plan(plan.with_fields(config, methods=("tpgm",)), os.fspath(tmp_path))
  env = environment.setup(resolved, progress=False)
  saved = runner.run_method(env, resolved, resolved["tpgm"])[0]["tpgm"]
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(data["final_params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  rows = data["rows"]
  assert len(rows) == 3 and len(rows[0]["r_prev"]) == len(data["paths"])
  for prev, nxt in zip(rows, rows[1:]):  # the state carries r_new to the next step
    np.testing.assert_allclose(nxt["r_prev"], prev["r_new"], rtol=1e-6)
  summary = mechanism.summarise(data)
  for t in summary["per_tensor"]:  # r_T = r_0 + what the clip adds and cuts + the steps
    parts = t["r0"] + t["clip_floor"] + t["clip_ceiling"] + t["opt_up"] + t["opt_down"]
    assert t["r_final"] == pytest.approx(parts, rel=1e-4, abs=1e-7)
    assert t["clip_ceiling"] <= 0 <= t["clip_floor"] and t["opt_down"] <= 0 <= t["opt_up"]
  # The first radius is min(norms) / 2 of the first candidate, below its bound.
  assert all(r <= b for r, b in zip(rows[0]["r_prev"], rows[0]["bound"]))
  lines = mechanism.findings(summary, data["info"])
  assert any("What holds the radii" in line for line in lines)


def test_trace_rejects_a_method_without_per_step_radius_updates(tiny_config, tmp_path):
  config = _config(tiny_config)
  config.tpgm.proj_freq = 2
  with pytest.raises(ValueError, match="proj_freq=1 and max_iters=1"):
    mechanism.trace(config, os.fspath(tmp_path))
