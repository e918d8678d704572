"""L2-SP: an L2 penalty toward the starting point, as a gradient transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tpgm_jax import _lora, _projection, _tree

PyTree = Any


class L2SPState(NamedTuple):
  """State of :func:`l2sp`.

  Attributes:
    count: int32 scalar, the number of updates so far; a scheduled ``alpha`` or
      ``beta`` is evaluated at it (0 at the first update).
    anchor: the pre-trained value ``w0`` of every anchored tensor (shape,
      sharding of the parameter; its dtype, or ``anchor_dtype``), recorded by ``init``;
      ``optax.MaskedNode()`` for the others.
  """

  count: jax.Array
  anchor: PyTree


def l2sp(
  alpha: _tree.ScalarOrSchedule,
  beta: _tree.ScalarOrSchedule = 0.0,
  mask: _tree.Mask = None,
  *,
  lora: _lora.LoRAAdapters | None = None,
  anchor_dtype: Any = None,
) -> optax.GradientTransformation:
  """Adds the gradient of the L2-SP penalty to the updates.

  The penalty ``alpha / 2 ||w_S - w0_S||^2 + beta / 2 ||w_N||^2`` (``S`` the
  anchored tensors, ``N`` the other floating-point tensors, e.g. a new head)
  has the gradient added here::

      u' = u + alpha * (w - w0)   for anchored tensors
      u' = u + beta * w           for the other floating-point tensors

  Place it before the optimizer, like ``optax.add_decayed_weights``:
  ``optax.chain(tpgm_jax.l2sp(alpha), optax.sgd(lr, momentum=0.9))``.
  The anchor ``w0`` is recorded by ``init`` (call it on the pre-trained
  parameters).

  Args:
    alpha: strength of the pull toward the anchor: a number or an optax
      schedule of the step count (a finite number >= 0, a scalar array, or
      ``schedule(count) -> scalar`` evaluated at the number of updates before
      this one, e.g. ``optax.linear_schedule(0.0, 0.1, 1000)``).
    beta: plain weight decay of the unanchored tensors (0 by default): a
      number or an optax schedule of the step count, as ``alpha``.
    mask: which tensors are anchored, as ``optax.masked`` takes it: ``None``
      (every floating-point tensor), a pytree of static bools (or a prefix),
      or a callable ``params -> bool pytree`` such as
      ``tpgm_jax.path_mask(exclude=r"params/head/.*")``. Exclude a freshly
      initialised head (it has no meaningful pre-trained value).
    lora: LoRA adapters (:func:`lora_adapters`, opt-in): the penalty of an
      adapter is ``alpha / 2 ||s A B||_F^2``, the squared distance of the
      adapted layer to the pre-trained one, whose gradients are added to both
      leaves: ``u_A += alpha s^2 A (B B^T)`` and ``u_B += alpha s^2 (A^T A)
      B`` (``A`` flattened to ``(in, r)``; r x r Gram matrices, no product
      ``A B`` formed). Penalising ``A`` and ``B`` separately toward their
      initial values (or 0) would pull the random ``A`` back to where it
      started although ``dW`` does not depend on it when ``B = 0``. A mask
      selects an adapter by its ``B``; the adapters of an unselected one are
      "other" tensors (``beta``).
    anchor_dtype: the dtype the anchor is stored in (opt-in; ``None``, the
      default: the params'), e.g. ``jnp.bfloat16``; see :func:`tpgm`.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`L2SPState`; its
    ``update`` raises ``ValueError`` if ``params`` is missing or does not
    match the anchor, or the updates' structure or shapes differ from the
    params (naming the path).

  Example:
    >>> import jax.numpy as jnp, optax, tpgm_jax
    >>> w0 = {"w": jnp.zeros(2), "head": jnp.ones(2)}
    >>> tx = tpgm_jax.l2sp(0.1, beta=0.5, mask={"w": True, "head": False})
    >>> state = tx.init(w0)
    >>> params = {"w": jnp.array([1.0, -2.0]), "head": jnp.ones(2)}
    >>> grads = jax.tree.map(jnp.zeros_like, params)
    >>> u, _ = tx.update(grads, state, params)
    >>> u["w"].tolist(), u["head"].tolist()
    ([0.10000000149011612, -0.20000000298023224], [0.5, 0.5])

  References:
    Li, Grandvalet, Davoine, "Explicit Inductive Bias for Transfer Learning
    with Convolutional Networks", ICML 2018, arXiv:1802.01483.
  """
  anchor_dtype = _tree.check_anchor_dtype(anchor_dtype)
  _tree.check_number("alpha", alpha)
  _tree.check_number("beta", beta)
  decay_others = not (isinstance(beta, (int, float)) and beta == 0)

  def init_fn(params):
    _tree.require_params(params, "l2sp", "tx.init(params) with the pre-trained params")
    return L2SPState(
      count=jnp.zeros((), jnp.int32), anchor=_lora.record_anchor(params, mask, lora, anchor_dtype)
    )

  def update_fn(updates, state, params=None):
    _tree.require_params(params, "l2sp", "update(updates, state, params)")
    if lora is None:
      _tree.check_anchor(params, state.anchor)
      anchor = state.anchor
    else:
      anchor = _lora.anchor_tree(params, state.anchor, None, lora)
    _tree.check_like(params, updates, "updates")
    pairs = _lora.adapters(params, lora, anchor)
    a = _tree.schedule_value("alpha", alpha, state.count)
    b = _tree.schedule_value("beta", beta, state.count)

    def anchored(w0, u, w, ad):
      ct = _projection.compute_dtype(jnp.result_type(w))
      a_ct = _tree.in_dtype(a, ct, _tree.is_schedule(alpha))
      if ad:  # an adapter's B: d/dB alpha/2 ||s A B||^2
        return (u.astype(ct) + a_ct * _adapter_grad(ad, w, ct)).astype(u.dtype)
      return (u.astype(ct) + a_ct * (w.astype(ct) - w0.astype(ct))).astype(u.dtype)

    def others(u, w, ad):
      if ad and ad.constrained:  # an adapter's A: d/dA alpha/2 ||s A B||^2
        ct = _projection.compute_dtype(jnp.result_type(w))
        a_ct = _tree.in_dtype(a, ct, _tree.is_schedule(alpha))
        return (u.astype(ct) + a_ct * _adapter_grad(ad, w, ct)).astype(u.dtype)
      if not (decay_others and _tree.is_float(w)) or _tree.is_masked(u):
        return u
      ct = _projection.compute_dtype(jnp.result_type(w))
      b_ct = _tree.in_dtype(b, ct, _tree.is_schedule(beta))
      return (u.astype(ct) + b_ct * w.astype(ct)).astype(u.dtype)

    new_state = L2SPState(optax.safe_int32_increment(state.count), state.anchor)
    return _tree.map_constrained(
      anchored, anchor, updates, params, pairs, otherwise=others
    ), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _adapter_grad(ad: _lora.Adapter, w: jax.Array, ct: Any) -> jax.Array:
  """The gradient of ``1/2 ||s A B||_F^2`` in ``w``: ``s^2 A (B B^T)`` for ``w = A``,
  ``s^2 (A^T A) B`` for ``w = B`` (``A`` flattened to ``(in, r)``)."""
  hi = jax.lax.Precision.HIGHEST
  w, other = w.astype(ct), ad.partner.astype(ct)
  if ad.kind == "a":
    a2 = w.reshape(-1, w.shape[-1])
    return (
      ad.scale**2 * jnp.matmul(a2, jnp.matmul(other, other.T, precision=hi), precision=hi)
    ).reshape(w.shape)
  a2 = other.reshape(-1, other.shape[-1])
  return ad.scale**2 * jnp.matmul(jnp.matmul(a2.T, a2, precision=hi), w, precision=hi)
