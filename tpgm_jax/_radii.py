"""The outer loop of TPGM: learning the radii on held-out data."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tpgm_jax import _lora, _projection, _tree

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


def radii_trainer(
  loss_fn: LossFn,
  *,
  norm: _projection.Norm = "mars",
  mask: _tree.Mask = None,
  optimizer: optax.GradientTransformation | None = None,
  max_iters: int = 1,
  radius_units: str = "absolute",
  lora: _lora.LoRAAdapters | None = None,
) -> RadiiTrainer:
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
    radius_units: what the optimizer steps. ``"absolute"`` (the reference):
      the radius itself, so the learning rate is a distance per step.
      ``"anchor"`` (opt-in): the radius divided by the anchor tensor's own
      largest distance norm from 0 (:func:`anchor_scale`), so the learning
      rate is a fraction of the pre-trained weights' norm per step, the same
      for every layer whatever its size or weight scale. The optimizer state
      is kept in these units; the radii passed in and returned are distances.
      An adapter's unit (under ``lora``) is 1.
    lora: LoRA adapters (:func:`tpgm_jax.lora_adapters`): an adapter's radius
      (at its ``B`` leaf) bounds its merged update ``dW = s A B``; see
      :func:`tpgm_jax.project`.

  Returns:
    A :class:`RadiiTrainer`. Its ``update`` raises ``ValueError`` (when traced,
    before any work) if ``batches`` is ``None``, a string, holds a leaf that is
    not an array, or a leaf whose leading axis is not ``max_iters`` (a list of
    batches must be stacked first), if ``loss_fn`` does not return a
    floating-point scalar, or if the radii do not fit the params.

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
  _check_loss_fn(loss_fn)
  _projection._check_norm(norm)
  _tree.check_int("max_iters", max_iters, 1)
  _check_units(radius_units)
  optimizer = _check_optimizer(optimizer)

  def update(radii, opt_state, params, anchor, batches):
    check_batches(batches, max_iters)
    anchor, cached = _projection.constrained_displacements(params, anchor, norm, mask, lora=lora)
    _tree.check_radii(params, radii, anchor)
    return radius_steps(
      loss_fn,
      optimizer,
      params,
      anchor,
      cached,
      radii,
      opt_state,
      batches,
      max_iters,
      norm,
      radius_units,
    )

  return RadiiTrainer(init=optimizer.init, update=update)


def _check_loss_fn(loss_fn):
  if not callable(loss_fn):
    raise ValueError(
      f"the held-out loss must be a callable loss(params, batch) -> scalar, got {loss_fn!r}"
    )


def _check_optimizer(optimizer):
  if optimizer is None:
    return optax.adam(1e-2)
  if not isinstance(optimizer, optax.GradientTransformation):
    raise ValueError(
      f"the radius optimizer must be an optax GradientTransformation, got {optimizer!r}"
    )
  return optimizer


UNITS = ("absolute", "anchor")


def _check_units(units: str) -> None:
  _tree.check_choice("radius_units", units, UNITS)


def anchor_scale(w0: jax.Array, norm: _projection.Norm) -> jax.Array:
  """The unit of an ``"anchor"`` radius: the largest distance norm of the anchor tensor
  itself (from 0), 1 for an all-zero anchor; float32 (float64 for float64)."""
  scale = _projection.max_norm(
    _projection.channel_norms(w0.astype(_projection.compute_dtype(w0.dtype)), norm)
  )
  return jnp.where(scale > 0, scale, jnp.ones_like(scale))


def radius_steps(
  loss_fn: LossFn,
  optimizer: optax.GradientTransformation,
  params: PyTree,
  anchor: PyTree,
  cached: PyTree,
  radii: PyTree,
  opt_state: optax.OptState,
  batches: PyTree,
  max_iters: int,
  norm: _projection.Norm = "mars",
  units: str = "absolute",
) -> tuple[PyTree, optax.OptState, jax.Array]:
  """``max_iters`` radius iterations from precomputed displacements and norms
  (:func:`tpgm_jax._projection.constrained_displacements`).

  With ``units="anchor"`` the optimizer steps ``r / anchor_scale(w0)`` instead of
  ``r`` (its state is kept in those units); the radii returned are distances.
  """
  to_units = to_radii = lambda tree: tree
  if units == "anchor":
    scale = _tree.map_constrained(
      lambda _, c: anchor_scale(c[0], norm), anchor, cached, otherwise=lambda c: 1.0
    )

    def to_units(r):
      return jax.tree.map(lambda x, u: (x / u).astype(x.dtype), r, scale)

    def to_radii(v):
      return jax.tree.map(lambda x, u: (x * u).astype(x.dtype), v, scale)

  def step(radii, opt_state, batch):
    radii = _projection.clip_cached(anchor, cached, radii)
    loss, grads = jax.value_and_grad(
      lambda v: scalar_loss(
        loss_fn(_projection.project_cached(params, anchor, cached, to_radii(v)), batch)
      )
    )(to_units(radii))
    updates, opt_state = optimizer.update(grads, opt_state, to_units(radii))
    return to_radii(optax.apply_updates(to_units(radii), updates)), opt_state, loss

  # A Python loop (unrolled at trace time), not lax.scan: XLA:CPU runs the
  # model's convolutions ~20x slower inside a while loop, and max_iters is
  # small (1 in the paper's recipes).
  losses = []
  for k in range(max_iters):
    radii, opt_state, loss = step(radii, opt_state, jax.tree.map(lambda b: b[k], batches))
    losses.append(loss)
  return radii, opt_state, jnp.stack(losses)


def scalar_loss(out: Any) -> jax.Array:
  """The held-out loss's value, checked to be a floating-point scalar (a static check)."""
  if isinstance(out, numbers.Real) and not isinstance(out, bool):
    out = jnp.asarray(out, jnp.float32)
  if (
    not (hasattr(out, "shape") and hasattr(out, "dtype"))
    or jnp.shape(out) != ()
    or not (jnp.issubdtype(out.dtype, jnp.floating))
  ):
    got = (
      f"an array of shape {jnp.shape(out)} and dtype {out.dtype}"
      if hasattr(out, "shape") and hasattr(out, "dtype")
      else f"a {type(out).__name__}"
    )
    raise ValueError(
      f"the held-out loss must return a floating-point scalar (reduce it, e.g. with "
      f".mean(); return no auxiliary outputs), got {got}"
    )
  return out


