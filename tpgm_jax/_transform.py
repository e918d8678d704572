"""TPGM as optax transformations: the projection after a step, with given or learned radii."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tpgm_jax import _lora, _projection, _radii, _tree

PyTree = Any


class TPGMState(NamedTuple):
  """State of :func:`tpgm`.

  Attributes:
    count: int32 scalar, the number of updates so far; a radius schedule is
      evaluated at it (0 at the first update).
    anchor: the pre-trained parameters recorded by ``init``: an array (same
      shape and sharding as the parameter; its dtype, or ``anchor_dtype``) for every constrained
      tensor, ``optax.MaskedNode()`` for every unconstrained one.
  """

  count: jax.Array
  anchor: PyTree


def _projected_updates(
  updates: PyTree, params: PyTree, anchor: PyTree, projected: PyTree
) -> PyTree:
  """``project(w + u) - w`` for constrained tensors, ``u`` elsewhere."""
  return _tree.map_constrained(
    lambda _, u, w, new: (new - w).astype(jnp.result_type(u)), anchor, updates, params, projected
  )


def tpgm(
  norm: _projection.Norm = "mars",
  mask: _tree.Mask = None,
  radii: _tree.ScalarOrSchedule | PyTree | None = None,
  *,
  lora: _lora.LoRAAdapters | None = None,
  anchor_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Projects the parameters after each step into balls of given radii around the anchor.

  Use it as the LAST link of ``optax.chain``: given the updates ``u`` of the
  preceding optimizer it returns ``u' = project(w + u) - w``, so that
  ``optax.apply_updates(w, u')`` lies inside the constraint set
  (``|| w' - w0 || <= r`` per tensor, per output channel for ``"mars"``; see
  :func:`tpgm_jax.project`). The anchor ``w0`` is recorded by ``init`` (call
  it on the pre-trained parameters) and kept in :class:`TPGMState`; the radii
  are passed to every ``update`` as ``radii=`` (a pytree, e.g. learned by
  :func:`radii_trainer`), or fixed once with the ``radii`` argument. Fixed,
  hand-set radii make this MARS-PGM (Gouk et al., ICLR 2021); for radii
  learned on held-out data during fine-tuning (TPGM's recipe) use
  :func:`trainable_projection`. The optimizer's own state (momentum, Adam
  moments) is not projected, as in the reference.

  Args:
    norm: ``"mars"`` (per-output-channel L1, the paper's default) or ``"l2"``.
    mask: which tensors are constrained, as ``optax.masked`` takes it:
      ``None`` (every floating-point tensor), a pytree of static bools (or a
      prefix), or a callable ``params -> bool pytree`` such as
      ``tpgm_jax.path_mask(exclude=r"params/head/.*")``. Always exclude a
      freshly initialised head. Unconstrained tensors get the preceding
      optimizer's update unchanged.
    radii: radii used when ``update`` gets none: one radius for every
      constrained tensor (MARS-PGM with one hand-set radius), given as a
      number or an optax schedule of the step count (a finite number >= 0, or
      ``schedule(count) -> scalar`` evaluated at the number of updates before
      this one, the ``count`` field of :class:`TPGMState`, e.g.
      ``optax.linear_schedule(0.0, 0.5, 1000)`` to loosen the ball during
      training); or a pytree of scalars with the structure of the params
      (one per tensor).
    lora: LoRA adapters (:func:`lora_adapters`, opt-in): each adapter's
      merged update ``dW = s A B`` is kept in the ball (anchor 0, the frozen
      base kernel; norms of ``dW``) by scaling its ``B``'s columns, with one
      radius per adapter at its ``B`` leaf; its ``A`` takes the preceding
      optimizer's update unchanged and a mask selects an adapter by its ``B``.
    anchor_dtype: the dtype the anchor is stored in (opt-in): ``None`` (the
      default) keeps each parameter's dtype; a floating-point dtype such as
      ``jnp.bfloat16`` stores the pre-trained values rounded to it (half the
      anchor's memory for float32 params), and the method then anchors at
      those rounded values; the arithmetic stays float32.
      The same argument of :func:`trainable_projection`, :func:`ftp`,
      :func:`spd`, :func:`digrap` and :func:`l2sp`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`TPGMState`; ``update`` takes ``(updates, state, params, *,
    radii=None)`` and raises ``ValueError`` if ``params`` is missing, the
    updates' structure or shapes differ from the params, no radii are given,
    or they do not match the anchor. Radius values are checked where they are
    concrete: ``tpgm(radii=...)`` must be finite and >= 0; concrete
    ``update(radii=...)`` (outside ``jax.jit``, read back in one transfer) must
    be finite, and a negative one means the 1e-8 floor (a radius optimizer's
    raw step may go below it). Traced radii cannot be checked; use
    :func:`check_finite` outside jit.

  Example:
    >>> import jax.numpy as jnp, optax, tpgm_jax
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = optax.chain(optax.sgd(1.0), tpgm_jax.tpgm())
    >>> state = tx.init(params)                            # anchor = params
    >>> radii = {"w": jnp.float32(0.5)}
    >>> updates, state = tx.update({"w": jnp.array([-3.0, -1.0])}, state,
    ...                            params, radii=radii)
    >>> optax.apply_updates(params, updates)["w"].tolist()  # L1 4 -> 0.5
    [0.375, 0.125]

  References:
    Tian et al., "Trainable Projected Gradient Method for Robust
    Fine-tuning", CVPR 2023, arXiv:2303.10720.
    Gouk et al., "Distance-Based Regularisation of Deep Networks for
    Fine-Tuning", ICLR 2021, arXiv:2002.08253 (MARS-PGM).
  """
  anchor_dtype = _tree.check_anchor_dtype(anchor_dtype)
  _projection._check_norm(norm)
  scheduled = _tree.is_schedule(radii)
  one_radius = (
    radii is not None
    and not scheduled
    and (isinstance(radii, (int, float)) or (hasattr(radii, "shape") and jnp.shape(radii) == ()))
  )
  if one_radius:
    _tree.check_number("radii", radii)
  elif radii is not None and not scheduled:
    _tree.check_radius_values(radii, "radii")
  default_radii = radii

  def init_fn(params):
    _tree.require_params(params, "tpgm", "tx.init(params) with the pre-trained params")
    return TPGMState(
      count=jnp.zeros((), jnp.int32), anchor=_lora.record_anchor(params, mask, lora, anchor_dtype)
    )

  def update_fn(updates, state, params=None, *, radii=None, **extra_args):
    del extra_args
    _tree.require_params(params, "tpgm", "update(updates, state, params, radii=radii)")
    _tree.check_like(params, updates, "updates")
    if radii is not None:
      _tree.check_radius_values(radii, "radii", negative=False)
    elif scheduled:
      r = _tree.schedule_value("radii", default_radii, state.count).astype(jnp.float32)
      radii = jax.tree.map(lambda _: r, params)
    elif one_radius:
      radii = jax.tree.map(lambda _: jnp.asarray(default_radii, jnp.float32), params)
    else:
      radii = default_radii
    candidate = optax.apply_updates(params, updates)
    anchor, cached = _projection.constrained_displacements(candidate, state.anchor, norm, lora=lora)
    _tree.check_radii(candidate, radii, anchor)
    projected = _projection.project_cached(candidate, anchor, cached, radii)
    new_state = TPGMState(optax.safe_int32_increment(state.count), state.anchor)
    return _projected_updates(updates, params, anchor, projected), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class TrainableProjectionState(NamedTuple):
  """State of :func:`trainable_projection`.

  Attributes:
    count: int32 scalar, the number of updates so far.
    anchor: the pre-trained value of every constrained tensor (its array,
      same shape and sharding as the parameter; its dtype, or
      ``anchor_dtype``), ``optax.MaskedNode()`` for the others; recorded by
      ``init``.
    radii: one float32 scalar per tensor, same structure as the params
      (0 for unconstrained tensors, never used); set at the first update.
    radius_state: the radius optimizer's state.
  """

  count: jax.Array
  anchor: PyTree
  radii: PyTree
  radius_state: optax.OptState


