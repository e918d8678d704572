"""Why TPGM's radii stay small: every radius update of a TPGM run, taken apart.

``python -m experiments.mechanism --config experiments/configs/study.py
[--config.mechanism.method=tpgm] [--config.study.out=.]`` re-runs the TPGM run of the config
(same pre-trained weights, head initialisation, data order and held-out batches as the
runner's: its final parameters are the same) in a loop that, at every step ``t`` and for
every constrained tensor, records

* ``r_prev``: the radius the state holds before the step (at step 1: the initial radius,
  ``min(norms) / 2`` of the first candidate);
* ``bound``: ``max(norms)`` of the candidate ``c = w + u`` (the inner optimizer's update
  ``u``; with lazy projection ``c = f + u``, ``f`` the unprojected iterate), the clip the
  radius update applies first (``clip(r, 1e-8, max(norms))``, as in the reference);
* ``grad``: the held-out loss's gradient with respect to the clipped radius, on the same
  held-out batch the step uses (< 0: a larger radius lowers the held-out loss);
* ``step``: the radius optimizer's step, ``r_new - clip(r_prev)``;
* ``r_new`` and ``ft_norm``: the radius after the step and the candidate's largest channel
  distance (what the radius would have to reach for the projection to leave the tensor
  alone).

:func:`summarise` splits each tensor's growth into its parts (``r_T = r_0 + sum(clip cuts) +
sum(optimizer steps)``), how often the gradient asks to grow and how often the clip or the
projection binds, and :func:`render` says which of the gradient's sign, the clip or the
optimizer's step size holds the radii; the figure plots a few tensors step by step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from ml_collections import ConfigDict

import tpgm_jax
from experiments import environment, runner
from experiments.analysis import plots, tables
from experiments.plan import make_plan, with_fields
from experiments.training import distributed, loop
from experiments.types import PyTree


class InnerUpdates(NamedTuple):
  """State of :func:`observe`: the last update the inner optimizer produced."""

  inner_updates: PyTree


def observe() -> optax.GradientTransformation:
  """An identity transformation that keeps the updates it passes in its state (to read the
  inner optimizer's update ``u``, hence the candidate ``w + u``, after a step)."""

  def init_fn(params):
    return InnerUpdates(jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del state, params
    return updates, InnerUpdates(updates)

  return optax.GradientTransformation(init_fn, update_fn)


def _trace_step(setup, tx, constrained, norm: str, lazy: bool = False):
  """The jitted step: the run's step plus the radius-update quantities of every tensor."""
  model, task = setup.model, setup.task

  def heldout_loss(p, b):
    return loop.cross_entropy(model, p, b, task)

  def step(params, opt_state, anchor, t, batch, heldout):
    loss, grads = jax.value_and_grad(lambda p: heldout_loss(p, batch))(params)
    held = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), heldout)  # (iters, batch, ...)
    updates, new_state = tx.update(grads, opt_state, params, heldout=held)
    candidate = optax.apply_updates(params, optax.tree.get(new_state, "inner_updates"))
    if lazy:  # the constrained tensors' candidate is f + u, which the state keeps as f
      candidate = jax.tree.map(
        lambda f, c: c if isinstance(f, optax.MaskedNode) else f,
        optax.tree.get(new_state, "free"),
        candidate,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
      )
    first = tpgm_jax.init_radii(candidate, anchor, norm, constrained)
    r_prev = jax.tree.map(
      lambda r, r0: jnp.where(t == 0, r0, r), optax.tree.get(opt_state, "radii"), first
    )
    clipped = tpgm_jax.clip_radii(r_prev, candidate, anchor, norm, constrained)
    batch0 = jax.tree.map(lambda x: x[0], held)
    grad = jax.grad(
      lambda r: heldout_loss(tpgm_jax.project(candidate, anchor, r, norm, constrained), batch0)
    )(clipped)
    r_new = optax.tree.get(new_state, "radii")
    norms = tpgm_jax.distance_norms(candidate, anchor, norm, constrained)
    picked = loop.select_leaves  # the constrained tensors, in leaf order
    row = {
      "loss": loss,
      "r_prev": jnp.stack(picked(r_prev, constrained)),
      "bound": jnp.stack([jnp.max(n) for n in picked(norms, constrained)]),
      "grad": jnp.stack(picked(grad, constrained)),
      "step": jnp.stack(
        [a - b for a, b in zip(picked(r_new, constrained), picked(clipped, constrained))]
      ),
      "r_new": jnp.stack(picked(r_new, constrained)),
    }
    return optax.apply_updates(params, updates), new_state, row

  return jax.jit(step)