_STACK_HINT = (
  "stack a list of batches into one pytree with jax.tree.map(lambda *b: jnp.stack(b), *batches)"
)


def check_batches(batches: PyTree, max_iters: int, name: str = "batches") -> None:
  """Checks a held-out batch pytree: every leaf is an array with a leading axis of
  ``max_iters`` (one stacked batch per radius iteration). Static: costs nothing under jit."""
  expected = (
    f"expected one pytree of arrays whose leaves have a leading axis of length "
    f"max_iters={max_iters} (one held-out batch per radius iteration)"
  )
  if batches is None or isinstance(batches, (str, bytes)):
    raise ValueError(f"{name} is {batches!r}; {expected}")
  leaves = jax.tree.leaves(batches)
  if not leaves:
    raise ValueError(f"{name} is empty; {expected}")
  listed = isinstance(batches, list)
  for path, leaf in zip(_tree.leaf_paths(batches), leaves):
    if not (hasattr(leaf, "shape") or isinstance(leaf, numbers.Number)):
      raise ValueError(f"{name} at '{path}' is a {type(leaf).__name__} ({leaf!r}); {expected}")
    if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != max_iters:
      raise ValueError(
        f"{name} at '{path}' has shape {jnp.shape(leaf)}; expected a leading axis of length "
        f"max_iters={max_iters} (one held-out batch per radius iteration; use batch[None] "
        f"for max_iters=1" + (f"; {_STACK_HINT}" if listed else "") + ")"
      )


def _batch_signature(batch: Any) -> tuple[Any, list[Any]]:
  leaves = jax.tree.leaves(batch)
  return jax.tree.structure(batch), [(jnp.shape(x), jnp.result_type(x)) for x in leaves]


