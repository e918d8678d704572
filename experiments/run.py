"""The main job: data, pre-training (cached), every method, evaluation, report.

:func:`run_all` does, in ``<workdir>/<config.name>/``:

1. build the data set if it is built in (``<workdir>/data``) and get the
   pre-trained checkpoint (:mod:`experiments.pretrain`, cached);
2. for every method of ``config.methods`` (dependencies first,
   :func:`experiments.methods.run_order`): train it with the shared loop in
   ``<name>-<hash>/`` (:func:`run_dir`; resuming if interrupted) or apply the
   post-hoc method, then evaluate on the val, ID test and OOD splits;
3. write ``results.json``, ``results.md`` and ``radii.png``.

Each run's directory is named by a hash of what determines it (model, data,
pre-training, its train and method config and those of its dependencies;
not the mesh), and holds its ``results.json``: running the job again reuses
finished runs, resumes interrupted ones and starts only what changed. The
checkpoints carry the same hash, so a checkpoint directory of another
configuration is an error, never a resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import Mesh
from ml_collections import ConfigDict

import tpgm_jax
from experiments import distributed, evaluate, methods, optim, pretrain, report, train, weights
from experiments.data import pipeline

PyTree = Any


@dataclasses.dataclass
class Env:
  """What every run of one configuration shares."""
  config: ConfigDict
  workdir: epath.Path
  task: pipeline.Task
  model: Any
  mesh: Mesh
  data_dir: str
  pretrained: epath.Path
  input_options: pipeline.InputOptions
  progress: bool = True

  def param_sharding(self, abstract_params: PyTree, mesh: Mesh) -> PyTree:
    """``distributed.param_sharding`` with ``config.shard_min_size``."""
    return distributed.param_sharding(abstract_params, mesh,
                                      min_size=self.config.shard_min_size)

  @property
  def root(self) -> epath.Path:
    """``<workdir>/<config.name>``: the job's results."""
    return self.workdir / self.config.name

  def run_dir(self, name: str) -> epath.Path:
    return run_dir(self.config, self.workdir, name)

  @functools.cached_property
  def evaluator(self) -> evaluate.Evaluator:
    return evaluate.Evaluator(self.model, self.task, self.mesh, data_dir=self.data_dir,
                              batch_size=self.config.data.eval_batch_size,
                              options=self.input_options)

  def with_config(self, config: ConfigDict) -> Env:
    """This environment for another configuration of the same data, model and pre-training
    (e.g. another seed or hyper-parameter); the opened evaluation splits are shared."""
    env = dataclasses.replace(self, config=config)
    if "evaluator" in self.__dict__ and config.data.to_dict() == self.config.data.to_dict():
      env.__dict__["evaluator"] = self.evaluator
    return env


def setup(config: ConfigDict, workdir: str | os.PathLike, *, mesh: Mesh | None = None,
          progress: bool = True) -> Env:
  """Mesh (default: ``config.mesh`` over all devices), data (built if needed), model and the
  pre-trained checkpoint (pre-trained if needed)."""
  options = pretrain.input_options(config)  # first: an unknown data key fails fast
  mesh = mesh if mesh is not None else distributed.make_mesh(config.mesh.to_dict())
  pretrain.prepare_data(config, workdir)
  task = pretrain.get_task(config)
  checkpoint = pretrain.pretrained_checkpoint(config, workdir, mesh=mesh, progress=progress)
  return Env(config, epath.Path(workdir), task, pretrain.get_model(config, task),
             mesh, pretrain.data_dir(config, workdir), checkpoint, options, progress)


def run_identity(config: ConfigDict, name: str) -> dict[str, Any]:
  """Everything that determines run ``name``'s result (not the mesh, not the paths)."""
  section = config.get(name)
  pretrained = config.pretrain.checkpoint or pretrain.cache_key(config)
  return {
      "method": name, "seed": config.seed, "model": config.model.to_dict(),
      "data": pretrain.data_identity(config),
      "pretrained": pretrained,
      "train": (methods.train_config(config, name).to_dict()
                if methods.get(name, config).trained else None),
      "section": section.to_dict() if section is not None else None,
      "deps": {d: run_identity(config, d) for d in methods.dependencies(config, name)},
  }


def run_dir(config: ConfigDict, workdir: str | os.PathLike, name: str) -> epath.Path:
  """``<workdir>/<config.name>/<name>-<hash of run_identity>``: the directory of run ``name``.

  A run of another configuration gets another directory, so changing a
  hyper-parameter starts a new run instead of clashing with the old one.
  """
  identity = train.config_hash(run_identity(config, name))[:8]
  return epath.Path(workdir) / config.name / f"{name}-{identity}"


def _load(env: Env, path: epath.Path, fresh: PyTree, dont_load=()) -> PyTree:
  return weights.load_pretrained(path, {"params": fresh}, dont_load)["params"]


