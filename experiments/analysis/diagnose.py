"""Can TPGM learn its radii on this data? A diagnostic of the held-out radius signal.

``python -m experiments.diagnose [--workdir runs] [--config ...]`` fine-tunes
with plain FT (``config.diagnose.method``), keeping a checkpoint every
``config.diagnose.every`` steps, and at each checkpoint measures, per
constrained tensor ``w`` (anchor ``w0``, displacement ``d = w - w0`` with the
distance norms ``n_j`` of TPGM's ``"mars"`` norm):

* **the radius gradient** ``h = sum_j <g, d_j> / n_j`` of the held-out loss,
  on ``config.diagnose.batches`` held-out batches one at a time (what one TPGM
  radius update sees). It is the derivative of the held-out loss with respect
  to the radius of a ball that just contains ``w`` with every channel on it
  (the ``[0, 1]`` clip of the ratio ignored, as in FTP's amortised gradient):
  ``h > 0`` means TPGM's Adam step SHRINKS the radius (pulls toward the
  anchor), ``h < 0`` grows it. Reported: the fraction of batches with
  ``h > 0`` ("shrink frequency"), and the signal-to-noise ratio
  ``|mean h| / std h`` over the batches;
* **the alignment** of training and held-out gradients: the cosine between the
  gradient of one training batch and of one held-out batch (the noise one
  radius step sees) and between the means over the batches (the signal).

Reading it: if the held-out gradients are nearly orthogonal to the training
ones and the radius gradient is noise (shrink frequency near 50-60 %, SNR well
below 1), TPGM's radius updates are a random walk with a shrink bias and the
radii collapse toward the anchor (as on the first version of this benchmark).
If the gradients are aligned and the held-out radius gradient is mostly
negative while FT still improves on held-out data, the radii can follow FT and
stop where the held-out loss stops improving.

Writes ``<workdir>/<config.name>/diagnose_<method>.{json,md,png}``. The run
lives in its own directory (all its checkpoints are kept) and is reused when
run again. ``--config.diagnose.method=tpgm`` measures the same quantities
along TPGM's own run, at its projected iterates: the radius gradient there is
(up to the clip of the ratio) the signal TPGM's radius updates follow.

:func:`measure` and :func:`summarise` compute (plain dicts and lists: the JSON);
:func:`markdown` presents that dict and the figure is
:func:`experiments.analysis.plots.radius_signal`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from ml_collections import ConfigDict

import tpgm_jax
from experiments import environment, runner
from experiments.analysis import plots, tables
from experiments.plan import make_plan
from experiments.training import checkpointing, distributed, loop
from experiments.types import PyTree

EPS = 1e-8


def diagnose_config(config: ConfigDict) -> tuple[ConfigDict, str]:
  """The config of the diagnostic FT run (every checkpoint kept) and its method name."""
  cfg = ConfigDict(config.to_dict())
  d = config.diagnose
  section = cfg.get(d.method)
  if section is None or "train" not in section:
    cfg[d.method] = ConfigDict({**(section.to_dict() if section is not None else {}), "train": {}})
  cfg[d.method].train.checkpoint_every = int(d.every)
  cfg[d.method].train.max_to_keep = None  # keep the whole trajectory
  return cfg, d.method


def _radius_gradient(grad: jax.Array, d: jax.Array) -> jax.Array:
  """``sum_j <grad, d_j> / n_j`` over the output channels of TPGM's "mars" norm."""
  axes = tuple(range(d.ndim - 1)) if d.ndim >= 2 else tuple(range(d.ndim))
  dots = jnp.sum(grad * d, axis=axes)
  return jnp.sum(dots / (tpgm_jax.channel_norms(d, "mars") + EPS))


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.sum(a * b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + EPS)


