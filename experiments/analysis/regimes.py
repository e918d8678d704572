"""The regime map: where each method helps, cell by cell.

``python -m experiments.regimes --config experiments/configs/regimes.py [--workdir runs]
[--config.regimes.run='("shapes_scarce",)'] [--config.regimes.out=.]`` runs, for every cell
of ``regimes.run`` (default: all of ``regimes.cells``, in :func:`ordered_cells` order), in
``<workdir>/<config.name>/``:

1. **selection, per cell** (seed ``regimes.select_seed``): every ``(method, field, values)``
   entry of ``regimes.select``, in order, picked on the cell's ID val split
   (:func:`experiments.analysis.study.select`): the same grids and the same protocol for
   every method in every cell;
2. **the runs**: every method of ``config.methods`` for every seed of ``regimes.seeds`` with
   the cell's choices;

and writes the cell's summary ``<workdir>/<config.name>/cells/<cell>.json`` (tied to a hash
of the cell's config: a cell whose config changed is run again, never mixed). Then, from
every finished cell, ``<out>/results/regimes.json`` (:func:`records`: one record per run,
the format users read), ``<out>/results/regimes_meta.json`` (the grids, the premise checks,
the run times), the figures ``<out>/results/regimes_<benchmark>.png`` and the section of
``RESULTS.md`` (:func:`render`). A cell is a benchmark (a list of config fields,
``regimes.benchmarks``) with a fine-tuning set size (``data.train_size``, 0: all) and a
number of steps. Every run is cached by its hash (:mod:`experiments.runner`), so an
interrupted map resumes, and cells share the runs they have in common; every finished run's
results are also copied to the run store ``regimes.store`` (default
``<out>/results/regimes_runs``, a few kB per run), so that the map resumes from them in
another workdir or a fresh clone: with ``--config.regimes.out=.`` it reuses every run
committed in ``results/regimes_runs``.
``--config.regimes.render_only=True`` only re-renders from ``results/regimes*.json``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from ml_collections import ConfigDict

from experiments import environment, runner
from experiments.analysis import plots, report, tables
from experiments.analysis import study as study_lib
from experiments.data import sources
from experiments.plan import ConfigError, config_hash, make_plan, with_fields

OOD_MEAN = report.OOD_MEAN
#: The verdict's thresholds (the paper's promise, as the study states it).
OOD_FACTOR, ID_SLACK, PREMISE = 1.15, 1.0, 5.0


def cell_config(config: ConfigDict, cell: str) -> ConfigDict:
  """``config`` with the fields of ``cell``'s benchmark, its ``data.train_size`` and its
  ``train.steps`` set (an unknown cell, benchmark or field is a :class:`ConfigError`)."""
  cells = config.regimes.cells
  if cell not in cells:
    raise ConfigError(f"regimes: unknown cell {cell!r}; cells: {sorted(cells)}")
  spec = cells[cell]
  if spec.benchmark not in config.regimes.benchmarks:
    raise ConfigError(
      f"regimes.cells.{cell}.benchmark={spec.benchmark!r} is not in regimes.benchmarks "
      f"({sorted(config.regimes.benchmarks)})"
    )
  fields = dict(config.regimes.benchmarks[spec.benchmark])
  fields.update({"data.train_size": spec.train_size, "train.steps": spec.steps})
  return with_fields(config, **fields)


def _train_records(env: environment.Environment) -> int:
  """The number of fine-tuning records of the environment's task (its ``train`` slice)."""
  task = env.task
  return len(sources.open_data_source(task.train, env.data_dir, builtin_config=task.builtin_config))


def _method_of(row: str) -> str:
  """The method (config section) a result row comes from: ``wise_ft_0.5`` -> ``wise_ft``."""
  return re.sub(r"_\d+(\.\d+)?$", "", row) if row.startswith("wise_ft_") else row


