"""One training loop for pre-training and for every fine-tuning method.

:func:`train` runs ``train_cfg.steps`` steps of one run in ``workdir``::

  workdir/ckpt/<step>/   Checkpointer: the whole train state (see below)
  workdir/metrics.jsonl  one JSON line per step (process 0 only)
  workdir/params/        the final ``{"params": ...}`` (weights.save_params), written once

The train state is a dict ``{"step", "params", "opt_state", "anchor", "rng"}``:
``step`` (int32) counts the updates and is also the data position (step ``i``
trains on batch ``i`` of the stream, a pure function of ``(seed, i)``), the
optimizer state holds everything a method learns besides the parameters
(TPGM's radii and their Adam state included), ``anchor`` is the parameters the
run started from, kept for the distance metrics only when the method's own
state does not record them (``None`` otherwise and when pre-training; see
:func:`anchor_of`), and ``rng`` is PRNG key data.
Start-up order: resume from the latest checkpoint in ``workdir``, else
``init_params`` (e.g. the pre-trained checkpoint), else a fresh init.

The step is built as ``jax.eval_shape`` -> shardings
(:func:`experiments.training.distributed.state_sharding`) -> ``jax.jit(...,
in_shardings, out_shardings, donate_argnums=0)``. The host fetches the
metrics only every ``train_cfg.log_every`` steps and before each checkpoint; a
non-finite loss then stops the run (:class:`NonFiniteLossError`) before a bad
state is saved. SIGTERM saves the state and raises :class:`Preempted`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from etils import epath
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

import tpgm_jax
from experiments.data import pipeline, tasks
from experiments.training import checkpointing, distributed, methods, optimizers, weights
from experiments.types import PyTree

ALL_PARAMS = ((".*", "all"),)


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


class Preempted(Exception):  # noqa: N818 (what happened, not an error)
  """The run stopped on SIGTERM after saving its state; run it again to resume."""


def cross_entropy(
  model: nn.Module, params: PyTree, batch: dict[str, jax.Array], task: tasks.Task
) -> jax.Array:
  """Mean softmax cross-entropy of ``model`` on ``batch`` (uint8 ``image``, ``label``).

  The images are normalised with the task's mean/std here, on the device.
  """
  images = pipeline.normalize(batch["image"], task.mean, task.std)
  logits = model.apply({"params": params}, images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def select_leaves(tree: PyTree, mask: PyTree | None) -> list[Any]:
  """The leaves of ``tree`` that the bool pytree ``mask`` selects (none for ``mask=None``)."""
  if mask is None:
    return []
  # flatten_up_to keeps the MaskedNode placeholders of a method's anchor aligned.
  return [
    x for x, m in zip(jax.tree.structure(mask).flatten_up_to(tree), jax.tree.leaves(mask)) if m
  ]


def anchor_of(state: dict[str, Any]) -> PyTree | None:
  """The anchor of a train state: its own copy, else the method's (in the optimizer state)."""
  if state["anchor"] is not None:
    return state["anchor"]
  return optax.tree.get(state["opt_state"], "anchor")


def _method_keeps_anchor(abstract_opt_state: PyTree, abstract_params: PyTree, mask: PyTree) -> bool:
  """Whether the optimizer state records the pre-trained value of every constrained tensor."""
  try:
    anchor = optax.tree.get(abstract_opt_state, "anchor")
  except KeyError:  # several anchors: keep our own copy
    return False
  if anchor is None:
    return False
  leaves = jax.tree.structure(abstract_params).flatten_up_to(anchor)
  return all(
    not m or (isinstance(a, jax.ShapeDtypeStruct) and a.shape == p.shape)
    for a, p, m in zip(leaves, jax.tree.leaves(abstract_params), jax.tree.leaves(mask))
  )


