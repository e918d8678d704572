"""RESULTS.md as a whole, from the committed JSON files alone (nothing is run).

:func:`write` renders ``<out>/RESULTS.md``: the title, the regime map
(:mod:`experiments.analysis.regimes`, from ``results/regimes.json`` and
``regimes_meta.json``, when present), the radius mechanism
(:mod:`experiments.analysis.mechanism`, from ``results/mechanism.json``, when present, and
its variants' ``results/mechanism_<method>.json``), then
the study of the default cell (:mod:`experiments.analysis.study`, from ``results/study.json``),
and draws their figures into ``<out>/results/``. The study, the regime map and the mechanism
all end with it, and so does ``--config.study.render_only=True``.
"""

from __future__ import annotations

import os
from typing import Any

from experiments.analysis import mechanism, regimes, study


def write(out_dir: str | os.PathLike) -> dict[str, Any]:
  """Renders ``<out_dir>/RESULTS.md`` and every figure; ``{"path", "figures", "skipped"}``."""
  sections, figures = [], []
  loaded = regimes.load(out_dir)
  if loaded is not None and loaded[0]:
    sections.append(regimes.render(*loaded, run_cmd=regimes.RUN_COMMAND))
    figures += regimes.render_figures(loaded[0], out_dir)
  trace = mechanism.load(out_dir)
  if trace is not None:
    for t in [trace, *mechanism.load_variants(out_dir)]:
      sections.append(mechanism.render(t))
      figures += mechanism.render_figures(t, out_dir)
  out = study.render_results(out_dir, sections)
  return {**out, "figures": [*figures, *out["figures"]]}
