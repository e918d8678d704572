"""The regime map on the tiny benchmark: per-cell selection, records, resumption, rendering."""

from __future__ import annotations

import json
import os

import pytest

from experiments import plan
from experiments.analysis import regimes, results_md
from experiments.configs import regimes as regimes_config

KEYS = {
  "benchmark",
  "cell",
  "train_size",
  "steps",
  "method",
  "seed",
  "id",
  "ood_mean",
  "ood",
  "selected",
}


def _config(tiny_config, tmp_path):
  config = regimes_config.get_config()
  for key in ("data", "model", "pretrain", "train", "tpgm_post_hoc", "shard_min_size"):
    config[key] = tiny_config[key]
  config.tpgm.proj_freq = 2
  # What the map's selection, records and resumption are checked on does not depend on the
  # learning-rate schedule or the checkpoints kept: with a constant rate, a train step does
  # not depend on a cell's number of steps, so the second cell's runs reuse the first's
  # compilations; one checkpoint per run (the last) is enough.
  config.train.optimizer.schedule = "constant"
  config.train.checkpoint_every = 4
  config.methods = ("ft", "lp", "tpgm")
  config.regimes.seeds = (0, 1)
  config.regimes.cells = {
    "small": {"benchmark": "shapes", "train_size": 16, "steps": 4},
    "all": {"benchmark": "shapes", "train_size": 0, "steps": 2},
  }
  config.regimes.select = (
    ("ft", "train.optimizer.lr", (0.01, 0.1)),
    ("tpgm", "tpgm.lr", (0.01, 0.1)),
  )
  config.regimes.out = os.fspath(tmp_path / "out")
  return config


def test_cell_config_sets_size_and_steps_and_rejects_unknown_names(tiny_config, tmp_path):
  config = _config(tiny_config, tmp_path)
  cell = regimes.cell_config(config, "small")
  assert (cell.data.train_size, cell.train.steps) == (16, 4)
  # Cells run and are reported by benchmark, size (0 = all, the largest), steps; not by name.
  assert regimes.ordered_cells(config) == ["small", "all"]
  assert plan.get_task(cell).train.split == "real_train[:16]"
  with pytest.raises(plan.ConfigError, match="unknown cell 'nope'"):
    regimes.cell_config(config, "nope")
  config.regimes.cells.small.benchmark = "other"
  with pytest.raises(plan.ConfigError, match="benchmark='other' is not in regimes.benchmarks"):
    regimes.cell_config(config, "small")
  assert regimes.cell_hash(config, "all") != regimes.cell_hash(
    _config(tiny_config, tmp_path), "small"
  )