def signals(
  loss_fn,
  params: PyTree,
  anchor: PyTree,
  mask: PyTree,
  train_batches: PyTree,
  heldout_batches: PyTree,
) -> dict[str, Any]:
  """Per constrained tensor (in flattening order): the radius gradients of the held-out
  and training batches (each ``(K,)``), the single-batch cosines ``(K,)`` and the cosine
  of the mean gradients ``()``; and the mean training and held-out losses. Batches are
  stacked on a leading axis of length K."""
  grads = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))
  (l_train, g_train), (l_held, g_held) = (
    grads(params, train_batches),
    grads(params, heldout_batches),
  )
  out = {
    "h_heldout": [],
    "h_train": [],
    "cos_batch": [],
    "cos_mean": [],
    "train_loss": l_train.mean(),
    "heldout_loss": l_held.mean(),
  }
  # flatten_up_to keeps the MaskedNode placeholders of a method's anchor aligned.
  anchors = jax.tree.structure(params).flatten_up_to(anchor)
  for w, w0, gt, gh, m in zip(
    jax.tree.leaves(params),
    anchors,
    jax.tree.leaves(g_train),
    jax.tree.leaves(g_held),
    jax.tree.leaves(mask),
  ):
    if not m:
      continue
    d = w - w0
    out["h_heldout"].append(jax.vmap(_radius_gradient, in_axes=(0, None))(gh, d))
    out["h_train"].append(jax.vmap(_radius_gradient, in_axes=(0, None))(gt, d))
    out["cos_batch"].append(jax.vmap(_cosine)(gt, gh))
    out["cos_mean"].append(_cosine(gt.mean(0), gh.mean(0)))
  return out


def _stacked(batches, indices, mesh) -> PyTree:
  """Batches ``indices`` of a random-access batch dataset, stacked on a leading axis."""
  local = [batches[int(i)] for i in indices]
  return {k: jnp.stack([distributed.global_batch(b, mesh)[k] for b in local]) for k in local[0]}


