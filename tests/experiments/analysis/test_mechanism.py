"""The radius-update trace replays the runner's TPGM run exactly and adds up."""

from __future__ import annotations

import json
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


def _adam_steps(grads, lr, b1=0.9, b2=0.999, eps=1e-8):
  """optax.adam's steps for a sequence of gradients of one scalar, in float64."""
  m = v = 0.0
  out = []
  for t, g in enumerate(grads, start=1):
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    out.append(-lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps))
  return out


@pytest.mark.parametrize("method", ["tpgm", "tpgm_lazy"])
def test_trace_replays_the_run_and_its_parts_add_up(tiny_config, tmp_path, method):
  config = _config(tiny_config)
  config[method].proj_freq = 1
  data = mechanism.trace(config, os.fspath(tmp_path), method)
  assert data["info"]["lazy"] == (method == "tpgm_lazy")
  # The trace evaluates its final parameters: the runner's own accuracy of the run.
  # The runner's own TPGM run of the same config ends at the same parameters.
  resolved = plan.make_plan(plan.with_fields(config, methods=(method,)), os.fspath(tmp_path))
  env = environment.setup(resolved, progress=False)
  saved = runner.run_method(env, resolved, resolved[method])[0][method]
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(data["final_params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert data["info"]["results"] == pytest.approx(env.evaluator(saved), abs=0.5)
  assert mechanism.accuracy_line(data["info"]).startswith("The run ends at ID test")
  rows = data["rows"]
  assert len(rows) == 3 and len(rows[0]["r_prev"]) == len(data["paths"])
  for prev, nxt in zip(rows, rows[1:]):  # the state carries r_new to the next step
    np.testing.assert_allclose(nxt["r_prev"], prev["r_new"], rtol=1e-6)
  # The recorded gradients are the ones the run's radius optimizer stepped with (so the trace
  # differentiates at the run's own candidate, f + u under lazy projection): Adam's steps
  # from them are the recorded steps.
  lr = config[method].lr
  for i in range(len(data["paths"])):
    want = _adam_steps([r["grad"][i] for r in rows], lr)
    np.testing.assert_allclose([r["step"][i] for r in rows], want, rtol=1e-3, atol=1e-7)
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


def test_a_variant_trace_has_its_own_files_and_subsection(tmp_path):
  """A variant's trace is written next to TPGM's (never over it) and rendered after it."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  committed = mechanism.load(root)
  assert committed is not None, "results/mechanism.json is committed"
  variant = json.loads(json.dumps(committed))
  variant["info"].update(method="tpgm_lazy", lazy=True)
  main_path = mechanism.write(committed, tmp_path)
  before = main_path.read_bytes()
  assert mechanism.write(variant, tmp_path).name == "mechanism_tpgm_lazy.json"
  assert main_path.read_bytes() == before
  assert [v["info"]["method"] for v in mechanism.load_variants(tmp_path)] == ["tpgm_lazy"]
  text = mechanism.render(variant)
  assert text.startswith("### The same for `tpgm_lazy` with lazy projection")
  assert "![radius updates](results/mechanism_tpgm_lazy.png)" in text
  assert mechanism.render_figures(variant, tmp_path)[0].name == "mechanism_tpgm_lazy.png"