def step_metrics(params, anchor, radii, mask) -> dict[str, jax.Array]:
  """Distance to the anchor (global L2, max per-channel MARS) and a radii summary."""
  out = {}
  if anchor is not None and mask is not None:
    diffs = [w - w0 for w, w0 in zip(select_leaves(params, mask), select_leaves(anchor, mask))]
    if diffs:
      out["distance_l2"] = optax.tree.norm(diffs)
      out["distance_mars_max"] = jnp.max(
        jnp.stack([jnp.max(tpgm_jax.channel_norms(d, "mars")) for d in diffs])
      )
  if radii is not None:
    # The projection floors the radii at 1e-8 (tpgm_jax.clip_radii).
    rs = jnp.maximum(jnp.stack(select_leaves(radii, mask)), 1e-8)
    out.update(radius_min=rs.min(), radius_mean=rs.mean(), radius_max=rs.max())
  return out


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """Everything :func:`train` needs: the train config, the model, the data, the method.

  Attributes:
    name: the run's name (logs, errors, checkpoint metadata).
    train: the train config: ``split``, ``steps``, ``batch_size``, ``optimizer``,
      ``log_every``, ``checkpoint_every``, ``max_to_keep`` and, for fine-tuning,
      ``param_groups``, ``frozen``, ``constrained``.
    model: the Flax module.
    task: the data task (its input normalisation).
    mesh: the device mesh.
    init: ``init(key) -> params``, the model's initialisation (traceable).
    data: ``data(batch_size, start)`` -> an iterator over this process's rows of the
      training batches ``start, start + 1, ...`` (a pure function of the run's seed and the
      position).
    seed: the init and state seed.
    method: the fine-tuning method (``None``: the plain optimizer, no anchor).
    section: the method's config section.
    init_params: ``init_params(fresh_params) -> params`` used when there is no
      checkpoint to resume (e.g. load the pre-trained weights); ``None`` keeps
      the fresh init.
    heldout: for a method that takes held-out batches: ``heldout(batch_size, start)`` -> an
      iterator over this process's rows of the held-out batches ``start, ...``.
    metadata: JSON-able dict saved with every checkpoint and required to match
      on resume (a workdir is tied to one configuration).
    progress: show a progress bar (process 0).
    param_sharding: ``(abstract_params, mesh) -> shardings`` of the parameters;
      the rest of the state follows (``distributed.state_sharding``).
  """

  name: str
  train: ConfigDict
  model: nn.Module
  task: tasks.Task
  mesh: Mesh
  init: Callable[[jax.Array], PyTree]
  data: Callable[[int, int], Any]
  seed: int = 0
  method: methods.Method | None = None
  section: ConfigDict | None = None
  init_params: Callable[[PyTree], PyTree] | None = None
  heldout: Callable[[int, int], Any] | None = None
  metadata: dict[str, Any] | None = None
  progress: bool = True
  param_sharding: Callable[[PyTree, Mesh], PyTree] = distributed.param_sharding


class Step(NamedTuple):
  """A run's jitted train step and what it needs (see :func:`build_step`).

  Attributes:
    fn: ``fn(state, batch, heldout) -> (state, metrics)``, jitted with the
      state donated; ``heldout`` is None except on radius-update steps.
    abstract_state: ``jax.eval_shape`` of the train state.
    shardings: the ``NamedSharding`` of every train-state leaf.
    fresh_params: ``fresh_params()`` -> freshly initialised, sharded params.
    create: ``create(params)`` -> the initial train state, sharded.
  """

  fn: Callable
  abstract_state: PyTree
  shardings: PyTree
  fresh_params: Callable[[], PyTree]
  create: Callable[[PyTree], PyTree]


class Transform(NamedTuple):
  """A run's optimizer (see :func:`transform`).

  Attributes:
    tx: the whole update: the method on the inner optimizer, frozen groups zeroed.
    constrained: bool pytree of the tensors the method keeps near the anchor (None without
      a method).
    trained: bool pytree of the tensors that are not frozen.
  """

  tx: optax.GradientTransformation
  constrained: PyTree | None
  trained: PyTree


def transform(
  setup: TrainSetup,
  abstract_params: PyTree,
  wrap_inner: Callable[[optax.GradientTransformation], optax.GradientTransformation] = None,
) -> Transform:
  """The optimizer of ``setup`` for params shaped like ``abstract_params``: the inner
  optimizer of ``setup.train.optimizer`` (passed through ``wrap_inner`` if given, e.g. to
  observe its updates), the method on it, frozen groups zeroed."""
  train_cfg, method = setup.train, setup.method
  rules = train_cfg.get("param_groups", ALL_PARAMS)
  optimizers.param_groups(abstract_params, rules)  # every parameter in exactly one group
  constrained = (
    optimizers.group_mask(abstract_params, rules, train_cfg.constrained)
    if method is not None
    else None
  )
  inner = optimizers.optimizer(train_cfg.optimizer, train_cfg.steps)
  if wrap_inner is not None:
    inner = wrap_inner(inner)
  if method is None:
    tx = inner
  else:
    heldout_loss = lambda p, b: cross_entropy(setup.model, p, b, setup.task)  # noqa: E731
    tx = method.transform(methods.Context(setup.section, inner, constrained, heldout_loss))
  frozen = train_cfg.get("frozen", ())
  tx = optimizers.freeze(tx, abstract_params, rules, frozen)
  trained = jax.tree.map(lambda f: not f, optimizers.group_mask(abstract_params, rules, frozen))
  return Transform(tx, constrained, trained)


