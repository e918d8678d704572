"""Pytree plumbing shared by every method: paths, masks and input checks.

Every check here is static (structure, shape, dtype), so it runs once at trace
time and costs nothing inside ``jax.jit``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
Mask = Union[None, PyTree, Callable[[str], bool]]

MaskedNode = optax.MaskedNode


def is_masked(x: Any) -> bool:
  """True for the placeholder of an unconstrained tensor in an anchor tree."""
  return x is None or isinstance(x, MaskedNode)


def key_str(key: Any) -> str:
  """One key of a ``jax.tree_util`` key path as a string."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: tuple[Any, ...]) -> str:
  """A key path as ``'a/b/0/kernel'`` (dict keys, attribute names, indices)."""
  return "/".join(key_str(k) for k in path)


def leaf_paths(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> list[str]:
  """The '/'-joined paths of every leaf of ``tree``, in flattening order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [path_str(p) for p, _ in leaves]


def _describe_mismatch(params: PyTree, other: PyTree, name: str) -> str:
  want, got = leaf_paths(params), leaf_paths(other, is_masked)
  missing = [p for p in want if p not in set(got)]
  extra = [p for p in got if p not in set(want)]
  parts = []
  if missing:
    parts.append(f"missing from {name}: {missing[:5]}"
                 + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
  if extra:
    parts.append(f"not in params: {extra[:5]}"
                 + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
  if not parts:
    parts.append(f"params have structure {jax.tree.structure(params)}, "
                 f"{name} has {jax.tree.structure(other, is_leaf=is_masked)}")
  return "; ".join(parts)


def align(params: PyTree, other: PyTree, name: str) -> list[Any]:
  """The leaves of ``other`` in the order of ``params``' leaves.

  ``other`` must have exactly the structure of ``params``, except that a leaf
  may be replaced by ``None`` or ``optax.MaskedNode()`` (an unconstrained
  tensor). Raises a ``ValueError`` naming the differing paths otherwise.
  """
  treedef = jax.tree.structure(params)
  try:
    subtrees = treedef.flatten_up_to(other)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{name} must have the same tree structure as params: "
        f"{_describe_mismatch(params, other, name)}") from e
  for path, sub in zip(leaf_paths(params), subtrees):
    if not (is_masked(sub) or jax.tree_util.treedef_is_leaf(jax.tree.structure(sub))):
      raise ValueError(
          f"{name} must have the same tree structure as params: at '{path}' "
          f"params have one array, {name} has a subtree {jax.tree.structure(sub)}")
  return subtrees


def is_float(x: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def resolve_mask(mask: Mask, params: PyTree) -> list[bool]:
  """The mask as one Python bool per leaf of ``params`` (flattening order).

  Args:
    mask: ``None`` (constrain every floating-point tensor), a callable taking a
      parameter path such as ``'params/head/kernel'`` and returning a bool, or
      a pytree of bools with the structure of ``params`` (or a prefix of it,
      as in ``optax.masked``). Mask values must be static Python/NumPy bools.
    params: the parameter pytree.
  """
  paths = leaf_paths(params)
  leaves = jax.tree.leaves(params)
  if mask is None:
    return [is_float(x) for x in leaves]
  if callable(mask) and not isinstance(mask, (dict, list, tuple)):
    flags = [mask(p) for p in paths]
  else:
    treedef = jax.tree.structure(params)
    try:
      full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), mask, params)
      flags = treedef.flatten_up_to(full)
    except (ValueError, TypeError) as e:
      raise ValueError(
          "mask must be None, a callable on the parameter path, or a pytree of "
          f"bools with the structure of params (or a prefix): "
          f"{_describe_mismatch(params, mask, 'mask')}") from e
  out = []
  for path, flag, leaf in zip(paths, flags, leaves):
    if isinstance(flag, jax.core.Tracer):
      raise ValueError(f"mask at '{path}' is a traced value; masks must be static bools")
    flag = bool(np.asarray(flag))
    if flag and not is_float(leaf):
      raise ValueError(
          f"mask selects '{path}', which has dtype {jnp.result_type(leaf)}; only "
          "floating-point tensors can be constrained")
    out.append(flag)
  return out


def check_anchor(params: PyTree, anchor: PyTree, name: str = "anchor") -> list[Any]:
  """Aligned anchor leaves, after checking structure, shapes and dtypes."""
  anchors = align(params, anchor, name)
  for path, p, a in zip(leaf_paths(params), jax.tree.leaves(params), anchors):
    if is_masked(a):
      continue
    if jnp.shape(p) != jnp.shape(a):
      raise ValueError(
          f"{name} at '{path}' has shape {jnp.shape(a)} but params have "
          f"{jnp.shape(p)}")
    if is_float(p) and not is_float(a):
      raise ValueError(
          f"{name} at '{path}' has dtype {jnp.result_type(a)}; expected a "
          f"floating-point dtype like params ({jnp.result_type(p)})")
  return anchors


def check_radii(params: PyTree, radii: PyTree) -> list[Any]:
  """Aligned radius leaves, after checking one floating scalar per tensor."""
  if radii is None:
    raise ValueError(
        "radii are required: pass radii=tpgm_jax.init_radii(params, anchor) "
        "(one float32 scalar per tensor, same tree structure as params)")
  leaves = align(params, radii, "radii")
  for path, r in zip(leaf_paths(params), leaves):
    if is_masked(r):
      continue
    if jnp.shape(r) != () or not is_float(r):
      raise ValueError(
          f"radii at '{path}' must be a floating-point scalar; got shape "
          f"{jnp.shape(r)} and dtype {jnp.result_type(r)}")
  return leaves


def check_finite(tree: PyTree, name: str = "tree") -> None:
  """Raises a ``ValueError`` naming every leaf of ``tree`` holding NaN or inf.

  This reads values back to the host, so call it outside ``jax.jit`` (for
  example on loaded checkpoints or after a radius update in a debug run).
  """
  bad = []
  for path, leaf in zip(leaf_paths(tree), jax.tree.leaves(tree)):
    if is_float(leaf) and not bool(jnp.all(jnp.isfinite(leaf))):
      bad.append(path)
  if bad:
    raise ValueError(f"{name} has non-finite values at {bad}")