class LazyProjectionState(NamedTuple):
  """State of :func:`trainable_projection` with ``lazy=True``.

  Attributes:
    count: int32 scalar, the number of updates so far.
    anchor: as in :class:`TrainableProjectionState`.
    radii: as in :class:`TrainableProjectionState`.
    radius_state: the radius optimizer's state.
    free: the unprojected iterate of every constrained tensor (the
      pre-trained value plus the sum of the preceding optimizer's updates;
      the params' dtype and sharding), ``optax.MaskedNode()`` for the others.
  """

  count: jax.Array
  anchor: PyTree
  radii: PyTree
  radius_state: optax.OptState
  free: PyTree


def trainable_projection(
  heldout_loss: Callable[[PyTree, Any], jax.Array],
  *,
  norm: _projection.Norm = "mars",
  mask: _tree.Mask = None,
  radius_optimizer: optax.GradientTransformation | None = None,
  max_iters: int = 1,
  radius_units: str = "absolute",
  lora: _lora.LoRAAdapters | None = None,
  anchor_dtype: Any = None,
  lazy: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """TPGM during fine-tuning: learns the radii on held-out data and projects every step.

  The last link of ``optax.chain(inner, trainable_projection(...))`` (the
  paper's ResNet / DomainNet recipe). With the inner update ``u`` and the
  candidate ``c = w + u``, each ``update``:

  1. on the first update, sets ``radii = min(norms(c - w0)) / 2`` per tensor
     (the reference initialises at the first projection update);
  2. if ``heldout`` batches are passed, takes ``max_iters`` radius steps, each
     on one held-out batch: clip the radii to ``[1e-8, max(norms)]``, take
     ``jax.grad`` of ``heldout_loss(project(c, w0, radii), batch)`` with
     respect to the radii and step ``radius_optimizer`` (TPGM's outer loop,
     :func:`radii_trainer`);
  3. returns the update to ``project(c, w0, radii)`` (:func:`project`).

  Pass ``heldout`` every ``proj_freq`` steps (every step in the paper's
  recipe) and nothing on the others. Whether it is passed is static: a jitted
  step compiles once per variant, and the train loop chooses the variant from
  its host-side step counter (``lax.cond`` would avoid the second compilation,
  but XLA:CPU runs a model's convolutions many times slower inside a
  conditional). The displacement and norms of the candidate are computed once
  per update and shared by the three parts.

  The radii and their optimizer state live in the state, so they are
  checkpointed with the optimizer. Read them with
  ``optax.tree.get(opt_state, "radii")`` (works through ``optax.chain``,
  ``optax.masked`` and ``optax.MultiSteps``).

  Args:
    heldout_loss: ``heldout_loss(params, batch) -> scalar`` on a held-out
      batch, with the model in inference mode (e.g. BatchNorm with its
      running statistics). Use a split that you do not select checkpoints on.
    norm: ``"mars"`` (per-output-channel L1, the paper's default) or ``"l2"``.
    mask: which tensors are constrained, as ``optax.masked`` takes it (see
      :func:`tpgm`). Always exclude a freshly initialised head.
    radius_optimizer: optax optimizer of the radii; default
      ``optax.adam(1e-2)`` (the reference).
    max_iters: radius steps per radius update (the reference's ``max_iters``).
    radius_units: ``"absolute"`` (the reference: the optimizer steps the
      radius, so its learning rate is a distance per step) or ``"anchor"``
      (opt-in: it steps the radius in units of the anchor tensor's own norm,
      so the learning rate means the same for every layer; see
      :func:`radii_trainer`). Under ``lora`` an adapter's unit is 1.
    lora: LoRA adapters (:func:`lora_adapters`, opt-in): each adapter's
      merged update ``dW = s A B`` is kept in the ball (anchor 0, the frozen
      base kernel; norms of ``dW``) by scaling its ``B``'s columns, with one
      radius per adapter at its ``B`` leaf (learned on held-out data); its ``A`` takes the preceding
      optimizer's update unchanged and a mask selects an adapter by its ``B``.
    anchor_dtype: the dtype the anchor is stored in (opt-in; ``None``, the
      default: the params'), e.g. ``jnp.bfloat16``; see :func:`tpgm`.
    lazy: lazy projection (opt-in, not in the paper; off by default). The
      preceding optimizer's updates accumulate in an unprojected iterate
      ``f`` of every constrained tensor (in the state: one more buffer the
      size of the constrained params), the candidate is ``c = f + u``
      instead of ``w + u``, ``f`` becomes ``c`` and the params become
      ``project(c, w0, radii)`` as before; gradients are still taken at the
      projected params (lazy projection, or dual averaging: Zinkevich 2003,
      Nesterov 2009). The radii are then learned along the whole accumulated
      displacement ``f - w0`` rather than along one step beyond the ball,
      and a radius held at 0 for a while does not erase the optimizer's
      progress. Not available with ``lora``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`TrainableProjectionState` (:class:`LazyProjectionState` with
    ``lazy=True``); ``update(updates, state, params, *,
    heldout=None)`` takes ``heldout`` as a batch pytree whose leaves have a
    leading axis of length ``max_iters`` (``batch[None]`` for one). It raises
    ``ValueError`` (when traced) if the updates' structure or shapes differ
    from the params, ``heldout`` is not such a pytree of arrays, or
    ``heldout_loss`` does not return a floating-point scalar.

  Example:
    >>> import jax, jax.numpy as jnp, optax, tpgm_jax
    >>> loss = lambda p, target: jnp.sum((p["w"] - target) ** 2)
    >>> params = {"w": jnp.zeros(2)}                        # pre-trained
    >>> tx = optax.chain(optax.sgd(0.5),
    ...                  tpgm_jax.trainable_projection(loss, norm="l2"))
    >>> state = tx.init(params)
    >>> step = jax.jit(lambda p, s, g, h: tx.update(g, s, p, heldout=h))
    >>> for _ in range(200):                  # train optimum 1, held-out 0.4
    ...   grads = jax.grad(loss)(params, jnp.ones(2))
    ...   updates, state = step(params, state, grads, jnp.full((1, 2), 0.4))
    ...   params = optax.apply_updates(params, updates)
    >>> [round(float(x), 2) for x in params["w"]]
    [0.4, 0.4]
    >>> round(float(optax.tree.get(state, "radii")["w"]), 2)   # 0.4 * sqrt(2)
    0.57

  References:
    Tian et al., "Trainable Projected Gradient Method for Robust
    Fine-tuning", CVPR 2023, arXiv:2303.10720 (Algorithm 1).
  """
  anchor_dtype = _tree.check_anchor_dtype(anchor_dtype)
  _radii._check_loss_fn(heldout_loss)
  _projection._check_norm(norm)
  _tree.check_int("max_iters", max_iters, 1)
  _radii._check_units(radius_units)
  optimizer = _radii._check_optimizer(radius_optimizer)
  if not isinstance(lazy, bool):
    raise ValueError(f"trainable_projection: lazy must be a bool, got {lazy!r}")
  if lazy and lora is not None:
    raise ValueError(
      "trainable_projection: lazy=True is not available with lora= (the lazy iterate of an "
      "adapter's B would have to follow its scaled columns); use lazy=False"
    )

  def init_fn(params):
    _tree.require_params(
      params, "trainable_projection", "tx.init(params) with the pre-trained params"
    )
    anchor = _lora.record_anchor(params, mask, lora, anchor_dtype)
    radii = jax.tree.map(lambda _: jnp.zeros((), jnp.float32), params)
    count = jnp.zeros((), jnp.int32)
    if lazy:
      free = _tree.copy_anchor(_tree.masked_anchor(params, params, mask))
      return LazyProjectionState(count, anchor, radii, optimizer.init(radii), free)
    return TrainableProjectionState(count, anchor, radii, optimizer.init(radii))

  def update_fn(updates, state, params=None, *, heldout=None, **extra_args):
    del extra_args
    _tree.require_params(
      params, "trainable_projection", "update(updates, state, params, heldout=batches or None)"
    )
    _tree.check_like(params, updates, "updates")
    start = params
    if lazy:  # the constrained tensors step from their unprojected iterate
      start = _tree.map_constrained(lambda _, w, f: f, state.anchor, params, state.free)
    candidate = optax.apply_updates(start, updates)
    anchor, cached = _projection.constrained_displacements(candidate, state.anchor, norm, lora=lora)
    first = _projection.initial_radii(anchor, cached)
    radii = jax.tree.map(lambda r, r0: jnp.where(state.count == 0, r0, r), state.radii, first)
    radius_state = state.radius_state
    if heldout is not None:
      _radii.check_batches(heldout, max_iters, "heldout")
      radii, radius_state, _ = _radii.radius_steps(
        heldout_loss,
        optimizer,
        candidate,
        anchor,
        cached,
        radii,
        radius_state,
        heldout,
        max_iters,
        norm,
        radius_units,
      )
    projected = _projection.project_cached(candidate, anchor, cached, radii)
    count = optax.safe_int32_increment(state.count)
    if lazy:
      free = _tree.map_constrained(
        lambda _, c: c, state.anchor, candidate, otherwise=lambda c: _tree.MaskedNode()
      )
      new_state = LazyProjectionState(count, state.anchor, radii, radius_state, free)
    else:
      new_state = TrainableProjectionState(count, state.anchor, radii, radius_state)
    return _projected_updates(updates, params, anchor, projected), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
