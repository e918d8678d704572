"""Rendering the write-ups from their JSON alone: the committed study re-renders exactly."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from experiments.analysis import mechanism, regimes, report, results_md, study

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
STUDY_JSON = os.path.join(ROOT, "results", "study.json")
RESULTS_MD = os.path.join(ROOT, "RESULTS.md")


def _committed():
  with open(STUDY_JSON, encoding="utf-8") as f:
    return json.load(f)


def _committed_md() -> bytes:
  with open(RESULTS_MD, "rb") as f:
    return f.read()


#: The committed JSON files RESULTS.md is rendered from (results_md.write); those present.
RESULT_JSONS = [
  f
  for f in ("study.json", "regimes.json", "regimes_meta.json", "mechanism.json")
  if os.path.exists(os.path.join(ROOT, "results", f))
] + sorted(
  f for f in os.listdir(os.path.join(ROOT, "results")) if re.fullmatch(r"mechanism_.+\.json", f)
)


def _copy(tmp_path):
  """An output directory holding only copies of the committed result JSON files."""
  (tmp_path / "results").mkdir()
  for f in RESULT_JSONS:
    shutil.copy(os.path.join(ROOT, "results", f), tmp_path / "results" / f)
  return tmp_path


def _sections():
  sections = []
  loaded = regimes.load(ROOT)
  if loaded is not None and loaded[0]:
    sections.append(regimes.render(*loaded, run_cmd=regimes.RUN_COMMAND))
  trace = mechanism.load(ROOT)
  if trace is not None:
    sections += [mechanism.render(t) for t in [trace, *mechanism.load_variants(ROOT)]]
  return sections


def test_committed_jsons_render_the_committed_results_md():
  assert study.render(_committed(), _sections()).encode("utf-8") == _committed_md()


def test_render_results_writes_results_md_and_the_figures_the_json_holds(tmp_path):
  out = results_md.write(_copy(tmp_path))
  assert (tmp_path / "RESULTS.md").read_bytes() == _committed_md()
  names = sorted(os.path.basename(p) for p in out["figures"])
  extra = [f[: -len(".json")] + ".png" for f in RESULT_JSONS if f.startswith("mechanism")]
  if "regimes.json" in RESULT_JSONS:
    benchmarks = {r["benchmark"] for r in regimes.load(ROOT)[0]}
    extra += [f"regimes_{b}{kind}.png" for b in benchmarks for kind in ("", "_id_vs_ood")]
  assert names == sorted(["diagnose_ft.png", "diagnose_tpgm.png", "id_vs_ood.png", *extra])
  for name in names:
    assert (tmp_path / "results" / name).stat().st_size > 10_000, name
  # The committed study.json predates the per-layer summaries: that figure is skipped.
  assert len(out["skipped"]) == 1 and "radii_by_depth.png" in out["skipped"][0]
  assert not (tmp_path / "results" / "radii_by_depth.png").exists()


def test_render_figures_draws_the_depth_figure_from_the_layers(tmp_path):
  data = _committed()
  paths = data["depth"]["tpgm"]["paths"]
  n = len(paths)
  data["layers"] = {
    "ft": {"paths": paths, "distance": [1.0] * n, "radius": None},
    "tpgm": {"paths": paths, "distance": [0.1] * n, "radius": [0.2] * n},
  }
  data["diagnose"] = {}
  written, skipped = study.render_figures(data, tmp_path)
  assert skipped == []
  assert sorted(os.path.basename(p) for p in written) == ["id_vs_ood.png", "radii_by_depth.png"]
  assert (tmp_path / "results" / "radii_by_depth.png").stat().st_size > 10_000


def test_render_needs_the_config_values():
  data = _committed()
  del data["config"]
  with pytest.raises(ValueError, match="no 'config' entry"):
    study.render(data)


def test_study_data_round_trips_through_json():
  data = _committed()
  agg = {r: {k: tuple(v) for k, v in accs.items()} for r, accs in data["results"].items()}

  class Config(dict):  # the three config values study_data reads
    __getattr__ = dict.__getitem__

  config = Config(
    study=Config(select_seed=0, seeds=(0, 1, 2)), wise_ft=Config(base="lp", source="lp_ft")
  )
  again = study.study_data(
    config, agg, data["ood"], data["selection"], data["diagnose"], data["depth"], None, data["info"]
  )
  again = json.loads(json.dumps(again))
  assert again.pop("layers") is None
  assert again == data


def test_report_renders_results_md_from_results_json(tmp_path):
  results = {
    "ft": {"val": 90.0, "test": 88.0, "a": 60.0, "b": 70.0},
    "lp": {"val": 80.0, "test": 81.0, "a": 80.0, "b": 90.0},
  }
  paths = report.write(tmp_path, results, ["a", "b"], info={"wall_s": 1.0}, notes=["A note."])
  saved = json.loads(paths["json"].read_text())
  assert saved["results"]["ft"]["ood_mean"] == 65.0 and saved["notes"] == ["A note."]
  text = paths["markdown"].read_text()
  assert text == report.render(saved)
  assert text.splitlines()[:3] == [
    "| method | val (ID) | ID test | a | b | OOD mean |",
    "|---|---:|---:|---:|---:|---:|",
    "| ft | 90.0 | 88.0 | 60.0 | 70.0 | 65.0 |",
  ]
  assert text.endswith("A note.\n") and "plot" not in paths  # no radii: no figure


@pytest.mark.slow
def test_render_only_on_the_command_line(tmp_path):
  out = _copy(tmp_path)
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.study",
      "--config=experiments/configs/study.py",
      f"--config.study.out={out}",
      "--config.study.render_only=True",
      f"--workdir={tmp_path / 'unused'}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr
  assert (out / "RESULTS.md").read_bytes() == _committed_md()
  assert "# Results of the robust fine-tuning study" in proc.stdout
  assert "radii_by_depth.png not drawn" in proc.stdout
  assert not (tmp_path / "unused").exists()  # nothing was run