def _selected(row: str, selection: Sequence[Mapping[str, Any]], plan) -> dict[str, Any]:
  """The values picked on val that ``row``'s run used: its method's own entries, and the
  shared fine-tuning learning rate when its train config does not set its own."""
  method = _method_of(row)
  out = {s["key"]: s["chosen"] for s in selection if s["method"] == method}
  if method in plan.names:
    spec = plan[method]
    own = ((spec.section.get("train") or {}).get("optimizer") or {}).get("lr")
    if spec.method.trained and own is None:
      shared = [s for s in selection if s["key"] == "train.optimizer.lr"]
      if shared:
        out["train.optimizer.lr"] = shared[-1]["chosen"]
  return out


class NotFinished(Exception):  # noqa: N818 (a state, not an error)
  """A run the cell needs has not finished (raised by :func:`run_cell` with ``partial``)."""


def store_dir(config: ConfigDict, workdir: str) -> epath.Path:
  """The map's run store (:mod:`experiments.runner`): ``regimes.store``, by default
  ``<out>/results/regimes_runs`` (committed with the results when ``out`` is the repo)."""
  out = config.regimes.out or f"{workdir}/{config.name}"
  return epath.Path(config.regimes.store or f"{out}/results/regimes_runs")


def _reuse_only(env, plan, store):
  """:func:`experiments.runner.execute` on runs that finished already; else NotFinished."""
  if any(runner.cached_results(s, store) is None for s in plan):
    raise NotFinished
  return runner.execute(env, plan, store=store)


def run_cell(config: ConfigDict, cell: str, workdir: str, *, partial: bool = False) -> dict:
  """Selects, runs and summarises one cell (see the module docstring); the cell's dict
  (also written to ``<workdir>/<config.name>/cells/<cell>.json``).

  With ``partial``, nothing is run: the summary holds what has finished so far (the
  selection entries whose every value finished, then the seeds whose every run finished),
  ``"complete": False`` if anything is missing; it is written to ``cells/<cell>.partial.json``
  and never replaces a complete summary.
  """
  cfg = cell_config(config, cell)
  spec = config.regimes.cells[cell]
  settings = config.regimes
  env = environment.setup(make_plan(cfg, workdir, device_count=jax.device_count()))
  t0 = time.perf_counter()
  seconds: dict[str, float | None] = {}
  execute = functools.partial(
    _reuse_only if partial else runner.execute, store=store_dir(config, workdir)
  )
  size, ood = _train_records(env), list(env.task.ood)
  recs, selection, complete = [], [], True
  try:
    for entry in settings.select:  # one entry at a time, so a partial summary keeps the done
      chosen, found = study_lib.select(
        with_fields(cfg, **{s["key"]: s["chosen"] for s in selection}),
        env,
        seconds,
        grid=(entry,),
        seed=settings.select_seed,
        execute=execute,
      )
      selection += found
  except NotFinished:
    complete = False
  chosen = with_fields(cfg, **{s["key"]: s["chosen"] for s in selection})
  pending = {e[0] for e in settings.select[len(selection) :]}  # methods not selected yet
  seeds = settings.seeds if complete else (settings.select_seed,)
  # In full, one plan per seed; partial, one plan per method and seed (what finished).
  groups = (
    [(seed, None) for seed in seeds]
    if not partial
    else [(seed, (m,)) for seed in seeds for m in cfg.methods if m not in pending]
  )
  for seed, names in groups:
    fields = {"seed": seed} if names is None else {"seed": seed, "methods": names}
    plan = make_plan(with_fields(chosen, **fields), workdir, device_count=jax.device_count())
    try:
      outcome = execute(env, plan)
    except NotFinished:
      complete = False
      continue
    seconds.update(study_lib._seconds(plan))
    for row, accs in outcome.results.items():
      if names is not None and _method_of(row) not in names:
        continue  # a dependency's row: recorded under its own method
      recs.append(
        {
          "benchmark": spec.benchmark,
          "cell": cell,
          "train_size": size,
          "steps": spec.steps,
          "method": row,
          "seed": seed,
          "id": accs["test"],
          "val": accs["val"],
          "ood_mean": float(np.mean([accs[d] for d in ood])),
          "ood": {d: accs[d] for d in ood},
          "selected": _selected(row, selection, plan),
        }
      )
  timed = [s for s in seconds.values() if s is not None]
  out = {
    "cell": cell,
    "complete": complete,
    "hash": cell_hash(config, cell),
    "benchmark": spec.benchmark,
    "train_size": size,
    "steps": spec.steps,
    "id": str(env.task.test),
    "ood": ood,
    "selection": selection,
    "records": recs,
    "runs": len(seconds),
    "runs_min": sum(timed) / 60,
    "wall_min": (time.perf_counter() - t0) / 60,
    "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), "
    f"{jax.device_count()} {jax.default_backend()} device(s)",
  }
  if jax.process_index() == 0:
    path = _cell_path(config, workdir, cell, partial=not complete)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
  return out


