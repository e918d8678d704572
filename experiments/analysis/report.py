"""Results as JSON and a Markdown table, and the radii plot of the TPGM runs.

``results`` maps a row name (a method or a variant such as ``wise_ft_0.5``) to
``{split name: accuracy %}`` with ``test`` the ID test split; the OOD mean is
added here. ``layers`` maps a run to its per-layer summary
``{"paths": [...], "distance": [...], "radius": [...] or None}``: the maximum
per-channel (MARS) distance of each constrained tensor to the anchor and, for
TPGM runs, the learned radius.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

OOD_MEAN = "ood_mean"


def with_ood_mean(results: Mapping[str, Mapping[str, float]],
                  ood: Sequence[str]) -> dict[str, dict[str, float]]:
  """Each row plus ``ood_mean``, the mean accuracy over the ``ood`` splits."""
  return {row: {**accs, OOD_MEAN: float(np.mean([accs[d] for d in ood]))}
          for row, accs in results.items()}


def markdown_table(results: Mapping[str, Mapping[str, float]], ood: Sequence[str]) -> str:
  """A Markdown table: method, val, ID test, each OOD split, OOD mean."""
  rows = with_ood_mean(results, ood)
  cols = ["val", "test", *ood, OOD_MEAN]
  names = {"val": "val (ID)", "test": "ID test", OOD_MEAN: "OOD mean"}
  lines = ["| method | " + " | ".join(names.get(c, c) for c in cols) + " |",
           "|---|" + "---:|" * len(cols)]
  for row, accs in rows.items():
    lines.append(f"| {row} | " + " | ".join(
        f"{accs[c]:.1f}" if c in accs else "" for c in cols) + " |")
  return "\n".join(lines)


def summary(results: Mapping[str, Mapping[str, float]], ood: Sequence[str]) -> list[str]:
  """Sentences comparing FT with LP and WiSE-FT (the robustness problem) and the robust methods."""
  rows = with_ood_mean(results, ood)
  out = []

  def delta(a, b, key):
    return rows[a][key] - rows[b][key]

  if "ft" in rows:
    for ref in ("lp", *[r for r in rows if r.startswith("wise_ft")]):
      if ref in rows:
        d_ood, d_id = delta("ft", ref, OOD_MEAN), delta("ft", ref, "test")
        verdict = "loses" if d_ood < 0 else "does not lose"
        out.append(f"FT {verdict} OOD accuracy against {ref}: OOD mean {d_ood:+.1f}, "
                   f"ID {d_id:+.1f} points.")
    for row in rows:
      if row not in ("ft", "lp", "pretrained") and not row.startswith("wise_ft"):
        out.append(f"{row} vs FT: ID {delta(row, 'ft', 'test'):+.1f}, "
                   f"OOD mean {delta(row, 'ft', OOD_MEAN):+.1f} points.")
  wise = [r for r in rows if r.startswith("wise_ft") and "val" in rows[r]]
  if wise:
    best = max(wise, key=lambda r: rows[r]["val"])
    out.append(f"WiSE-FT alpha selected on val: {best}.")
  return out


def write(out_dir: str | os.PathLike, results: Mapping[str, Mapping[str, float]],
          ood: Sequence[str], layers: Mapping[str, Mapping[str, Any]] | None = None,
          info: Mapping[str, Any] | None = None,
          notes: Sequence[str] = ()) -> dict[str, epath.Path]:
  """Writes ``results.json``, ``results.md`` (table, comparisons, ``notes``) and (with TPGM
  layers) ``radii.png``; returns their paths."""
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  rows = with_ood_mean(results, ood)
  paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
  paths["json"].write_text(json.dumps(
      {"results": rows, "ood": list(ood), "info": dict(info or {})}, indent=1))
  text = "\n\n".join([markdown_table(results, ood), "\n".join(summary(results, ood)),
                      *notes]) + "\n"
  paths["markdown"].write_text(text)
  if layers and any(v.get("radius") is not None for v in layers.values()):
    paths["plot"] = plot_radii(out_dir / "radii.png", layers)
  return paths


def plot_radii(path: str | os.PathLike, layers: Mapping[str, Mapping[str, Any]]) -> epath.Path:
  """One panel per TPGM run: learned radius and distance to the anchor per layer, by depth.

  Layers are drawn in the order of ``paths`` (depth order, see
  ``experiments.run.depth_order``). Runs without radii (e.g. FT) are drawn in
  every panel as a reference distance.
  """
  import matplotlib  # noqa: PLC0415 (only needed here)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  tpgm = [r for r, v in layers.items() if v.get("radius") is not None]
  refs = [r for r, v in layers.items() if v.get("radius") is None]
  fig, axes = plt.subplots(len(tpgm), 1, figsize=(10, 3.6 * len(tpgm)), squeeze=False)
  for ax, run in zip(axes[:, 0], tpgm):
    info = layers[run]
    order = np.arange(len(info["paths"]))
    x = order
    floor = 1e-8
    ax.plot(x, np.maximum(np.asarray(info["radius"])[order], floor), "o-", ms=3,
            label=f"{run}: learned radius")
    ax.plot(x, np.maximum(np.asarray(info["distance"])[order], floor), "s--", ms=3,
            label=f"{run}: distance to anchor (max MARS norm)")
    for ref in refs:
      dist = dict(zip(layers[ref]["paths"], layers[ref]["distance"]))
      if all(p in dist for p in info["paths"]):
        ax.plot(x, np.maximum([dist[info["paths"][i]] for i in order], floor), ":", lw=1,
                label=f"{ref}: distance to anchor")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([info["paths"][i] for i in order], rotation=90, fontsize=6)
    ax.set_ylabel("L1 per output channel")
    ax.set_title(f"{run}: per-layer radii by depth")
    ax.legend(fontsize=7)
  fig.tight_layout()
  path = epath.Path(path)
  fig.savefig(os.fspath(path), dpi=110)
  plt.close(fig)
  return path
