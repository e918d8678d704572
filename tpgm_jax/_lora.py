"""LoRA adapters: the merged update ``s * A @ B`` as the constrained quantity.

A LoRA-adapted layer keeps its pre-trained kernel ``W0`` frozen and learns
``A`` (shape ``(*in, r)``, usually ``(in, r)``) and ``B`` (shape ``(r, out)``);
the layer computes with ``W0 + s * A @ B`` (``s = alpha / rank``). Its
distance to the pre-trained model is that of the merged update
``dW = s * A @ B``, whatever ``A`` and ``B`` are separately. With
``lora=tpgm_jax.lora_adapters(...)`` every method constrains ``dW``:

* the anchor of ``dW`` is 0 (the pre-trained layer); the base kernel is never
  read, so it may be absent from the params (``nnx.Optimizer(..., wrt=
  nnx.LoRAParam)``) or frozen;
* the norms are those of ``dW``: ``"mars"`` one L1 norm per output column
  (summed over every axis of ``dW`` but the last), ``"l2"`` its Frobenius
  norm, computed from the Gram matrices ``s^2 <A^T A, B B^T>`` without forming
  ``dW``;
* a projection scales ``B``'s columns: ``B' = ratio * B`` gives
  ``s A B' = ratio * dW`` column by column, exactly; ``A`` is not changed;
* one radius (or FTP constraint, SPD / DiGraP quantity) per adapted layer,
  held at the position of its ``B`` leaf; the ``A`` leaf holds none (its
  radius in a radii tree is unused, 0 from :func:`tpgm_jax.init_radii`);
* a mask selects an adapter by its ``B`` leaf; the mask's value for the ``A``
  leaf is ignored. Other tensors are treated as without ``lora``.

Adapters with leading stack axes (scanned layers, ``B`` of rank > 2) are not
supported: ``B`` must be 2-D.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp

from tpgm_jax import _tree

PyTree = Any
Scale = Union[float, Callable[[str], float]]


@dataclasses.dataclass(frozen=True)
class LoRAAdapters:
  """Which leaves form LoRA adapters, and their scale; built by :func:`lora_adapters`.

  Attributes:
    scale: ``s`` of ``dW = s * A @ B``: a number, or a callable ``A's path ->
      number``.
    a: regex fully matching the path of every ``A`` leaf; its first group is
      the layer's key.
    b: regex fully matching the path of every ``B`` leaf; its first group is
      the layer's key. An ``A`` and a ``B`` with the same key form an adapter.
  """

  scale: Scale = 1.0
  a: str = r"(.*)lora_a"
  b: str = r"(.*)lora_b"

  def pairs(self, params: PyTree) -> list[tuple[str, str, float]]:
    """The adapters of ``params`` as ``(A path, B path, scale)``, checked (see
    :func:`lora_adapters`)."""
    paths = _tree.leaf_paths(params)
    return [
      (paths[i], paths[role.partner], role.scale)
      for i, role in enumerate(roles(params, self))
      if role is not None and role.kind == "a"
    ]


def lora_adapters(
  scale: Scale = 1.0, *, a: str = r"(.*)lora_a", b: str = r"(.*)lora_b"
) -> LoRAAdapters:
  """Names the LoRA adapters of a parameter tree once, for every method's ``lora=``.

  Paths are spelled as :func:`tpgm_jax.leaf_paths` spells them. The defaults
  match both Flax NNX (``nnx.LoRA`` / ``nnx.LoRALinear``: ``.../lora/lora_a``
  and ``.../lora/lora_b``, keys ``'.../lora/'``) and qwix
  (``apply_lora_to_model``: ``<name>_lora_a`` and ``<name>_lora_b`` beside the
  kernel, keys ``'.../<name>_'``). ``A`` must have shape ``(*in, r)`` (``(in,
  r)`` for a dense layer) and ``B`` shape ``(r, out)``: ``dW = s * A @ B``
  contracts the last axis of ``A`` with the first of ``B``.

  Args:
    scale: ``s = alpha / rank``: qwix's ``LoraProvider(rank=r, alpha=alpha)``
      uses ``alpha / r``; ``nnx.LoRA`` computes ``x @ A @ B``, i.e. ``s = 1``.
      A finite number > 0, or a callable ``A's path -> number`` for adapters
      of different ranks.
    a: regex matched against the WHOLE path (``re.fullmatch``) of the ``A``
      leaves; its first group is the layer's key.
    b: the same for the ``B`` leaves.

  Returns:
    A :class:`LoRAAdapters`, resolved against the params by every method that
    takes ``lora=`` (so it works with ``nnx.Optimizer``'s Variables at
    ``init`` and arrays at ``update``); ``.pairs(params)`` lists the adapters.

  Raises:
    ValueError: at once if a pattern does not compile or has no group, or
      ``scale`` is not a finite number > 0 nor a callable; when resolved
      against the params, naming the paths, if the patterns match no leaf, an
      ``A`` has no ``B`` (or a ``B`` no ``A``), two leaves claim one key, the
      shapes do not chain (``A``: ``(*in, r)``, ``B``: ``(r, out)``), or an
      adapter is not floating-point.

  Example:
    >>> import jax.numpy as jnp, tpgm_jax
    >>> params = {"dense": {"kernel": jnp.zeros((4, 3)),
    ...                     "kernel_lora_a": jnp.ones((4, 2)),
    ...                     "kernel_lora_b": jnp.ones((2, 3))}}
    >>> tpgm_jax.lora_adapters(scale=0.5).pairs(params)
    [('dense/kernel_lora_a', 'dense/kernel_lora_b', 0.5)]
  """
  for name, pattern in (("a", a), ("b", b)):
    if not isinstance(pattern, str):
      raise ValueError(f"lora_adapters({name}=...) must be a regex string, got {pattern!r}")
    try:
      groups = re.compile(pattern).groups
    except re.error as e:
      raise ValueError(f"lora_adapters({name}={pattern!r}) does not compile: {e}") from e
    if groups < 1:
      raise ValueError(
        f"lora_adapters({name}={pattern!r}) needs a group for the layer's key, e.g. "
        r'r"(.*)lora_a"'
      )
  if not callable(scale):
    _tree.check_number("lora_adapters(scale=...)", scale, strict=True)
  return LoRAAdapters(scale=scale, a=a, b=b)


class Role(NamedTuple):
  """A leaf's part in an adapter: ``kind`` ``"a"`` or ``"b"``, the flattening index of
  its partner and the adapter's scale."""

  kind: str
  partner: int
  scale: float


