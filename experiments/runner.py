"""Executing a plan: train or apply every run, evaluate it, cache its results; the main job.

:func:`execute` goes through the runs of a :class:`~experiments.plan.Plan`
(dependencies first). A run whose directory already holds a ``results.json``
with its hash is reused; otherwise it is trained with the shared loop
(resuming if interrupted) or its post-hoc step is applied, then evaluated on
the val, ID test and OOD splits, and its ``results.json`` written. The
checkpoints carry the same hash, so a checkpoint directory of another
configuration is an error, never a resume.

A *run store* (``execute(..., store=dir)``) keeps a copy of every finished run's
``results.json`` as ``<store>/<name>-<hash>.json``: a few kilobytes per run, so a long
study can commit it and resume in another working directory (a fresh clone) from every run
it finished. A run found only there is restored to its directory; a run that needs the
params of a run found only there (post-hoc steps, ``init_from``) retrains that run first
(same spec, same seed: the same params on the same software and hardware).

:func:`train_and_evaluate` is the main job (``python -m experiments.main``):
plan, environment, execute, and the report in ``<workdir>/<config.name>/``
(``results.json``, ``results.md``, ``radii.png``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import traverse_util
from jax.sharding import Mesh
from ml_collections import ConfigDict

import tpgm_jax
from experiments import environment
from experiments.analysis import report
from experiments.environment import Environment
from experiments.plan import Plan, RunSpec, make_plan
from experiments.training import loop, methods, optimizers
from experiments.types import PyTree


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What :func:`execute` returns.

  Attributes:
    results: result row -> ``{split: accuracy %}``.
    layers: run -> per-layer summary (:func:`layer_summary`; trained methods and post-hoc
      methods with radii).
    timings: ``<name>_s`` -> seconds spent now.
  """

  results: dict[str, dict[str, float]]
  layers: dict[str, dict[str, Any]]
  timings: dict[str, float]


def start_params(env: Environment, plan: Plan, spec: RunSpec, fresh: PyTree) -> PyTree:
  """The initial params of ``spec``: its ``init_from`` run's result, or the pre-trained
  weights with ``dont_load`` (the new head) kept from ``fresh``."""
  if spec.section.get("init_from"):
    return params_of(env, plan, spec.section.init_from, fresh)
  return env.load(plan.pretrain.checkpoint, fresh, tuple(spec.train.dont_load))


def params_of(env: Environment, plan: Plan, name: str, fresh: PyTree) -> PyTree:
  """The final params of the trained run ``name``; trained again first if its results were
  restored from a run store without them (see the module docstring)."""
  spec = plan[name]
  if not (spec.directory / "params").exists():
    logging.info("%s: params not in %s; training it again", name, spec.directory)
    train_run(env, plan, spec)
  return env.load(spec.directory / "params", fresh)


def constrained_mask(spec: RunSpec, params: PyTree) -> PyTree:
  """The mask of the parameters ``spec`` keeps near the anchor."""
  return optimizers.group_mask(params, spec.train.param_groups, spec.train.constrained)


def depth_order(env: Environment) -> list[str]:
  """Parameter paths in the order the modules were created (depth order for our models).

  ``model.init`` builds its dicts in call order, which sorting flattening loses
  (``block1`` before ``stem``); ``flax.traverse_util.flatten_dict`` keeps it, so the
  order is read from the params as traced.
  """
  order = []

  def init():
    params = env.init_params(jax.random.key(0))
    order.extend(traverse_util.flatten_dict(params, sep="/"))
    return params

  jax.eval_shape(init)
  return order


