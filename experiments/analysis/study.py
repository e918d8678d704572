"""The study: every method x seeds on the benchmark, written up as RESULTS.md with plots.

``python -m experiments.study [--workdir runs] [--config experiments/configs/study.py]
[--config.study.out=DIR]`` runs, in ``<workdir>/<config.name>/``:

1. **selection** (seed ``study.select_seed``): for each ``(method, key, values)`` of
   ``study.select``, in order, the method is trained with every value of the config
   field ``key`` and the value with the best ID val accuracy is kept (later entries
   see the earlier choices);
2. **the runs**: every method of ``config.methods`` for every seed of
   ``study.seeds`` (the pre-trained model is the same for all seeds: seeds vary the
   head initialisation and the data order of fine-tuning);
3. **the radius-signal diagnostic** (:mod:`experiments.analysis.diagnose`) along the runs of
   ``study.diagnose`` (FT and TPGM);

and writes ``<out>/results/study.json`` (:func:`study_data`: every number, and the few
config values the write-up names), then, from that file alone (:func:`render_results`),
``<out>/RESULTS.md`` (:func:`render`: the tables, the premise checks, the verdict) and the
plots ``<out>/results/*.png`` (:func:`render_figures`). Every run is cached in its own
directory (named by a hash of its configuration), so running the command again only redoes
what changed; an interrupted study resumes. ``--config.study.render_only=True`` only
re-renders RESULTS.md and the plots from ``<out>/results/study.json``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath
from ml_collections import ConfigDict

from experiments import environment, runner
from experiments.analysis import diagnose, plots, report, tables
from experiments.environment import Environment
from experiments.plan import Plan, make_plan, run_order, with_fields

OOD_MEAN = report.OOD_MEAN


def _get(config: ConfigDict, key: str) -> Any:
  node = config
  for p in key.split("."):
    node = node[p]
  return node


def _seconds(plan: Plan) -> dict[str, float | None]:
  """Run directory -> the computation time the run recorded in its results.json
  (None: not recorded)."""
  return {
    os.fspath(s.directory): json.loads((s.directory / "results.json").read_text()).get("seconds")
    for s in plan
  }


def _plan(config: ConfigDict, workdir: str) -> Plan:
  return make_plan(config, workdir, device_count=jax.device_count())


def select(
  config: ConfigDict,
  env: Environment,
  seconds: dict[str, float | None] | None = None,
  *,
  grid: Any = None,
  seed: int | None = None,
  execute: Any = runner.execute,
) -> tuple[ConfigDict, list[dict[str, Any]]]:
  """Picks every value of ``grid`` (default ``config.study.select``: ``(method, field,
  values)`` entries, in order; later entries see the earlier choices) on ID val with seed
  ``seed`` (default ``config.study.select_seed``); records each run's computation time in
  ``seconds`` (see :func:`_seconds`). ``execute(env, plan)`` runs a plan (default
  :func:`experiments.runner.execute`).

  Returns:
    ``(config with the chosen values, [{"method", "key", "scores", "chosen", "default"}])``.
  """
  grid = config.study.select if grid is None else grid
  seed = config.study.select_seed if seed is None else seed
  chosen, table = config, []
  seconds = {} if seconds is None else seconds
  for method, key, values in grid:
    scores = {}
    for value in values:
      cfg = with_fields(chosen, seed=seed, methods=(method,), **{key: value})
      plan = _plan(cfg, env.plan.workdir)
      found = execute(env, plan).results
      seconds.update(_seconds(plan))
      scores[value] = found[method]["val"]
    best = max(values, key=lambda v: scores[v])
    table.append(
      {
        "method": method,
        "key": key,
        "scores": {str(v): s for v, s in scores.items()},
        "chosen": best,
        "default": _get(config, key),
      }
    )
    chosen = with_fields(chosen, **{key: best})
    logging.info("select: %s = %s (val %s)", key, best, scores)
  return chosen, table


def aggregate(
  per_seed: list[dict[str, dict[str, float]]], ood: list[str]
) -> dict[str, dict[str, tuple[float, float]]]:
  """Row -> split -> (mean, std over seeds); rows present for every seed."""
  rows = [report.with_ood_mean(r, ood) for r in per_seed]
  names = [n for n in rows[0] if all(n in r for r in rows)]
  return {
    n: {
      k: (float(np.mean([r[n][k] for r in rows])), float(np.std([r[n][k] for r in rows])))
      for k in rows[0][n]
    }
    for n in names
  }


def _wise_curve(agg, prefix="wise_ft_"):
  """WiSE-FT points sorted by alpha: [(alpha, row)] (alpha 0: the base run, 1: the source)."""
  pts = sorted((float(n[len(prefix) :]), n) for n in agg if n.startswith(prefix))
  return pts


def verdict(
  agg: dict[str, dict[str, tuple[float, float]]],
  tpgm_rows: list[str],
  ft_losses: list[tuple[int, float]] | None = None,
) -> list[str]:
  """Sentences answering the study's questions, computed from the means.

  ``ft_losses``: FT's held-out loss along the run, ``[(step, loss)]`` (the diagnostic).
  """
  m = lambda row, key: agg[row][key][0]  # noqa: E731
  out = []
  if "ft" in agg and "lp" in agg:
    line = (
      f"Premise: FT beats LP in-distribution by {m('ft', 'test') - m('lp', 'test'):+.1f} "
      f"points and loses {m('lp', OOD_MEAN) - m('ft', OOD_MEAN):.1f} OOD-mean points to it "
      "(both required >= 5)."
    )
    if ft_losses:
      mid = ft_losses[len(ft_losses) // 2 - 1]
      end = min(ft_losses[len(ft_losses) // 2 :], key=lambda x: x[1])
      line += (
        f" FT does not just memorise: its held-out loss goes from {mid[1]:.3f} at step "
        f"{mid[0]} (mid-run) to {end[1]:.3f} at step {end[0]}, and is "
        f"{ft_losses[-1][1]:.3f} "
        f"at the end."
      )
    out.append(line)
  curve = [(m(r, "test"), m(r, OOD_MEAN)) for _, r in _wise_curve(agg)]
  for row in tpgm_rows:
    if row not in agg or "ft" not in agg:
      continue
    oid, ood = m(row, "test"), m(row, OOD_MEAN)
    target = 1.15 * m("ft", OOD_MEAN)
    ok = ood >= target and oid >= m("ft", "test") - 1
    parts = [
      f"{row}: ID {oid:.1f} vs FT {m('ft', 'test'):.1f}, OOD mean {ood:.1f} vs FT "
      f"{m('ft', OOD_MEAN):.1f} (target >= {target:.1f} at ID >= "
      f"{m('ft', 'test') - 1:.1f}): {'reached' if ok else 'NOT reached'}."
    ]
    if len(curve) >= 2:
      ids, oods = np.array(curve).T
      order = np.argsort(ids)
      if ids.min() <= oid <= ids.max():
        wise = float(np.interp(oid, ids[order], oods[order]))
        parts.append(
          f"The WiSE-FT curve at that ID accuracy has OOD {wise:.1f}: {row} lies "
          f"{'on or above' if ood >= wise - 0.5 else 'below'} it ({ood - wise:+.1f})."
        )
      else:
        parts.append(
          f"Its ID accuracy lies outside the WiSE-FT curve's range "
          f"[{ids.min():.1f}, {ids.max():.1f}]."
        )
    out.append(" ".join(parts))
  others = [
    r for r in agg if r not in ("ft", "lp") and not r.startswith("wise_ft") and r not in tpgm_rows
  ]
  if "ft" in agg:
    for row in others:
      out.append(
        f"{row} vs FT: ID {m(row, 'test') - m('ft', 'test'):+.1f}, OOD mean "
        f"{m(row, OOD_MEAN) - m('ft', OOD_MEAN):+.1f} points."
      )
  return out


def diagnosis(
  diags: dict[str, dict[str, Any]], ratios: dict[str, dict[str, Any]], tpgm_rows: list[str]
) -> list[str]:
  """Sentences on the radius signal (:mod:`experiments.analysis.diagnose`) and on how far the
  TPGM runs moved, computed from the measurements."""
  out = []
  for method, d in diags.items():
    o, k = d["overall"]["all"], d["info"]["batches"]
    halves = [
      d["overall"][h]["shrink_frequency"]
      for h in ("first_half", "second_half")
      if h in d["overall"]
    ]
    out.append(
      f"Along {method}: the held-out radius gradient asks to shrink in "
      f"{100 * o['shrink_frequency']:.0f} % of (tensor, checkpoint) pairs"
      + (
        f" ({', then '.join(f'{100 * x:.0f} %' for x in halves)} over the two halves)"
        if len(halves) == 2
        else ""
      )
      + f"; its median signal-to-noise ratio over {k} held-out batches (|mean| / std) is "
      f"{o['snr_median']:.2f}, so the sign TPGM steps on from one batch is "
      f"{'mostly noise' if o['snr_median'] < 1 else 'mostly consistent'}; training and held-out "
      f"gradients have cosine {o['cos_batch']:.2f} on one batch and {o['cos_mean']:.2f} "
      f"between their {k}-batch means."
    )
  if "ft" in diags and "tpgm" in diags:
    ends = {m: diags[m]["per_step"][-1] for m in ("ft", "tpgm")}
    best = min(diags["ft"]["per_step"], key=lambda r: r["heldout_loss"])
    out.append(
      f"TPGM's own objective, the held-out loss, ends at {ends['tpgm']['heldout_loss']:.3f} "
      f"along tpgm against {ends['ft']['heldout_loss']:.3f} along FT (lowest "
      f"{best['heldout_loss']:.3f}, step {best['step']}): "
      + (
        "the learned radii stop short of where the held-out loss is lowest."
        if ends["tpgm"]["heldout_loss"] > ends["ft"]["heldout_loss"]
        else "the learned radii reach a held-out loss at least as low as FT's."
      )
    )
  for row in tpgm_rows:
    if row in ratios:
      r = ratios[row]
      out.append(
        f"{row} ends at {np.median(r['ratio']):.2f} of FT's distance to the "
        f"pre-trained weights (median over layers; lower third {r['lower']:.2f}, "
        f"upper third {r['upper']:.2f})."
      )
  return out


def _weights(paths: list[str]) -> list[str]:
  """The weight matrices / kernels among ``paths`` (Flax names them ``kernel``; the
  normalisation scales and biases are left out), or every path if none is."""
  kernels = [p for p in paths if p.rsplit("/", 1)[-1] == "kernel"]
  return kernels or list(paths)


def tightness(layers: dict[str, dict[str, Any]], rows: list[str]) -> dict[str, dict[str, Any]]:
  """Per run: each weight tensor's distance to the anchor divided by FT's, in depth
  order, and the mean ratio of the lower and upper third of them (the paper's
  question is about layers: normalisation scales and biases are left out)."""
  out = {}
  ft = dict(zip(layers["ft"]["paths"], layers["ft"]["distance"]))
  for row in rows:
    if row not in layers:
      continue
    dist = dict(zip(layers[row]["paths"], layers[row]["distance"]))
    paths = [p for p in _weights(layers[row]["paths"]) if p in ft]
    ratio = [dist[p] / max(ft[p], 1e-12) for p in paths]
    third = max(len(ratio) // 3, 1)
    out[row] = {
      "paths": paths,
      "ratio": ratio,
      "lower": float(np.mean(ratio[:third])),
      "upper": float(np.mean(ratio[-third:])),
    }
  return out


def config_values(config: ConfigDict) -> dict[str, Any]:
  """The config values the write-up names: the selection seed, the seeds (the first is
  the one of the layer analysis) and WiSE-FT's two end points (None without WiSE-FT)."""
  wise = config.get("wise_ft")
  return {
    "select_seed": config.study.select_seed,
    "seeds": list(config.study.seeds),
    "wise_ft": {"base": wise.base, "source": wise.source} if wise else None,
  }


