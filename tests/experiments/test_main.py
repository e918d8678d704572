"""Smoke tests of the jobs (main, pretrain, diagnose), the command line, the configs, the
plan and the report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import environment, main, models, plan, pretrain
from experiments.analysis import report
from experiments.configs import all_methods, default, domainnet_resnet50, imagenet_vit_b16, tiny
from experiments.training import distributed, loop, methods

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _flags(config, workdir):
  return [
    f"--workdir={workdir}",
    f"--config={os.path.join(os.path.dirname(tiny.__file__), 'tiny.py')}",
    f"--config.data.data_dir={config.data.data_dir}",
    f"--config.pretrain.cache_dir={config.pretrain.cache_dir}",
  ]


def _start(module, *flags):
  """``python -m module flags`` started (stdout and stderr piped)."""
  return subprocess.Popen(
    [sys.executable, "-m", module, *flags],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def test_main_runs_every_method_and_reports(tiny_config, tiny_runs, tmp_path, capsys):
  shutil.copytree(tiny_runs, tmp_path, dirs_exist_ok=True)  # FT and TPGM finished: reused
  main.job(tiny_config, os.fspath(tmp_path))
  out = capsys.readouterr().out
  rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
  expected = [
    "method",
    "ft",
    "lp",
    "lp_ft",
    "l2sp",
    "ftp",
    "spd",
    "digrap",
    "mars_pgm",
    "tpgm",
    "wise_ft_0.25",
    "wise_ft_0.5",
    "wise_ft_0.75",
    "tpgm_post_hoc",
  ]
  assert rows == expected
  root = tmp_path / "tiny"
  saved = json.loads((root / "results.json").read_text())
  assert saved["ood"] == ["sketch", "painting", "clipart"]
  for row, accs in saved["results"].items():
    assert set(accs) == {"val", "test", "sketch", "painting", "clipart", "ood_mean"}, row
    assert np.mean([accs[d] for d in saved["ood"]]) == pytest.approx(accs["ood_mean"])
  assert (root / "radii.png").stat().st_size > 10_000
  assert "FT " in (root / "results.md").read_text()
  assert "pre-trained on" in (root / "results.md").read_text()  # other classes: no own-head row


def test_diagnose_measures_the_radius_signal(tiny_config, tmp_path, capsys):
  from experiments import diagnose  # noqa: PLC0415

  tiny_config.diagnose.every, tiny_config.diagnose.batches = 2, 2
  diagnose.job(tiny_config, os.fspath(tmp_path))
  out = capsys.readouterr().out
  assert "held-out radius grad > 0 (shrink)" in out
  result = json.loads((tmp_path / "tiny" / "diagnose_ft.json").read_text())
  assert result["steps"] == [2, 4]  # every checkpoint of the FT trajectory
  n_tensors = len(result["per_tensor"])
  assert n_tensors > 5 and result["per_tensor"][0]["path"].startswith("stem/")
  for row in result["per_tensor"]:
    assert 0 <= row["shrink_frequency"] <= 1 and -1 <= row["cos_batch"] <= 1
  assert (tmp_path / "tiny" / "diagnose_ft.png").stat().st_size > 10_000


def test_pretrain_job_caches_and_never_overwrites(tiny_config, tmp_path, capsys):
  config = tiny_config
  config.pretrain.cache_dir = ""  # a fresh cache in the workdir
  pretrain.job(config, os.fspath(tmp_path))
  path = capsys.readouterr().out.strip().split(": ", 1)[1]
  assert path.startswith(
    os.fspath(tmp_path / "cache" / "pretrained" / "resnet_tiny-shapes_tiny_transfer-")
  )
  stamp = os.stat(path).st_mtime_ns
  pretrain.job(config, os.fspath(tmp_path))
  assert capsys.readouterr().out.strip().endswith(path) and os.stat(path).st_mtime_ns == stamp
  other = plan.pretrain_key(tiny.get_config()), tiny.get_config()
  other[1].pretrain.optimizer.lr = 1e-4
  assert plan.pretrain_key(other[1]) != other[0]  # another recipe, another checkpoint


def test_command_line_overrides_and_errors(tiny_config, tmp_path):
  """The command line, end to end: overrides reach the job; a bad flag, an unknown field or a
  config that cannot run is one line on stderr, before anything is built."""
  cases = [
    (
      ["--config.train.no_such_field=1"],
      "FATAL Flags parsing error: the config has no field "
      "'no_such_field' (--config overrides given: --config.train.no_such_field=1)",
    ),
    (["--config.train.steps=ten"], "FATAL Flags parsing error: flag --config.train.steps=ten"),
    (["--config.train.steps=0"], "error: config.train.steps must be a positive integer, got 0"),
    (["--config.methods=ft,sgdp"], "error: unknown method 'sgdp'"),
    (["positional"], "unexpected arguments ['positional']"),
  ]
  # Every command in a process of its own, all at once (each mostly imports).
  good = _start(
    "experiments.pretrain",
    *_flags(tiny_config, tmp_path),
    "--config.methods=ft,tpgm",
    "--config.train.steps=7",
  )
  bad = [_start("experiments.main", f"--workdir={tmp_path / 'bad'}", *flags) for flags, _ in cases]
  try:
    outs = [proc.communicate(timeout=600) for proc in (good, *bad)]
  finally:
    for proc in (good, *bad):
      proc.kill()
  (stdout, stderr), outs = outs[0], outs[1:]
  assert good.returncode == 0, stderr
  assert "pre-trained checkpoint: " + os.fspath(tiny_config.pretrain.cache_dir) in stdout
  for (flags, message), proc, (_, stderr) in zip(cases, bad, outs):
    assert proc.returncode != 0 and message in stderr, (flags, stderr)
    assert "Traceback" not in stderr, stderr
  assert not (tmp_path / "bad").exists()  # nothing was built


def test_plan_resolves_methods_dependencies_and_directories(tmp_path):
  config = default.get_config()
  config.methods = ("ft,tpgm", "wise_ft")
  resolved = plan.make_plan(config, tmp_path)
  assert resolved.names == ["ft", "tpgm", "lp", "lp_ft", "wise_ft"]  # dependencies first
  assert resolved["wise_ft"].deps == ("lp", "lp_ft") and not resolved["wise_ft"].trained
  assert resolved["lp"].train.frozen == ("backbone",) and resolved["ft"].train.frozen == ()
  tpgm = resolved["tpgm"]
  assert tpgm.directory == tmp_path / "default" / f"tpgm-{tpgm.hash[:8]}"
  assert tpgm.identity["pretrained"] == resolved.pretrain.key
  again = plan.make_plan(default.get_config(), tmp_path)
  assert again["ft"].hash == resolved["ft"].hash  # config.methods is not part of a run
  config.tpgm.lr = 0.1
  assert plan.make_plan(config, tmp_path)["tpgm"].hash != tpgm.hash
  assert plan.make_plan(config, tmp_path)["ft"].hash == resolved["ft"].hash
  config.train.steps = 300  # every trained run and what depends on them
  changed = plan.make_plan(config, tmp_path)
  assert all(changed[n].hash != resolved[n].hash for n in resolved.names)


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("train.steps", -3, "config.train.steps must be a positive integer, got -3"),
    ("train.batch_size", 0, "config.train.batch_size must be a positive integer"),
    ("pretrain.steps", 0, "config.pretrain.steps must be a positive integer"),
    ("data.eval_batch_size", 0, "config.data.eval_batch_size must be a positive integer"),
    ("methods", ("ft", "nope"), "unknown method 'nope'"),
    ("data.task", "mnist", "unknown task 'mnist'"),
    (
      "pretrain.checkpoint",
      "/no/such/dir",
      "config.pretrain.checkpoint=/no/such/dir does not exist",
    ),
  ],
)
def test_plan_refuses_configs_that_cannot_run(key, value, message, tmp_path):
  config = plan.with_fields(default.get_config(), **{key: value})
  with pytest.raises(plan.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    plan.make_plan(config, tmp_path)
  assert not os.listdir(tmp_path)  # before anything is built


def test_plan_refuses_unknown_keys_and_batches_the_mesh_cannot_split(tmp_path):
  config = default.get_config()
  config.tpgm_typo = 1
  with pytest.raises(plan.ConfigError, match=r"unknown config key\(s\) \['tpgm_typo'\]"):
    plan.make_plan(config, tmp_path)
  config = default.get_config()
  config.train.batch_size = 100
  with pytest.raises(
    plan.ConfigError,
    match="config.train.batch_size=100 cannot be split over "
    "the 8 data-parallel devices of config.mesh: use a multiple of 8",
  ):
    plan.make_plan(config, tmp_path, device_count=8)
  config.mesh.model = 3
  with pytest.raises(plan.ConfigError, match="does not fit 8 devices"):
    plan.make_plan(config, tmp_path, device_count=8)
  config = default.get_config()
  config.train.hflip = True
  with pytest.raises(plan.ConfigError, match="config.train.hflip is not read"):
    plan.make_plan(config, tmp_path)
  with pytest.raises(plan.ConfigError, match="config has no field"):
    plan.with_fields(config, **{"train.nope": 1})


def test_missing_pretrained_checkpoint_is_explained(tmp_path):
  config = domainnet_resnet50.get_config()
  with pytest.raises(
    plan.ConfigError, match="no pre-training split: set config.pretrain.checkpoint"
  ):
    plan.make_plan(config, tmp_path)
  config.pretrain.checkpoint = os.fspath(tmp_path / "nowhere")
  with pytest.raises(plan.ConfigError, match="does not exist"):
    plan.make_plan(config, tmp_path)


def test_config_variants_override_the_default():
  config, base = all_methods.get_config(), default.get_config()
  assert set(config.methods) == set(methods.METHODS) > set(base.methods)
  assert {"ft", "lp", "wise_ft", "tpgm"} <= set(base.methods)
  config.methods = base.methods
  assert config.to_dict() == base.to_dict()  # nothing else changes


@pytest.mark.parametrize("module", [domainnet_resnet50, imagenet_vit_b16])
def test_paper_configs_build_and_trace(module, tmp_path):
  """The paper-scale recipes need prepared data and weights; here they only build and trace."""
  config = module.get_config()
  if "zero_shot_head" in config.model.overrides:  # the ImageNet recipe's zero-shot head
    np.save(tmp_path / "text.npy", np.random.default_rng(0).normal(size=(1000, 512)))
    config.model.overrides.zero_shot_head = os.fspath(tmp_path / "text.npy")
  task = plan.get_task(config)
  assert task.mean == config.model.input_mean and task.std == config.model.input_std  # CLIP's
  model = environment.model_for(config, task)
  assert model.__class__.__name__ == {"domainnet": "ModifiedResNet", "imagenet": "ViT"}[task.name]
  mesh = distributed.make_mesh(config.mesh.to_dict())
  size = task.image_size
  # The model's init is traced once; every method's step is then built on its shapes (a
  # paper-scale init costs a second or more to trace, the same for every method).
  shapes = jax.eval_shape(lambda key: models.init_params(model, key, size), jax.random.key(0))
  init = lambda key: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
  for name in plan.run_order(config):
    method = methods.get(name, config)
    if not method.trained:
      continue
    train_cfg = plan.train_config(config, name)
    batch = train_cfg.batch_size = 8
    built = loop.build_step(
      loop.TrainSetup(
        name=name,
        train=train_cfg,
        model=model,
        task=task,
        mesh=mesh,
        init=init,
        data=None,
        method=method,
        section=config.get(name),
      )
    )
    images = jax.ShapeDtypeStruct((batch, size, size, 3), np.uint8)  # normalised on device
    labels = jax.ShapeDtypeStruct((batch,), np.int32)
    heldout = None
    if method.heldout is not None:
      iters = method.heldout(config.get(name))[1]
      heldout = {
        "image": jax.ShapeDtypeStruct((batch, iters, size, size, 3), np.uint8),
        "label": jax.ShapeDtypeStruct((batch, iters), np.int32),
      }
    state, metrics = jax.eval_shape(
      built.fn, built.abstract_state, {"image": images, "label": labels}, heldout
    )
    assert jax.tree.structure(state) == jax.tree.structure(built.abstract_state)
    assert metrics["loss"].shape == ()
    if name == "tpgm":
      assert {"radius_min", "distance_mars_max"} <= set(metrics)
  assert task.num_classes == {"domainnet": 345, "imagenet": 1000}[task.name]


def test_constrained_fresh_head_and_bad_normalisation_are_refused():
  config = imagenet_vit_b16.get_config()
  task = plan.get_task(config)
  with pytest.raises(
    ValueError,
    match="constrained includes the 'head' group, but the head is "
    "freshly initialised: set config.model.overrides.zero_shot_head",
  ):
    environment.model_for(config, task)
  config.train.constrained = ("backbone",)
  assert environment.model_for(config, task).zero_shot_head == ""
  config.model.input_std = (0.2, 0.0, 0.2)
  with pytest.raises(ValueError, match="input_mean and input_std must both be set"):
    plan.get_task(config)
  assert plan.get_task(default.get_config()).mean == (0.5, 0.5, 0.5)  # the task's own


def test_markdown_table_and_summary():
  results = {
    "ft": {"val": 90.0, "test": 88.0, "a": 60.0, "b": 70.0},
    "lp": {"val": 80.0, "test": 81.0, "a": 80.0, "b": 90.0},
    "wise_ft_0.5": {"val": 85.0, "test": 85.0, "a": 75.0, "b": 80.0},
  }
  rows = report.with_ood_mean(results, ["a", "b"])
  table = report.results_table(rows, ["a", "b"])
  assert table.splitlines()[0] == "| method | val (ID) | ID test | a | b | OOD mean |"
  assert table.splitlines()[2] == "| ft | 90.0 | 88.0 | 60.0 | 70.0 | 65.0 |"
  lines = report.summary(rows)
  assert lines[0] == "FT loses OOD accuracy against lp: OOD mean -20.0, ID +7.0 points."
  assert lines[-1] == "WiSE-FT alpha selected on val: wise_ft_0.5."


def test_study_selects_runs_seeds_and_writes_results(tiny_config, tmp_path):
  from experiments.analysis import results_md, study  # noqa: PLC0415
  from experiments.configs import study as study_config  # noqa: PLC0415

  config = study_config.get_config()
  for key in ("data", "model", "pretrain", "train", "tpgm", "tpgm_post_hoc", "shard_min_size"):
    config[key] = tiny_config[key]
  config.diagnose.every, config.diagnose.batches = 2, 2
  config.methods = ("ft", "lp", "tpgm", "wise_ft", "tpgm_post_hoc_l2")
  config.wise_ft.alphas = (0.0, 0.5, 1.0)
  config.tpgm_post_hoc_l2.steps = 2
  config.tpgm_post_hoc_l2.batch_size = 8
  config.study.seeds = (0, 1)
  config.study.select = (("lp", "lp.train.optimizer.lr", (0.05, 0.5)),)
  config.study.out = os.fspath(tmp_path / "out")
  out = study.study(config, os.fspath(tmp_path))
  assert not (tmp_path / "out" / "RESULTS.md").exists()  # the JSON first, rendered from it:
  results_md.write(out["out"])
  text = (tmp_path / "out" / "RESULTS.md").read_text()
  for needle in (
    "## Verdict",
    "Premise: FT beats LP",
    "| tpgm |",
    "`lp.train.optimizer.lr`",
    "held-out radius grad > 0 (shrink)",
    "lower third",
  ):
    assert needle in text, needle
  saved = json.loads((tmp_path / "out" / "results" / "study.json").read_text())
  assert saved["selection"][0]["chosen"] in (0.05, 0.5)
  assert set(saved["results"]) >= {
    "ft",
    "lp",
    "tpgm",
    "wise_ft_0",
    "wise_ft_0.5",
    "wise_ft_1",
    "tpgm_post_hoc_l2",
  }
  mean, std = saved["results"]["ft"]["test"]
  assert 0 <= mean <= 100 and std >= 0
  assert "### Along tpgm" in text and "FT does not just memorise" in text
  for png in ("id_vs_ood.png", "radii_by_depth.png", "diagnose_ft.png", "diagnose_tpgm.png"):
    assert (tmp_path / "out" / "results" / png).stat().st_size > 10_000, png
  assert out["info"]["seeds"] == 2
  # Every run is new here, so each recorded its time: the two selection runs and every
  # run of both seeds, the chosen lp run (also seed 0's lp run) counted once.
  n = len(plan.run_order(config))
  assert out["info"]["runs_timed"] == out["info"]["runs"] == 2 + 2 * n - 1
  assert out["info"]["runs_min"] > 0 and "runs taking" in text and "made before" not in text
  assert "Along ft: the held-out radius gradient asks to shrink in" in text
  assert "tpgm ends at" in text


def test_study_aggregate_and_verdict():
  from experiments.analysis import study  # noqa: PLC0415

  seeds = [
    {
      "ft": {"val": 90, "test": 90, "a": 40},
      "lp": {"val": 80, "test": 80, "a": 60},
      "tpgm": {"val": 90, "test": 89.5, "a": 50},
      "wise_ft_0": {"val": 80, "test": 80, "a": 60},
      "wise_ft_1": {"val": 90, "test": 90, "a": 40},
    },
    {
      "ft": {"val": 92, "test": 92, "a": 42},
      "lp": {"val": 80, "test": 80, "a": 62},
      "tpgm": {"val": 90, "test": 91.5, "a": 50},
      "wise_ft_0": {"val": 80, "test": 80, "a": 62},
      "wise_ft_1": {"val": 92, "test": 92, "a": 42},
    },
  ]
  agg = study.aggregate(seeds, ["a"])
  assert agg["ft"]["test"] == (91.0, 1.0) and agg["ft"]["ood_mean"] == (41.0, 1.0)
  lines = study.verdict(agg, ["tpgm"])
  assert lines[0].startswith("Premise: FT beats LP in-distribution by +11.0 points and loses 20.0")
  # tpgm: ID 90.5 >= 91 - 1 and OOD 50 >= 1.15 * 41 = 47.15;
  # WiSE-FT (80, 61) .. (91, 41) at 90.5: 41.9.
  assert "reached" in lines[1] and "NOT" not in lines[1]
  assert "has OOD 41.9: tpgm lies on or above it (+8.1)" in lines[1]