def measure(config: ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or reuses) the diagnostic FT run and measures the signals at every checkpoint."""
  cfg, name = diagnose_config(config)
  plan = make_plan(cfg, workdir, device_count=jax.device_count())
  env = environment.setup(plan)
  spec = plan[name]
  runner.train_run(env, plan, spec)  # trains the run, keeping every checkpoint
  built = loop.build_step(env.train_setup(spec))
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    built.abstract_state,
    built.shardings,
  )
  mask = runner.constrained_mask(spec, built.abstract_state["params"])
  order = runner.depth_order(env)
  paths = [
    p
    for p, m in zip(tpgm_jax.leaf_paths(built.abstract_state["params"]), jax.tree.leaves(mask))
    if m
  ]
  k, bs = int(cfg.diagnose.batches), spec.train.batch_size
  train_it = env.batches("train", "diagnose_train", spec.seed, bs, augmented=True)
  held_it = env.batches("heldout", "diagnose_heldout", spec.seed, bs)
  measure_fn = jax.jit(lambda p, a, tb, hb: signals(env.loss, p, a, mask, tb, hb))
  ckpt = checkpointing.Checkpointer(spec.directory / "ckpt", read_only=True, max_to_keep=None)
  steps, rows = [], []
  try:
    for step in ckpt.all_steps():
      state = ckpt.restore(target, step)
      tb = _stacked(train_it, range(step * k, (step + 1) * k), env.mesh)
      hb = _stacked(held_it, range(step * k, (step + 1) * k), env.mesh)
      rows.append(jax.device_get(measure_fn(state["params"], loop.anchor_of(state), tb, hb)))
      steps.append(step)
      logging.info("diagnose: step %d measured", step)
  finally:
    ckpt.close()
  return summarise(
    steps,
    paths,
    order,
    rows,
    {"batches": k, "batch_size": bs, "method": name, "every": int(cfg.diagnose.every)},
  )


def summarise(
  steps: list[int],
  paths: list[str],
  order: list[str],
  rows: list[dict[str, list[np.ndarray]]],
  info: dict[str, Any],
) -> dict[str, Any]:
  """Per tensor (in depth order) and overall statistics of the measured signals."""
  ranked = sorted(range(len(paths)), key=lambda i: order.index(paths[i]))
  losses = {key: [float(r.pop(key)) for r in rows] for key in ("train_loss", "heldout_loss")}
  # (steps, tensors, ...)
  arr = {key: np.stack([np.stack(r[key]) for r in rows]) for key in rows[0]}
  h = arr["h_heldout"]  # (steps, tensors, K)
  snr = np.abs(h.mean(-1)) / (h.std(-1) + EPS)  # (steps, tensors)
  per_tensor = [
    {
      "path": paths[i],
      "shrink_frequency": float(np.mean(h[:, i] > 0)),
      "radius_grad_mean": float(h[:, i].mean()),
      "snr_median": float(np.median(snr[:, i])),
      "cos_batch": float(arr["cos_batch"][:, i].mean()),
      "cos_mean": float(arr["cos_mean"][:, i].mean()),
      "train_shrink_frequency": float(np.mean(arr["h_train"][:, i] > 0)),
    }
    for i in ranked
  ]
  half = len(steps) // 2
  phases = {"all": slice(None), "first_half": slice(0, half), "second_half": slice(half, None)}
  overall = {
    phase: {
      "shrink_frequency": float(np.mean(h[sl] > 0)),
      "snr_median": float(np.median(snr[sl])),
      "cos_batch": float(np.mean(arr["cos_batch"][sl])),
      "cos_mean": float(np.mean(arr["cos_mean"][sl])),
      "train_shrink_frequency": float(np.mean(arr["h_train"][sl] > 0)),
    }
    for phase, sl in phases.items()
    if len(steps[sl])
  }
  per_step = [
    {
      "step": s,
      "shrink_frequency": float(np.mean(h[t] > 0)),
      "cos_batch": float(np.mean(arr["cos_batch"][t])),
      "cos_mean": float(np.mean(arr["cos_mean"][t])),
      "train_loss": losses["train_loss"][t],
      "heldout_loss": losses["heldout_loss"][t],
    }
    for t, s in enumerate(steps)
  ]
  return {
    "info": info,
    "steps": steps,
    "overall": overall,
    "per_tensor": per_tensor,
    "per_step": per_step,
  }


def markdown(result: dict[str, Any]) -> str:
  """The diagnostic in Markdown (from :func:`summarise`'s dict): the summary table by phase,
  the held-out loss along the run and the per-tensor table."""
  info = result["info"]
  phases = tables.markdown_table(
    [
      "phase",
      "held-out radius grad > 0 (shrink)",
      "SNR (median)",
      "cos(train, held-out) one batch",
      "cos of the batch means",
      "training radius grad > 0",
    ],
    [
      [
        phase.replace("_", " "),
        tables.percent(o["shrink_frequency"]),
        f"{o['snr_median']:.2f}",
        f"{o['cos_batch']:.3f}",
        f"{o['cos_mean']:.3f}",
        tables.percent(o["train_shrink_frequency"]),
      ]
      for phase, o in result["overall"].items()
    ],
  )
  tensors = tables.markdown_table(
    ["tensor (by depth)", "shrink", "SNR", "cos one batch", "cos means"],
    [
      [
        t["path"],
        tables.percent(t["shrink_frequency"]),
        f"{t['snr_median']:.2f}",
        f"{t['cos_batch']:.3f}",
        f"{t['cos_mean']:.3f}",
      ]
      for t in result["per_tensor"]
    ],
  )
  losses = ", ".join(f"{r['step']}: {r['heldout_loss']:.3f}" for r in result["per_step"])
  return "\n".join(
    [
      f"Radius-signal diagnostic along a {info['method']} run: checkpoints every "
      f"{info['every']} steps ({len(result['steps'])}), {info['batches']} held-out and "
      f"{info['batches']} training batches of {info['batch_size']} each.",
      "",
      phases,
      "",
      f"Held-out loss along the run (step: loss): {losses}.",
      "",
      tensors,
    ]
  )


def diagnose(config: ConfigDict, workdir: str) -> tuple[dict[str, Any], str]:
  """Measures and writes ``<workdir>/<config.name>/diagnose_<method>.{json,md,png}``;
  ``(result, markdown)``."""
  result = measure(config, workdir)
  text = markdown(result)
  if jax.process_index() == 0:
    stem = epath.Path(workdir) / config.name / f"diagnose_{config.diagnose.method}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(text + "\n")
    plots.radius_signal(stem.with_suffix(".png"), result["per_tensor"], result["per_step"])
  return result, text