def test_regime_map_selects_per_cell_records_every_run_and_resumes(tiny_config, tmp_path):
  config = _config(tiny_config, tmp_path)
  out = regimes.regime_map(config, os.fspath(tmp_path))
  recs = json.loads((out / "results" / "regimes.json").read_text())
  assert all(set(r) == KEYS for r in recs)
  rows = {"ft", "lp", "tpgm"}
  for cell, size, steps in (("small", 16, 4), ("all", 40, 2)):
    mine = [r for r in recs if r["cell"] == cell]
    assert {(r["method"], r["seed"]) for r in mine} == {(m, s) for m in rows for s in (0, 1)}
    assert {(r["train_size"], r["steps"], r["benchmark"]) for r in mine} == {
      (size, steps, "shapes")
    }
    for r in mine:
      assert 0 <= r["id"] <= 100 and set(r["ood"]) == {"sketch", "painting", "clipart"}
      assert r["ood_mean"] == pytest.approx(sum(r["ood"].values()) / 3)
  meta = json.loads((out / "results" / "regimes_meta.json").read_text())
  for cell in ("small", "all"):
    grid = meta["cells"][cell]["selection"]
    assert [(g["method"], g["key"]) for g in grid] == [
      ("ft", "train.optimizer.lr"),
      ("tpgm", "tpgm.lr"),
    ]
    lr = grid[0]["chosen"]
    by = {(r["method"], r["seed"]): r for r in recs if r["cell"] == cell}
    # Each method records what it used: FT its lr; TPGM its radius lr and its own training
    # lr is in its section (not the shared one); LP its own lr (not selected here).
    assert by["ft", 0]["selected"] == {"train.optimizer.lr": lr}
    assert by["tpgm", 1]["selected"] == {"tpgm.lr": grid[1]["chosen"]}
    assert by["lp", 0]["selected"] == {}
    # The val accuracy the selection saw is seed 0's run with the chosen value.
    assert meta["cells"][cell]["val"]["ft/0"] == grid[0]["scores"][str(lr)]
  # Resuming runs nothing: every run directory is reused (no new directory appears).
  before = sorted(os.listdir(tmp_path / "regimes"))
  again = regimes.run_cell(config, "small", os.fspath(tmp_path))
  assert sorted(os.listdir(tmp_path / "regimes")) == before
  assert again["records"] == [
    r for r in json.loads((tmp_path / "regimes" / "cells" / "small.json").read_text())["records"]
  ]
  # Every finished run is also in the run store (<out>/results/regimes_runs): a fresh workdir
  # (a fresh clone) with that store trains nothing and records the same.
  assert len(os.listdir(out / "results" / "regimes_runs")) == len(before) - 1  # - cells/
  clone = regimes.run_cell(config, "small", os.fspath(tmp_path / "clone"))
  assert clone["records"] == again["records"]
  assert not list((tmp_path / "clone").rglob("ckpt"))
  # Collecting from another workdir where only "small" finished keeps the other cell's
  # records already in the output (nothing finished is lost) and replaces "small"'s.
  elsewhere = tmp_path / "elsewhere" / "regimes" / "cells"
  elsewhere.mkdir(parents=True)
  (elsewhere / "small.json").write_text((tmp_path / "regimes" / "cells" / "small.json").read_text())
  regimes.collect(config, os.fspath(tmp_path / "elsewhere"), out)
  merged = json.loads((out / "results" / "regimes.json").read_text())
  assert sorted(merged, key=json.dumps) == sorted(recs, key=json.dumps)
  # Partial: nothing runs; what finished is summarised (the selection entries done, then seed
  # 0 of the methods with nothing left to select), into cells/<cell>.partial.json.
  more = _config(tiny_config, tmp_path)
  more.regimes.select = (*config.regimes.select, ("lp", "lp.train.optimizer.lr", (0.011, 0.012)))
  more.regimes.partial = True
  before = sorted(os.listdir(tmp_path / "regimes"))
  part = regimes.run_cell(more, "small", os.fspath(tmp_path), partial=True)
  assert sorted(os.listdir(tmp_path / "regimes")) == before  # nothing was run
  assert not part["complete"] and len(part["selection"]) == 2
  assert {(r["method"], r["seed"]) for r in part["records"]} == {("ft", 0), ("tpgm", 0)}
  assert (tmp_path / "regimes" / "cells" / "small.partial.json").exists()
  # Collected from a workdir holding only that partial summary, it does not replace the more
  # runs of "small" already in the output (a fresh workdir's first runs of a cell recorded
  # elsewhere): the output keeps every record.
  only = tmp_path / "partial_only" / "regimes" / "cells"
  only.mkdir(parents=True)
  partial_text = (tmp_path / "regimes" / "cells" / "small.partial.json").read_text()
  (only / "small.partial.json").write_text(partial_text)
  regimes.collect(more, os.fspath(tmp_path / "partial_only"), out)
  kept = json.loads((out / "results" / "regimes.json").read_text())
  assert sorted(kept, key=json.dumps) == sorted(recs, key=json.dumps)
  assert json.loads((out / "results" / "regimes_meta.json").read_text())["cells"] == meta["cells"]
  # A cell with nothing finished yet is left out of the results, not reported empty.
  more.regimes.cells.unrun = {"benchmark": "shapes", "train_size": 8, "steps": 3}
  assert regimes.run_cell(more, "unrun", os.fspath(tmp_path), partial=True)["records"] == []
  assert [c["cell"] for c in regimes.finished_cells(more, os.fspath(tmp_path))] == ["small"]
  # A cell summary made with another config is not mixed in.
  changed = _config(tiny_config, tmp_path)
  changed.regimes.seeds = (0,)
  assert [c["cell"] for c in regimes.finished_cells(changed, os.fspath(tmp_path))] == []