def trace(config: ConfigDict, workdir: str, method: str = "tpgm") -> dict[str, Any]:
  """Re-runs run ``method`` (a TPGM-during-FT section of ``config``, radius update every
  step) with the trace; ``{"paths", "rows" (per step: name -> list per tensor), "info"}``."""
  cfg = with_fields(config, methods=(method,))
  plan = make_plan(cfg, workdir, device_count=jax.device_count())
  # One device: the trace is a single-process analysis (and its arrays stay unsharded).
  one = distributed.make_mesh({"data": 1, "model": 1}, devices=jax.local_devices()[:1])
  env = environment.setup(plan, mesh=one)
  spec = plan[method]
  section = spec.section
  if spec.method.heldout is None or section.proj_freq != 1 or section.max_iters != 1:
    raise ValueError(
      f"mechanism: {method!r} must be TPGM during fine-tuning with proj_freq=1 and "
      f"max_iters=1 (the paper's recipe), got {section.to_dict()}"
    )
  setup = env.train_setup(
    spec, init_params=lambda fresh: runner.start_params(env, plan, spec, fresh)
  )
  init_key, _ = jax.random.split(jax.random.key(setup.seed))
  fresh = jax.jit(lambda: setup.init(init_key))()
  abstract = jax.eval_shape(lambda: fresh)
  tx, constrained, _ = loop.transform(
    setup, abstract, wrap_inner=lambda inner: optax.chain(inner, observe())
  )
  params = setup.init_params(fresh)
  opt_state = tx.init(params)
  lazy = bool(section.get("lazy", False))
  step_fn = _trace_step(setup, tx, constrained, section.norm, lazy)
  anchor = jax.tree.map(jnp.copy, params)  # the pre-trained backbone, the new head
  paths = [p for p, m in zip(tpgm_jax.leaf_paths(params), jax.tree.leaves(constrained)) if m]
  rows = []
  with contextlib.ExitStack() as stack:
    data = stack.enter_context(contextlib.closing(setup.data(setup.train.batch_size, 0)))
    heldout = loop.heldout_feed(setup, 0, stack)
    for t in range(setup.train.steps):
      batch = distributed.global_batch(next(data), env.mesh)
      params, opt_state, row = step_fn(params, opt_state, anchor, t, batch, heldout(t))
      rows.append(row)
      if (t + 1) % 50 == 0:
        logging.info("mechanism: step %d / %d", t + 1, setup.train.steps)
  rows = jax.device_get(rows)
  out_rows = [{k: np.asarray(v).tolist() for k, v in r.items()} for r in rows]
  for t, r in enumerate(out_rows):
    r["t"] = t + 1
  info = {
    "method": method,
    "run": os.fspath(spec.directory.name),
    "radius_lr": section.lr,
    "lr": spec.train.optimizer.lr,
    "steps": setup.train.steps,
    "train_size": cfg.data.get("train_size", 0),
    "norm": section.norm,
    "lazy": lazy,
    "results": env.evaluator(params),  # the run's accuracy in %, every split
  }
  return {"paths": paths, "rows": out_rows, "info": info, "final_params": params}