def build_step(setup: TrainSetup) -> Step:
  """The train step of ``setup``: ``jax.eval_shape`` -> shardings -> ``jax.jit``."""
  train_cfg, model, mesh, method = setup.train, setup.model, setup.mesh, setup.method
  init_key, state_key = jax.random.split(jax.random.key(setup.seed))
  init_fn = lambda: setup.init(init_key)  # noqa: E731
  abstract_params = jax.eval_shape(init_fn)
  tx, constrained, trained = transform(setup, abstract_params)
  radii_fn = method.radii if method is not None else None
  lr = optimizers.schedule(train_cfg.optimizer, train_cfg.steps)
  # The distance metrics need the anchor: a method that records it (TPGM, FTP, SPD,
  # L2-SP, ...) keeps the only copy in its state; for the others the state holds one.
  own_anchor = method is not None and not _method_keeps_anchor(
    jax.eval_shape(tx.init, abstract_params), abstract_params, constrained
  )

  def create(params):
    return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": tx.init(params),
      "anchor": jax.tree.map(jnp.copy, params) if own_anchor else None,
      "rng": jax.random.key_data(state_key),
    }

  abstract_state = jax.eval_shape(create, abstract_params)
  shardings = distributed.state_sharding(abstract_state, mesh, setup.param_sharding)
  param_shardings = shardings["params"]
  replicated = NamedSharding(mesh, P())
  batch_sh = distributed.batch_sharding(mesh)

  def step(state, batch, heldout):
    params = state["params"]
    loss, grads = jax.value_and_grad(lambda p: cross_entropy(model, p, batch, setup.task))(params)
    extra = {}
    if heldout is not None:  # (batch, iters, ...) -> (iters, batch, ...)
      extra["heldout"] = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), heldout)
    updates, opt_state = tx.update(grads, state["opt_state"], params, **extra)
    params = optax.apply_updates(params, updates)
    radii = radii_fn(opt_state) if radii_fn is not None else None
    # Frozen gradients are left out: computing them would cost LP a full backward pass.
    metrics = {
      "loss": loss,
      "grad_norm": optax.tree.norm(select_leaves(grads, trained)),
      "lr": lr(state["step"]),
      **step_metrics(params, anchor_of(state), radii, constrained),
    }
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])
    new = {
      "step": state["step"] + 1,
      "params": params,
      "opt_state": opt_state,
      "anchor": state["anchor"],
      "rng": rng,
    }
    return new, metrics

  heldout_sh = batch_sh if method is not None and method.heldout is not None else None
  fn = jax.jit(
    step,
    in_shardings=(shardings, batch_sh, heldout_sh),
    out_shardings=(shardings, replicated),
    donate_argnums=0,
  )
  fresh = jax.jit(init_fn, out_shardings=param_shardings)
  create_jit = jax.jit(create, in_shardings=(param_shardings,), out_shardings=shardings)
  return Step(fn, abstract_state, shardings, fresh, create_jit)


class _MetricsLog:
  """Per-step metrics as JSON lines (process 0 only), buffered on device between flushes."""

  def __init__(self, path: epath.Path, start: int, enabled: bool):
    self.path, self.enabled, self.pending = path, enabled, []
    if enabled and path.exists():
      # Steps after the checkpoint we resume from are logged again: drop the old lines.
      lines = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line)["step"] <= start
      ]
      path.write_text("".join(line + "\n" for line in lines))

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self.pending.append((step, metrics))

  def flush(self, run_name: str) -> dict[str, float] | None:
    """Fetches the buffered metrics, stops on a non-finite loss, writes them; the last row."""
    if not self.pending:
      return None
    rows = [
      {"step": s, **{k: float(v) for k, v in m.items()}} for s, m in jax.device_get(self.pending)
    ]
    self.pending = []
    bad = next((r for r in rows if not math.isfinite(r["loss"])), None)
    if bad is not None:
      raise NonFiniteLossError(
        f"{run_name}: the training loss is {bad['loss']} at step {bad['step']}; stopping. "
        "No checkpoint after the last finite loss was written. Try a lower learning rate."
      )
    if self.enabled:
      with self.path.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows[-1]