def start_params(env: Env, fresh: PyTree, *, name: str) -> PyTree:
  """The initial params of run ``name``: its ``init_from`` run's result, or the pre-trained
  weights with ``dont_load`` (the new head) kept from ``fresh``."""
  section = env.config.get(name) or {}
  if section.get("init_from"):
    return _load(env, env.run_dir(section["init_from"]) / "params",
                 fresh)
  return _load(env, env.pretrained, fresh, tuple(methods.train_config(env.config, name).dont_load))


def _init(env: Env):
  images = train.dummy_images(env.task.image_size)
  return lambda: env.model.init(jax.random.key(env.config.seed),
                                jnp.zeros(images.shape, images.dtype))["params"]


def _fresh_params(env: Env) -> PyTree:
  """Freshly initialised params, sharded on the mesh like the train state's."""
  init = _init(env)
  return jax.jit(init, out_shardings=env.param_sharding(jax.eval_shape(init), env.mesh))()


def constrained_mask(env: Env, params: PyTree, name: str):
  cfg = methods.train_config(env.config, name)
  return optim.group_mask(params, cfg.param_groups, cfg.constrained)


def _paths_in_creation_order(params: PyTree, prefix: str = "") -> list[str]:
  out = []
  for key, value in params.items():
    path = f"{prefix}{key}"
    out.extend(_paths_in_creation_order(value, path + "/") if isinstance(value, dict) else [path])
  return out


def depth_order(env: Env) -> list[str]:
  """Parameter paths in the order the modules were created (depth order for our models).

  ``model.init`` builds its dicts in call order, which flattening loses (it
  sorts: ``block1`` before ``stem``), so the order is read while tracing.
  """
  order = []

  def init():
    params = _init(env)()
    order.extend(_paths_in_creation_order(params))
    return params

  jax.eval_shape(init)
  return order


def layer_summary(params: PyTree, anchor: PyTree, mask, radii: PyTree | None,
                  order: list[str]) -> dict[str, Any]:
  """Per constrained tensor, in ``order``: path, max per-channel (MARS) distance to the
  anchor, radius (or None)."""
  norms = tpgm_jax.distance_norms(params, anchor, "mars", mask)
  selected = dict(zip(tpgm_jax.leaf_paths(params), jax.tree.leaves(mask)))
  paths = [p for p in order if selected[p]]
  flat_norms = dict(zip(tpgm_jax.leaf_paths(params),
                        jax.tree.leaves(norms, is_leaf=lambda x: x is None)))
  out = {"paths": paths, "distance": [float(np.max(flat_norms[p], initial=0.0)) for p in paths],
         "radius": None}
  if radii is not None:
    flat_radii = dict(zip(tpgm_jax.leaf_paths(radii), jax.tree.leaves(radii)))
    out["radius"] = [float(flat_radii[p]) for p in paths]
  return out


def _heldout_batches(env: Env, batch_size: int, seed: int):
  """``batches(n)`` yields the next ``n`` batches of the held-out stream (not augmented)."""
  layout = train.data_layout(batch_size, env.mesh)
  opened = pipeline.open_split(env.task, "heldout", options=env.input_options,
                               data_dir=env.data_dir)
  position = 0

  def batches(n):
    nonlocal position
    start, position = position, position + n
    it = pipeline.train_iterator(env.task, "heldout", batch_size=batch_size, seed=seed,
                                 step=start, options=env.input_options, opened=opened,
                                 augmented=False, **layout)
    with contextlib.closing(it):
      for _ in range(n):
        yield distributed.global_batch(next(it), env.mesh)

  return batches


def run_method(env: Env, name: str) -> tuple[dict[str, PyTree], dict[str, Any] | None]:
  """Trains or applies method ``name``: ``({row: params}, layer summary or None)``."""
  config, method = env.config, methods.get(name, env.config)
  section = config.get(name)
  identity = train.config_hash(run_identity(config, name))
  if method.trained:
    cfg = methods.train_config(config, name)
    run = train.Run(name=name, model=env.model, task=env.task, mesh=env.mesh, seed=config.seed,
                    method=method, method_cfg=section, data_dir=env.data_dir,
                    input_options=env.input_options,
                    init_params=functools.partial(start_params, env, name=name),
                    metadata={"identity": identity}, progress=env.progress,
                    param_sharding=env.param_sharding)
    state = train.train(cfg, env.run_dir(name), run)
    params, anchor = state["params"], train.anchor_of(state)
    radii = method.radii(state["opt_state"]) if method.radii is not None else None
    order = depth_order(env)
    return {name: params}, layer_summary(params, anchor, constrained_mask(env, params, name),
                                         radii, order)
  fresh = _fresh_params(env)
  if section.get("base"):
    # The alpha = 0 / radius = 0 end is another run with its own head (e.g. LP: the
    # pre-trained backbone with a head fitted to it), so every tensor is interpolated.
    pretrained = _load(env, env.run_dir(section.base) / "params", fresh)
    mask = jax.tree.map(lambda _: True, fresh)
  else:
    pretrained = start_params(env, fresh, name=section.source)
    mask = constrained_mask(env, fresh, section.source)
  ctx = methods.PostHocContext(
      name=name, cfg=section, pretrained=pretrained, constrained=mask,
      finetuned=_load(env, env.run_dir(section.source) / "params", fresh),
      heldout_loss=lambda p, b: train.cross_entropy(env.model, p, b, env.task),
      heldout_batches=_heldout_batches(env, section.get("batch_size", config.train.batch_size),
                                       config.seed + 2))
  result = method.post_hoc(ctx)
  layers = None
  if result.radii is not None:
    (_, params), = result.params.items()
    layers = layer_summary(params, pretrained, mask, result.radii, depth_order(env))
  return result.params, layers