def summarise(data: Mapping[str, Any]) -> dict[str, Any]:
  """Per tensor and overall: the growth decomposition and the binding frequencies.

  Per tensor: ``r0`` (initial radius), ``r_final``, ``bound_final``; the decomposition
  ``r_final = r0 + clip_floor + clip_ceiling + opt_up + opt_down``: ``clip_floor`` (>= 0, what
  the clip's floor ``1e-8`` adds back when an optimizer step took the stored radius below
  zero), ``clip_ceiling`` (<= 0, what the clip to ``max(norms)`` cuts), ``opt_up`` /
  ``opt_down`` (sums of the optimizer's positive / negative steps); ``grow_frequency`` (share
  of steps with ``grad < 0``), ``at_floor`` / ``at_ceiling`` (shares of steps where the clip
  raised / lowered the radius), ``projected`` (share of steps where the new radius is below
  the candidate's largest channel distance), ``mean_abs_step`` and ``ratio_to_bound``.
  """
  rows = data["rows"]
  arr = {k: np.array([r[k] for r in rows]) for k in ("r_prev", "bound", "grad", "step", "r_new")}
  clipped = np.clip(arr["r_prev"], 1e-8, np.maximum(arr["bound"], 1e-8))
  cut = clipped - arr["r_prev"]
  per_tensor = []
  for i, path in enumerate(data["paths"]):
    s, c = arr["step"][:, i], cut[:, i]
    per_tensor.append(
      {
        "path": path,
        "r0": float(arr["r_prev"][0, i]),
        "r_final": float(arr["r_new"][-1, i]),
        "bound_final": float(arr["bound"][-1, i]),
        "clip_floor": float(c[c > 0].sum()),
        "clip_ceiling": float(c[c < 0].sum()),
        "opt_up": float(s[s > 0].sum()),
        "opt_down": float(s[s < 0].sum()),
        "grow_frequency": float(np.mean(arr["grad"][:, i] < 0)),
        "at_floor": float(np.mean(c > 0)),
        "at_ceiling": float(np.mean(c < 0)),
        "projected": float(np.mean(arr["r_new"][:, i] < arr["bound"][:, i])),
        "mean_abs_step": float(np.abs(s).mean()),
        "ratio_to_bound": float(max(arr["r_new"][-1, i], 0.0) / max(arr["bound"][-1, i], 1e-12)),
      }
    )
  keys = [k for k in per_tensor[0] if k != "path"]
  overall = {k: float(np.median([t[k] for t in per_tensor])) for k in keys}
  overall["step_over_lr"] = overall["mean_abs_step"] / data["info"]["radius_lr"]
  return {"per_tensor": per_tensor, "overall": overall}