def test_regime_section_renders_premise_verdict_tables_and_figure(tiny_config, tmp_path):
  recs = []
  for seed in (0, 1, 2):
    for method, i, o in (
      ("ft", 90, 50),
      ("lp", 80, 70),
      ("tpgm", 89.5, 60),
      ("wise_ft_0", 80, 70),
      ("wise_ft_1", 90, 50),
    ):
      recs.append(
        {
          "benchmark": "b",
          "cell": "c1",
          "train_size": 10,
          "steps": 4,
          "method": method,
          "seed": seed,
          "id": i + seed,
          "ood_mean": o,
          "ood": {"x": o},
          "selected": {},
        }
      )
  meta = {
    "seeds": [0, 1, 2],
    "select_seed": 0,
    "cells": {
      "c1": {
        "benchmark": "b",
        "train_size": 10,
        "steps": 4,
        "id": "b:test",
        "ood": ["x"],
        "selection": [
          {"method": "ft", "key": "train.optimizer.lr", "scores": {"0.1": 50.0}, "chosen": 0.1}
        ],
        "runs": 15,
        "runs_min": 3.0,
        "machine": "m",
      }
    },
  }
  agg = regimes.aggregate(recs)
  assert agg["c1"]["tpgm"]["d_id"] == pytest.approx((-0.5, 0.0))
  assert agg["c1"]["tpgm"]["id"] == pytest.approx((90.5, (2 / 3) ** 0.5))
  v = regimes.verdict(agg["c1"], "tpgm")
  # OOD 60 = 1.2 x FT's 50 at ID FT - 0.5: the promise holds; the WiSE-FT line from (81, 70)
  # to (91, 50) has OOD 51 at ID 90.5: TPGM is 9 points above it; vs LP +9.5 ID, -10 OOD.
  assert v["promise"] and v["ood_ratio"] == pytest.approx(1.2)
  assert v["vs_wise"] == pytest.approx(60 - 51)
  assert v["vs_lp"] == pytest.approx((9.5, -10))
  assert regimes.premise(agg["c1"]) == {"ft_minus_lp_id": 10, "lp_minus_ft_ood": 20, "holds": True}
  text = regimes.render(recs, meta, run_cmd="CMD")
  for needle in (
    "## Where each method helps",
    "Premise: FT - LP = +10.0 ID, LP - FT = +20.0 OOD mean",
    "**reached**",
    "on or above the WiSE-FT curve (+9.0 OOD at its ID)",
    "not above LP (ID +9.5, OOD -10.0)",
    "| tpgm | 90.5 ± 0.8 |",
    "`train.optimizer.lr` | 0.1: 50.0 | 0.1",
  ):
    assert needle in text, needle
  written, panels = regimes.render_figures(recs, tmp_path)
  # A zigzag curve (seed noise) is compared by its frontier: (79, 72) and (78.5, 70) are beaten
  # by (80, 74), so at ID 81 the curve is on the line from (80, 74) to (85, 55): 70.2.
  front = regimes.wise_frontier([(78.5, 70), (80, 74), (79, 72), (90, 50), (85, 55)])
  assert front == [(80, 74), (85, 55), (90, 50)]
  zigzag = {f"wise_ft_{i}": {"id": (x, 0), "ood_mean": (y, 0)} for i, (x, y) in enumerate(front)}
  assert regimes._wise_ood_at(
    {**zigzag, "wise_ft_9": {"id": (79, 0), "ood_mean": (72, 0)}}, 81
  ) == (pytest.approx(74 - 19 / 5))
  assert written.name == "regimes_b.png" and os.path.getsize(written) > 10_000
  assert panels.name == "regimes_b_id_vs_ood.png" and os.path.getsize(panels) > 10_000
  panel = regimes._id_vs_ood_panel(agg["c1"])  # the WiSE-FT alphas are the curve, by alpha
  assert [a for a, _, _ in panel["curve"]] == sorted(a for a, _, _ in panel["curve"])
  assert not any(m.startswith("wise_ft_") for m in panel["points"])
  assert panel["promise"] == (agg["c1"]["ft"]["id"][0], agg["c1"]["ft"]["ood_mean"][0])


def test_results_md_puts_the_regime_map_before_the_study(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  (tmp_path / "results").mkdir()
  with open(os.path.join(root, "results", "study.json"), encoding="utf-8") as f:
    (tmp_path / "results" / "study.json").write_text(f.read())
  alone = results_md.write(tmp_path)["path"].read_text()
  assert "Where each method helps" not in alone
  rec = {"benchmark": "b", "cell": "c", "train_size": 1, "steps": 1, "method": "ft", "seed": 0}
  (tmp_path / "results" / "regimes.json").write_text(
    json.dumps([{**rec, "id": 90.0, "ood_mean": 50.0, "ood": {"x": 50.0}, "selected": {}}])
  )
  cell = {"benchmark": "b", "train_size": 1, "steps": 1, "id": "i", "ood": ["x"], "selection": []}
  (tmp_path / "results" / "regimes_meta.json").write_text(
    json.dumps(
      {
        "seeds": [0],
        "select_seed": 0,
        "cells": {"c": {**cell, "runs": 1, "runs_min": 1.0, "machine": "m"}},
      }
    )
  )
  both = results_md.write(tmp_path)["path"].read_text()
  assert both.index("## Where each method helps") < both.index("## The default cell in depth")
  assert both.endswith(alone.split("\n", 2)[2])  # the study's part unchanged after its heading