def train(setup: TrainSetup, workdir: str | epath.Path) -> dict[str, Any]:
  """Runs (or resumes) ``setup.train.steps`` training steps of ``setup`` in ``workdir``.

  Args:
    setup: the train config, model, data, method and initialisation (:class:`TrainSetup`).
    workdir: the run's directory (created).

  Returns:
    The final train state (its ``params`` are also saved in ``workdir/params``).

  Raises:
    Preempted: SIGTERM arrived; the state was saved (call again to resume).
    NonFiniteLossError: the loss became NaN/inf.
    checkpointing.CheckpointError: a checkpoint in ``workdir`` is corrupt or
      was written by another configuration.
  """
  train_cfg = setup.train
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  primary = jax.process_index() == 0
  built = build_step(setup)
  metadata = {"run": setup.name, **(setup.metadata or {})}
  ckpt = checkpointing.Checkpointer(
    workdir / "ckpt",
    max_to_keep=train_cfg.max_to_keep,
    save_interval_steps=train_cfg.checkpoint_every,
  )
  with contextlib.ExitStack() as stack:
    stack.callback(ckpt.close)
    state = _initial_state(ckpt, built, setup, metadata)
    start = int(state["step"])
    # Batch `step` of the stream is a pure function of (seed, step): resuming at `start`
    # feeds exactly the batches the interrupted run would have seen.
    data = stack.enter_context(contextlib.closing(setup.data(train_cfg.batch_size, start)))
    heldout = heldout_feed(setup, start, stack)
    log = _MetricsLog(workdir / "metrics.jsonl", start, primary)
    bar = tqdm.tqdm(
      total=train_cfg.steps,
      initial=start,
      desc=setup.name,
      unit="step",
      disable=not (primary and setup.progress),
      dynamic_ncols=True,
    )
    preempted, clock = False, (time.perf_counter(), start)
    with checkpointing.PreemptionGuard(ckpt) as guard, bar:
      for step in range(start, train_cfg.steps):
        batch = distributed.global_batch(next(data), setup.mesh)
        state, metrics = built.fn(state, batch, heldout(step))
        log.add(step + 1, metrics)
        bar.update(1)
        done = step + 1
        stop = guard.should_stop(done)
        save = stop or done == train_cfg.steps or ckpt.manager.should_save(done)
        if save or done % train_cfg.log_every == 0:
          last = log.flush(setup.name)
          now = time.perf_counter()
          rate = (done - clock[1]) * train_cfg.batch_size / max(now - clock[0], 1e-9)
          clock = (now, done)
          bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{rate:.0f}")
        if save:
          ckpt.save(done, state, force=True, metadata=metadata)
        if stop:
          preempted = True
          break
    ckpt.manager.wait_until_finished()
  if preempted:
    raise Preempted(
      f"{setup.name}: stopped at step {int(state['step'])} on SIGTERM; the state "
      f"is saved in {workdir}: run the same command again to resume"
    )
  if not (workdir / "params").exists():
    weights.save_params(workdir / "params", {"params": state["params"]})
  return state


def _initial_state(ckpt, built: Step, setup: TrainSetup, metadata: dict[str, Any]):
  """Resume from the latest checkpoint, else init_params(fresh), else fresh params."""
  latest = ckpt.manager.latest_step()
  if latest is not None:
    saved = ckpt.restore_metadata(latest)
    if saved is not None and saved != metadata:
      raise checkpointing.CheckpointError(
        f"{ckpt.step_directory(latest)} was written by another configuration "
        f"({saved}, now {metadata}); use another workdir or delete it"
      )
    target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      built.abstract_state,
      built.shardings,
    )
    logging.info("%s: resuming from step %d", setup.name, latest)
    return ckpt.restore(target, latest)
  params = built.fresh_params()
  if setup.init_params is not None:
    params = setup.init_params(params)
  return built.create(params)


def heldout_feed(setup: TrainSetup, start: int, stack: contextlib.ExitStack):
  """``feed(step)`` -> the held-out batches due at ``step``, or None; a pure function of it.

  With ``(every, iters) = method.heldout(section)``, step ``k * every``
  gets held-out batches ``k * iters .. k * iters + iters - 1`` (stacked on
  axis 1: axis 0 stays the sharded batch axis) of ``section.heldout_batch_size``
  examples (default: the training batch size); other steps get None, which
  selects the step's other compiled variant. ``feed`` must be called for every
  step from ``start`` on, in order: it reads the held-out stream sequentially
  (from the batch due at the first multiple of ``every`` at or after
  ``start``).
  """
  method = setup.method
  if method is None or method.heldout is None:
    return lambda step: None
  every, iters = method.heldout(setup.section)
  if every < 1 or iters < 1:
    raise ValueError(
      f"{setup.name}: held-out batches every {every} steps, {iters} at a time: both must be >= 1"
    )
  first = -(-start // every)
  batch_size = int(setup.section.get("heldout_batch_size") or setup.train.batch_size)
  it = stack.enter_context(contextlib.closing(setup.heldout(batch_size, first * iters)))

  def feed(step):
    if step % every:
      return None
    local = [next(it) for _ in range(iters)]
    return distributed.global_batch(
      {n: np.stack([b[n] for b in local], axis=1) for n in local[0]}, setup.mesh
    )

  return feed