def run_methods(env: Env, names: list[str]) -> tuple[dict[str, dict[str, float]],
                                                    dict[str, dict[str, Any]], dict[str, float]]:
  """Trains or applies, then evaluates, each method of ``names`` (in order; dependencies
  must come first), reusing finished runs: ``(results, layers, timings)``.

  ``results`` maps a result row to its accuracies, ``layers`` a run to its
  per-layer summary (:func:`layer_summary`; trained methods and post-hoc methods
  with radii) and ``timings`` ``<name>_s`` to seconds spent now. A run's
  ``results.json`` also keeps the seconds its computation took (``seconds``; the
  last session's, for a resumed run).
  """
  primary = jax.process_index() == 0
  results, layers, timings = {}, {}, {}
  for name in names:
    t = time.perf_counter()
    identity = train.config_hash(run_identity(env.config, name))
    cache = env.run_dir(name) / "results.json"
    cached = json.loads(cache.read_text()) if cache.exists() else None
    if cached is None or cached["identity"] != identity:
      variants, summary = run_method(env, name)
      cached = {"identity": identity, "results": {r: env.evaluator(p) for r, p in variants.items()},
                "layers": summary, "seconds": round(time.perf_counter() - t, 1)}
      if primary:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(cached, indent=1))
    results.update(cached["results"])
    if cached["layers"] is not None:
      layers[name] = cached["layers"]
    timings[f"{name}_s"] = round(time.perf_counter() - t, 1)
    logging.info("%s done in %.1f s", name, timings[f"{name}_s"])
  return results, layers, timings


def run_all(config: ConfigDict, workdir: str | os.PathLike, *, mesh: Mesh | None = None,
            progress: bool = True) -> dict:
  """Runs the whole job; returns ``{"results", "layers", "paths", "info"}`` (see module doc)."""
  t0 = time.perf_counter()
  env = setup(config, workdir, mesh=mesh, progress=progress)
  t_setup = time.perf_counter() - t0
  primary = jax.process_index() == 0
  results: dict[str, dict[str, float]] = {}
  same_classes = env.task.pretrain_num_classes in (None, env.task.num_classes)
  if not config.pretrain.checkpoint and same_classes:  # pre-trained here on these classes
    results["pretrained"] = env.evaluator(_load(env, env.pretrained, _fresh_params(env)))
  if config.model.overrides.get("zero_shot_head"):
    # CLIP's zero-shot classifier: the pre-trained backbone, the head initialised from the
    # class text embeddings (kept at init by dont_load), where FT and WiSE-FT start.
    results["zero_shot"] = env.evaluator(_load(env, env.pretrained, _fresh_params(env),
                                               tuple(config.train.dont_load)))
  found, all_layers, timings = run_methods(env, methods.run_order(config))
  results.update(found)
  # The radii plot: every run with radii, and FT's distances as the reference.
  layers = {n: v for n, v in all_layers.items() if v["radius"] is not None or n == "ft"}
  timings = {"setup_s": round(t_setup, 1), **timings}
  info = {"config": config.name, "workdir": os.fspath(workdir), "devices": jax.device_count(),
          "wall_s": round(time.perf_counter() - t0, 1), "timings": timings}
  notes = [f"Accuracy in %; ID test = {env.task.test}, OOD = the {', '.join(env.task.ood)} "
           "test splits; val (model selection) and held-out (TPGM radii) are disjoint ID splits."]
  if "zero_shot" in results:
    notes.append("`zero_shot`: the pre-trained model with the zero-shot head built from the "
                 f"class text embeddings in {config.model.overrides.zero_shot_head}.")
  if "pretrained" in results:
    notes.append("`pretrained`: the pre-trained model with its own head (pre-trained on "
                 f"{env.task.pretrain}); every method starts from its backbone with a new head.")
  elif not same_classes:
    notes.append(f"The model was pre-trained on {env.task.pretrain}, whose classes differ from "
                 "the task's; every method starts from its backbone with a new head.")
  paths = (report.write(env.root, results, list(env.task.ood), layers, info, notes)
           if primary else {})
  return {"results": results, "layers": layers, "paths": paths, "info": info}
