"""Every figure of :mod:`experiments.analysis.plots`, drawn from tiny plain data."""

from __future__ import annotations

import math
import os

from experiments.analysis import plots

PATHS = ["stem/conv/kernel", "block1/conv/kernel", "head/kernel"]
PER_TENSOR = [
  {"path": p, "shrink_frequency": f, "cos_batch": c, "cos_mean": 2 * c}
  for p, f, c in zip(PATHS, (0.2, 0.5, 0.9), (0.1, 0.2, 0.3))
]
PER_STEP = [
  {"step": s, "shrink_frequency": f, "cos_batch": 0.1, "cos_mean": 0.4}
  for s, f in ((2, 0.4), (4, 0.6))
]


def _drawn(path):
  assert os.path.getsize(path) > 10_000, path
  return True


def test_radii_by_layer(tmp_path):
  layers = {
    "ft": {"paths": PATHS, "distance": [1.0, 2.0, 3.0], "radius": None},
    "tpgm": {"paths": PATHS, "distance": [0.1, 0.2, 0.0], "radius": [0.1, 0.3, 1e-9]},
  }
  assert _drawn(plots.radii_by_layer(tmp_path / "radii.png", layers))


def test_id_vs_ood(tmp_path):
  points = {
    "ft": {"id": [95.0, 0.4], "ood": [52.0, 1.2]},
    "tpgm": {"id": [83.0, 0.5], "ood": [77.0, 0.6]},
  }
  curve = [(0.0, 80.0, 75.0), (0.5, 86.0, 73.0), (1.0, 93.0, 62.0)]
  path = plots.id_vs_ood(
    tmp_path / "id_vs_ood.png",
    points,
    curve,
    highlight=["tpgm"],
    curve_label="WiSE-FT: alpha 0 (lp) .. 1 (lp_ft)",
    promise=(95.0, 52.0),
  )
  assert _drawn(path)
  assert _drawn(plots.id_vs_ood(tmp_path / "points_only.png", points))
  # One panel per cell; a method missing from one cell keeps its colour in the others.
  panels = {
    "a": {"points": points, "curve": curve, "promise": (95.0, 52.0), "highlight": ["tpgm"]},
    "b": {"points": {"tpgm": points["tpgm"]}},
  }
  assert _drawn(plots.id_vs_ood_cells(tmp_path / "cells.png", panels, title="t"))
  four = {**panels, "c": panels["b"], "d": panels["b"]}  # 3 x 2 panels: the legend in a spare
  assert _drawn(plots.id_vs_ood_cells(tmp_path / "cells4.png", four))


def test_weights_by_depth(tmp_path):
  path = plots.weights_by_depth(
    tmp_path / "depth.png",
    PATHS,
    [1.0, 2.0, 3.0],
    {"tpgm": [1e-8, 0.5, 1.0]},
    {"tpgm": [0.001, 0.5, math.nan], "l2sp": [0.9, 1.1, 3.0]},
    seed=0,
  )
  assert _drawn(path)
  # No constrained run besides the reference: an empty heat map.
  assert _drawn(plots.weights_by_depth(tmp_path / "empty.png", PATHS, [1.0, 2.0, 3.0], {}, {}))


def test_radius_signal(tmp_path):
  assert _drawn(plots.radius_signal(tmp_path / "diagnose_ft.png", PER_TENSOR, PER_STEP))