def study_data(
  config: ConfigDict,
  agg: Mapping[str, Mapping[str, tuple[float, float]]],
  ood: list[str],
  selection: list[dict[str, Any]],
  diags: dict[str, Any],
  ratios: dict[str, dict[str, Any]],
  layers: dict[str, dict[str, Any]] | None,
  info: dict[str, Any],
) -> dict[str, Any]:
  """What ``results/study.json`` holds, and all that :func:`render` and
  :func:`render_figures` read.

  Keys: ``results`` (row -> split -> ``[mean, std]``, :func:`aggregate`), ``ood``,
  ``selection`` (:func:`select`), ``diagnose`` (method -> :func:`diagnose.summarise`'s
  dict), ``depth`` (:func:`tightness`), ``info`` (seeds, run counts and times, machine,
  ID split), ``config`` (:func:`config_values`) and ``layers`` (the first seed's per-layer
  summaries, :func:`runner.layer_summary`).
  """
  return {
    "results": {r: {k: list(v) for k, v in accs.items()} for r, accs in agg.items()},
    "ood": list(ood),
    "selection": selection,
    "diagnose": diags,
    "depth": ratios,
    "info": info,
    "config": config_values(config),
    "layers": layers,
  }


def _run_time(info: dict[str, Any]) -> str:
  missing = info["runs"] - info["runs_timed"]
  if not info["runs_timed"]:
    return f"{info['runs']} runs (made before run times were recorded)"
  return (
    f"{info['runs']} runs taking {info['runs_min']:.0f} min together (as recorded when "
    "each was made"
    + (f"; {missing} made before times were recorded are not counted)" if missing else ")")
  )


