"""Distance norms, radius initialisation and the TPGM projection.

For one constrained tensor with current value ``w`` and anchor ``w0`` let
``d = w - w0``. TPGM keeps ``w`` in a ball of radius ``r`` around ``w0``:

* ``norm="mars"``: one L1 norm per output channel, ``n_j = sum_{i} |d_{i, j}|``
  summed over every axis but the LAST (Flax keeps the output axis last:
  Dense ``(in, out)``, Conv ``(kh, kw, in, out)``). A 0-D or 1-D tensor (bias,
  norm scale) gets one norm, the L1 norm of the whole tensor.
* ``norm="l2"``: one Frobenius norm of the whole tensor.

Projection with radius ``r`` (a scalar per tensor)::

    r'    = clip(r, 1e-8, max(n))
    ratio = clip(r' / (n + 1e-8), 0, 1)
    w'    = w0 + ratio * d

The norms are constants for differentiation, so the gradient with respect to
``r`` flows only through ``ratio`` (and is zero where ``ratio`` or ``r`` is
clipped). Unlike the reference implementation, a tensor equal to its anchor
(all norms zero) is projected onto itself, with zero radius gradient.

References:
  Tian et al., "Trainable Projected Gradient Method for Robust Fine-tuning",
  CVPR 2023, arXiv:2303.10720.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from tpgm_jax import _lora, _tree

PyTree = Any
Norm = Literal["mars", "l2"]
NORMS = ("mars", "l2")
EPS = 1e-8


def _check_norm(norm: str) -> None:
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def compute_dtype(dtype: Any) -> jnp.dtype:
  """Float32, or float64 for float64 tensors: never compute in half precision."""
  return jnp.promote_types(dtype, jnp.float32)


def channel_norms(d: jax.Array, norm: Norm) -> jax.Array:
  """Distance norms of a displacement ``d``: shape ``(d.shape[-1],)`` or ``()``.

  ``"mars"`` gives one L1 norm per output channel (last axis) for tensors of
  rank >= 2 and one L1 norm for rank 0 and 1; ``"l2"`` one Frobenius norm.
  """
  _check_norm(norm)
  if norm == "l2":
    return jnp.sqrt(channel_sum(jnp.square(d), norm))
  return channel_sum(jnp.abs(d), norm)


def channel_sum(x: jax.Array, norm: Norm) -> jax.Array:
  """Sums ``x`` over the axes that one distance norm of ``norm`` reduces.

  Every axis but the last for ``"mars"`` at rank >= 2 (shape ``(out,)``),
  every axis otherwise (shape ``()``): the shape of :func:`channel_norms`.
  """
  if norm == "mars" and x.ndim >= 2:
    return jnp.sum(x, axis=tuple(range(x.ndim - 1)))
  return jnp.sum(x)


def max_norm(norms: jax.Array) -> jax.Array:
  """``max(norms)``, 0 for a tensor with no elements."""
  return jnp.max(norms, initial=0.0)


def clip_radius(r: jax.Array, norms: jax.Array) -> jax.Array:
  """``clip(r, 1e-8, max(norms))``; the upper bound is floored at 1e-8 too.

  The floor keeps the interval well formed when the tensor equals its anchor
  (``max(norms) == 0``), where the reference implementation crashes.
  """
  return jnp.clip(r, EPS, jnp.maximum(max_norm(norms), EPS))


def project_displacement(
  w0: jax.Array, d: jax.Array, norms: jax.Array, r: jax.Array, dtype: Any
) -> jax.Array:
  """``w0 + clip(clip_radius(r) / (norms + 1e-8), 0, 1) * d``, cast to ``dtype``."""
  ct = d.dtype
  ratio = jnp.clip(clip_radius(r.astype(ct), norms) / (norms + EPS), 0.0, 1.0)
  return (w0.astype(ct) + ratio * d).astype(dtype)


def displacement(w: jax.Array, w0: jax.Array, norm: Norm) -> tuple[jax.Array, jax.Array]:
  """``(d, norms)`` for one tensor, in float32 (float64 for float64 tensors).

  The norms are wrapped in ``stop_gradient``: they are constants for TPGM.
  """
  ct = compute_dtype(jnp.result_type(w))
  d = w.astype(ct) - w0.astype(ct)
  return d, jax.lax.stop_gradient(channel_norms(d, norm))


def adapter_displacement(
  b: jax.Array, adapter: _lora.Adapter, norm: Norm
) -> tuple[jax.Array, jax.Array]:
  """``(d, norms)`` of an adapter's ``B`` leaf: ``d = B`` (so scaling ``d``'s columns
  scales ``dW``'s) and the norms of ``dW = s A B``, constants for differentiation."""
  d = b.astype(compute_dtype(jnp.result_type(b)))
  norms = _lora.merged_norms(adapter.partner, b, adapter.scale, norm)
  return d, jax.lax.stop_gradient(norms.astype(d.dtype))


