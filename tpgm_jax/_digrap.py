"""DiGraP (Directional Gradient Projection): a trainable gradient projection before the
optimizer."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tpgm_jax import _lora, _projection, _tree, _wrapper

PyTree = Any
ANCHORS = ("init", "zeros")
EPS = _projection.EPS
# DiGraP's own Adam on the per-tensor strength omega (fixed constants).
OMEGA_B1 = 0.9
OMEGA_B2 = 0.999


class DiGraPState(NamedTuple):
  """State of :func:`digrap`.

  Every per-tensor field holds ``optax.MaskedNode()`` for unconstrained
  tensors, so the state is a pytree of arrays only (checkpointable as is).

  Attributes:
    count: int32 scalar, the number of completed steps (``t - 1`` during step
      ``t``).
    anchor: with ``anchor="init"``, the pre-trained value ``w0`` of every
      constrained tensor (shape, sharding of the parameter; its dtype, or ``anchor_dtype``),
      recorded by ``init``; with ``anchor="zeros"``, a float32 scalar 0 per
      constrained tensor (nothing stored).
    omega: the projection strength of each constrained tensor after the last
      step, a float32 scalar (float64 for float64 parameters); 0 initially.
    omega_mu: Adam's first moment of omega (scalar, dtype of ``omega``).
    omega_nu: Adam's second moment of omega (scalar, dtype of ``omega``).
    prev_projection: the previous step's projection of the gradient on the
      displacement, ``p_{t-1}`` (shape of the parameter, dtype of ``omega``);
      zeros initially.
  """

  count: jax.Array
  anchor: PyTree
  omega: PyTree
  omega_mu: PyTree
  omega_nu: PyTree
  prev_projection: PyTree


def digrap(
  *,
  strength_lr: _tree.ScalarOrSchedule,
  mask: _tree.Mask = None,
  anchor: Literal["init", "zeros"] = "init",
  max_strength: _tree.ScalarOrSchedule = 1.0,
  lora: _lora.LoRAAdapters | None = None,
  anchor_dtype: Any = None,
) -> optax.GradientTransformation:
  """Projects conflicting gradient components off the displacement from the anchor.

  A link placed BEFORE the optimizer, like ``optax.add_decayed_weights``:
  ``optax.chain(tpgm_jax.digrap(strength_lr=0.05), optax.adam(lr))``. For every
  constrained tensor ``w`` with anchor ``w0`` and gradient ``g_t``, step
  ``t``, with ``r = w - w0``:

  1. projection of the gradient on the displacement:
     ``p_t = (<g_t, r> / (||r||^2 + 1e-8)) r``;
  2. the strength ``omega`` (one scalar per tensor, ``omega_1 = 0``) takes one
     Adam step (learning rate ``strength_lr``, betas 0.9 / 0.999, eps 1e-8) on
     the hyper-gradient ``h_t = <g_t, p_{t-1}> / (||g_t|| ||p_{t-1}|| + 1e-8)``,
     the cosine between the gradient and the previous projection (the
     direction in which a larger ``omega`` would have moved ``w_t``), then
     ``omega = clip(omega, 0, max_strength)``. As in FTP, the bias corrections
     use the global step ``t`` although the moments have seen ``t - 1``
     hyper-gradients;
  3. only where the two objectives conflict, ``<g_t, r> < 0`` (a descent step
     moves ``w`` away from ``w0``), the gradient becomes ``g_t - omega_t p_t``
     (for ``omega = 1``, its component along ``r`` is removed); elsewhere it is
     unchanged.

  At ``t = 1``, ``r = 0`` and ``p_0 = 0``, so nothing changes and ``omega``
  stays 0 (no branch is needed: the hyper-gradient and both moments are 0).
  Unconstrained tensors pass through. The work per step is three reductions
  per constrained tensor and O(1) scalar work; the state adds ``p_{t-1}``
  (one float32 copy of the constrained parameters) to the anchor.

  Semantics where the paper is silent follow its only public code (an
  unofficial prototype) except for one documented choice: the hyper-gradient
  is the cosine over the whole tensor (the paper's normalised
  ``g_t . p_{t-1}``), where the prototype normalises row by row.

  Args:
    strength_lr: learning rate ``mu`` of omega's Adam: a number or an optax
      schedule of the step count (a finite number > 0, or ``schedule(count)
      -> scalar`` evaluated at ``count = t - 1``, the number of steps before
      this one, the ``count`` field of :class:`DiGraPState`). The paper's
      hyper-parameter table was not available to us; the experiments use
      0.05 (an earlier value of the prototype, which now uses 0.5).
    mask: which tensors are projected, as ``optax.masked`` takes it: ``None``
      (every floating-point tensor), a pytree of static bools (or a prefix),
      or a callable ``params -> bool pytree`` such as
      ``tpgm_jax.path_mask(exclude=r"params/head/.*")``. Exclude a freshly
      initialised head.
    anchor: ``"init"`` uses the parameters passed to ``init`` (the pre-trained
      model) as ``w0``; ``"zeros"`` uses ``w0 = 0`` and stores nothing (the
      PEFT / LoRA case, where the trainable adapters start from zero).
    max_strength: the upper clip ``kappa`` of omega (1 in the paper): a
      number or an optax schedule of the step count, as ``strength_lr``
      (a finite number > 0).
    lora: LoRA adapters (:func:`lora_adapters`, opt-in): DiGraP on each
      adapter's merged update ``dW = s A B`` (anchor 0, the frozen base
      kernel), applied to ``B`` with ``r = B``: ``B`` is the direction that
      scales ``dW`` (``d/de s A (1 + e) B = dW``) and ``<g_B, B> = <G, dW>``
      for the gradient ``G`` in the merged weight, so the conflict test of
      step 3 is exactly the merged update's, and the removed component is the
      gradient's along ``dW``'s own scale. ``A`` (random at initialisation,
      no meaningful anchor) is not projected, unlike ``anchor="zeros"``
      applied to every adapter tensor (the paper's PEFT setting). No product
      ``A B`` is formed. ``anchor`` applies to the tensors outside the
      adapters; a mask selects an adapter by its ``B``.
    anchor_dtype: the dtype the anchor is stored in (opt-in; ``None``, the
      default: the params'), e.g. ``jnp.bfloat16``; see :func:`tpgm`. Ignored
      with ``anchor="zeros"`` (nothing is stored).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`DiGraPState`;
    ``update(grads, state, params)`` returns the modified gradients and
    raises ``ValueError`` if ``params`` is missing or does not match the
    anchor, or the gradients' structure or shapes differ from the params
    (naming the path).

  Example:
    >>> import jax.numpy as jnp, tpgm_jax
    >>> tx = tpgm_jax.digrap(strength_lr=0.5)
    >>> state = tx.init({"w": jnp.zeros(2)})                   # w0 = 0
    >>> params = {"w": jnp.array([1.0, 0.0])}                  # r = (1, 0)
    >>> # The component of g along r flips sign every step: omega grows.
    >>> for g in ([-1.0, -1.0], [1.0, -1.0], [-1.0, -1.0]):
    ...   out, state = tx.update({"w": jnp.array(g)}, state, params)
    >>> round(float(state.omega["w"]), 3)
    0.801
    >>> [round(float(x), 3) for x in out["w"]]   # <g, r> < 0: g - omega * p
    [-0.199, -1.0]

  References:
    Huang, Tian, Kira et al., "Directional Gradient Projection for Robust
    Fine-Tuning of Foundation Models", ICLR 2025, arXiv:2502.15895.
  """
  anchor_dtype = _tree.check_anchor_dtype(anchor_dtype)
  _tree.check_number("strength_lr", strength_lr, strict=True)
  _tree.check_number("max_strength", max_strength, strict=True)
  _tree.check_choice("anchor", anchor, ANCHORS)

  def init_fn(params):
    _tree.require_params(params, "digrap", "tx.init(params) with the pre-trained params")
    if anchor == "zeros":
      anchors = _tree.map_constrained(
        lambda a: jnp.zeros((), jnp.float32),
        _lora.anchor_tree(params, params, mask, lora),
        otherwise=lambda: _tree.MaskedNode(),
      )
    else:
      anchors = _lora.record_anchor(params, mask, lora, anchor_dtype)
    like = _lora.constrained_like(_lora.anchor_tree(params, params, mask, lora), params)

    def per_tensor(fn):
      return _tree.map_constrained(fn, like, otherwise=lambda: _tree.MaskedNode())

    def dtype(a):
      return _projection.compute_dtype(a.dtype)

    return DiGraPState(
      count=jnp.zeros((), jnp.int32),
      anchor=anchors,
      omega=per_tensor(lambda a: jnp.zeros((), dtype(a))),
      omega_mu=per_tensor(lambda a: jnp.zeros((), dtype(a))),
      omega_nu=per_tensor(lambda a: jnp.zeros((), dtype(a))),
      prev_projection=per_tensor(lambda a: jnp.zeros(a.shape, dtype(a))),
    )

  def update_fn(grads, state, params=None):
    _tree.require_params(params, "digrap", "update(grads, state, params)")
    w0 = state.anchor
    if anchor == "init":
      w0 = _lora.anchor_tree(params, w0, None, lora)
    else:
      _tree.align(params, w0, "anchor")
      if lora is not None:
        _lora.roles(params, lora)
    _tree.check_like(params, grads, "grads")
    lr = _tree.schedule_value("strength_lr", strength_lr, state.count)
    kappa = _tree.schedule_value("max_strength", max_strength, state.count)
    scheduled = (_tree.is_schedule(strength_lr), _tree.is_schedule(max_strength))
    count = optax.safe_int32_increment(state.count)
    rows = _tree.map_constrained(
      lambda w0, *xs: _digrap_tensor(
        w0, *xs, count=count, lr=lr, max_strength=kappa, scheduled=scheduled
      ),
      w0,
      params,
      grads,
      state.omega,
      state.omega_mu,
      state.omega_nu,
      state.prev_projection,
      otherwise=lambda w, g, *rest: (g, *rest),
    )
    grads, *fields = _tree.unzip(w0, rows, 5)
    return grads, DiGraPState(count, state.anchor, *fields)

  return optax.GradientTransformation(init_fn, update_fn)


def _digrap_tensor(
  w0, w, g, omega, mu, nu, prev_p, *, count, lr, max_strength, scheduled=(False, False)
):
  """One constrained tensor's DiGraP step: ``(gradient, omega, mu, nu, p)``."""
  ct = omega.dtype
  lr = _tree.in_dtype(lr, ct, scheduled[0])
  max_strength = _tree.in_dtype(max_strength, ct, scheduled[1])
  gc = g.astype(ct)
  gp = jnp.sum(gc * prev_p)
  # XLA stores r (two reductions and two writes read it): made after gp, which reads the
  # gradient, it is not held through the backward pass (see _wrapper.after; deferring w0
  # rather than r leaves the writes reading r, not w, so w can still be updated in place).
  r = w.astype(ct) - _wrapper.after(gp, count, jnp.asarray(w0).astype(ct))
  dot = jnp.sum(gc * r)
  p = (dot / (jnp.sum(jnp.square(r)) + EPS)) * r
  h = gp / (jnp.sqrt(jnp.sum(jnp.square(gc))) * jnp.sqrt(jnp.sum(jnp.square(prev_p))) + EPS)
  step, mu, nu = _wrapper.scalar_adam(h, mu, nu, count, OMEGA_B1, OMEGA_B2, EPS)
  omega = jnp.clip(omega - lr * step, 0.0, max_strength)
  new_g = jnp.where(dot < 0, gc - omega * p, gc).astype(jnp.result_type(g))
  # p_t reuses the donated buffer of p_{t-1}, which h reads.
  return new_g, omega, mu, nu, _wrapper.in_place(h, count, prev_p, p)
