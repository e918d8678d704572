"""Plumbing shared by the transformations that wrap an inner optimizer (FTP, SPD).

A wrapper sees the raw gradient ``g``, asks the inner optimizer for its
update ``u`` (the candidate is ``c = w + u``), and replaces ``u`` per
constrained tensor. The inner optimizer's state is never modified.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from tpgm_jax import _tree

PyTree = Any


def require_params(params: PyTree, name: str) -> None:
  if params is None:
    raise ValueError(
        f"{name} needs the current params: call update(grads, state, params)")


def per_anchor(anchor: PyTree, fn: Callable[[jax.Array], Any]) -> PyTree:
  """``fn(w0)`` for every recorded anchor tensor, ``MaskedNode`` elsewhere."""
  return jax.tree.map(lambda a: a if _tree.is_masked(a) else fn(a), anchor,
                      is_leaf=_tree.is_masked)


def inner_update(inner: optax.GradientTransformationExtraArgs, grads: PyTree,
                 inner_state: optax.OptState, params: PyTree,
                 extra_args: dict[str, Any]
                 ) -> tuple[list[Any], list[Any], optax.OptState]:
  """``(grads, updates, inner_state)``: leaves in params order, new state."""
  grad_leaves = _tree.align(params, grads, "grads")
  updates, inner_state = inner.update(grads, inner_state, params, **extra_args)
  return grad_leaves, _tree.align(params, updates, "inner updates"), inner_state


def leaves_like(params: PyTree, state_tree: PyTree) -> list[Any]:
  """The leaves of a state tree created by ``init`` (MaskedNode kept)."""
  return jax.tree.structure(params).flatten_up_to(state_tree)