def constrained_displacements(
  params: PyTree,
  anchor: PyTree,
  norm: Norm,
  mask: _tree.Mask = None,
  name: str = "anchor",
  lora: _lora.LoRAAdapters | None = None,
) -> tuple[PyTree, PyTree]:
  """``(anchor tree, tree of (w0, d, norms))``: the displacement and norms of
  every constrained tensor (:func:`displacement`), ``MaskedNode`` elsewhere.

  With ``lora``, an adapter's ``B`` leaf has ``w0 = 0``, ``d = B`` and the norms of
  ``dW = s A B`` (:func:`adapter_displacement`); its ``A`` leaf is unconstrained.
  """
  _check_norm(norm)
  anchor = _lora.anchor_tree(params, anchor, mask, lora, name)
  if lora is None:
    cached = _tree.map_constrained(
      lambda w0, w: (w0, *displacement(w, w0, norm)),
      anchor,
      params,
      otherwise=lambda w: _tree.MaskedNode(),
    )
    return anchor, cached
  cached = _tree.map_constrained(
    lambda w0, w, ad: (
      (w0, *adapter_displacement(w, ad, norm)) if ad else (w0, *displacement(w, w0, norm))
    ),
    anchor,
    params,
    _lora.adapters(params, lora),
    otherwise=lambda w, ad: _tree.MaskedNode(),
  )
  return anchor, cached


def project_cached(params: PyTree, anchor: PyTree, cached: PyTree, radii: PyTree) -> PyTree:
  """:func:`project` from the output of :func:`constrained_displacements`."""
  return _tree.map_constrained(
    lambda _, w, c, r: project_displacement(c[0], c[1], c[2], r, jnp.result_type(w)),
    anchor,
    params,
    cached,
    radii,
  )


def clip_cached(anchor: PyTree, cached: PyTree, radii: PyTree) -> PyTree:
  """:func:`clip_radii` from the output of :func:`constrained_displacements`."""
  return _tree.map_constrained(
    lambda _, c, r: clip_radius(r, c[2]).astype(jnp.result_type(r)),
    anchor,
    cached,
    radii,
    otherwise=lambda c, r: r,
  )


def distance_norms(
  params: PyTree,
  anchor: PyTree,
  norm: Norm = "mars",
  mask: _tree.Mask = None,
  *,
  lora: _lora.LoRAAdapters | None = None,
) -> PyTree:
  """The distance norms of every constrained tensor to its anchor.

  Args:
    params: current parameters (any pytree of arrays).
    anchor: pre-trained parameters, same structure and shapes. A leaf may be
      ``None`` or ``optax.MaskedNode()`` to leave that tensor unconstrained.
    norm: ``"mars"`` (per-output-channel L1) or ``"l2"`` (Frobenius).
    mask: which tensors are constrained; see :func:`project`.
    lora: LoRA adapters (:func:`tpgm_jax.lora_adapters`): an adapter's
      distance is that of its merged update ``dW = s A B`` to 0, reported at
      its ``B`` leaf (the ``A`` leaf is unconstrained); see
      :func:`tpgm_jax.lora_adapters`.

  Returns:
    A pytree with the structure of ``params``: per constrained tensor an array
    of shape ``(out,)`` (``"mars"``, rank >= 2) or ``()``; ``None`` for
    unconstrained tensors.
  """
  anchor, cached = constrained_displacements(params, anchor, norm, mask, lora=lora)
  return _tree.map_constrained(lambda _, c: c[2], anchor, cached, otherwise=lambda c: None)


def init_radii(
  params: PyTree,
  anchor: PyTree,
  norm: Norm = "mars",
  mask: _tree.Mask = None,
  *,
  lora: _lora.LoRAAdapters | None = None,
) -> PyTree:
  """Initial radii: ``min(norms) / 2`` per tensor, as float32 scalars.

  TPGM initialises the radii at the first projection update, i.e. from the
  parameters after the first fine-tuning step (or, post hoc, from the
  fine-tuned parameters). Unconstrained tensors and tensors with no elements
  get radius 0 (which is never used).

  Args:
    params: current parameters (any pytree of arrays).
    anchor: pre-trained parameters (same structure and shapes).
    norm: ``"mars"`` or ``"l2"``.
    mask: which tensors are constrained; see :func:`project`.
    lora: LoRA adapters (:func:`tpgm_jax.lora_adapters`): an adapter's
      distance is that of its merged update ``dW = s A B`` to 0, reported at
      its ``B`` leaf (the ``A`` leaf is unconstrained); see
      :func:`tpgm_jax.lora_adapters`.

  Returns:
    A pytree with the structure of ``params`` holding one float32 scalar per
    tensor.

  Example:
    >>> import jax.numpy as jnp, tpgm_jax
    >>> w0 = {"kernel": jnp.zeros((2, 2))}
    >>> w = {"kernel": jnp.array([[1.0, 3.0], [1.0, 1.0]])}
    >>> float(tpgm_jax.init_radii(w, w0)["kernel"])   # norms (2, 4) -> 2 / 2
    1.0
  """
  anchor, cached = constrained_displacements(params, anchor, norm, mask, lora=lora)
  return initial_radii(anchor, cached)