def cell_hash(config: ConfigDict, cell: str) -> str:
  """A hash of everything a cell's result depends on (its config, grids and seeds)."""
  settings = config.regimes
  cfg = cell_config(config, cell).to_dict()
  for key in ("regimes", "study", "mechanism"):  # settings of the write-ups, not of the runs
    cfg.pop(key, None)
  return config_hash(
    {
      "config": cfg,
      "select": [list(map(str, e[:2])) + [list(e[2])] for e in settings.select],
      "seeds": list(settings.seeds),
      "select_seed": settings.select_seed,
    }
  )


def _cell_path(config: ConfigDict, workdir: str, cell: str, partial=False) -> epath.Path:
  suffix = ".partial.json" if partial else ".json"
  return epath.Path(workdir) / config.name / "cells" / f"{cell}{suffix}"


def ordered_cells(config: ConfigDict) -> list[str]:
  """The cells of ``regimes.cells`` by benchmark, then training-set size (0, all, is the
  largest), then steps: the order they run in by default and are reported in (a
  ``ConfigDict`` keeps its keys sorted by name, so the config's own order is not kept)."""
  cells = config.regimes.cells

  def key(name):
    spec = cells[name]
    return (spec.benchmark, spec.train_size or float("inf"), spec.steps, name)

  return sorted(cells, key=key)


