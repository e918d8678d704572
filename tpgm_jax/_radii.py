"""The outer loop of TPGM: learning the radii on held-out data."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tpgm_jax import _projection, _tree

PyTree = Any
LossFn = Callable[[PyTree, Any], jax.Array]


class RadiiTrainer(NamedTuple):
  """A pair of pure functions learning TPGM's radii (see :func:`radii_trainer`).

  Attributes:
    init: ``init(radii) -> opt_state``, the radius optimizer's state.
    update: ``update(radii, opt_state, params, anchor, batches) ->
      (radii, opt_state, losses)``; ``batches`` is a pytree whose leaves have
      a leading axis of length ``max_iters`` (one held-out batch per
      iteration) and ``losses`` has shape ``(max_iters,)``.
  """
  init: Callable[[PyTree], optax.OptState]
  update: Callable[..., tuple[PyTree, optax.OptState, jax.Array]]


def radii_trainer(loss_fn: LossFn, *, norm: _projection.Norm = "mars",
                  mask: _tree.Mask = None,
                  optimizer: optax.GradientTransformation | None = None,
                  max_iters: int = 1) -> RadiiTrainer:
  """The radius update of TPGM's outer loop, as a pair of jit-able functions.

  One call of ``update`` runs ``max_iters`` iterations; iteration ``k``:

  1. replaces the radii by their clipped values ``clip(r, 1e-8, max(n))``
     (as the reference does before each step);
  2. computes ``g = d/dr loss_fn(project(params, anchor, r), batches[k])``;
  3. steps the radii with ``optimizer`` (Adam, learning rate 1e-2 by default).

  The parameters are not changed; project them with the new radii afterwards
  (``tpgm_jax.project`` or the ``tpgm`` transformation). The distance norms
  are computed once per call.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` on held-out data. Evaluate
      the model in inference mode (e.g. BatchNorm with running statistics)
      and close over anything else it needs.
    norm: ``"mars"`` or ``"l2"``.
    mask: which tensors are constrained; see :func:`tpgm_jax.project`.
    optimizer: optax optimizer for the radii; default ``optax.adam(1e-2)``.
    max_iters: radius steps per call (the reference's ``max_iters``).

  Returns:
    A :class:`RadiiTrainer`.

  Example:
    >>> import jax, jax.numpy as jnp, tpgm_jax
    >>> w0, w = {"w": jnp.zeros(2)}, {"w": jnp.ones(2)}
    >>> loss = lambda p, target: jnp.sum((p["w"] - target) ** 2)
    >>> trainer = tpgm_jax.radii_trainer(loss, max_iters=3)
    >>> radii = tpgm_jax.init_radii(w, w0)                  # 1.0
    >>> state = trainer.init(radii)
    >>> radii, state, losses = jax.jit(trainer.update)(
    ...     radii, state, w, w0, jnp.full((3, 2), 0.4))
    >>> losses.shape
    (3,)

  References:
    Tian et al., "Trainable Projected Gradient Method for Robust
    Fine-tuning", CVPR 2023, arXiv:2303.10720 (Algorithm 1).
  """
  _projection._check_norm(norm)
  if max_iters < 1:
    raise ValueError(f"max_iters must be >= 1, got {max_iters}")
  optimizer = optax.adam(1e-2) if optimizer is None else optimizer

  def update(radii, opt_state, params, anchor, batches):
    _check_batches(batches, max_iters)
    rs = _tree.check_radii(params, radii)
    treedef = jax.tree.structure(params)
    # Displacements and norms do not depend on the radii: compute them once.
    cached = []
    for (_, w, w0), r in zip(_projection._constrained(params, anchor, mask), rs):
      if w0 is None or _tree.is_masked(r) or jnp.size(w) == 0:
        cached.append(None)
      else:
        cached.append((w0,) + _projection.displacement(w, w0, norm))

    def projected(radii):
      out = []
      for w, c, r in zip(treedef.flatten_up_to(params), cached,
                         treedef.flatten_up_to(radii)):
        out.append(w if c is None else _projection.project_displacement(
            c[0], c[1], c[2], r, jnp.result_type(w)))
      return jax.tree.unflatten(treedef, out)

    def clipped(radii):
      out = [r if c is None else _projection.clip_radius(r, c[2]).astype(jnp.result_type(r))
             for c, r in zip(cached, treedef.flatten_up_to(radii))]
      return jax.tree.unflatten(treedef, out)

    def step(carry, batch):
      radii, opt_state = carry
      radii = clipped(radii)
      loss, grads = jax.value_and_grad(lambda r: loss_fn(projected(r), batch))(radii)
      updates, opt_state = optimizer.update(grads, opt_state, radii)
      return (optax.apply_updates(radii, updates), opt_state), loss

    # A Python loop (unrolled at trace time), not lax.scan: XLA:CPU runs the
    # model's convolutions ~20x slower inside a while loop, and max_iters is
    # small (1 in the paper's recipes).
    losses = []
    for k in range(max_iters):
      (radii, opt_state), loss = step((radii, opt_state), jax.tree.map(lambda b: b[k], batches))
      losses.append(loss)
    return radii, opt_state, jnp.stack(losses)

  return RadiiTrainer(init=optimizer.init, update=update)


def _check_batches(batches: PyTree, max_iters: int) -> None:
  for path, leaf in zip(_tree.leaf_paths(batches), jax.tree.leaves(batches)):
    if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != max_iters:
      raise ValueError(
          f"batches at '{path}' has shape {jnp.shape(leaf)}; expected a leading "
          f"axis of length max_iters={max_iters} (one held-out batch per radius "
          "iteration; use batch[None] for max_iters=1)")


def learn_radii_post_hoc(loss_fn: LossFn, finetuned: PyTree, pretrained: PyTree,
                         batches: Iterable[Any], *, norm: _projection.Norm = "mars",
                         mask: _tree.Mask = None,
                         optimizer: optax.GradientTransformation | None = None,
                         radii: PyTree | None = None) -> tuple[PyTree, PyTree]:
  """Post-hoc TPGM: learns radii between two models, then projects once.

  The recipe used with CLIP ViTs on ImageNet: fine-tune normally, then
  learn per-tensor radii around the pre-trained weights on held-out data and
  return ``project(finetuned, pretrained, radii)``. It is a learned,
  per-layer generalisation of WiSE-FT's weight interpolation: for ``"l2"``
  each constrained tensor is ``w0 + ratio * (w_ft - w0)`` with its own learned
  ``ratio`` in ``[0, 1]`` (per output channel for ``"mars"``).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar`` on held-out data.
    finetuned: the fine-tuned parameters.
    pretrained: the pre-trained parameters (same structure and shapes).
    batches: an iterable of held-out batches; one radius step per batch,
      each step a call of a jitted function (so the loop is over host data).
    norm: ``"mars"`` or ``"l2"``.
    mask: which tensors are constrained (exclude a new head).
    optimizer: radius optimizer; default ``optax.adam(1e-2)``.
    radii: initial radii; default ``init_radii(finetuned, pretrained)``.

  Returns:
    ``(projected_params, radii)``.
  """
  trainer = radii_trainer(loss_fn, norm=norm, mask=mask, optimizer=optimizer)
  if radii is None:
    radii = _projection.init_radii(finetuned, pretrained, norm, mask)
  state = trainer.init(radii)
  step = jax.jit(lambda r, s, ft, pre, b: trainer.update(
      r, s, ft, pre, jax.tree.map(lambda x: x[None], b))[:2])
  for batch in batches:
    radii, state = step(radii, state, finetuned, pretrained, batch)
  return _projection.project(finetuned, pretrained, radii, norm, mask), radii