def initial_radii(anchor: PyTree, cached: PyTree) -> PyTree:
  """:func:`init_radii` from the output of :func:`constrained_displacements`."""
  return _tree.map_constrained(
    lambda _, c: (jnp.min(c[2]) / 2).astype(jnp.float32),
    anchor,
    cached,
    otherwise=lambda c: jnp.zeros((), jnp.float32),
  )


def clip_radii(
  radii: PyTree,
  params: PyTree,
  anchor: PyTree,
  norm: Norm = "mars",
  mask: _tree.Mask = None,
  *,
  lora: _lora.LoRAAdapters | None = None,
) -> PyTree:
  """The radii clipped to ``[1e-8, max(norms)]``, the values the projection uses.

  The reference implementation replaces its stored radii by these clipped
  values before every radius update; :func:`radii_trainer` does the same.
  Unconstrained and empty tensors keep their radius unchanged. ``lora``: see
  :func:`project`.
  """
  anchor, cached = constrained_displacements(params, anchor, norm, mask, lora=lora)
  _tree.check_radii(params, radii, anchor)
  return clip_cached(anchor, cached, radii)


def project(
  params: PyTree,
  anchor: PyTree,
  radii: PyTree,
  norm: Norm = "mars",
  mask: _tree.Mask = None,
  *,
  lora: _lora.LoRAAdapters | None = None,
) -> PyTree:
  """Projects every constrained tensor into its ball around the anchor.

  ``w' = w0 + clip(clip(r, 1e-8, max(n)) / (n + 1e-8), 0, 1) * (w - w0)``
  with ``n`` the distance norms (see the module docstring). Pure, jit-able,
  differentiable in ``radii`` (the norms carry no gradient), and
  sharding-preserving: reductions are per tensor, so under ``jax.jit`` with
  sharded inputs XLA reduces shard-locally and all-reduces the small norms.

  Args:
    params: parameters to project (any pytree of float arrays: Flax Linen
      dicts, ``nnx.State``, nested tuples/lists/dicts). float32, bfloat16 and
      float64 are supported; the arithmetic is float32 (float64 for float64)
      and the result has the dtype of ``params``.
    anchor: pre-trained parameters with the same structure and shapes. A leaf
      may be ``None`` or ``optax.MaskedNode()`` to leave that tensor alone
      (so the ``anchor`` of a :class:`TPGMState` can be passed directly).
    radii: one floating-point scalar per tensor, same structure as ``params``
      (see :func:`init_radii`); float32 by convention.
    norm: ``"mars"`` (per-output-channel L1, the paper's default) or ``"l2"``.
    mask: which tensors are constrained, as ``optax.masked`` takes it:
      ``None`` for every floating-point tensor, a pytree of static bools with
      the structure of ``params`` (or a prefix), or a callable ``params ->
      bool pytree``; :func:`tpgm_jax.path_mask` builds one from parameter
      paths (``path_mask(exclude=r"params/head/.*")``). Unconstrained tensors
      are returned unchanged.
    lora: LoRA adapters (:func:`tpgm_jax.lora_adapters`): each adapter is
      projected on its merged update ``dW = s A B`` (anchor 0: the frozen base
      kernel) with the radius at its ``B`` leaf, by scaling ``B``'s columns
      (``B' = ratio * B``, so ``s A B' = ratio * dW`` exactly); ``A`` is
      returned unchanged and the anchor's values at the adapters are not
      read (a ``None`` leaf at a ``B`` still leaves that adapter alone).

  Returns:
    The projected parameters, same structure, shapes and dtypes as ``params``.

  Example:
    >>> import jax.numpy as jnp, tpgm_jax
    >>> w0 = {"w": jnp.zeros(3)}
    >>> w = {"w": jnp.array([3.0, 0.0, 1.0])}              # L1 distance 4
    >>> r = {"w": jnp.float32(2.0)}
    >>> tpgm_jax.project(w, w0, r)["w"].tolist()           # scaled onto L1 = 2
    [1.5, 0.0, 0.5]
  """
  anchor, cached = constrained_displacements(params, anchor, norm, mask, lora=lora)
  _tree.check_radii(params, radii, anchor)
  return project_cached(params, anchor, cached, radii)