def _intro(data: Mapping[str, Any]) -> str:
  info = data["info"]
  return (
    f"Generated by `python -m experiments.study` ({info['seeds']} seeds) on "
    f"{info['machine']}: {_run_time(info)}, and {info['diagnose_min']:.0f} min of diagnostics "
    f"(this invocation's wall time: {info['wall_min']:.0f} min; finished runs are reused). "
    "Accuracy in %, mean ± std over seeds; "
    f"ID = {info['id']}, OOD = {', '.join(data['ood'])}; val (model and hyper-parameter "
    "selection) and held-out (TPGM's radii) are disjoint ID splits. The pre-trained model is "
    "the same for every seed; seeds change the head initialisation and the data order."
  )


def _tpgm_rows(agg: Mapping[str, Any]) -> list[str]:
  return [r for r in agg if r.startswith("tpgm")]


def _selection_table(data: Mapping[str, Any]) -> str:
  seed = data["config"]["select_seed"]
  return tables.markdown_table(
    ["method", "field", f"val accuracy per value (seed {seed})", "chosen"],
    [
      [
        s["method"],
        f"`{s['key']}`",
        ", ".join(f"{v}: {a:.1f}" for v, a in s["scores"].items()),
        s["chosen"],
      ]
      for s in data["selection"]
    ],
    align="lllr",
  )


