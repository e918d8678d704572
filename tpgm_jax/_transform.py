"""TPGM as an optax ``GradientTransformation``: the projection after a step."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tpgm_jax import _projection, _tree

PyTree = Any


class TPGMState(NamedTuple):
  """State of :func:`tpgm`.

  Attributes:
    anchor: the pre-trained parameters recorded by ``init``: an array (same
      shape, dtype and sharding as the parameter) for every constrained
      tensor, ``optax.MaskedNode()`` for every unconstrained one.
  """
  anchor: PyTree


def anchor_tree(params: PyTree, mask: _tree.Mask) -> PyTree:
  """A copy of the constrained tensors of ``params``, MaskedNode elsewhere.

  The copy gives the anchor buffers of its own, so a train step may donate
  both the params and the optimizer state.
  """
  flags = _tree.resolve_mask(mask, params)
  leaves = [jnp.copy(p) if f else optax.MaskedNode()
            for p, f in zip(jax.tree.leaves(params), flags)]
  return jax.tree.unflatten(jax.tree.structure(params), leaves)


def tpgm(norm: _projection.Norm = "mars",
         mask: _tree.Mask = None) -> optax.GradientTransformationExtraArgs:
  """Projects the parameters after each step into balls around the anchor.

  Use it as the LAST link of ``optax.chain``: given the updates ``u`` of the
  preceding optimizer it returns ``u' = project(w + u) - w``, so that
  ``optax.apply_updates(w, u')`` lies inside the constraint set
  (``|| w' - w0 || <= r`` per tensor, per output channel for ``"mars"``; see
  :func:`tpgm_jax.project`). The anchor ``w0`` is recorded by ``init`` (call
  it on the pre-trained parameters) and kept in :class:`TPGMState`; the radii
  are a separate pytree passed to every ``update`` as ``radii=``, learned by
  :func:`tpgm_jax.radii_trainer` on held-out data. The optimizer's own state
  (momentum, Adam moments) is not projected, as in the reference.

  Args:
    norm: ``"mars"`` (per-output-channel L1, the paper's default) or ``"l2"``.
    mask: which tensors are constrained: ``None`` (every floating-point
      tensor), a callable on the parameter path such as
      ``lambda path: not path.startswith("params/head")``, or a pytree of
      static bools. Always exclude a freshly initialised head. Unconstrained
      tensors get the preceding optimizer's update unchanged.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` takes
    ``(updates, state, params, *, radii)`` and raises ``ValueError`` if
    ``params`` or ``radii`` is missing or does not match the anchor.

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
  """
  _projection._check_norm(norm)

  def init_fn(params):
    return TPGMState(anchor=anchor_tree(params, mask))

  def update_fn(updates, state, params=None, *, radii=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
          "tpgm needs the current params: call update(updates, state, params, "
          "radii=radii)")
    candidate = optax.apply_updates(params, updates)
    projected = _projection.project(candidate, state.anchor, radii, norm)
    anchors = jax.tree.structure(params).flatten_up_to(state.anchor)
    new_updates = [
        u if _tree.is_masked(a) else (n - p).astype(jnp.result_type(u))
        for u, p, n, a in zip(jax.tree.leaves(updates), jax.tree.leaves(params),
                              jax.tree.leaves(projected), anchors)]
    return jax.tree.unflatten(jax.tree.structure(updates), new_updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