def check_batch_sequence(batches: Any, name: str = "batches") -> None:
  """Checks that ``batches`` is an iterable of held-out batches, not one batch.

  ``None``, a string, a dict (one batch), an array, or a tuple of arrays (one
  ``(x, y)`` batch, which iterating would silently take as two batches) raise
  a ``ValueError``; so does a sequence whose batches differ in tree structure,
  shapes or dtypes (:func:`check_same_batch`).
  """
  one = "pass a list (or a generator) of held-out batches, e.g. [batch] for one batch"
  if batches is None or isinstance(batches, (str, bytes)):
    raise ValueError(f"{name} is {batches!r}; {one}")
  if isinstance(batches, Mapping) or hasattr(batches, "shape"):
    raise ValueError(
      f"{name} must be an iterable of held-out batches, not a single batch "
      f"({type(batches).__name__}); {one}"
    )
  if isinstance(batches, tuple) and batches and all(hasattr(x, "shape") for x in batches):
    shapes = ", ".join(str(jnp.shape(x)) for x in batches[:4])
    raise ValueError(
      f"{name} is a tuple of {len(batches)} arrays (shapes {shapes}), which looks like a "
      f"single (x, y) batch; iterating it would take each array as a batch. Pass "
      f"[(x, y)] for one batch, or a list of batches"
    )
  if not isinstance(batches, Iterable):
    raise ValueError(
      f"{name} must be an iterable of held-out batches, got {type(batches).__name__}; {one}"
    )
  if isinstance(batches, Sequence) and batches:
    first = _batch_signature(batches[0])
    for i, batch in enumerate(batches[1:], 1):
      check_same_batch(first, batch, i, name)


def check_same_batch(
  first: tuple[Any, list[Any]], batch: Any, index: int, name: str = "batches"
) -> None:
  """Batch ``index`` must have the tree structure, shapes and dtypes of batch 0."""
  structure, leaves = _batch_signature(batch)
  if structure != first[0]:
    raise ValueError(
      f"{name} is ragged: batch {index} has tree structure {structure}, batch 0 has {first[0]}"
    )
  for path, got, want in zip(_tree.leaf_paths(batch), leaves, first[1]):
    if got != want:
      raise ValueError(
        f"{name} is ragged: batch {index} at '{path}' has shape {got[0]} and dtype {got[1]}, "
        f"batch 0 has {want[0]} and {want[1]}; use batches of one size (drop the remainder)"
      )


def learn_radii_post_hoc(
  loss_fn: LossFn,
  finetuned: PyTree,
  pretrained: PyTree,
  batches: Iterable[Any],
  *,
  norm: _projection.Norm = "mars",
  mask: _tree.Mask = None,
  optimizer: optax.GradientTransformation | None = None,
  radii: PyTree | None = None,
  radius_units: str = "absolute",
  lora: _lora.LoRAAdapters | None = None,
) -> tuple[PyTree, PyTree]:
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
    batches: an iterable of held-out batches (a list or a generator); one
      radius step per batch, each step a call of a jitted function (so the
      loop is over host data). All batches must have the same tree structure,
      shapes and dtypes. ``None``, a string, one dict batch, one array or one
      ``(x, y)`` tuple of arrays is an error (pass ``[batch]``).
    norm: ``"mars"`` or ``"l2"``.
    mask: which tensors are constrained (exclude a new head).
    optimizer: radius optimizer; default ``optax.adam(1e-2)``.
    radii: initial radii; default ``init_radii(finetuned, pretrained)``.
    radius_units: ``"absolute"`` (the reference) or ``"anchor"``; see
      :func:`radii_trainer`.
    lora: LoRA adapters (:func:`tpgm_jax.lora_adapters`): each adapter's
      merged update is projected (``B``'s columns scaled), one learned radius
      per adapter; ``pretrained``'s values at the adapters are not read (pass
      e.g. the adapters at initialisation), so the base model is the anchor.

  Returns:
    ``(projected_params, radii)``.

  Raises:
    ValueError: ``batches`` is not a sequence of equally shaped batches (see
      above), ``loss_fn`` does not return a floating-point scalar, or the
      trees do not match (the message names the path).
  """
  trainer = radii_trainer(
    loss_fn, norm=norm, mask=mask, optimizer=optimizer, radius_units=radius_units, lora=lora
  )
  check_batch_sequence(batches)
  if radii is None:
    radii = _projection.init_radii(finetuned, pretrained, norm, mask, lora=lora)
  state = trainer.init(radii)
  step = jax.jit(
    lambda r, s, ft, pre, b: trainer.update(r, s, ft, pre, jax.tree.map(lambda x: x[None], b))[:2]
  )
  steps, first = 0, None
  for batch in batches:
    if first is None:
      first = _batch_signature(batch)
    else:
      check_same_batch(first, batch, steps)
    radii, state = step(radii, state, finetuned, pretrained, batch)
    steps += 1
  if not steps:
    raise ValueError("batches is empty: post-hoc TPGM needs at least one held-out batch")
  return _projection.project(finetuned, pretrained, radii, norm, mask, lora=lora), radii
