"""L2-SP: an L2 penalty toward the starting point, as a gradient transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tpgm_jax import _projection, _tree

PyTree = Any


class L2SPState(NamedTuple):
  """State of :func:`l2sp`.

  Attributes:
    count: int32 scalar, the number of updates so far; a scheduled ``alpha`` or
      ``beta`` is evaluated at it (0 at the first update).
    anchor: the pre-trained value ``w0`` of every anchored tensor (shape,
      dtype and sharding of the parameter), recorded by ``init``;
      ``optax.MaskedNode()`` for the others.
  """

  count: jax.Array
  anchor: PyTree


def l2sp(
  alpha: _tree.ScalarOrSchedule, beta: _tree.ScalarOrSchedule = 0.0, mask: _tree.Mask = None
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
  _tree.check_number("alpha", alpha)
  _tree.check_number("beta", beta)
  decay_others = not (isinstance(beta, (int, float)) and beta == 0)

  def init_fn(params):
    _tree.require_params(params, "l2sp", "tx.init(params) with the pre-trained params")
    return L2SPState(count=jnp.zeros((), jnp.int32), anchor=_tree.record_anchor(params, mask))

  def update_fn(updates, state, params=None):
    _tree.require_params(params, "l2sp", "update(updates, state, params)")
    _tree.check_anchor(params, state.anchor)
    _tree.check_like(params, updates, "updates")
    a = _tree.schedule_value("alpha", alpha, state.count)
    b = _tree.schedule_value("beta", beta, state.count)

    def anchored(w0, u, w):
      ct = _projection.compute_dtype(jnp.result_type(w))
      a_ct = _tree.in_dtype(a, ct, _tree.is_schedule(alpha))
      return (u.astype(ct) + a_ct * (w.astype(ct) - w0.astype(ct))).astype(u.dtype)

    def others(u, w):
      if not (decay_others and _tree.is_float(w)) or _tree.is_masked(u):
        return u
      ct = _projection.compute_dtype(jnp.result_type(w))
      b_ct = _tree.in_dtype(b, ct, _tree.is_schedule(beta))
      return (u.astype(ct) + b_ct * w.astype(ct)).astype(u.dtype)

    new_state = L2SPState(optax.safe_int32_increment(state.count), state.anchor)
    return _tree.map_constrained(
      anchored, state.anchor, updates, params, otherwise=others
    ), new_state

  return optax.GradientTransformation(init_fn, update_fn)