def layer_summary(
  params: PyTree, anchor: PyTree, mask, radii: PyTree | None, order: list[str]
) -> dict[str, Any]:
  """Per constrained tensor, in ``order``: path, max per-channel (MARS) distance to the
  anchor, radius (or None)."""
  norms = tpgm_jax.distance_norms(params, anchor, "mars", mask)
  selected = dict(zip(tpgm_jax.leaf_paths(params), jax.tree.leaves(mask)))
  paths = [p for p in order if selected[p]]
  flat_norms = dict(
    zip(tpgm_jax.leaf_paths(params), jax.tree.leaves(norms, is_leaf=lambda x: x is None))
  )
  out = {
    "paths": paths,
    "distance": [float(np.max(flat_norms[p], initial=0.0)) for p in paths],
    "radius": None,
  }
  if radii is not None:
    flat_radii = dict(zip(tpgm_jax.leaf_paths(radii), jax.tree.leaves(radii)))
    out["radius"] = [float(flat_radii[p]) for p in paths]
  return out


def train_run(env: Environment, plan: Plan, spec: RunSpec) -> dict[str, Any]:
  """Trains (or resumes) the trained run ``spec``; returns its final train state."""
  setup = env.train_setup(spec, init_params=functools.partial(start_params, env, plan, spec))
  return loop.train(setup, spec.directory)


def run_method(
  env: Environment, plan: Plan, spec: RunSpec
) -> tuple[dict[str, PyTree], dict[str, Any] | None]:
  """Trains or applies ``spec``: ``({row: params}, layer summary or None)``."""
  method, section = spec.method, spec.section
  if spec.trained:
    state = train_run(env, plan, spec)
    params, anchor = state["params"], loop.anchor_of(state)
    radii = method.radii(state["opt_state"]) if method.radii is not None else None
    return {spec.name: params}, layer_summary(
      params, anchor, constrained_mask(spec, params), radii, depth_order(env)
    )
  fresh = env.fresh_params(spec.seed)
  if section.get("base"):
    # The alpha = 0 / radius = 0 end is another run with its own head (e.g. LP: the
    # pre-trained backbone with a head fitted to it), so every tensor is interpolated.
    pretrained = params_of(env, plan, section.base, fresh)
    mask = jax.tree.map(lambda _: True, fresh)
  else:
    source = plan[section.source]
    pretrained = start_params(env, plan, source, fresh)
    mask = constrained_mask(source, fresh)
  ctx = methods.PostHocContext(
    name=spec.name,
    section=section,
    pretrained=pretrained,
    constrained=mask,
    finetuned=params_of(env, plan, section.source, fresh),
    heldout_loss=env.loss,
    heldout_batches=env.heldout_batches(
      "post_hoc", spec.seed, section.get("batch_size", plan.config.train.batch_size)
    ),
  )
  result = method.post_hoc(ctx)
  layers = None
  if result.radii is not None:
    ((_, params),) = result.params.items()
    layers = layer_summary(params, pretrained, mask, result.radii, depth_order(env))
  return result.params, layers


def stored_path(spec: RunSpec, store: str | os.PathLike) -> epath.Path:
  """Where a run store keeps ``spec``'s results: ``<store>/<name>-<hash>.json``."""
  return epath.Path(store) / f"{spec.name}-{spec.hash}.json"


def _read(path: epath.Path, spec: RunSpec) -> dict[str, Any] | None:
  cached = json.loads(path.read_text()) if path.exists() else None
  return cached if cached is not None and cached["identity"] == spec.hash else None


def cached_results(spec: RunSpec, store: str | os.PathLike | None = None) -> dict[str, Any] | None:
  """The run's saved ``results.json`` if it was written by this very spec (its hash), else
  its copy in ``store`` (a run store, see the module docstring), else None."""
  found = _read(spec.directory / "results.json", spec)
  if found is None and store:
    found = _read(stored_path(spec, store), spec)
  return found


