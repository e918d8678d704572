"""The main job's write-up: ``results.json``, ``results.md`` and ``radii.png``.

Computing and presenting are apart: :func:`report_data` turns the evaluations into the
plain dict written as ``results.json``; :func:`render` writes ``results.md`` from that
dict alone; the radii figure is :func:`experiments.analysis.plots.radii_by_layer`.

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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from experiments.analysis import plots, tables

OOD_MEAN = "ood_mean"
_COLUMN_NAMES = {"val": "val (ID)", "test": "ID test", OOD_MEAN: "OOD mean"}


def with_ood_mean(
  results: Mapping[str, Mapping[str, float]], ood: Sequence[str]
) -> dict[str, dict[str, float]]:
  """Each row plus ``ood_mean``, the mean accuracy over the ``ood`` splits."""
  return {
    row: {**accs, OOD_MEAN: float(np.mean([accs[d] for d in ood]))} for row, accs in results.items()
  }


def report_data(
  results: Mapping[str, Mapping[str, float]],
  ood: Sequence[str],
  info: Mapping[str, Any] | None = None,
  notes: Sequence[str] = (),
) -> dict[str, Any]:
  """What ``results.json`` holds: ``{"results": rows with the OOD mean, "ood", "info",
  "notes"}`` (``notes``: paragraphs ``results.md`` ends with)."""
  return {
    "results": with_ood_mean(results, ood),
    "ood": list(ood),
    "info": dict(info or {}),
    "notes": list(notes),
  }


def results_table(
  rows: Mapping[str, Mapping[str, Any]],
  ood: Sequence[str],
  cell: Callable[[Any], str] = lambda v: f"{v:.1f}",
) -> str:
  """A Markdown table: method, val, ID test, each OOD split, OOD mean (blank where a row
  lacks a split); ``cell`` formats a value (the study's are ``(mean, std)``)."""
  cols = ["val", "test", *ood, OOD_MEAN]
  return tables.markdown_table(
    ["method", *(_COLUMN_NAMES.get(c, c) for c in cols)],
    [[row, *(cell(accs[c]) if c in accs else "" for c in cols)] for row, accs in rows.items()],
  )


def summary(rows: Mapping[str, Mapping[str, float]]) -> list[str]:
  """Sentences comparing FT with LP and WiSE-FT (the robustness problem) and the robust
  methods; ``rows`` include the OOD mean (:func:`with_ood_mean`)."""
  out = []

  def delta(a, b, key):
    return rows[a][key] - rows[b][key]

  if "ft" in rows:
    for ref in ("lp", *[r for r in rows if r.startswith("wise_ft")]):
      if ref in rows:
        d_ood, d_id = delta("ft", ref, OOD_MEAN), delta("ft", ref, "test")
        verdict = "loses" if d_ood < 0 else "does not lose"
        out.append(
          f"FT {verdict} OOD accuracy against {ref}: OOD mean {d_ood:+.1f}, ID {d_id:+.1f} points."
        )
    for row in rows:
      if row not in ("ft", "lp", "pretrained") and not row.startswith("wise_ft"):
        out.append(
          f"{row} vs FT: ID {delta(row, 'ft', 'test'):+.1f}, "
          f"OOD mean {delta(row, 'ft', OOD_MEAN):+.1f} points."
        )
  wise = [r for r in rows if r.startswith("wise_ft") and "val" in rows[r]]
  if wise:
    best = max(wise, key=lambda r: rows[r]["val"])
    out.append(f"WiSE-FT alpha selected on val: {best}.")
  return out


def render(data: Mapping[str, Any]) -> str:
  """``results.md`` from :func:`report_data`'s dict: the table, the comparisons, the notes."""
  rows = data["results"]
  return (
    "\n\n".join(
      [results_table(rows, data["ood"]), "\n".join(summary(rows)), *data.get("notes", ())]
    )
    + "\n"
  )


def write(
  out_dir: str | os.PathLike,
  results: Mapping[str, Mapping[str, float]],
  ood: Sequence[str],
  layers: Mapping[str, Mapping[str, Any]] | None = None,
  info: Mapping[str, Any] | None = None,
  notes: Sequence[str] = (),
) -> dict[str, epath.Path]:
  """Writes ``results.json``, then ``results.md`` rendered from it and (with TPGM layers)
  ``radii.png``; returns their paths."""
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
  paths["json"].write_text(json.dumps(report_data(results, ood, info, notes), indent=1))
  paths["markdown"].write_text(render(json.loads(paths["json"].read_text())))
  if layers and any(v.get("radius") is not None for v in layers.values()):
    paths["plot"] = plots.radii_by_layer(out_dir / "radii.png", layers)
  return paths
