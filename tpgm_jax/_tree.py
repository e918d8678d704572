"""Pytree plumbing shared by every method: paths, masks, anchors and input checks.

One masking path serves the whole library. A mask (``None``, a bool pytree or
prefix, or a callable ``params -> bool pytree``, exactly as ``optax.masked``
takes it) is turned by :func:`masked_anchor` into an *anchor tree*: the
anchor's array where a tensor is constrained, ``optax.MaskedNode()`` where it
is not. Every per-tensor computation is then one :func:`map_constrained` over
that tree, and the transformations keep it in their state, so their
``update`` never looks at the mask again.

Every check here is static (structure, shape, dtype), so it runs once at trace
time and costs nothing inside ``jax.jit``.
"""

from __future__ import annotations

import math
import numbers
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
Mask = Union[None, PyTree, Callable[[PyTree], PyTree]]
PathRule = Union[None, str, Sequence[str], Callable[[str], bool]]

MaskedNode = optax.MaskedNode


def is_masked(x: Any) -> bool:
  """True for the placeholder of an unconstrained tensor in an anchor tree."""
  return x is None or isinstance(x, MaskedNode)


def path_str(path: tuple[Any, ...]) -> str:
  """A key path as ``'params/head/kernel'``, spelled as ``jax.tree_util.keystr``
  spells it with ``simple=True, separator="/"``."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _is_nnx_variable(x: Any) -> bool:
  """True for a Flax NNX ``Variable`` (``nnx.Param`` etc.), without importing Flax.

  If ``flax.nnx`` has not been imported, no Variable can exist.
  """
  nnx = sys.modules.get("flax.nnx")
  variable = getattr(nnx, "Variable", None) if nnx is not None else None
  return variable is not None and isinstance(x, variable)


def _key_paths(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple]:
  """The key path of every leaf, with the ``value`` key of an NNX Variable dropped.

  ``nnx.Optimizer`` calls ``tx.init`` on a state of Variables (a leaf's path
  ends in ``GetAttrKey('value')``) and ``tx.update`` on plain arrays (the
  same path without it); dropping that key gives both the same path.
  """

  def stop(x):
    return _is_nnx_variable(x) or (is_leaf is not None and is_leaf(x))

  out = []
  for path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=stop)[0]:
    if not _is_nnx_variable(node) or (is_leaf is not None and is_leaf(node)):
      out.append(path)
      continue
    for sub, _ in jax.tree_util.tree_flatten_with_path(node, is_leaf=is_leaf)[0]:
      if sub and isinstance(sub[0], jax.tree_util.GetAttrKey) and sub[0].name == "value":
        sub = sub[1:]
      out.append(tuple(path) + tuple(sub))
  return out


def leaf_paths(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> list[str]:
  """The '/'-joined paths of every leaf of ``tree``, in flattening order.

  A Flax NNX ``Variable`` (``nnx.Param``, ...) contributes its own path: the
  trailing ``value`` key of the Variable is dropped, so a state of Variables
  (what ``nnx.Optimizer`` passes to ``tx.init``) and the same state of plain
  arrays (what it passes to ``tx.update``) have the same paths, e.g.
  ``'head/kernel'`` for both. The library does not import Flax.

  Example:
    >>> import tpgm_jax
    >>> tpgm_jax.leaf_paths({"params": {"head": {"bias": 0, "kernel": 0}}, "x": [1, 2]})
    ['params/head/bias', 'params/head/kernel', 'x/0', 'x/1']
  """
  return [path_str(p) for p in _key_paths(tree, is_leaf)]


def _listing(items: Sequence[str], limit: int = 5) -> str:
  shown = ", ".join(repr(x) for x in items[:limit])
  return f"[{shown}]" + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _describe_mismatch(params: PyTree, other: PyTree, name: str, prefix: bool = False) -> str:
  """The paths that differ; with ``prefix``, ``other`` may be a prefix of ``params``."""
  want, got = leaf_paths(params), leaf_paths(other, is_masked)

  def covers(q, p):
    return p == q or (prefix and (q == "" or p.startswith(q + "/")))

  missing = [p for p in want if not any(covers(q, p) for q in got)]
  extra = [q for q in got if not any(covers(q, p) for p in want)]
  parts = []
  if missing:
    parts.append(f"missing from {name}: {_listing(missing)}")
  if extra:
    parts.append(f"not in params: {_listing(extra)}")
  if not parts:
    parts.append(
      f"params have structure {jax.tree.structure(params)}, "
      f"{name} has {jax.tree.structure(other, is_leaf=is_masked)}"
    )
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
      f"{_describe_mismatch(params, other, name)}"
    ) from e
  for path, sub in zip(leaf_paths(params), subtrees):
    if not (is_masked(sub) or jax.tree_util.treedef_is_leaf(jax.tree.structure(sub))):
      raise ValueError(
        f"{name} must have the same tree structure as params: at '{path}' "
        f"params have one array, {name} has a subtree {jax.tree.structure(sub)}"
      )
  return subtrees


def check_like(params: PyTree, tree: PyTree, name: str) -> list[Any]:
  """:func:`align`, then checks that every array of ``tree`` has the shape of the
  parameter at its path (``ValueError`` naming the path). Static: costs nothing
  under ``jax.jit``."""
  leaves = align(params, tree, name)
  for path, p, x in zip(leaf_paths(params), jax.tree.leaves(params), leaves):
    if not is_masked(x) and jnp.shape(x) != jnp.shape(p):
      raise ValueError(
        f"{name} at '{path}' has shape {jnp.shape(x)} but params have {jnp.shape(p)}"
      )
  return leaves


def is_float(x: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


# ----------------------------------------------------------------------------
# Masks.


class MaskError(ValueError):
  """A bad mask or path rule (raised as is through a callable mask)."""


def _rule(rule: PathRule, arg: str) -> tuple[Callable[[str], bool], list[str] | None]:
  """A path predicate from a regex, a sequence of regexes or a predicate, and the
  regexes (``None`` for a predicate)."""
  if callable(rule):
    return rule, None
  kind = (
    "a regex, a sequence of regexes or a predicate on the '/'-joined parameter path "
    '(e.g. r"params/head/.*")'
  )
  if isinstance(rule, str):
    patterns = [rule]
  elif isinstance(rule, Sequence) and not isinstance(rule, (bytes, bytearray)):
    patterns = list(rule)
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad or not patterns:
      detail = (
        f"element {bad[0]!r} ({type(bad[0]).__name__}) is not a string"
        if bad
        else "the sequence is empty"
      )
      raise MaskError(f"{arg} must be {kind}; got {rule!r}: {detail}")
  else:
    raise MaskError(f"{arg} must be {kind}; got {rule!r} ({type(rule).__name__})")
  try:
    compiled = [re.compile(p) for p in patterns]
  except re.error as e:
    raise MaskError(f"{arg} must be {kind}; got {rule!r} ({e})") from e
  return (lambda path: any(c.fullmatch(path) for c in compiled)), patterns


def _suggestion(patterns: Sequence[str], paths: Sequence[str]) -> str:
  """A hint for patterns that match part of a path but never a whole path."""
  for pattern in patterns:
    for path in paths:
      m = re.search(pattern, path)
      if m is None:
        continue
      end = path.find("/", m.end())
      prefix = path[:end] if end >= 0 else path
      forms = [f'r".*{pattern}.*"'] + ([f'"{re.escape(prefix)}/.*"'] if end >= 0 else [])
      return (
        f" '{pattern}' matches part of '{path}' but patterns are matched against the "
        f"WHOLE path (re.fullmatch); did you mean {' or '.join(forms)}?"
      )
  return ""


def _check_matches(
  arg: str, rule: Callable[[str], bool], patterns: list[str] | None, paths: Sequence[str]
) -> None:
  """A regex rule that matches no parameter path is an error (a typo or a partial name)."""
  if patterns is None or not paths or any(rule(p) for p in paths):
    return
  raise MaskError(
    f"path_mask({arg}={patterns[0] if len(patterns) == 1 else patterns!r}) matches no "
    f"parameter path; the paths are {_listing(list(paths))}." + _suggestion(patterns, paths)
  )


def path_mask(include: PathRule = None, *, exclude: PathRule = None) -> Callable[[PyTree], PyTree]:
  """A mask selecting floating-point tensors by their parameter path.

  Paths are spelled as ``jax.tree_util.keystr(path, simple=True,
  separator="/")`` spells them (``'params/head/kernel'``, ``'layers/0/bias'``;
  see :func:`leaf_paths`; a Flax NNX Variable's trailing ``value`` key is
  dropped, so under ``nnx.Optimizer`` the same mask means the same tensors at
  ``init`` and ``update``). A tensor is selected when it is floating-point, its
  path matches ``include`` (every path if ``None``) and does not match
  ``exclude``. A rule is a regex (matched against the WHOLE path with
  ``re.fullmatch``), a sequence of regexes (any of them), or a predicate
  ``path -> bool``.

  Args:
    include: the paths to select (default: all).
    exclude: the paths to leave out, e.g. the new head.

  Returns:
    A callable ``params -> bool pytree``, usable as the ``mask`` of every
    function of this library and of ``optax.masked``.

  Raises:
    ValueError: at once, if a rule is not a regex, a sequence of regex
      strings or a callable (or a regex does not compile); when the mask is
      applied to the params (a transformation's ``init``), if a regex rule
      matches no parameter path at all: the message lists the first paths and,
      for a partial name such as ``exclude="head"``, suggests ``r".*head.*"``
      or ``"params/head/.*"``. Predicates are not checked.

  Example:
    >>> import jax.numpy as jnp, tpgm_jax
    >>> params = {"params": {"backbone": {"kernel": jnp.ones(2)},
    ...                      "head": {"kernel": jnp.ones(2)}}}
    >>> not_head = tpgm_jax.path_mask(exclude=r"params/head/.*")
    >>> not_head(params)
    {'params': {'backbone': {'kernel': True}, 'head': {'kernel': False}}}
  """
  keep, keep_patterns = (None, None) if include is None else _rule(include, "include")
  drop, drop_patterns = (None, None) if exclude is None else _rule(exclude, "exclude")

  def mask(params):
    all_paths = leaf_paths(params)
    if keep is not None:
      _check_matches("include", keep, keep_patterns, all_paths)
    if drop is not None:
      _check_matches("exclude", drop, drop_patterns, all_paths)
    paths = iter(all_paths)

    def flag(leaf):
      path = next(paths)
      return bool(
        is_float(leaf) and (keep is None or keep(path)) and not (drop is not None and drop(path))
      )

    return jax.tree.map(flag, params)

  return mask


def _mask_error(detail: str) -> ValueError:
  return ValueError(
    "mask must be None (every floating-point tensor), a pytree of bools with the "
    "structure of params (or a prefix of it), or a callable params -> such a pytree, "
    "as optax.masked takes it; to select tensors by their path use "
    f"tpgm_jax.path_mask(include=..., exclude=...). {detail}"
  )


def resolve_mask(mask: Mask, params: PyTree) -> list[bool]:
  """The mask as one Python bool per leaf of ``params`` (flattening order).

  Args:
    mask: ``None`` (every floating-point tensor), a pytree of bools with the
      structure of ``params`` or a prefix of it, or a callable ``params ->
      such a pytree`` (exactly what ``optax.masked`` accepts). Mask values must
      be static Python/NumPy bools, not traced arrays.
    params: the parameter pytree.

  Raises:
    ValueError: the mask is of the wrong kind or structure, holds a non-bool
      or traced value, or selects a non-floating-point tensor; the message
      names the path.
  """
  paths = leaf_paths(params)
  leaves = jax.tree.leaves(params)
  if mask is None:
    return [is_float(x) for x in leaves]
  if callable(mask):
    try:
      mask = mask(params)
    except MaskError:
      raise
    except Exception as e:  # noqa: BLE001 (any failure of user code, shown with its cause)
      raise _mask_error(
        f"The mask callable failed on the params (paths "
        f"{_listing(paths)}): it raised {type(e).__name__}: {e} "
        "(a callable mask receives the params pytree, not a path string)."
      ) from e
  treedef = jax.tree.structure(params)
  try:
    full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), mask, params)
    flags = treedef.flatten_up_to(full)
  except (ValueError, TypeError) as e:
    raise _mask_error(
      f"The mask does not fit params: {_describe_mismatch(params, mask, 'mask', prefix=True)}"
    ) from e
  out = []
  for path, flag, leaf in zip(paths, flags, leaves):
    if isinstance(flag, jax.core.Tracer):
      raise _mask_error(f"The mask at '{path}' is a traced value; masks must be static bools.")
    if not isinstance(flag, (bool, np.bool_)) and not (
      hasattr(flag, "dtype") and jnp.shape(flag) == () and flag.dtype == bool
    ):
      raise _mask_error(f"The mask at '{path}' is {flag!r}; expected a bool.")
    flag = bool(flag)
    if flag and not is_float(leaf):
      raise ValueError(
        f"mask selects '{path}', which has dtype {jnp.result_type(leaf)}; only "
        "floating-point tensors can be constrained"
      )
    out.append(flag)
  return out


# ----------------------------------------------------------------------------
# Anchor trees: the one masking path.


def check_anchor(params: PyTree, anchor: PyTree, name: str = "anchor") -> list[Any]:
  """Aligned anchor leaves, after checking structure, shapes and dtypes."""
  anchors = align(params, anchor, name)
  for path, p, a in zip(leaf_paths(params), jax.tree.leaves(params), anchors):
    if is_masked(a):
      continue
    if jnp.shape(p) != jnp.shape(a):
      raise ValueError(
        f"{name} at '{path}' has shape {jnp.shape(a)} but params have {jnp.shape(p)}"
      )
    if is_float(p) and not is_float(a):
      raise ValueError(
        f"{name} at '{path}' has dtype {jnp.result_type(a)}; expected a "
        f"floating-point dtype like params ({jnp.result_type(p)})"
      )
  return anchors


def masked_anchor(
  params: PyTree, anchor: PyTree, mask: Mask = None, name: str = "anchor"
) -> PyTree:
  """The anchor tree of ``params``: ``anchor``'s leaf where a tensor is
  constrained, ``optax.MaskedNode()`` where it is not.

  A tensor is constrained when ``mask`` selects it, ``anchor`` has an array
  for it (not ``None`` / ``MaskedNode``) and it has at least one element.
  Structure, shapes, dtypes and the mask are checked (``ValueError`` naming
  the path). The result has the structure of ``params``.
  """
  anchors = check_anchor(params, anchor, name)
  flags = resolve_mask(mask, params)
  leaves = [
    a if f and not is_masked(a) and jnp.size(p) else MaskedNode()
    for p, a, f in zip(jax.tree.leaves(params), anchors, flags)
  ]
  return jax.tree.unflatten(jax.tree.structure(params), leaves)


def check_anchor_dtype(anchor_dtype: Any) -> Any:
  """``anchor_dtype`` as a NumPy dtype (``None`` stays ``None``); ``ValueError`` unless it
  is ``None`` or a floating-point dtype."""
  if anchor_dtype is None:
    return None
  try:
    dtype = jnp.dtype(anchor_dtype)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      "anchor_dtype must be None (the params' dtype) or a floating-point dtype such as "
      f"jnp.bfloat16, got {anchor_dtype!r}"
    )
  return dtype


def copy_anchor(anchor: PyTree, dtype: Any = None) -> PyTree:
  """A copy of every array of an anchor tree (cast to ``dtype`` unless ``None``), so
  the anchor has buffers of its own and a train step may donate both the params and
  the optimizer state."""
  return jax.tree.map(
    lambda a: a if is_masked(a) else (jnp.copy(a) if dtype is None else jnp.asarray(a, dtype)),
    anchor,
    is_leaf=is_masked,
  )


def record_anchor(params: PyTree, mask: Mask = None, dtype: Any = None) -> PyTree:
  """A copy of the constrained tensors of ``params`` (``MaskedNode`` elsewhere):
  the anchor a transformation's ``init`` keeps in its state, in ``dtype`` (``None``:
  each parameter's own; see :func:`copy_anchor`)."""
  return copy_anchor(masked_anchor(params, params, mask), dtype)


def map_constrained(
  fn: Callable[..., Any],
  anchor: PyTree,
  *trees: PyTree,
  otherwise: Callable[..., Any] | None = None,
) -> PyTree:
  """``fn(w0, *leaves)`` for every constrained tensor, ``otherwise(*leaves)``
  (default: the first of ``leaves``) for the others.

  ``anchor`` is an anchor tree (:func:`masked_anchor`); every tree of
  ``trees`` must have its structure (check with :func:`align` first). The
  result has the anchor's structure; ``fn`` may return a tuple, split with
  :func:`unzip`.
  """
  otherwise = otherwise if otherwise is not None else (lambda x, *_: x)
  return jax.tree.map(
    lambda a, *xs: otherwise(*xs) if is_masked(a) else fn(a, *xs), anchor, *trees, is_leaf=is_masked
  )


def unzip(anchor: PyTree, tree: PyTree, n: int) -> tuple[PyTree, ...]:
  """Splits a tree of ``n``-tuples (one per tensor, from :func:`map_constrained`)
  into ``n`` trees with the anchor's structure."""
  return tuple(
    jax.tree.map(lambda _, row: row[i], anchor, tree, is_leaf=is_masked) for i in range(n)
  )


def check_radii(params: PyTree, radii: PyTree, anchor: PyTree) -> None:
  """Checks one floating-point scalar radius per constrained tensor.

  ``anchor`` is an anchor tree; radii of unconstrained tensors are not used
  and may be anything (``None``, ``MaskedNode``, a scalar).
  """
  if radii is None:
    raise ValueError(
      "radii are required: pass radii=tpgm_jax.init_radii(params, anchor) "
      "(one float32 scalar per tensor, same tree structure as params)"
    )
  leaves = align(params, radii, "radii")
  anchors = jax.tree.structure(params).flatten_up_to(anchor)
  for path, r, a in zip(leaf_paths(params), leaves, anchors):
    if is_masked(a):
      continue
    if is_masked(r) or jnp.shape(r) != () or not is_float(r):
      raise ValueError(
        f"radii at '{path}' must be a floating-point scalar; got "
        + ("nothing" if is_masked(r) else f"shape {jnp.shape(r)} and dtype {jnp.result_type(r)}")
      )


def check_radius_values(radii: PyTree, name: str = "radii", negative: bool = True) -> None:
  """Checks the values of concrete radii: finite, and ``>= 0`` with ``negative``.

  Traced values (inside ``jax.jit``) cannot be checked and are skipped (no
  host sync); concrete values are read back in one transfer. Use
  :func:`check_finite` for an explicit check of any tree.
  """
  items = [
    (p, x)
    for p, x in zip(leaf_paths(radii, is_masked), jax.tree.leaves(radii, is_leaf=is_masked))
    if not is_masked(x)
    and not isinstance(x, jax.core.Tracer)
    and (isinstance(x, numbers.Real) or hasattr(x, "dtype"))
  ]
  if not items:
    return
  values = jax.device_get([x for _, x in items])
  bad = [
    (p, v)
    for (p, _), v in zip(items, values)
    if np.size(v)
    and (
      not np.all(np.isfinite(np.asarray(v, np.float64)))
      or (negative and np.any(np.asarray(v, np.float64) < 0))
    )
  ]
  if bad:
    shown = ", ".join(f"'{p}': {np.asarray(v).tolist()!r}" for p, v in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    want = "finite numbers >= 0" if negative else "finite numbers"
    raise ValueError(f"{name} must hold {want}; got {shown}{more}")


def require_params(params: PyTree, name: str, call: str) -> None:
  """The error of a transformation whose ``init`` or ``update`` got no params."""
  if params is None:
    raise ValueError(f"{name} needs the params: call {call}")


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


# ----------------------------------------------------------------------------
# Hyper-parameters.


def check_number(
  name: str,
  value: Any,
  *,
  minimum: float | None = 0.0,
  strict: bool = False,
  maximum: float | None = None,
) -> None:
  """Checks a scalar hyper-parameter: finite, ``>= minimum`` (``> minimum``
  with ``strict``) and ``<= maximum``. Traced values are not checked (no host
  sync); neither are schedules (callables)."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return
  if isinstance(value, bool) or not (
    isinstance(value, numbers.Real)
    or (
      hasattr(value, "shape")
      and jnp.shape(value) == ()
      and jnp.issubdtype(jnp.result_type(value), jnp.number)
    )
  ):
    raise ValueError(f"{name} must be a real number, got {value!r}")
  x = float(value)
  bound = "" if minimum is None else (f" > {minimum:g}" if strict else f" >= {minimum:g}")
  if maximum is not None:
    bound += f"{' and' if bound else ''} <= {maximum:g}"
  if (
    not math.isfinite(x)
    or (minimum is not None and (x <= minimum if strict else x < minimum))
    or (maximum is not None and x > maximum)
  ):
    raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], Any]]


def is_schedule(value: Any) -> bool:
  """True for a schedule ``count -> value`` (any callable), as ``optax.ScalarOrSchedule``."""
  return callable(value)


def schedule_value(name: str, value: ScalarOrSchedule, count: jax.Array) -> Any:
  """A hyper-parameter at step ``count``: ``value(count)`` for a schedule, ``value`` itself
  (unchanged, so numbers keep their exact arithmetic) otherwise.

  ``count`` is an int32 scalar kept in a transformation's state (the number of
  updates before this one), so under ``jax.jit`` the schedule is traced once and
  evaluated on device: no recompilation per step. Raises ``ValueError`` naming
  ``name`` if the schedule does not return a scalar (a static check).
  """
  if not is_schedule(value):
    return value
  out = value(count)
  if jnp.ndim(out) != 0 or not jnp.issubdtype(jnp.result_type(out), jnp.number):
    raise ValueError(
      f"the schedule given as {name} must return a real scalar for a step "
      f"count, got {type(out).__name__} of shape {jnp.shape(out)}"
    )
  return jnp.asarray(out)


def in_dtype(value: Any, dtype: Any, scheduled: bool) -> Any:
  """A scheduled value cast to the compute dtype; a number passes through untouched."""
  return jnp.asarray(value).astype(dtype) if scheduled else value


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_int(name: str, value: Any, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