def findings(summary: Mapping[str, Any], info: Mapping[str, Any]) -> list[str]:
  """Sentences on what holds the radii, computed from :func:`summarise`."""
  o, t = summary["overall"], summary["per_tensor"]
  total = {k: float(np.sum([x[k] for x in t])) for k in ("opt_up", "opt_down", "clip_floor")}
  total["clip_ceiling"] = float(np.sum([x["clip_ceiling"] for x in t]))
  lr, steps = info["radius_lr"], info["steps"]
  out = [
    f"Over {steps} steps the held-out gradient asks to grow the radius in "
    f"{100 * o['grow_frequency']:.0f} % of the steps (median over {len(t)} tensors), and the "
    f"radius optimizer (Adam, lr {lr:g}) takes steps of a median {o['step_over_lr']:.2f} x its "
    "learning rate: Adam's step is about lr only when the gradient keeps its sign, so the "
    "sign changes most steps.",
    f"Summed over tensors the optimizer's steps add {total['opt_up']:.3g} and remove "
    f"{-total['opt_down']:.3g}: the net drift is "
    f"{'down' if total['opt_up'] + total['opt_down'] < 0 else 'up'}. The clip's floor (1e-8) "
    f"gives back {total['clip_floor']:.3g} (the stored radius went below zero: a median "
    f"{100 * o['at_floor']:.0f} % of the steps start at the floor) and its ceiling, "
    f"max(norms) of the candidate, cuts {-total['clip_ceiling']:.3g} (binding in a median "
    f"{100 * o['at_ceiling']:.0f} % of the steps).",
    f"The radii end at a median {o['r_final']:.3g} (they start at {o['r0']:.3g}, half the "
    "smallest channel distance of the first step), and the projection moves some channel in "
    f"{100 * o['projected']:.0f} % of the steps.",
  ]
  if info.get("lazy"):
    out.append(
      "With lazy projection the optimizer's steps accumulate unprojected: that iterate ends at "
      f"a median largest channel distance of {o['bound_final']:.3g} from the anchor, and the "
      f"radii at a median {100 * o['ratio_to_bound']:.1f} % of it."
    )
  up, down = total["opt_up"], -total["opt_down"]
  if -total["clip_ceiling"] > 0.5 * up:
    beyond = (
      "the unprojected iterate's distance"
      if info.get("lazy")
      else "one inner step beyond the radius"
    )
    out.append(
      "What holds the radii: **the clip's ceiling**: what the optimizer would add is cut back "
      f"to the candidate's largest channel distance ({beyond})."
    )
  elif down >= 0.8 * up and o["step_over_lr"] < 0.5:
    asks = (
      "asks to shrink at least as much as to grow"
      if down >= up
      else f"asks to grow only {up / max(down, 1e-12):.2f}x as much as to shrink"
    )
    line = (
      f"What holds the radii: **the held-out gradient's sign**. It changes most steps and, "
      f"summed, {asks}, so Adam's steps cancel and the radii random-walk near where they "
      "start"
      + (", reflected at zero by the clip's floor" if o["at_floor"] > 0.05 else "")
      + "; the ceiling and the step size rarely bind."
    )
    if info.get("method") == "tpgm":  # the study's measurements of TPGM as published
      line += (
        " That is consistent with the measured insensitivity to the radius learning rate (it "
        "scales the steps both ways) and to the horizon (a walk without drift does not grow "
        "with time), and with a 4x larger held-out batch changing nothing: the mean of the "
        "signal, not only its noise, is near zero."
      )
    out.append(line)
  else:
    out.append(
      f"What holds the radii: **the optimizer's step size**: the gradient mostly asks to grow "
      f"and a radius grows by at most lr x steps = {lr * steps:.3g}."
    )
  return out


def stem(method: str) -> str:
  """The file name (without suffix) of a method's trace: ``mechanism`` for TPGM as published
  (``tpgm``), ``mechanism_<method>`` for a variant."""
  return "mechanism" if method == "tpgm" else f"mechanism_{method}"


def accuracy_line(info: Mapping[str, Any]) -> str | None:
  """ "The run ends at ID ... / OOD ..." from the trace's evaluation (None for a trace written
  before it had one)."""
  res = info.get("results")
  if not res:
    return None
  ood = {k: v for k, v in res.items() if k not in ("val", "test")}
  mean = float(np.mean(list(ood.values()))) if ood else float("nan")
  return (
    f"The run ends at ID test {res['test']:.1f} % and OOD {mean:.1f} % (mean of "
    + ", ".join(f"{k} {v:.1f}" for k, v in ood.items())
    + f"; val {res['val']:.1f})."
  )