def execute(
  env: Environment,
  plan: Plan,
  names: list[str] | None = None,
  *,
  store: str | os.PathLike | None = None,
) -> Outcome:
  """Trains or applies, then evaluates, each run of ``plan`` (or of ``names``, in plan
  order), reusing finished runs.

  A run's ``results.json`` also keeps the seconds its computation took
  (``seconds``; the last session's, for a resumed run). With ``store``, finished runs are
  also looked up in, restored from and copied to that run store (module docstring).
  """
  if not env.compatible(plan):
    raise ValueError(
      f"plan {plan.config.name!r} needs another data, model, pre-training or "
      "mesh than the environment it was given"
    )
  primary = jax.process_index() == 0
  results, layers, timings = {}, {}, {}
  for spec in plan:
    if names is not None and spec.name not in names:
      continue
    t = time.perf_counter()
    cached = cached_results(spec, store)
    computed = cached is None
    if computed:
      variants, summary = run_method(env, plan, spec)
      cached = {
        "identity": spec.hash,
        "results": {r: env.evaluator(p) for r, p in variants.items()},
        "layers": summary,
        "seconds": round(time.perf_counter() - t, 1),
      }
    if primary:
      text = json.dumps(cached, indent=1)
      targets = [spec.directory / "results.json"]
      targets += [stored_path(spec, store)] if store else []
      for path in targets:
        if computed or not path.exists():  # a copy there has this hash: the same results
          path.parent.mkdir(parents=True, exist_ok=True)
          path.write_text(text)
    results.update(cached["results"])
    if cached["layers"] is not None:
      layers[spec.name] = cached["layers"]
    timings[f"{spec.name}_s"] = round(time.perf_counter() - t, 1)
    logging.info("%s done in %.1f s", spec.name, timings[f"{spec.name}_s"])
  return Outcome(results, layers, timings)


def train_and_evaluate(
  config: ConfigDict, workdir: str | os.PathLike, *, mesh: Mesh | None = None, progress: bool = True
) -> dict[str, Any]:
  """The main job: ``{"results", "layers", "paths", "info"}`` (see the module docstring)."""
  t0 = time.perf_counter()
  plan = make_plan(
    config, workdir, device_count=jax.device_count() if mesh is None else mesh.devices.size
  )
  env = environment.setup(plan, mesh=mesh, progress=progress)
  t_setup = time.perf_counter() - t0
  results: dict[str, dict[str, float]] = {}
  task, config = env.task, plan.config
  same_classes = task.pretrain_num_classes in (None, task.num_classes)
  if not plan.pretrain.given and same_classes:  # pre-trained here on these classes
    results["pretrained"] = env.evaluator(
      env.load(plan.pretrain.checkpoint, env.fresh_params(config.seed))
    )
  if config.model.overrides.get("zero_shot_head"):
    # CLIP's zero-shot classifier: the pre-trained backbone, the head initialised from the
    # class text embeddings (kept at init by dont_load), where FT and WiSE-FT start.
    results["zero_shot"] = env.evaluator(
      env.load(
        plan.pretrain.checkpoint, env.fresh_params(config.seed), tuple(config.train.dont_load)
      )
    )
  outcome = execute(env, plan)
  results.update(outcome.results)
  # The radii plot: every run with radii, and FT's distances as the reference.
  layers = {n: v for n, v in outcome.layers.items() if v["radius"] is not None or n == "ft"}
  timings = {"setup_s": round(t_setup, 1), **outcome.timings}
  info = {
    "config": config.name,
    "workdir": os.fspath(workdir),
    "devices": jax.device_count(),
    "wall_s": round(time.perf_counter() - t0, 1),
    "timings": timings,
  }
  notes = [
    f"Accuracy in %; ID test = {task.test}, OOD = the {', '.join(task.ood)} "
    "test splits; val (model selection) and held-out (TPGM radii) are disjoint ID splits."
  ]
  if "zero_shot" in results:
    notes.append(
      "`zero_shot`: the pre-trained model with the zero-shot head built from the "
      f"class text embeddings in {config.model.overrides.zero_shot_head}."
    )
  if "pretrained" in results:
    notes.append(
      "`pretrained`: the pre-trained model with its own head (pre-trained on "
      f"{task.pretrain}); every method starts from its backbone with a new head."
    )
  elif not same_classes:
    notes.append(
      f"The model was pre-trained on {task.pretrain}, whose classes differ from "
      "the task's; every method starts from its backbone with a new head."
    )
  paths = (
    report.write(plan.root, results, list(task.ood), layers, info, notes)
    if jax.process_index() == 0
    else {}
  )
  return {"results": results, "layers": layers, "paths": paths, "info": info}
