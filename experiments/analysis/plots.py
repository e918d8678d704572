"""Every figure of the write-ups, drawn with matplotlib from plain data into a file.

* :func:`radii_by_layer`: the main job's ``radii.png`` (learned radii and distances per layer);
* :func:`id_vs_ood`: the study's ``id_vs_ood.png`` (every method and the WiSE-FT curve);
* :func:`weights_by_depth`: the study's ``radii_by_depth.png`` (radii and distance ratios);
* :func:`radius_signal`: the diagnostic's ``diagnose_<method>.png``.

Each takes the output path first, then lists / dicts of numbers and names (what the JSON
files hold), and returns the path. matplotlib is imported on the first figure, on the
non-interactive Agg backend, so that importing the experiments does not load it or change
the backend of a caller's session.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath


def _matplotlib():
  """``(matplotlib, matplotlib.pyplot)`` on the Agg backend (files only, no display)."""
  import matplotlib  # noqa: PLC0415 (only when a figure is drawn)

  matplotlib.use("Agg")
  import matplotlib.colors  # noqa: PLC0415
  import matplotlib.pyplot as plt  # noqa: PLC0415

  return matplotlib, plt


def _save(fig, path: str | os.PathLike, dpi: int, rect=None) -> epath.Path:
  _, plt = _matplotlib()
  path = epath.Path(path)
  fig.tight_layout(rect=rect)
  fig.savefig(os.fspath(path), dpi=dpi)
  plt.close(fig)
  return path


def radii_by_layer(path: str | os.PathLike, layers: Mapping[str, Mapping[str, Any]]) -> epath.Path:
  """One panel per run with radii: learned radius and distance to the anchor per layer.

  Args:
    path: the image file to write.
    layers: run -> ``{"paths": [...], "distance": [...], "radius": [...] or None}`` with
      the layers in depth order. Runs without radii (e.g. FT) are drawn in every panel as
      a reference distance.

  Returns:
    ``path``.
  """
  _, plt = _matplotlib()
  tpgm = [r for r, v in layers.items() if v.get("radius") is not None]
  refs = [r for r, v in layers.items() if v.get("radius") is None]
  fig, axes = plt.subplots(len(tpgm), 1, figsize=(10, 3.6 * len(tpgm)), squeeze=False)
  floor = 1e-8
  for ax, run in zip(axes[:, 0], tpgm):
    info = layers[run]
    x = np.arange(len(info["paths"]))
    ax.plot(
      x, np.maximum(np.asarray(info["radius"]), floor), "o-", ms=3, label=f"{run}: learned radius"
    )
    ax.plot(
      x,
      np.maximum(np.asarray(info["distance"]), floor),
      "s--",
      ms=3,
      label=f"{run}: distance to anchor (max MARS norm)",
    )
    for ref in refs:
      dist = dict(zip(layers[ref]["paths"], layers[ref]["distance"]))
      if all(p in dist for p in info["paths"]):
        ax.plot(
          x,
          np.maximum([dist[p] for p in info["paths"]], floor),
          ":",
          lw=1,
          label=f"{ref}: distance to anchor",
        )
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(info["paths"], rotation=90, fontsize=6)
    ax.set_ylabel("L1 per output channel")
    ax.set_title(f"{run}: per-layer radii by depth")
    ax.legend(fontsize=7)
  return _save(fig, path, dpi=110)


def id_vs_ood(
  path: str | os.PathLike,
  points: Mapping[str, Mapping[str, Sequence[float]]],
  curve: Sequence[tuple[float, float, float]] = (),
  highlight: Sequence[str] = (),
  curve_label: str = "WiSE-FT",
  promise: tuple[float, float] | None = None,
) -> epath.Path:
  """ID test vs OOD mean accuracy: every method with std bars, labelled beside its point.

  Args:
    path: the image file to write.
    points: method -> ``{"id": (mean, std), "ood": (mean, std)}``, drawn in this order.
    curve: ``(alpha, id, ood)`` points of the WiSE-FT curve, drawn as a grey line.
    highlight: methods drawn larger and on top.
    curve_label: the legend entry of the curve.
    promise: FT's ``(id, ood)``: shades TPGM's promise, OOD >= 1.15 x FT's at ID >= FT's - 1.

  Returns:
    ``path``.
  """
  _, plt = _matplotlib()
  fig, ax = plt.subplots(figsize=(8, 6))
  _draw_id_vs_ood(ax, plt, points, curve, highlight, curve_label, promise)
  ax.set_title("In-distribution vs out-of-distribution (mean +- std over seeds)")
  ax.legend(fontsize=7, loc="best", ncol=2)
  return _save(fig, path, dpi=130)


def id_vs_ood_cells(
  path: str | os.PathLike,
  panels: Mapping[str, Mapping[str, Any]],
  title: str = "",
) -> epath.Path:
  """:func:`id_vs_ood` for several cells side by side, one panel each (its own axes).

  Args:
    path: the image file to write.
    panels: panel title (a cell) -> ``{"points", "curve", "promise", "highlight"}``, the
      arguments of :func:`id_vs_ood` (all but ``points`` optional).
    title: the figure's title.

  Returns:
    ``path``.
  """
  _, plt = _matplotlib()
  n = max(len(panels), 1)
  cols = min(n, 3)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 5 * rows), squeeze=False)
  order: list[str] = []  # one colour and marker per method in every panel
  for panel in panels.values():
    order += [m for m in panel["points"] if m not in order]
  index = {m: i for i, m in enumerate(order)}
  legend: dict[str, Any] = {}
  for ax, (name, panel) in zip(axes.flat, panels.items()):
    _draw_id_vs_ood(
      ax,
      plt,
      panel["points"],
      panel.get("curve", ()),
      panel.get("highlight", ()),
      "WiSE-FT",
      panel.get("promise"),
      index,
    )
    ax.set_title(name, fontsize=10)
    legend.update(zip(*reversed(ax.get_legend_handles_labels())))
  spare = list(axes.flat)[len(panels) :]
  for ax in spare:
    ax.axis("off")
  handles, labels = list(legend.values()), list(legend)
  if title:
    fig.suptitle(title)
  if spare:  # the legend in the first empty panel
    spare[0].legend(handles, labels, fontsize=9, loc="center", ncol=2)
    return _save(fig, path, dpi=110)
  ncol = min(len(legend), 7) or 1
  fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=ncol)
  bottom = (0.3 + 0.25 * (-(-len(legend) // ncol))) / (5 * rows)  # inches of legend rows
  return _save(fig, path, dpi=110, rect=(0, bottom, 1, 1))


def _draw_id_vs_ood(ax, plt, points, curve, highlight, curve_label, promise, index=None) -> None:
  """The points, curve and promise of :func:`id_vs_ood` on ``ax`` (no title, no legend);
  ``index``: method -> colour and marker number (default: its position in ``points``)."""
  if curve:
    alphas, xs, ys = zip(*curve)
    ax.plot(xs, ys, "-", color="grey", lw=1.5, zorder=1, label=curve_label)
    for alpha, x, y in curve:
      ax.annotate(
        f"{alpha:g}", (x, y), fontsize=7, color="grey", xytext=(3, 3), textcoords="offset points"
      )
  if promise is not None:
    ax.fill_between(
      [promise[0] - 1, 100],
      1.15 * promise[1],
      100,
      color="tab:green",
      alpha=0.08,
      label="TPGM's promise: OOD >= 1.15 x FT at ID >= FT - 1",
    )
  # tab20's dark shades first, then its light ones: up to 20 rows in distinct colours.
  colors = [plt.get_cmap("tab20")(i) for i in (*range(0, 20, 2), *range(1, 20, 2))]
  markers = "osD^v<>pP*Xhd"
  for i, (row, v) in enumerate(points.items()):
    i = index[row] if index else i
    strong = row in highlight
    color = colors[i % len(colors)]
    ax.errorbar(
      v["id"][0],
      v["ood"][0],
      xerr=v["id"][1],
      yerr=v["ood"][1],
      fmt=markers[i % len(markers)],
      color=color,
      ms=8 if strong else 6,
      capsize=3,
      label=row,
      zorder=3 if strong else 2,
    )
    ax.annotate(
      row,
      (v["id"][0], v["ood"][0]),
      fontsize=7,
      color=color,
      xytext=(6, -10 if i % 2 else 5),
      textcoords="offset points",
    )
  xs = [v["id"][0] for v in points.values()] + [c[1] for c in curve]
  ys = [v["ood"][0] for v in points.values()] + [c[2] for c in curve]
  ax.set_xlim(min(xs) - 3, max(xs) + 3)
  ax.set_ylim(min(ys) - 5, max(ys) + 5)
  ax.set_xlabel("ID test accuracy (%)")
  ax.set_ylabel("OOD mean accuracy (%)")
  ax.grid(alpha=0.3)


def weights_by_depth(
  path: str | os.PathLike,
  paths: Sequence[str],
  reference: Sequence[float],
  radii: Mapping[str, Sequence[float]],
  ratios: Mapping[str, Sequence[float]],
  seed: int = 0,
) -> epath.Path:
  """Weight tensors in depth order: learned radii and how far each run moved.

  Left: the learned radii of each run against the reference (FT's) distance to the
  pre-trained weights; right: each run's distance divided by FT's, as a heat map.

  Args:
    path: the image file to write.
    paths: the weight tensors, input to output.
    reference: FT's distance to the pre-trained weights, per tensor of ``paths``.
    radii: run -> its learned radius per tensor of ``paths`` (NaN: not constrained).
    ratios: run -> its distance / FT's per tensor of ``paths`` (NaN: not constrained).
    seed: the seed of the runs (for the titles).

  Returns:
    ``path``.
  """
  mpl, plt = _matplotlib()
  x = np.arange(len(paths))
  labels = [p.removesuffix("/kernel") for p in paths]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [1, 1.25]})
  ax1.plot(x, np.asarray(reference, float), "k--", lw=2, label="FT: distance to pre-trained")
  for row, radius in radii.items():
    ax1.plot(
      x, np.maximum(np.asarray(radius, float), 1e-5), "o-", ms=3, lw=1.2, label=f"{row}: radius"
    )
  ax1.set_yscale("log")
  ax1.set_ylim(bottom=1e-5)
  ax1.set_ylabel("max per-channel L1 (MARS); radii at the 1e-8 floor drawn at 1e-5")
  ax1.set_title(f"learned radii vs FT's distance, weight tensors by depth (seed {seed})")
  ax1.set_xticks(x, labels, rotation=90, fontsize=7)
  ax1.grid(alpha=0.3)
  ax1.legend(fontsize=7)
  rows = list(ratios)
  if rows:  # else an empty panel: no constrained run besides the reference
    grid = np.array([np.asarray(ratios[r], float) for r in rows]).reshape(len(rows), len(paths))
    logs = np.log10(np.clip(grid, 1e-4, 1e2))
    vmax = max(1.0, np.nanmax(logs)) if np.isfinite(logs).any() else 1.0
    im = ax2.imshow(
      logs,
      aspect="auto",
      cmap="RdBu_r",
      norm=mpl.colors.TwoSlopeNorm(vcenter=0.0, vmin=-4, vmax=vmax),
    )
    for (i, j), v in np.ndenumerate(grid):
      if np.isfinite(v):
        ax2.text(j, i, f"{v:.2f}" if v >= 0.01 else "<.01", ha="center", va="center", fontsize=5)
    ax2.set_yticks(range(len(rows)), rows, fontsize=8)
    fig.colorbar(im, ax=ax2, label="log10 of the ratio (blue: held tighter than FT)")
  ax2.set_xticks(x, labels, rotation=90, fontsize=7)
  ax2.set_title(f"distance to pre-trained / FT's distance (input left, output right; seed {seed})")
  return _save(fig, path, dpi=130)


def radius_signal(
  path: str | os.PathLike,
  per_tensor: Sequence[Mapping[str, Any]],
  per_step: Sequence[Mapping[str, Any]],
) -> epath.Path:
  """The radius-signal diagnostic: shrink frequency and gradient cosines.

  Left: per tensor in depth order; right: along fine-tuning (mean over tensors).

  Args:
    path: the image file to write.
    per_tensor: ``{"path", "shrink_frequency", "cos_batch", "cos_mean"}`` per tensor,
      input to output (:func:`experiments.analysis.diagnose.summarise`).
    per_step: ``{"step", "shrink_frequency", "cos_batch", "cos_mean"}`` per checkpoint.

  Returns:
    ``path``.
  """
  _, plt = _matplotlib()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
  x = np.arange(len(per_tensor))
  ax1.axhline(50, color="grey", lw=0.8, ls=":")
  ax1.bar(
    x,
    [100 * t["shrink_frequency"] for t in per_tensor],
    color="tab:red",
    alpha=0.7,
    label="held-out radius gradient > 0 (shrink), %",
  )
  ax1b = ax1.twinx()
  ax1b.axhline(0, color="grey", lw=0.8)
  ax1b.plot(
    x,
    [t["cos_batch"] for t in per_tensor],
    "o-",
    color="tab:blue",
    ms=3,
    label="cos(train, held-out), one batch",
  )
  ax1b.plot(
    x,
    [t["cos_mean"] for t in per_tensor],
    "s-",
    color="tab:green",
    ms=3,
    label="cos of the batch means",
  )
  ax1.set_xticks(
    x, [t["path"].removesuffix("/kernel") for t in per_tensor], rotation=90, fontsize=6
  )
  ax1.set_ylim(0, 100)
  ax1b.set_ylim(-1, 1)
  ax1.set_ylabel("shrink frequency (%)")
  ax1b.set_ylabel("cosine")
  ax1.set_title("per tensor, input (left) to output (right)")
  h1, l1 = ax1.get_legend_handles_labels()
  h2, l2 = ax1b.get_legend_handles_labels()
  ax1.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
  steps = [r["step"] for r in per_step]
  ax2.plot(
    steps,
    [100 * r["shrink_frequency"] for r in per_step],
    "o-",
    color="tab:red",
    label="shrink frequency (%)",
  )
  ax2.axhline(50, color="grey", lw=0.8, ls=":")
  ax2.set_xlabel("FT step")
  ax2.set_ylabel("shrink frequency (%)")
  ax2.set_ylim(0, 100)
  ax2c = ax2.twinx()
  ax2c.plot(
    steps, [r["cos_batch"] for r in per_step], "o-", color="tab:blue", label="cos, one batch"
  )
  ax2c.plot(
    steps, [r["cos_mean"] for r in per_step], "s-", color="tab:green", label="cos, batch means"
  )
  ax2c.set_ylim(-1, 1)
  ax2c.axhline(0, color="grey", lw=0.8)
  h1, l1 = ax2.get_legend_handles_labels()
  h2, l2 = ax2c.get_legend_handles_labels()
  ax2.legend(h1 + h2, l1 + l2, fontsize=7)
  ax2.set_title("along fine-tuning (mean over tensors)")
  return _save(fig, path, dpi=120)


def gains_vs_ft(
  path: str | os.PathLike,
  gains: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]],
  title: str = "",
) -> epath.Path:
  """ID and OOD-mean gain vs FT per method (bars grouped by cell, std as error bars).

  Args:
    path: the image file to write.
    gains: cell -> method -> ``{"id": (mean, std), "ood": (mean, std)}`` in points; methods
      in the order of their first appearance.
    title: the benchmark, in the title.

  Returns:
    ``path``.
  """
  _, plt = _matplotlib()
  cells = list(gains)
  methods = []
  for c in cells:
    methods += [m for m in gains[c] if m not in methods]
  fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.55 * len(methods) + 2), 7), sharex=True)
  width = 0.8 / max(len(cells), 1)
  x = np.arange(len(methods))
  colors = plt.get_cmap("viridis")(np.linspace(0.15, 0.85, max(len(cells), 1)))
  for ax, key, label in zip(axes, ("id", "ood"), ("ID test", "OOD mean")):
    for i, c in enumerate(cells):
      vals = [gains[c].get(m, {}).get(key, (np.nan, 0.0)) for m in methods]
      ax.bar(
        x + (i - (len(cells) - 1) / 2) * width,
        [v[0] for v in vals],
        width,
        yerr=[v[1] for v in vals],
        capsize=2,
        color=colors[i],
        label=c,
      )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel(f"{label} - FT (points)")
    ax.grid(axis="y", alpha=0.3)
  axes[0].legend(fontsize=8, ncol=min(len(cells), 4))
  axes[0].set_title(f"Gain vs FT per method and cell{f' ({title})' if title else ''}")
  axes[1].set_xticks(x)
  axes[1].set_xticklabels(methods, rotation=45, ha="right", fontsize=8)
  return _save(fig, path, dpi=120)


def radius_updates(
  path: str | os.PathLike,
  steps: Sequence[int],
  series: Mapping[str, Mapping[str, Sequence[float]]],
) -> epath.Path:
  """TPGM's radius updates, one column per tensor: the radius and its clip bound (top), the
  held-out radius gradient and the radius optimizer's step (bottom).

  Args:
    path: the image file to write.
    steps: the step of every value.
    series: tensor path -> ``{"r_prev", "bound", "grad", "step"}`` per step
      (:mod:`experiments.analysis.mechanism`).

  Returns:
    ``path``.
  """
  _, plt = _matplotlib()
  k = max(len(series), 1)
  fig, axes = plt.subplots(2, k, figsize=(3.6 * k, 6), squeeze=False, sharex=True)
  for j, (name, s) in enumerate(series.items()):
    top, bottom = axes[0, j], axes[1, j]
    top.plot(steps, s["bound"], color="tab:grey", lw=1, label="bound: max(norms) of candidate")
    top.plot(steps, s["r_prev"], color="tab:red", lw=1.2, label="radius")
    top.set_yscale("log")
    top.set_title(name.removesuffix("/kernel"), fontsize=8)
    grad = np.asarray(s["grad"], dtype=float)
    bottom.scatter(
      steps, np.sign(grad), s=2, color=np.where(grad < 0, "tab:green", "tab:red"), alpha=0.5
    )
    bottom.set_ylim(-1.5, 1.5)
    bottom.set_yticks([-1, 1], ["grow", "shrink"], fontsize=7)
    twin = bottom.twinx()
    twin.plot(steps, s["step"], color="tab:blue", lw=0.8, label="optimizer step")
    twin.axhline(0, color="black", lw=0.5)
    if j == k - 1:
      twin.set_ylabel("radius optimizer step", fontsize=8)
    bottom.set_xlabel("step")
    if j == 0:
      top.set_ylabel("radius / bound")
      bottom.set_ylabel("held-out gradient sign")
      top.legend(fontsize=7)
      twin.legend(fontsize=7, loc="lower right")
  fig.suptitle("TPGM radius updates: radius vs its clip bound; gradient sign and step")
  return _save(fig, path, dpi=120)