def render(data: Mapping[str, Any]) -> str:
  """The RESULTS.md section from ``results/mechanism.json`` (a subsection for a variant's
  ``results/mechanism_<method>.json``)."""
  summary, info = data["summary"], data["info"]
  rows = summary["per_tensor"]
  pick = set(data["plotted"])
  name = stem(info["method"])
  ends = accuracy_line(info)
  if name == "mechanism":
    head = [
      "## Why the radii stay small (`python -m experiments.mechanism`)",
      "",
      f"Every radius update of the `{info['method']}` run of the default cell "
      f"({info['steps']} steps, radius lr {info['radius_lr']:g}, training lr {info['lr']:g}), "
      "taken apart per tensor: the clip `clip(r, 1e-8, max(norms))` of the candidate, the "
      "held-out gradient and the radius optimizer's step (`results/mechanism.json`).",
    ]
  else:
    how = " with lazy projection (the optimizer's steps accumulate unprojected)" * bool(
      info.get("lazy")
    )
    head = [
      f"### The same for `{info['method']}`{how}",
      "",
      f"`python -m experiments.mechanism --config experiments/configs/study.py "
      f"--config.mechanism.method={info['method']}`: the same cell, {info['steps']} steps, "
      f"radius lr {info['radius_lr']:g}, training lr {info['lr']:g} (`results/{name}.json`).",
    ]
  return "\n".join(
    [
      *head,
      "",
      *[f"- {line}" for line in [*data["findings"], *([ends] if ends else [])]],
      "",
      f"![radius updates](results/{name}.png)",
      "",
      tables.markdown_table(
        [
          "tensor",
          "r0",
          "final r",
          "final max(norms)",
          "optimizer +",
          "optimizer -",
          "floor gives",
          "ceiling cuts",
          "grad asks to grow",
          "at floor",
          "at ceiling",
        ],
        [
          [
            ("**" + t["path"] + "**") if t["path"] in pick else t["path"],
            f"{t['r0']:.3g}",
            f"{t['r_final']:.3g}",
            f"{t['bound_final']:.3g}",
            f"{t['opt_up']:.3g}",
            f"{t['opt_down']:.3g}",
            f"{t['clip_floor']:.3g}",
            f"{t['clip_ceiling']:.3g}",
            tables.percent(t["grow_frequency"]),
            tables.percent(t["at_floor"]),
            tables.percent(t["at_ceiling"]),
          ]
          for t in rows
        ],
        align="lrrrrrrrrrr",
      ),
      "",
    ]
  )


def plotted(paths: Sequence[str], k: int = 4) -> list[str]:
  """``k`` kernels spread over depth (first, last and between)."""
  kernels = [p for p in paths if p.endswith("kernel")] or list(paths)
  idx = sorted({round(i * (len(kernels) - 1) / max(k - 1, 1)) for i in range(k)})
  return [kernels[i] for i in idx]


def render_figures(data: Mapping[str, Any], out_dir: str | os.PathLike) -> list[epath.Path]:
  """``<out_dir>/results/<stem>.png`` (:func:`stem`): radius, bound, gradient and step of a
  few tensors."""
  figs = epath.Path(out_dir) / "results"
  figs.mkdir(parents=True, exist_ok=True)
  index = {p: i for i, p in enumerate(data["paths"])}
  series = {
    p: {k: [r[k][index[p]] for r in data["rows"]] for k in ("r_prev", "bound", "grad", "step")}
    for p in data["plotted"]
  }
  path = figs / f"{stem(data['info']['method'])}.png"
  return [plots.radius_updates(path, [r["t"] for r in data["rows"]], series)]


def measure(config: ConfigDict, workdir: str) -> dict[str, Any]:
  """:func:`trace` + :func:`summarise`: the dict ``results/mechanism.json`` holds."""
  data = trace(config, workdir, config.mechanism.method)
  data.pop("final_params")
  data["summary"] = summarise(data)
  data["findings"] = findings(data["summary"], data["info"])
  data["plotted"] = plotted(data["paths"])
  return data


def _rounded(x: Any) -> Any:
  """``x`` with every float to 6 significant digits (the JSON stays small and readable)."""
  if isinstance(x, float):
    return float(f"{x:.6g}")
  if isinstance(x, dict):
    return {k: _rounded(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_rounded(v) for v in x]
  return x


def write(data: Mapping[str, Any], out_dir: str | os.PathLike) -> epath.Path:
  """Writes ``<out_dir>/results/<stem>.json`` (:func:`stem`; floats to 6 significant
  digits); a variant's trace never replaces TPGM's."""
  path = epath.Path(out_dir) / "results" / f"{stem(data['info']['method'])}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(_rounded(dict(data))))
  return path


def load(out_dir: str | os.PathLike) -> dict[str, Any] | None:
  """``results/mechanism.json`` of ``out_dir``; None if absent."""
  path = epath.Path(out_dir) / "results" / "mechanism.json"
  return json.loads(path.read_text()) if path.exists() else None


def load_variants(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
  """Every ``results/mechanism_<method>.json`` of ``out_dir`` (the variants' traces), by name."""
  paths = sorted((epath.Path(out_dir) / "results").glob("mechanism_*.json"))
  return [json.loads(p.read_text()) for p in paths]