def _depth_table(ratios: Mapping[str, Mapping[str, Any]]) -> str:
  return tables.markdown_table(
    ["run", "lower third", "upper third", ""],
    [
      [
        row,
        f"{r['lower']:.2f}",
        f"{r['upper']:.2f}",
        f"{'lower' if r['lower'] < r['upper'] else 'upper'} layers held tighter",
      ]
      for row, r in ratios.items()
    ],
    align="lrrl",
  )


def _diagnostic_sections(diags: Mapping[str, Any]) -> list[str]:
  lines = []
  for method, d in diags.items():
    lines += [
      f"### Along {method}",
      "",
      diagnose.markdown(d),
      "",
      f"![radius signal along {method}](results/diagnose_{method}.png)",
      "",
    ]
  return lines


def render(data: Mapping[str, Any], sections: Sequence[str] = ()) -> str:
  """RESULTS.md from :func:`study_data`'s dict (as read back from ``study.json``), with
  ``sections`` (Markdown, e.g. the regime map's) after the title.

  Raises:
    ValueError: ``data`` has no ``config`` (a ``study.json`` written before it was kept).
  """
  if "config" not in data:
    raise ValueError(
      "study.json has no 'config' entry (select_seed, seeds, wise_ft): it was "
      "written by an older version; add those values from the study's config"
    )
  agg, diags, ratios = data["results"], data["diagnose"], data["depth"]
  tpgm_rows = _tpgm_rows(agg)
  ft_losses = (
    [(r["step"], r["heldout_loss"]) for r in diags["ft"]["per_step"]] if "ft" in diags else None
  )
  text = [
    "# Results of the robust fine-tuning study",
    "",
    *[part for section in sections for part in (section.rstrip("\n"), "")],
    *(["## The default cell in depth (`python -m experiments.study`)", ""] if sections else []),
    _intro(data),
    "",
    "## Verdict",
    "",
    *[f"- {line}" for line in verdict(agg, tpgm_rows, ft_losses)],
    "",
    "Why (the diagnostic below and the layer distances):",
    "",
    *[f"- {line}" for line in diagnosis(diags, ratios, tpgm_rows)],
    "",
    "![ID vs OOD](results/id_vs_ood.png)",
    "",
    "## All methods",
    "",
    report.results_table(agg, data["ood"], cell=tables.mean_std),
    "",
    "## Hyper-parameters selected on ID val",
    "",
    "Every method runs its paper's recipe on the shared optimizer; the fields below were "
    "picked on the ID validation split (never on test or OOD data), in this order.",
    "",
    _selection_table(data),
    "",
    "## Can TPGM learn its radii here? (`python -m experiments.diagnose`)",
    "",
    *_diagnostic_sections(diags),
    "## Which layers are held tightly",
    "",
    "Distance of each weight tensor (convolution / dense kernel; normalisation scales and "
    "biases left out) to the pre-trained weights divided by FT's distance (max "
    "per-channel L1), mean of the lower and upper third of the layers (seed "
    f"{data['config']['seeds'][0]}):",
    "",
    _depth_table(ratios),
    "",
    "![radii by depth](results/radii_by_depth.png)",
  ]
  return "\n".join(text) + "\n"


