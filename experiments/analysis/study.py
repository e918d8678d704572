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

and writes ``<out>/RESULTS.md`` (the tables, the premise checks, the verdict),
``<out>/results/study.json`` and the plots ``<out>/results/*.png``. Every run is
cached in its own directory (named by a hash of its configuration), so running the
command again only redoes what changed; an interrupted study resumes.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from typing import Any

import jax
import numpy as np
from etils import epath
from ml_collections import ConfigDict

from experiments import environment, runner
from experiments.analysis import diagnose, report
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
  return {os.fspath(s.directory): json.loads((s.directory / "results.json").read_text()
                                              ).get("seconds") for s in plan}


def _plan(config: ConfigDict, workdir: str) -> Plan:
  return make_plan(config, workdir, device_count=jax.device_count())


def select(config: ConfigDict, env: Environment, seconds: dict[str, float | None] | None = None
           ) -> tuple[ConfigDict, list[dict[str, Any]]]:
  """Picks every ``study.select`` value on ID val (seed ``study.select_seed``); records
  each run's computation time in ``seconds`` (see :func:`_seconds`)."""
  chosen, table = config, []
  seconds = {} if seconds is None else seconds
  for method, key, values in config.study.select:
    scores = {}
    for value in values:
      cfg = with_fields(chosen, seed=config.study.select_seed, methods=(method,),
                        **{key: value})
      plan = _plan(cfg, env.plan.workdir)
      found = runner.execute(env, plan).results
      seconds.update(_seconds(plan))
      scores[value] = found[method]["val"]
    best = max(values, key=lambda v: scores[v])
    table.append({"method": method, "key": key, "scores": {str(v): s for v, s in scores.items()},
                  "chosen": best, "default": _get(config, key)})
    chosen = with_fields(chosen, **{key: best})
    logging.info("study: %s = %s (val %s)", key, best, scores)
  return chosen, table


def aggregate(per_seed: list[dict[str, dict[str, float]]], ood: list[str]
              ) -> dict[str, dict[str, tuple[float, float]]]:
  """Row -> split -> (mean, std over seeds); rows present for every seed."""
  rows = [report.with_ood_mean(r, ood) for r in per_seed]
  names = [n for n in rows[0] if all(n in r for r in rows)]
  return {n: {k: (float(np.mean([r[n][k] for r in rows])), float(np.std([r[n][k] for r in rows])))
              for k in rows[0][n]} for n in names}


def _wise_curve(agg, prefix="wise_ft_"):
  """WiSE-FT points sorted by alpha: [(alpha, row)] (alpha 0: the base run, 1: the source)."""
  pts = sorted((float(n[len(prefix):]), n) for n in agg if n.startswith(prefix))
  return pts


def verdict(agg: dict[str, dict[str, tuple[float, float]]], tpgm_rows: list[str],
            ft_losses: list[tuple[int, float]] | None = None) -> list[str]:
  """Sentences answering the study's questions, computed from the means.

  ``ft_losses``: FT's held-out loss along the run, ``[(step, loss)]`` (the diagnostic).
  """
  m = lambda row, key: agg[row][key][0]  # noqa: E731
  out = []
  if "ft" in agg and "lp" in agg:
    line = (f"Premise: FT beats LP in-distribution by {m('ft', 'test') - m('lp', 'test'):+.1f} "
            f"points and loses {m('lp', OOD_MEAN) - m('ft', OOD_MEAN):.1f} OOD-mean points to it "
            "(both required >= 5).")
    if ft_losses:
      mid = ft_losses[len(ft_losses) // 2 - 1]
      end = min(ft_losses[len(ft_losses) // 2:], key=lambda x: x[1])
      line += (f" FT does not just memorise: its held-out loss goes from {mid[1]:.3f} at step "
               f"{mid[0]} (mid-run) to {end[1]:.3f} at step {end[0]}, and is "
               f"{ft_losses[-1][1]:.3f} "
               f"at the end.")
    out.append(line)
  curve = [(m(r, "test"), m(r, OOD_MEAN)) for _, r in _wise_curve(agg)]
  for row in tpgm_rows:
    if row not in agg or "ft" not in agg:
      continue
    oid, ood = m(row, "test"), m(row, OOD_MEAN)
    target = 1.15 * m("ft", OOD_MEAN)
    ok = ood >= target and oid >= m("ft", "test") - 1
    parts = [f"{row}: ID {oid:.1f} vs FT {m('ft', 'test'):.1f}, OOD mean {ood:.1f} vs FT "
             f"{m('ft', OOD_MEAN):.1f} (target >= {target:.1f} at ID >= "
             f"{m('ft', 'test') - 1:.1f}): {'reached' if ok else 'NOT reached'}."]
    if len(curve) >= 2:
      ids, oods = np.array(curve).T
      order = np.argsort(ids)
      if ids.min() <= oid <= ids.max():
        wise = float(np.interp(oid, ids[order], oods[order]))
        parts.append(f"The WiSE-FT curve at that ID accuracy has OOD {wise:.1f}: {row} lies "
                     f"{'on or above' if ood >= wise - 0.5 else 'below'} it ({ood - wise:+.1f}).")
      else:
        parts.append(f"Its ID accuracy lies outside the WiSE-FT curve's range "
                     f"[{ids.min():.1f}, {ids.max():.1f}].")
    out.append(" ".join(parts))
  others = [r for r in agg if r not in ("ft", "lp") and not r.startswith("wise_ft")
            and r not in tpgm_rows]
  if "ft" in agg:
    for row in others:
      out.append(f"{row} vs FT: ID {m(row, 'test') - m('ft', 'test'):+.1f}, OOD mean "
                 f"{m(row, OOD_MEAN) - m('ft', OOD_MEAN):+.1f} points.")
  return out


def diagnosis(diags: dict[str, dict[str, Any]], ratios: dict[str, dict[str, Any]],
              tpgm_rows: list[str]) -> list[str]:
  """Sentences on the radius signal (:mod:`experiments.analysis.diagnose`) and on how far the
  TPGM runs moved, computed from the measurements."""
  out = []
  for method, d in diags.items():
    o, k = d["overall"]["all"], d["info"]["batches"]
    halves = [d["overall"][h]["shrink_frequency"] for h in ("first_half", "second_half")
              if h in d["overall"]]
    out.append(
        f"Along {method}: the held-out radius gradient asks to shrink in "
        f"{100 * o['shrink_frequency']:.0f} % of (tensor, checkpoint) pairs"
        + (f" ({', then '.join(f'{100 * x:.0f} %' for x in halves)} over the two halves)"
           if len(halves) == 2 else "")
        + f"; its median signal-to-noise ratio over {k} held-out batches (|mean| / std) is "
        f"{o['snr_median']:.2f}, so the sign TPGM steps on from one batch is "
        f"{'mostly noise' if o['snr_median'] < 1 else 'mostly consistent'}; training and held-out "
        f"gradients have cosine {o['cos_batch']:.2f} on one batch and {o['cos_mean']:.2f} "
        f"between their {k}-batch means.")
  if "ft" in diags and "tpgm" in diags:
    ends = {m: diags[m]["per_step"][-1] for m in ("ft", "tpgm")}
    best = min(diags["ft"]["per_step"], key=lambda r: r["heldout_loss"])
    out.append(
        f"TPGM's own objective, the held-out loss, ends at {ends['tpgm']['heldout_loss']:.3f} "
        f"along tpgm against {ends['ft']['heldout_loss']:.3f} along FT (lowest "
        f"{best['heldout_loss']:.3f}, step {best['step']}): "
        + ("the learned radii stop short of where the held-out loss is lowest."
           if ends["tpgm"]["heldout_loss"] > ends["ft"]["heldout_loss"]
           else "the learned radii reach a held-out loss at least as low as FT's."))
  for row in tpgm_rows:
    if row in ratios:
      r = ratios[row]
      out.append(f"{row} ends at {np.median(r['ratio']):.2f} of FT's distance to the "
                 f"pre-trained weights (median over layers; lower third {r['lower']:.2f}, "
                 f"upper third {r['upper']:.2f}).")
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
    out[row] = {"paths": paths, "ratio": ratio,
                "lower": float(np.mean(ratio[:third])), "upper": float(np.mean(ratio[-third:]))}
  return out


def plot_id_vs_ood(path, agg, highlight: list[str], wise_label: str = "WiSE-FT") -> None:
  """ID test vs OOD mean: the WiSE-FT curve over alpha and every method with std bars,
  each labelled beside its point."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(8, 6))
  curve = _wise_curve(agg)
  if curve:
    xs = [agg[r]["test"][0] for _, r in curve]
    ys = [agg[r][OOD_MEAN][0] for _, r in curve]
    ax.plot(xs, ys, "-", color="grey", lw=1.5, zorder=1, label=wise_label)
    for (alpha, r), x, y in zip(curve, xs, ys):
      ax.annotate(f"{alpha:g}", (x, y), fontsize=7, color="grey", xytext=(3, 3),
                  textcoords="offset points")
  if "ft" in agg:
    ft_id, ft_ood = agg["ft"]["test"][0], agg["ft"][OOD_MEAN][0]
    ax.fill_between([ft_id - 1, 100], 1.15 * ft_ood, 100, color="tab:green", alpha=0.08,
                    label="TPGM's promise: OOD >= 1.15 x FT at ID >= FT - 1")
  rows = [r for r in agg if not r.startswith("wise_ft")]
  # tab20's dark shades first, then its light ones: up to 20 rows in distinct colours.
  colors = [plt.get_cmap("tab20")(i) for i in (*range(0, 20, 2), *range(1, 20, 2))]
  markers = "osD^v<>pP*Xhd"
  for i, row in enumerate(rows):
    v = agg[row]
    strong = row in highlight or row in ("ft", "lp")
    ax.errorbar(v["test"][0], v[OOD_MEAN][0], xerr=v["test"][1], yerr=v[OOD_MEAN][1],
                fmt=markers[i % len(markers)], color=colors[i % len(colors)],
                ms=8 if strong else 6, capsize=3, label=row, zorder=3 if strong else 2)
    ax.annotate(row, (v["test"][0], v[OOD_MEAN][0]), fontsize=7, color=colors[i % len(colors)],
                xytext=(6, -10 if i % 2 else 5), textcoords="offset points")
  xs = [v["test"][0] for v in agg.values()]
  ys = [v[OOD_MEAN][0] for v in agg.values()]
  ax.set_xlim(min(xs) - 3, max(xs) + 3)
  ax.set_ylim(min(ys) - 5, max(ys) + 5)
  ax.set_xlabel("ID test accuracy (%)")
  ax.set_ylabel("OOD mean accuracy (%)")
  ax.set_title("In-distribution vs out-of-distribution (mean +- std over seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="best", ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


def plot_depth(path, layers, radii_rows: list[str], ratios: dict[str, dict[str, Any]]) -> None:
  """Weight tensors in depth order. Left: the learned radii against FT's distance to
  the anchor; right: every constrained run's distance relative to FT's (a heat map)."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  from matplotlib.colors import TwoSlopeNorm  # noqa: PLC0415

  paths = _weights(layers["ft"]["paths"])
  x = np.arange(len(paths))
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [1, 1.25]})
  on_paths = lambda row, key: np.array(  # noqa: E731
      [dict(zip(layers[row]["paths"], layers[row][key])).get(p, np.nan) for p in paths])
  ax1.plot(x, on_paths("ft", "distance"), "k--", lw=2, label="FT: distance to pre-trained")
  for row in radii_rows:
    if row in layers and layers[row]["radius"] is not None:
      ax1.plot(x, np.maximum(on_paths(row, "radius"), 1e-5), "o-", ms=3, lw=1.2,
               label=f"{row}: radius")
  ax1.set_yscale("log")
  ax1.set_ylim(bottom=1e-5)
  ax1.set_ylabel("max per-channel L1 (MARS); radii at the 1e-8 floor drawn at 1e-5")
  ax1.set_title("learned radii vs FT's distance, weight tensors by depth (seed 0)")
  ax1.set_xticks(x, [p.removesuffix("/kernel") for p in paths], rotation=90, fontsize=7)
  ax1.grid(alpha=0.3)
  ax1.legend(fontsize=7)
  rows = list(ratios)
  grid = np.array([[dict(zip(ratios[r]["paths"], ratios[r]["ratio"])).get(p, np.nan)
                    for p in paths] for r in rows])
  logs = np.log10(np.clip(grid, 1e-4, 1e2))
  im = ax2.imshow(logs, aspect="auto", cmap="RdBu_r",
                  norm=TwoSlopeNorm(vcenter=0.0, vmin=-4, vmax=max(1.0, np.nanmax(logs))))
  for (i, j), v in np.ndenumerate(grid):
    if np.isfinite(v):
      ax2.text(j, i, f"{v:.2f}" if v >= 0.01 else "<.01", ha="center", va="center", fontsize=5)
  ax2.set_yticks(range(len(rows)), rows, fontsize=8)
  ax2.set_xticks(x, [p.removesuffix("/kernel") for p in paths], rotation=90, fontsize=7)
  ax2.set_title("distance to pre-trained / FT's distance (input left, output right; seed 0)")
  fig.colorbar(im, ax=ax2, label="log10 of the ratio (blue: held tighter than FT)")
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


def _run_time(info: dict[str, Any]) -> str:
  missing = info["runs"] - info["runs_timed"]
  if not info["runs_timed"]:
    return f"{info['runs']} runs (made before run times were recorded)"
  return (f"{info['runs']} runs taking {info['runs_min']:.0f} min together (as recorded when "
          "each was made" + (f"; {missing} made before times were recorded are not counted)"
                             if missing else ")"))


def _fmt(v: tuple[float, float]) -> str:
  return f"{v[0]:.1f} ± {v[1]:.1f}"


def write(out: epath.Path, config: ConfigDict, agg, ood: list[str], selection, diags,
          ratios, info: dict[str, Any]) -> epath.Path:
  """RESULTS.md, results/study.json and the ID-vs-OOD plot (the others are drawn by
  :func:`study`)."""
  figs = out / "results"
  figs.mkdir(parents=True, exist_ok=True)
  tpgm_rows = [r for r in agg if r.startswith("tpgm")]
  wise = config.get("wise_ft")
  plot_id_vs_ood(os.fspath(figs / "id_vs_ood.png"), agg, tpgm_rows,
                 f"WiSE-FT: alpha 0 ({wise.base}) .. 1 ({wise.source})" if wise else "WiSE-FT")
  (figs / "study.json").write_text(json.dumps(
      {"results": {r: {k: list(v) for k, v in accs.items()} for r, accs in agg.items()},
       "ood": ood, "selection": selection, "diagnose": diags, "depth": ratios, "info": info},
      indent=1))
  cols = ["val", "test", *ood, OOD_MEAN]
  names = {"val": "val (ID)", "test": "ID test", OOD_MEAN: "OOD mean"}
  table = ["| method | " + " | ".join(names.get(c, c) for c in cols) + " |",
           "|---|" + "---:|" * len(cols)]
  for row, accs in agg.items():
    table.append(f"| {row} | " + " | ".join(_fmt(accs[c]) for c in cols) + " |")
  sel = ["| method | field | val accuracy per value (seed {}) | chosen |".format(
      config.study.select_seed), "|---|---|---|---:|"]
  for s in selection:
    scores = ", ".join(f"{v}: {a:.1f}" for v, a in s["scores"].items())
    sel.append(f"| {s['method']} | `{s['key']}` | {scores} | {s['chosen']} |")
  depth = [f"| {row} | {r['lower']:.2f} | {r['upper']:.2f} | "
           f"{'lower' if r['lower'] < r['upper'] else 'upper'} layers held tighter |"
           for row, r in ratios.items()]
  ft_losses = ([(r["step"], r["heldout_loss"]) for r in diags["ft"]["per_step"]]
               if "ft" in diags else None)
  diag_text = []
  for method, d in diags.items():
    diag_text += [f"### Along {method}", "", diagnose.markdown(d), "",
                  f"![radius signal along {method}](results/diagnose_{method}.png)", ""]
  text = [
      "# Results of the robust fine-tuning study",
      "",
      f"Generated by `python -m experiments.study` ({info['seeds']} seeds) on {info['machine']}: "
      f"{_run_time(info)}, "
      f"and {info['diagnose_min']:.0f} min of diagnostics (this invocation's wall time: "
      f"{info['wall_min']:.0f} min; finished runs are reused). Accuracy in %, mean ± std over "
      "seeds; "
      f"ID = {info['id']}, OOD = {', '.join(ood)}; val (model and hyper-parameter selection) and "
      "held-out (TPGM's radii) are disjoint ID splits. The pre-trained model is the same for "
      "every seed; seeds change the head initialisation and the data order.",
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
      *table,
      "",
      "## Hyper-parameters selected on ID val",
      "",
      "Every method runs its paper's recipe on the shared optimizer; the fields below were "
      "picked on the ID validation split (never on test or OOD data), in this order.",
      "",
      *sel,
      "",
      "## Can TPGM learn its radii here? (`python -m experiments.diagnose`)",
      "",
      *diag_text,
      "## Which layers are held tightly",
      "",
      "Distance of each weight tensor (convolution / dense kernel; normalisation scales and "
      "biases left out) to the pre-trained weights divided by FT's distance (max "
      "per-channel L1), mean of the lower and upper third of the layers (seed "
      f"{config.study.seeds[0]}):",
      "",
      "| run | lower third | upper third | |",
      "|---|---:|---:|---|",
      *depth,
      "",
      "![radii by depth](results/radii_by_depth.png)",
  ]
  path = out / "RESULTS.md"
  path.write_text("\n".join(text) + "\n")
  return path


def study(config: ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the whole study (see the module docstring); returns what was written."""
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
  figs = out / "results"
  figs.mkdir(parents=True, exist_ok=True)
  diags = {}
  t_diag = time.perf_counter()
  for method in config.study.diagnose:
    d_cfg = with_fields(config, seed=config.study.seeds[0], **{"diagnose.method": method})
    diags[method] = diagnose.measure(d_cfg, workdir)
    diagnose.plot(diags[method], os.fspath(figs / f"diagnose_{method}.png"))
  t_diag_s = time.perf_counter() - t_diag  # measuring (+ training its runs if not cached)
  constrained = [r for r in run_order(config) if r not in ("ft", "lp", "lp_ft", "wise_ft")]
  ratios = tightness(layers0, constrained)
  plot_depth(os.fspath(figs / "radii_by_depth.png"), layers0,
             [r for r in layers0 if layers0[r]["radius"] is not None], ratios)
  # Each run once (the selection's best value is also seed 0's run); the times are those
  # recorded when the runs were made, so they do not depend on what was cached now.
  timed = [s for s in seconds.values() if s is not None]
  info = {"seeds": len(config.study.seeds), "wall_min": (time.perf_counter() - t0) / 60,
          "runs": len(seconds), "runs_timed": len(timed), "runs_min": sum(timed) / 60,
          "diagnose_min": t_diag_s / 60,
          "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), "
                     f"{jax.device_count()} {jax.default_backend()} device(s)",
          "id": str(env.task.test)}
  path = write(out, config, agg, ood, selection, diags, ratios, info)
  return {"results": agg, "path": path, "info": info}