def _scale(lora: LoRAAdapters, a_path: str) -> float:
  s = lora.scale(a_path) if callable(lora.scale) else lora.scale
  _tree.check_number(f"the LoRA scale of '{a_path}'", s, strict=True)
  return float(s)


def roles(params: PyTree, lora: LoRAAdapters) -> list[Role | None]:
  """One :class:`Role` (or ``None``) per leaf of ``params``, after checking the adapters.

  Static (paths and shapes only): costs nothing under ``jax.jit``.
  """
  if not isinstance(lora, LoRAAdapters):
    raise ValueError(f"lora must be built by tpgm_jax.lora_adapters(...), got {lora!r}")
  paths = _tree.leaf_paths(params)
  leaves = jax.tree.leaves(params)
  keys: dict[str, dict[str, int]] = {"a": {}, "b": {}}
  for i, path in enumerate(paths):
    for kind, pattern in (("a", lora.a), ("b", lora.b)):
      m = re.fullmatch(pattern, path)
      if m is None:
        continue
      key = m.group(1) or ""
      if key in keys[kind]:
        raise ValueError(
          f"lora: '{paths[keys[kind][key]]}' and '{path}' both match {kind}={pattern!r} "
          f"with the layer key {key!r}"
        )
      keys[kind][key] = i
  if not keys["a"] and not keys["b"]:
    raise ValueError(
      f"lora_adapters(a={lora.a!r}, b={lora.b!r}) matches no parameter path; the paths are "
      f"{_tree._listing(paths)} (patterns are matched against the WHOLE path)"
    )
  for kind, other in (("a", "b"), ("b", "a")):
    lone = [paths[i] for k, i in keys[kind].items() if k not in keys[other]]
    if lone:
      raise ValueError(
        f"lora: {kind.upper()} without its {other.upper()} at {_tree._listing(lone)} (no path "
        f"matches {other}={getattr(lora, other)!r} with the same layer key)"
      )
  out: list[Role | None] = [None] * len(paths)
  for key, ia in keys["a"].items():
    ib = keys["b"][key]
    if ia == ib:
      raise ValueError(f"lora: '{paths[ia]}' matches both a={lora.a!r} and b={lora.b!r}")
    sa, sb = jnp.shape(leaves[ia]), jnp.shape(leaves[ib])
    if len(sa) < 2 or len(sb) != 2 or sa[-1] != sb[0]:
      raise ValueError(
        f"lora: the shapes of '{paths[ia]}' {sa} and '{paths[ib]}' {sb} do not chain; expected "
        "A: (in, r) (or (*in, r)) and B: (r, out) (stacked adapters are not supported)"
      )
    for i in (ia, ib):
      if not _tree.is_float(leaves[i]):
        raise ValueError(
          f"lora: '{paths[i]}' has dtype {jnp.result_type(leaves[i])}; adapters must be "
          "floating-point"
        )
    s = _scale(lora, paths[ia])
    out[ia], out[ib] = Role("a", ib, s), Role("b", ia, s)
  return out


# ----------------------------------------------------------------------------
# The merged update's norms.


def _ct(dtype: Any) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def _flat(a: jax.Array) -> jax.Array:
  return a.reshape(-1, a.shape[-1])