def _id_vs_ood_figure(data: Mapping[str, Any], path: epath.Path) -> epath.Path:
  agg = data["results"]
  wise = (data.get("config") or {}).get("wise_ft")
  points = {
    r: {"id": v["test"], "ood": v[OOD_MEAN]} for r, v in agg.items() if not r.startswith("wise_ft")
  }
  curve = [(alpha, agg[r]["test"][0], agg[r][OOD_MEAN][0]) for alpha, r in _wise_curve(agg)]
  return plots.id_vs_ood(
    path,
    points,
    curve,
    highlight=[*_tpgm_rows(agg), "ft", "lp"],
    curve_label=(
      f"WiSE-FT: alpha 0 ({wise['base']}) .. 1 ({wise['source']})" if wise else "WiSE-FT"
    ),
    promise=(agg["ft"]["test"][0], agg["ft"][OOD_MEAN][0]) if "ft" in agg else None,
  )


def _depth_figure(data: Mapping[str, Any], path: epath.Path) -> epath.Path:
  layers, ratios = data["layers"], data["depth"]
  paths = _weights(layers["ft"]["paths"])

  def on_paths(values: Mapping[str, Any], key: str) -> list[float]:
    by_path = dict(zip(values["paths"], values[key]))
    return [by_path.get(p, np.nan) for p in paths]

  radii = {r: on_paths(v, "radius") for r, v in layers.items() if v["radius"] is not None}
  return plots.weights_by_depth(
    path,
    paths,
    on_paths(layers["ft"], "distance"),
    radii,
    {r: on_paths(v, "ratio") for r, v in ratios.items()},
    seed=data["config"]["seeds"][0],
  )


