"""SPD (Selective Projection Decay): decay toward the anchor, only where needed."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tpgm_jax import _lora, _projection, _tree, _wrapper

PyTree = Any
ANCHORS = ("init", "zeros")


class SPDState(NamedTuple):
  """State of :func:`spd`.

  Attributes:
    count: int32 scalar, the number of updates so far; a scheduled
      ``weight_decay`` is evaluated at it (0 at the first update).
    anchor: with ``anchor="init"``, the pre-trained value ``w0`` of every
      constrained tensor (shape, sharding of the parameter; its dtype, or ``anchor_dtype``),
      recorded by ``init``, and ``optax.MaskedNode()`` for the others; with
      ``anchor="zeros"``, ``optax.MaskedNode()`` everywhere (nothing stored).
    inner_state: the inner optimizer's state.
  """

  count: jax.Array
  anchor: PyTree
  inner_state: optax.OptState


def spd(
  inner: optax.GradientTransformation,
  *,
  weight_decay: _tree.ScalarOrSchedule,
  mask: _tree.Mask = None,
  anchor: Literal["init", "zeros"] = "init",
  lora: _lora.LoRAAdapters | None = None,
  anchor_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Wraps an optimizer with Selective Projection Decay toward the anchor.

  For every constrained tensor ``w`` (anchor ``w0``) with raw gradient ``g``
  and inner update ``u``, the candidate ``c = w + u`` is decayed toward the
  anchor only if the gradient is positively aligned with the displacement,
  ``sum(g * (w - w0)) > 0`` (the descent direction ``-g`` points back toward
  ``w0`` while the step still moves away: inconsistent progress)::

      ratio = clip((||c - w0|| - ||w - w0||) / ||c - w0||, 0, 1)   # L2 norms
      c'    = c - weight_decay * ratio * (c - w0)

  ``ratio`` is the fraction of the new distance added by this step (0 when
  the step does not move away); it is taken as 0 when ``c == w0``. The decay
  is not multiplied by the learning rate. Other tensors take ``c``. In the
  paper SPD replaces weight decay: use ``optax.adam`` as ``inner``. The work
  per step is three reductions per constrained tensor, fused by XLA.

  Args:
    inner: any optax optimizer (Adam in the paper); extra keyword arguments
      of ``update`` are passed on to it.
    weight_decay: the decay strength, the paper's lambda: a number or an
      optax schedule of the step count (a finite number >= 0, a scalar array,
      or ``schedule(count) -> scalar`` evaluated at the number of updates
      before this one, e.g. ``optax.linear_schedule(0.0, 1.0, 1000)``).
    mask: which tensors are decayed, as ``optax.masked`` takes it: ``None``
      (every floating-point tensor), a pytree of static bools (or a prefix),
      or a callable ``params -> bool pytree`` such as
      ``tpgm_jax.path_mask(exclude=r"params/head/.*")``. Exclude a freshly
      initialised head.
    anchor: ``"init"`` decays toward the parameters passed to ``init`` (the
      pre-trained model); ``"zeros"`` toward 0 (``w0 = 0``, nothing stored:
      the PEFT / LoRA case of the paper, where every trainable tensor, ``A``
      included, is decayed toward 0). With ``lora``, it applies to the tensors
      outside the adapters.
    lora: LoRA adapters (:func:`lora_adapters`, opt-in): SPD on each
      adapter's merged update ``dW = s A B`` toward 0 (the frozen base
      kernel), the principled form of ``anchor="zeros"`` for adapters (whose
      ``A`` starts random, not at 0). With ``G`` the gradient in the merged
      weight, the selection ``<G, dW> = <g_B, B> > 0`` is exact on ``B``, the
      ratio uses ``||s A B||`` and ``||s A' B'||`` (Frobenius, from r x r
      Gram matrices) for the current and candidate adapter, and the decay
      ``dW' = (1 - weight_decay * ratio) s A' B'`` is a decay of ``B'``
      alone; ``A`` takes the plain inner update. A mask selects an adapter by
      its ``B``.
    anchor_dtype: the dtype the anchor is stored in (opt-in; ``None``, the
      default: the params'), e.g. ``jnp.bfloat16``; see :func:`tpgm`. Ignored
      with ``anchor="zeros"`` (nothing is stored).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`SPDState`; ``update(grads, state, params)`` returns updates such
    that ``optax.apply_updates(params, updates)`` is the SPD step and raises
    ``ValueError`` if ``params`` is missing or does not match the anchor, or
    the gradients' (or the inner updates') structure or shapes differ from
    the params (naming the path).

  Example:
    >>> import jax.numpy as jnp, optax, tpgm_jax
    >>> w0 = {"w": jnp.zeros(2)}
    >>> tx = tpgm_jax.spd(optax.sgd(0.1), weight_decay=0.5)
    >>> state = tx.init(w0)
    >>> params = {"w": jnp.array([1.0, 0.0])}
    >>> g = {"w": jnp.array([1.0, -10.0])}   # <g, w - w0> = 1 > 0: decay
    >>> updates, state = tx.update(g, state, params)
    >>> c = optax.apply_updates(params, updates)["w"]       # c = [0.9, 1.0]
    >>> [round(float(x), 4) for x in c]                      # ratio 0.2567
    [0.7845, 0.8716]

  References:
    Tian, Huang, Kira, "Rethinking Weight Decay for Robust Fine-Tuning of
    Foundation Models", NeurIPS 2024 (Selective Projection Decay).
  """
  anchor_dtype = _tree.check_anchor_dtype(anchor_dtype)
  _tree.check_choice("anchor", anchor, ANCHORS)
  _tree.check_number("weight_decay", weight_decay)
  inner = optax.with_extra_args_support(_wrapper.check_inner(inner, "spd"))

  def init_fn(params):
    _tree.require_params(params, "spd", "tx.init(params) with the pre-trained params")
    if anchor == "zeros":
      _tree.resolve_mask(mask, params)  # fail early on a bad mask
      if lora is not None:
        _lora.roles(params, lora)  # and on bad adapters
      anchors = _tree.record_anchor(params, lambda p: False)
    else:
      anchors = _lora.record_anchor(params, mask, lora, anchor_dtype)
    return SPDState(count=jnp.zeros((), jnp.int32), anchor=anchors, inner_state=inner.init(params))

  def update_fn(grads, state, params=None, **extra_args):
    _tree.require_params(params, "spd", "update(grads, state, params)")
    if anchor == "zeros":
      if lora is None:
        _tree.check_anchor(params, state.anchor)
      else:
        _tree.align(params, state.anchor, "anchor")
      w0 = _lora.anchor_tree(params, jax.tree.map(jnp.zeros_like, params), mask, lora)
    else:
      w0 = _lora.anchor_tree(params, state.anchor, None, lora)
    updates, inner_state = _wrapper.inner_update(
      inner, grads, state.inner_state, params, extra_args
    )
    current = _lora.adapters(params, lora)
    candidate = _lora.adapters(optax.apply_updates(params, updates), lora)
    lam = _tree.schedule_value("weight_decay", weight_decay, state.count)
    scheduled = _tree.is_schedule(weight_decay)
    updates = _tree.map_constrained(
      lambda w0, w, g, u, a, a_c: _spd_tensor(w0, w, g, u, lam, scheduled, a, a_c, state.count),
      w0,
      params,
      grads,
      updates,
      current,
      candidate,
      otherwise=lambda w, g, u, *_: u,
    )
    return updates, SPDState(optax.safe_int32_increment(state.count), state.anchor, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _spd_tensor(w0, w, g, u, weight_decay, scheduled, adapter, cand, count):
  """One tensor's SPD update; for an adapter's ``B`` (``w0 = 0``) the norms are those of the
  current and candidate merged updates ``s A B`` and ``s A' B'``. ``count``: SPD's step
  count (orders the conversions, see :func:`_wrapper.after`)."""
  ct = _projection.compute_dtype(jnp.result_type(w))
  weight_decay = _tree.in_dtype(weight_decay, ct, scheduled)
  # Each reduction of w - w0 computes it from a copy of w of its own (see _wrapper.private);
  # a conversion to ct is stored, so it is made once the gradient exists (_wrapper.after).
  w_dot, w_norm = _wrapper.private(w, 2)

  def cast(x):
    if x.dtype == ct or g.size == 0:
      return x.astype(ct)
    return _wrapper.after(g.reshape(-1)[0], count, x.astype(ct))

  w, w0, w_dot, w_norm = w.astype(ct), cast(w0), cast(w_dot), cast(w_norm)
  c = w + u.astype(ct)
  d_new = c - w0
  if adapter:
    n_old = jnp.sqrt(_lora.merged_sq_norm(adapter.partner, w, adapter.scale)).astype(ct)
    n_new = jnp.sqrt(_lora.merged_sq_norm(cand.partner, c, cand.scale)).astype(ct)
  else:
    n_old = jnp.sqrt(jnp.sum(jnp.square(w_norm - w0)))
    n_new = jnp.sqrt(jnp.sum(jnp.square(d_new)))
  moved = n_new > 0  # guards the division where c == w0
  ratio = jnp.clip((n_new - n_old) / jnp.where(moved, n_new, 1.0), 0.0, 1.0)
  selected = moved & (jnp.sum(g.astype(ct) * (w_dot - w0)) > 0)
  decay = jnp.where(selected, weight_decay * ratio, 0.0)
  return (u.astype(ct) - decay * d_new).astype(jnp.result_type(u))