def merged(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """``dW = s * A @ B`` (shape ``(*in, out)``), in float32 (float64 for float64)."""
  ct = _ct(jnp.result_type(a, b))
  hi = jax.lax.Precision.HIGHEST
  return scale * jnp.tensordot(a.astype(ct), b.astype(ct), 1, precision=hi)


def merged_sq_norm(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """``||s A B||_F^2 = s^2 <A^T A, B B^T>``: O((in + out) r^2), no ``dW`` formed."""
  ct = _ct(jnp.result_type(a, b))
  hi = jax.lax.Precision.HIGHEST
  a2, b = _flat(a).astype(ct), b.astype(ct)
  gram = jnp.sum(jnp.matmul(a2.T, a2, precision=hi) * jnp.matmul(b, b.T, precision=hi))
  return jnp.maximum(scale**2 * gram, 0.0)


def merged_norms(a: jax.Array, b: jax.Array, scale: float, norm: str) -> jax.Array:
  """The distance norms of ``dW`` to the pre-trained layer: shape ``(out,)`` for
  ``"mars"`` (L1 over every axis but the last), ``()`` for ``"l2"`` (Frobenius)."""
  if norm == "l2":
    return jnp.sqrt(merged_sq_norm(a, b, scale))
  d = merged(a, b, scale)
  return jnp.sum(jnp.abs(d), axis=tuple(range(d.ndim - 1)))


# ----------------------------------------------------------------------------
# Anchor trees and partners.


class Adapter:
  """What a per-tensor function needs of an adapter leaf: its role, its partner's
  value, the scale, and whether the adapter is constrained (a leaf, not a pytree)."""

  __slots__ = ("constrained", "kind", "partner", "scale")

  def __init__(self, kind=None, partner=None, scale=None, constrained=False):
    self.kind, self.partner, self.scale, self.constrained = kind, partner, scale, constrained

  def __bool__(self) -> bool:
    return self.kind is not None


NONE = Adapter()


def anchor_tree(
  params: PyTree, anchor: PyTree, mask: _tree.Mask, lora: LoRAAdapters | None, name: str = "anchor"
) -> PyTree:
  """:func:`tpgm_jax._tree.masked_anchor` with adapters: ``A`` leaves unconstrained
  (``MaskedNode``), a ``B`` leaf a 0-D zero of its dtype (the anchor of ``dW``) where the
  mask selects it and ``anchor`` has a leaf for it; the values of ``anchor`` at adapters
  are never read."""
  if lora is None:
    return _tree.masked_anchor(params, anchor, mask, name)
  rs = roles(params, lora)
  anchors = _tree.align(params, anchor, name)
  blank = [_tree.MaskedNode() if r is not None else x for x, r in zip(anchors, rs)]
  treedef = jax.tree.structure(params)
  out = jax.tree.leaves(
    _tree.masked_anchor(params, jax.tree.unflatten(treedef, blank), mask, name),
    is_leaf=_tree.is_masked,
  )
  flags = _tree.resolve_mask(mask, params)
  for i, (r, p) in enumerate(zip(rs, jax.tree.leaves(params))):
    if r is not None and r.kind == "b" and flags[i] and not _tree.is_masked(anchors[i]):
      out[i] = jnp.zeros((), jnp.result_type(p))
  return jax.tree.unflatten(treedef, out)


def record_anchor(
  params: PyTree, mask: _tree.Mask, lora: LoRAAdapters | None, dtype: Any = None
) -> PyTree:
  """:func:`tpgm_jax._tree.record_anchor` with adapters (see :func:`anchor_tree`)."""
  if lora is None:
    return _tree.record_anchor(params, mask, dtype)
  return _tree.copy_anchor(anchor_tree(params, params, mask, lora), dtype)


def adapters(params: PyTree, lora: LoRAAdapters | None, anchor: PyTree | None = None) -> PyTree:
  """A tree with the structure of ``params``: an :class:`Adapter` at every adapter leaf
  (its partner's value from ``params``; ``constrained`` from the anchor tree at the
  adapter's ``B``), ``NONE`` elsewhere."""
  treedef = jax.tree.structure(params)
  leaves = jax.tree.leaves(params)
  if lora is None:
    return jax.tree.unflatten(treedef, [NONE] * len(leaves))
  on = [True] * len(leaves)
  if anchor is not None:
    on = [not _tree.is_masked(a) for a in jax.tree.leaves(anchor, is_leaf=_tree.is_masked)]
  out = []
  for i, r in enumerate(roles(params, lora)):
    if r is None:
      out.append(NONE)
      continue
    b = i if r.kind == "b" else r.partner
    out.append(Adapter(r.kind, leaves[r.partner], r.scale, on[b]))
  return jax.tree.unflatten(treedef, out)


def constrained_like(anchor: PyTree, params: PyTree) -> PyTree:
  """The parameter at every constrained position of ``anchor``, ``MaskedNode`` elsewhere
  (the shapes of per-tensor state, where an adapter's anchor is a 0-D zero)."""
  return _tree.map_constrained(
    lambda _, w: w, anchor, params, otherwise=lambda w: _tree.MaskedNode()
  )