def render_figures(
  data: Mapping[str, Any], out_dir: str | os.PathLike
) -> tuple[list[epath.Path], list[str]]:
  """Draws the plots of :func:`study_data`'s dict into ``<out_dir>/results/``.

  Returns:
    ``(written, skipped)``: the image files and, for each figure whose data ``data``
    lacks (a ``study.json`` of an older version), a sentence saying so.
  """
  figs = epath.Path(out_dir) / "results"
  figs.mkdir(parents=True, exist_ok=True)
  written, skipped = [_id_vs_ood_figure(data, figs / "id_vs_ood.png")], []
  if data.get("layers") and "ft" in data["layers"] and "config" in data:
    written.append(_depth_figure(data, figs / "radii_by_depth.png"))
  else:
    skipped.append(
      "radii_by_depth.png not drawn: study.json lacks the per-layer summaries "
      "('layers') or 'config' (an older study.json); the committed image is kept"
    )
  for method, d in data["diagnose"].items():
    written.append(
      plots.radius_signal(figs / f"diagnose_{method}.png", d["per_tensor"], d["per_step"])
    )
  return written, skipped


def render_results(out_dir: str | os.PathLike, sections: Sequence[str] = ()) -> dict[str, Any]:
  """Re-renders ``<out_dir>/RESULTS.md`` (with ``sections``, see :func:`render`) and the plots
  from ``<out_dir>/results/study.json`` alone (nothing is run); ``{"path": RESULTS.md,
  "figures": [...], "skipped": [...]}`` (see :func:`render_figures`). The whole of
  RESULTS.md, with the regime map, is :func:`experiments.analysis.results_md.write`."""
  out = epath.Path(out_dir)
  data = json.loads((out / "results" / "study.json").read_text())
  path = out / "RESULTS.md"
  path.write_text(render(data, sections))
  figures, skipped = render_figures(data, out)
  for line in skipped:
    logging.warning("study: %s", line)
  return {"path": path, "figures": figures, "skipped": skipped}


def study(config: ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the whole study (see the module docstring): writes ``results/study.json``;
  ``{"results", "out" (the output directory), "info"}``. RESULTS.md and the plots are
  rendered from it by :func:`experiments.analysis.results_md.write`."""
  t0 = time.perf_counter()
  env = environment.setup(_plan(config, workdir))
  seconds: dict[str, float | None] = {}
  config, selection = select(config, env, seconds)
  per_seed, layers0 = [], None
  for seed in config.study.seeds:
    plan = _plan(with_fields(config, seed=seed), workdir)
    outcome = runner.execute(env, plan)
    seconds.update(_seconds(plan))
    per_seed.append(outcome.results)
    if layers0 is None:
      layers0 = outcome.layers
  ood = list(env.task.ood)
  agg = aggregate(per_seed, ood)
  out = epath.Path(config.study.out or env.plan.root)
  diags = {}
  t_diag = time.perf_counter()
  for method in config.study.diagnose:
    d_cfg = with_fields(config, seed=config.study.seeds[0], **{"diagnose.method": method})
    diags[method] = diagnose.measure(d_cfg, workdir)
  t_diag_s = time.perf_counter() - t_diag  # measuring (+ training its runs if not cached)
  constrained = [r for r in run_order(config) if r not in ("ft", "lp", "lp_ft", "wise_ft")]
  ratios = tightness(layers0, constrained)
  # Each run once (the selection's best value is also seed 0's run); the times are those
  # recorded when the runs were made, so they do not depend on what was cached now.
  timed = [s for s in seconds.values() if s is not None]
  info = {
    "seeds": len(config.study.seeds),
    "wall_min": (time.perf_counter() - t0) / 60,
    "runs": len(seconds),
    "runs_timed": len(timed),
    "runs_min": sum(timed) / 60,
    "diagnose_min": t_diag_s / 60,
    "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), "
    f"{jax.device_count()} {jax.default_backend()} device(s)",
    "id": str(env.task.test),
  }
  (out / "results").mkdir(parents=True, exist_ok=True)
  (out / "results" / "study.json").write_text(
    json.dumps(study_data(config, agg, ood, selection, diags, ratios, layers0, info), indent=1)
  )
  return {"results": agg, "out": out, "info": info}