def finished_cells(config: ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """The summaries of the cells of ``config`` that finished with the current config (in
  :func:`ordered_cells` order; a summary of an older config is left out, with a warning); a
  partial summary (:func:`run_cell` with ``partial``) with at least one finished run stands in
  for a cell not finished."""
  out = []
  for cell in ordered_cells(config):
    want = cell_hash(config, cell)
    for partial in (False, True):
      path = _cell_path(config, workdir, cell, partial=partial)
      data = json.loads(path.read_text()) if path.exists() else None
      if data is not None and data.get("hash") == want:
        if data.get("runs", 1):  # a partial summary of nothing is no result
          out.append(data)
        break
      if data is not None:
        logging.warning("regimes: %s was made with another config; run the cell again", path)
  return out


def records(cells: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """``results/regimes.json``: one record per run, ``{"benchmark", "cell", "train_size",
  "steps", "method", "seed", "id", "ood_mean", "ood": {domain: acc}, "selected": {field:
  value}}`` (accuracy in %; WiSE-FT alphas as methods ``wise_ft_<alpha>``)."""
  keys = ("benchmark", "cell", "train_size", "steps", "method", "seed", "id", "ood_mean")
  return [
    {**{k: r[k] for k in keys}, "ood": r["ood"], "selected": r["selected"]}
    for c in cells
    for r in c["records"]
  ]


def meta(cells: Sequence[Mapping[str, Any]], config: ConfigDict) -> dict[str, Any]:
  """``results/regimes_meta.json``: per cell its grids (scores and choices), its val
  accuracies, ID / OOD splits, run counts and times; the seeds and the thresholds."""
  return {
    "seeds": list(config.regimes.seeds),
    "select_seed": config.regimes.select_seed,
    "cells": {
      c["cell"]: {"complete": c.get("complete", True)}
      | {
        k: c[k]
        for k in (
          "benchmark",
          "train_size",
          "steps",
          "id",
          "ood",
          "selection",
          "runs",
          "runs_min",
          "machine",
        )
      }
      | {"val": {f"{r['method']}/{r['seed']}": r["val"] for r in c["records"]}}
      for c in cells
    },
  }


def aggregate(recs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
  """Cell -> method -> ``{"id", "ood_mean", <domain>...: (mean, std), "d_id", "d_ood":
  (mean, std) of the per-seed difference to FT (same seed), "seeds": n}``."""
  by_cell: dict[str, dict[str, dict[int, Mapping[str, Any]]]] = {}
  for r in recs:
    by_cell.setdefault(r["cell"], {}).setdefault(r["method"], {})[r["seed"]] = r
  out = {}
  for cell, rows in by_cell.items():
    ft = rows.get("ft", {})
    out[cell] = {}
    for method, seeds in rows.items():
      vals = list(seeds.values())

      def ms(xs):
        return (float(np.mean(xs)), float(np.std(xs)))

      row = {"id": ms([r["id"] for r in vals]), OOD_MEAN: ms([r["ood_mean"] for r in vals])}
      for d in vals[0]["ood"]:
        row[d] = ms([r["ood"][d] for r in vals])
      paired = [s for s in seeds if s in ft]
      if paired:
        row["d_id"] = ms([seeds[s]["id"] - ft[s]["id"] for s in paired])
        row["d_ood"] = ms([seeds[s]["ood_mean"] - ft[s]["ood_mean"] for s in paired])
      row["seeds"] = len(vals)
      out[cell][method] = row
  return out


def wise_frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
  """The WiSE-FT curve's Pareto frontier: the ``(id, ood)`` points (means over seeds) that no
  other point beats in both, by increasing ID. Where seed noise is as large as the curve's
  ID range the alphas' points zigzag; the frontier is what mixing the two ends can reach."""
  front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
  return sorted(set(front))


def _wise_ood_at(rows: Mapping[str, Mapping[str, Any]], at_id: float) -> float | None:
  """OOD of the WiSE-FT curve's frontier (:func:`wise_frontier`, linear between points) at ID
  ``at_id``; None outside its ID range."""
  pts = wise_frontier(
    [(rows[n]["id"][0], rows[n][OOD_MEAN][0]) for n in rows if n.startswith("wise_ft_")]
  )
  if len(pts) < 2:
    return None
  ids, oods = np.array(pts).T
  if not ids.min() <= at_id <= ids.max():
    return None
  return float(np.interp(at_id, ids, oods))


def premise(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
  """The benchmark's premise in a cell: FT beats LP in distribution and LP beats FT out of
  distribution, each by >= :data:`PREMISE` points (None without FT and LP)."""
  if "ft" not in rows or "lp" not in rows:
    return None
  gap_id = rows["ft"]["id"][0] - rows["lp"]["id"][0]
  gap_ood = rows["lp"][OOD_MEAN][0] - rows["ft"][OOD_MEAN][0]
  return {"ft_minus_lp_id": gap_id, "lp_minus_ft_ood": gap_ood, "holds": min(gap_id, gap_ood) >= 5}


def verdict(rows: Mapping[str, Mapping[str, Any]], method: str) -> dict[str, Any] | None:
  """Whether ``method`` keeps the paper's promise in a cell: OOD >= 1.15x FT at ID >= FT - 1;
  its place against the WiSE-FT curve and against LP. None if FT or the method is missing."""
  if method not in rows or "ft" not in rows:
    return None
  m, ft = rows[method], rows["ft"]
  out = {
    "id": m["id"][0],
    "ood": m[OOD_MEAN][0],
    "promise": m[OOD_MEAN][0] >= OOD_FACTOR * ft[OOD_MEAN][0]
    and m["id"][0] >= ft["id"][0] - ID_SLACK,
    "ood_ratio": m[OOD_MEAN][0] / max(ft[OOD_MEAN][0], 1e-9),
    "d_id": m["id"][0] - ft["id"][0],
  }
  wise = _wise_ood_at(rows, m["id"][0])
  out["vs_wise"] = None if wise is None else m[OOD_MEAN][0] - wise
  if "lp" in rows:
    out["vs_lp"] = (m["id"][0] - rows["lp"]["id"][0], m[OOD_MEAN][0] - rows["lp"][OOD_MEAN][0])
  return out


def _verdict_line(method: str, v: Mapping[str, Any]) -> str:
  parts = [
    f"{method}: ID {v['d_id']:+.1f} vs FT, OOD x{v['ood_ratio']:.2f} FT's: promise (OOD >= "
    f"{OOD_FACTOR}x FT at ID >= FT - {ID_SLACK:g}) "
    + ("**reached**" if v["promise"] else "not reached")
  ]
  if v["vs_wise"] is None:
    parts.append("its ID lies outside the WiSE-FT curve")
  else:
    where = "on or above" if v["vs_wise"] >= -0.5 else "below"
    parts.append(f"{where} the WiSE-FT curve ({v['vs_wise']:+.1f} OOD at its ID)")
  if "vs_lp" in v:
    d_id, d_ood = v["vs_lp"]
    above = "above" if d_id > 0 and d_ood > 0 else "not above"
    parts.append(f"{above} LP (ID {d_id:+.1f}, OOD {d_ood:+.1f})")
  return "; ".join(parts) + "."


def _tpgm_rows(rows: Mapping[str, Any]) -> list[str]:
  return [r for r in rows if r.startswith("tpgm") or r == "mars_pgm"]


def _order(rows: Mapping[str, Any]) -> list[str]:
  wise = sorted((r for r in rows if r.startswith("wise_ft_")), key=lambda r: float(r[8:]))
  return [r for r in rows if not r.startswith("wise_ft_")] + wise


def _summary_table(agg, cells: Sequence[Mapping[str, Any]]) -> str:
  names = [c["cell"] for c in cells]
  methods = []
  for c in names:
    methods += [m for m in _order(agg[c]) if m not in methods]

  def entry(cell, m):
    row = agg[cell].get(m)
    if row is None or "d_id" not in row:
      return "-"
    return f"{row['d_id'][0]:+.1f} / {row['d_ood'][0]:+.1f}"

  return tables.markdown_table(
    ["method", *names],
    [[m, *(entry(c, m) for c in names)] for m in methods if m != "ft"],
    align="l" + "r" * len(names),
  )


def _cell_table(rows, ood: Sequence[str]) -> str:
  return tables.markdown_table(
    ["method", "ID test", *ood, "OOD mean", "ID - FT", "OOD - FT", "seeds"],
    [
      [
        m,
        tables.mean_std(rows[m]["id"]),
        *(tables.mean_std(rows[m][d]) for d in ood),
        tables.mean_std(rows[m][OOD_MEAN]),
        tables.mean_std(rows[m]["d_id"]) if "d_id" in rows[m] else "-",
        tables.mean_std(rows[m]["d_ood"]) if "d_ood" in rows[m] else "-",
        rows[m]["seeds"],
      ]
      for m in _order(rows)
    ],
    align="l" + "r" * (len(ood) + 5),
  )


def _grid_table(selection: Sequence[Mapping[str, Any]]) -> str:
  return tables.markdown_table(
    ["method", "field", "val accuracy per value", "chosen"],
    [
      [
        s["method"],
        f"`{s['key']}`",
        ", ".join(f"{v}: {a:.1f}" for v, a in s["scores"].items()),
        s["chosen"],
      ]
      for s in selection
    ],
    align="lllr",
  )


def render(recs: Sequence[Mapping[str, Any]], meta_data: Mapping[str, Any], run_cmd: str) -> str:
  """The "Where each method helps" section of RESULTS.md from ``regimes.json`` and
  ``regimes_meta.json`` (as read back)."""
  agg = aggregate(recs)
  cells_meta = meta_data["cells"]
  cells = [dict(cell=c, **m) for c, m in cells_meta.items()]
  for c in cells:
    agg.setdefault(c["cell"], {})
  total = sum(c["runs_min"] for c in cells)
  runs = sum(c["runs"] for c in cells)
  benchmarks = list(dict.fromkeys(c["benchmark"] for c in cells))
  lines = [
    "## Where each method helps (the regime map)",
    "",
    f"Generated by `{run_cmd}`: {len(cells)} cell{'s' * (len(cells) != 1)}, {runs} runs "
    f"taking {total:.0f} min "
    f"together (as recorded when each was made; {cells[0]['machine'] if cells else ''}). "
    "A cell is a benchmark, a fine-tuning set size and a number of steps. In every cell "
    "every method's own hyper-parameters were picked on that cell's ID val split with seed "
    f"{meta_data['select_seed']} (the same grids for every cell, below), then every method runs "
    f"with seeds {', '.join(map(str, meta_data['seeds']))}. Accuracy in %, mean ± std over "
    "seeds; gains vs FT are the mean ± std of the per-seed differences (same seed). Every "
    "record is in `results/regimes.json`. A run is bit-identical when repeated on one machine "
    "but not across machines (XLA:CPU's floating point differs between CPUs): read the seed "
    "spread as the yardstick of a difference. Run one cell: "
    f"`{run_cmd} --config.regimes.run='(\"CELL\",)'`.",
    "",
    "ID / OOD-mean gain vs FT, per cell (points):",
    "",
    _summary_table(agg, cells),
    "",
  ]
  for b in benchmarks:
    lines += [f"![ID vs OOD per cell on {b}](results/regimes_{b}_id_vs_ood.png)", ""]
    lines += [f"![gains vs FT on {b}](results/regimes_{b}.png)", ""]
  for c in cells:
    rows = agg[c["cell"]]
    p = premise(rows)
    lines += [
      f"### {c['cell']}: {c['benchmark']}, {c['train_size']} training images, {c['steps']} steps",
      "",
    ]
    if not c.get("complete", True):
      lines += [
        f"**Partial** ({c['runs']} runs finished so far; the map resumes from them): the "
        "selection grids finished so far"
        + (
          ", and the seeds listed in the table."
          if rows
          else "; no method has run with every seed yet."
        ),
        "",
      ]
    if p is not None:
      lines.append(
        f"- Premise: FT - LP = {p['ft_minus_lp_id']:+.1f} ID, LP - FT = "
        f"{p['lp_minus_ft_ood']:+.1f} OOD mean (both required >= {PREMISE:g}): "
        f"{'holds' if p['holds'] else '**fails**: a robust method has little to keep here'}."
      )
    for m in _tpgm_rows(rows):
      v = verdict(rows, m)
      if v is not None:
        lines.append(f"- {_verdict_line(m, v)}")
    lines += [
      "",
      f"ID = {c['id']}; OOD = {', '.join(c['ood'])}.",
      "",
      _cell_table(rows, c["ood"]),
      "",
      "<details><summary>Selection grids (val accuracy, seed "
      f"{meta_data['select_seed']})</summary>",
      "",
      _grid_table(c["selection"]),
      "",
      "</details>",
      "",
    ]
  return "\n".join(lines)


def render_figures(recs: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike) -> list:
  """Two figures per benchmark: ``<out_dir>/results/regimes_<benchmark>.png``, ID and OOD gain
  vs FT per method, per cell (mean ± std of the per-seed differences), and
  ``regimes_<benchmark>_id_vs_ood.png``, a panel per cell: every method's ID vs OOD mean
  accuracy with the WiSE-FT curve and TPGM's promise (:func:`plots.id_vs_ood_cells`)."""
  agg = aggregate(recs)
  figs = epath.Path(out_dir) / "results"
  figs.mkdir(parents=True, exist_ok=True)
  by_bench: dict[str, list[str]] = {}
  for r in recs:
    cells = by_bench.setdefault(r["benchmark"], [])
    if r["cell"] not in cells:
      cells.append(r["cell"])
  written = []
  for bench, cells in by_bench.items():
    gains = {
      c: {
        m: {"id": row["d_id"], "ood": row["d_ood"]}
        for m, row in agg[c].items()
        if "d_id" in row and m != "ft"
      }
      for c in cells
    }
    written.append(plots.gains_vs_ft(figs / f"regimes_{bench}.png", gains, title=bench))
    written.append(
      plots.id_vs_ood_cells(
        figs / f"regimes_{bench}_id_vs_ood.png",
        {_cell_title(recs, c): _id_vs_ood_panel(agg[c]) for c in cells},
        title=f"{bench}: ID vs OOD mean per cell (mean +- std over seeds)",
      )
    )
  return written


def _cell_title(recs: Sequence[Mapping[str, Any]], cell: str) -> str:
  r = next(r for r in recs if r["cell"] == cell)
  return f"{cell}: {r['train_size']} images, {r['steps']} steps"


def _id_vs_ood_panel(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """One cell's :func:`plots.id_vs_ood` arguments: every method but the WiSE-FT alphas as a
  point, the alphas as the curve, FT's point as the promise's corner."""
  curve = sorted(
    (float(m[len("wise_ft_") :]), row["id"][0], row[OOD_MEAN][0])
    for m, row in rows.items()
    if m.startswith("wise_ft_")
  )
  points = {
    m: {"id": rows[m]["id"], "ood": rows[m][OOD_MEAN]}
    for m in _order(rows)
    if not m.startswith("wise_ft_")
  }
  ft = rows.get("ft")
  promise = (ft["id"][0], ft[OOD_MEAN][0]) if ft else None
  return {"points": points, "curve": curve, "promise": promise, "highlight": ("tpgm",)}


RUN_COMMAND = "python -m experiments.regimes --config experiments/configs/regimes.py"


def collect(config: ConfigDict, workdir: str, out_dir: str | os.PathLike) -> epath.Path:
  """Writes ``<out_dir>/results/regimes.json`` and ``regimes_meta.json`` from the finished
  cells (those files' records of other cells are kept, and of a cell finished here only in
  part if they hold more of its runs: nothing finished is lost); returns
  ``<out_dir>`` (render with :func:`experiments.analysis.results_md.write`)."""
  cells = finished_cells(config, workdir)
  out = epath.Path(out_dir)
  (out / "results").mkdir(parents=True, exist_ok=True)
  previous = load(out)
  if previous is not None:
    # A partial cell here does not replace more records of it made elsewhere (another
    # workdir): nothing finished is lost; it replaces them once it holds as many.
    had = Counter(r["cell"] for r in previous[0])
    kept_back = [
      c["cell"] for c in cells if not c.get("complete", True) and len(c["records"]) < had[c["cell"]]
    ]
    for cell in kept_back:
      logging.info("regimes: %s kept as recorded (%d runs there)", cell, had[cell])
    cells = [c for c in cells if c["cell"] not in kept_back]
  recs, info = records(cells), meta(cells, config)
  done = set(info["cells"])
  if previous is not None:  # cells finished elsewhere (another workdir) are kept
    recs = [r for r in previous[0] if r["cell"] not in done] + recs
    kept = {c: m for c, m in previous[1]["cells"].items() if c not in done}
    info["cells"] = {**kept, **info["cells"]}
  order = {c: i for i, c in enumerate(ordered_cells(config))}
  info["cells"] = dict(sorted(info["cells"].items(), key=lambda kv: order.get(kv[0], len(order))))
  recs.sort(key=lambda r: order.get(r["cell"], len(order)))
  (out / "results" / "regimes.json").write_text(json.dumps(recs, indent=1))
  (out / "results" / "regimes_meta.json").write_text(json.dumps(info, indent=1))
  return out


def load(out_dir: str | os.PathLike) -> tuple[list, dict] | None:
  """``(records, meta)`` from ``<out_dir>/results/regimes*.json``; None if absent."""
  res = epath.Path(out_dir) / "results"
  if not (res / "regimes.json").exists():
    return None
  return (
    json.loads((res / "regimes.json").read_text()),
    json.loads((res / "regimes_meta.json").read_text()),
  )


def regime_map(config: ConfigDict, workdir: str) -> epath.Path:
  """Runs the cells of ``regimes.run`` (all by default), then :func:`collect`."""
  todo = list(config.regimes.run) or ordered_cells(config)
  for cell in todo:
    cell_config(config, cell)  # every name checked before anything runs
  for cell in todo:
    logging.info("regimes: cell %s", cell)
    run_cell(config, cell, workdir, partial=config.regimes.partial)
  return collect(config, workdir, config.regimes.out or f"{workdir}/{config.name}")
