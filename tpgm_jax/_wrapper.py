"""Plumbing shared by the family's transformations.

A wrapper (FTP, SPD) sees the raw gradient ``g``, asks the inner optimizer for
its update ``u`` (the candidate is ``c = w + u``), and replaces ``u`` per
constrained tensor; the inner optimizer's state is never modified. FTP and
DiGraP also learn one scalar per tensor with their own fixed-constant Adam
(:func:`scalar_adam`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from tpgm_jax import _tree

PyTree = Any


def per_anchor(anchor: PyTree, fn: Callable[[jax.Array], Any]) -> PyTree:
  """``fn(w0)`` for every recorded anchor tensor, ``MaskedNode`` elsewhere."""
  return _tree.map_constrained(fn, anchor, otherwise=lambda: _tree.MaskedNode())


def inner_update(
  inner: optax.GradientTransformationExtraArgs,
  grads: PyTree,
  inner_state: optax.OptState,
  params: PyTree,
  extra_args: dict[str, Any],
) -> tuple[PyTree, optax.OptState]:
  """The inner optimizer's ``(updates, state)``, after checking the trees' structures."""
  _tree.check_like(params, grads, "grads")
  updates, inner_state = inner.update(grads, inner_state, params, **extra_args)
  _tree.check_like(params, updates, "inner updates")
  return updates, inner_state


def check_inner(inner: Any, name: str) -> optax.GradientTransformation:
  if not isinstance(inner, optax.GradientTransformation):
    raise ValueError(
      f"{name} wraps an optax optimizer (a GradientTransformation such as "
      f"optax.sgd(...)); got {inner!r}"
    )
  return inner


def _never(read: jax.Array, count: jax.Array) -> jax.Array:
  """A predicate that depends on ``read`` and is never true (``count``, a step count, is never
  negative): a select on it orders ``read`` before the selected value (:func:`in_place`,
  :func:`after`)."""
  return (count < 0) & jnp.isnan(read)


def in_place(read: jax.Array, count: jax.Array, old: jax.Array, new: jax.Array) -> jax.Array:
  """``new``, exactly, written so that XLA updates ``old``'s buffer in place.

  A per-tensor state (FTP's ``c_{t-1}``, DiGraP's ``p_{t-1}``) is read by a reduction
  (``read``, its result) and replaced by a new value that does not depend on that read.
  When the step donates the state, the new value takes the old buffer, and with no
  order between the read and the write XLA copies the old buffer and then the new value
  (two copies of the tensor per step). A select on a predicate that depends on ``read``
  and is never true (``count``, the step number, is >= 1) orders the read first and
  lets the write happen in place; the value is ``new`` bit for bit.
  """
  return jnp.where(_never(read, count), old, new)


def after(read: jax.Array, count: jax.Array, x: jax.Array) -> jax.Array:
  """``x``, exactly, computed after the scalar ``read``.

  A value that depends on the params and the anchor alone (``w - w0``, a conversion of
  either) can be computed at the start of the step; where XLA stores it (several fusions
  read it), it is then held through the whole backward pass, a params-sized temporary
  for every tensor at once. A select on a predicate that depends on ``read`` (a value of
  the gradient) and is never true (``count``, a step count, is never negative) defers it
  until ``read`` exists, so that it lives while its tensor is updated, then is freed.
  """
  return jnp.where(_never(read, count), jnp.zeros_like(x), x)


def private(x: jax.Array, n: int) -> tuple[jax.Array, ...]:
  """``n`` copies of ``x``: the same value, as new values that XLA merges with nothing.

  XLA:CPU fuses an element-wise expression into a reduction only where the reduction is
  its one reader: an expression read by two reductions (or by a reduction and another
  fusion) is first stored in a params-sized temporary. A reduction that computes its
  operand from a copy of its own recomputes it inside its fusion instead (no temporary,
  one more read of ``x``). ``jax.lax.optimization_barrier`` keeps XLA from merging the
  copies' expressions; it is removed before the program runs.
  """
  return tuple(jax.lax.optimization_barrier((x,) * n))


def scalar_adam(
  h: jax.Array,
  mu: jax.Array,
  nu: jax.Array,
  count: jax.Array,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Adam's ``(direction, mu, nu)`` for a scalar hyper-gradient ``h`` at step ``count``.

  ``direction = (mu / (1 - b1^t)) / (sqrt(nu / (1 - b2^t)) + eps)`` with the
  bias corrections on the global step ``t = count``, as the FTP and DiGraP
  reference code compute them (their moments have seen ``t - 1`` updates).
  """
  mu = b1 * mu + (1 - b1) * h
  nu = b2 * nu + (1 - b2) * jnp.square(h)
  t = count.astype(mu.dtype)
  return (mu / (1 - b1**t)) / (jnp.sqrt(nu / (1 - b2**t)) + eps), mu, nu
