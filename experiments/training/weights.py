"""Saving and loading pre-trained weights with orbax (big_vision's ``model_init`` + ``dont_load``).

A checkpoint is one orbax PyTree checkpoint directory holding a params pytree,
usually the Flax variables ``{'params': ...}``. Parameters are named by their
'/'-joined key paths (:func:`param_paths`), e.g. ``params/block1/unit1/conv/kernel``.

Fine-tuning starts from the freshly initialised parameters of the new model and
overwrites every leaf with its pre-trained value, except the leaves whose path
matches a ``dont_load`` pattern (by default the new head):

  >>> init = model.init(rng, images)                      # doctest: +SKIP
  >>> params = load_pretrained("/ckpts/pretrained", init)  # doctest: +SKIP

Loaded arrays get the sharding of the corresponding ``init`` leaves, so a
checkpoint written from any mesh restores onto any other. Writing is orbax's
``StandardSave``; reading is orbax's partial restore (only the leaves the
model loads are read) with restore arguments built from the init leaves
(``checkpoint_utils.construct_restore_args``).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

import tpgm_jax
from experiments.types import PyTree

__all__ = [
  "CheckpointError",
  "CheckpointExistsError",
  "load_pretrained",
  "param_paths",
  "save_params",
]


DEFAULT_DONT_LOAD = ("^params/head/.*",)
_TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax writes into <path><marker>... then renames
_MAX_LISTED = 20


class CheckpointError(ValueError):
  """A checkpoint path that is missing, unreadable, incomplete or corrupt."""


class CheckpointExistsError(CheckpointError, FileExistsError):
  """:func:`save_params` refuses to overwrite an existing path."""


def flatten(tree: PyTree) -> tuple[list[str], list[Any], Any]:
  """(paths, leaves, treedef) of ``tree``; raises ``ValueError`` if two leaves share a path."""
  leaves, treedef = jax.tree.flatten(tree)
  paths = tpgm_jax.leaf_paths(tree)
  if len(set(paths)) != len(paths):
    dups = sorted(p for p, n in collections.Counter(paths).items() if n > 1)
    raise ValueError(f"several leaves share the path(s) {dups}")
  return paths, leaves, treedef


def param_paths(tree: PyTree) -> list[str]:
  """The '/'-joined key paths of the leaves of ``tree``, in flattening order.

  Dict keys, attribute names and sequence indices are joined with '/', e.g.
  ``{'params': {'head': {'kernel': w}}, 'x': [a, b]}`` gives
  ``['params/head/kernel', 'x/0', 'x/1']``.
  """
  return flatten(tree)[0]


def listing(items: Sequence[str], separator: str = ", ") -> str:
  """The first 20 of ``items`` joined by ``separator``, and how many more there are (for
  error messages naming parameter paths)."""
  shown = separator.join(items[:_MAX_LISTED])
  more = len(items) - _MAX_LISTED
  return shown + (f"{separator}... and {more} more" if more > 0 else "")


def _numeric(dtype: np.dtype) -> bool:
  """Whether orbax can save arrays of ``dtype`` (bool, integers, floats incl. bfloat16, complex)."""
  return dtype == np.bool_ or jax.dtypes.issubdtype(dtype, np.number)


def _absolute(path: str | os.PathLike[str]) -> epath.Path:
  return epath.Path(os.path.abspath(os.fspath(path)))


def save_params(path: str | os.PathLike[str], params: PyTree) -> None:
  """Writes the params pytree ``params`` as an orbax checkpoint directory ``path``.

  Orbax writes into a temporary sibling directory and renames it to ``path``
  only when everything is written, so ``path`` never holds a partial
  checkpoint. Call it from every process (multi-host): orbax coordinates them.

  Args:
    path: the checkpoint directory to create; it must not exist.
    params: a pytree of ``jax.Array`` (any sharding) or NumPy arrays.

  Raises:
    CheckpointExistsError: ``path`` exists; it is left untouched.
    TypeError: a leaf of ``params`` is not an array or a number (nothing is written).
  """
  directory = _absolute(path)
  if directory.exists():
    raise CheckpointExistsError(
      f"refusing to overwrite {directory}: it already exists (choose a new path or delete it first)"
    )
  paths, leaves, _ = flatten(params)
  bad = [
    f"{p} ({type(x).__name__})"
    for p, x in zip(paths, leaves, strict=True)
    if not isinstance(x, jax.Array | np.ndarray | np.generic | int | float)
    or not _numeric(np.dtype(getattr(x, "dtype", type(x))))
  ]
  if bad:
    # Checked before orbax starts: a save that fails part-way leaves orbax's background threads
    # still creating its temporary directory after the error.
    raise TypeError(
      f"cannot save {directory}: leaves must be numeric arrays or numbers; got {listing(bad)}"
    )
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, params)


def _read_metadata(directory: epath.Path) -> Any:
  """The checkpoint's metadata tree (orbax), or a CheckpointError saying what is wrong."""
  if not directory.exists():
    raise CheckpointError(f"no checkpoint at {directory}: the path does not exist")
  if not directory.is_dir():
    raise CheckpointError(f"no checkpoint at {directory}: not a directory")
  if _TMP_MARKER in directory.name:
    raise CheckpointError(f"{directory} is an unfinished orbax write, not a checkpoint")
  if not (directory / "_METADATA").exists():
    inner = sorted(d.name for d in directory.iterdir() if (d / "_METADATA").exists())
    hint = f"; it holds the checkpoint item(s) {inner}: pass one of them" if inner else ""
    raise CheckpointError(
      f"{directory} is not an orbax PyTree checkpoint (no _METADATA file){hint}"
    )
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.metadata(directory).item_metadata.tree
  except Exception as e:  # orbax/tensorstore raise many types for corrupt files
    raise CheckpointError(
      f"cannot read the checkpoint metadata in {directory} (corrupt or partial "
      f"checkpoint?): {type(e).__name__}: {e}"
    ) from e


def _check_compatible(
  init: dict[str, Any],
  ckpt: dict[str, Any],
  loaded: list[str],
  skipped_ckpt: set[str],
  directory: epath.Path,
) -> None:
  missing = [p for p in loaded if p not in ckpt]
  unexpected = [p for p in ckpt if p not in init and p not in skipped_ckpt]
  mismatched = [
    f"{p}: checkpoint {tuple(ckpt[p].shape)} vs model {tuple(np.shape(init[p]))}"
    for p in loaded
    if p in ckpt and tuple(ckpt[p].shape) != tuple(np.shape(init[p]))
  ]
  problems = []
  if mismatched:
    problems.append(f"shape mismatch for {len(mismatched)} parameter(s): " + listing(mismatched))
  if missing:
    problems.append(
      f"{len(missing)} parameter(s) of the model missing from the checkpoint: " + listing(missing)
    )
  if unexpected:
    problems.append(
      f"{len(unexpected)} checkpoint parameter(s) not used by the model: " + listing(unexpected)
    )
  if problems:
    raise ValueError(
      f"checkpoint {directory} does not fit the model (add patterns to dont_load to keep "
      "parameters at their init values):\n  " + "\n  ".join(problems)
    )


def load_pretrained(
  path: str | os.PathLike[str],
  init_params: PyTree,
  dont_load: str | Sequence[str] = DEFAULT_DONT_LOAD,
) -> PyTree:
  """The pre-trained parameters at ``path`` merged into ``init_params``.

  A leaf whose path (:func:`param_paths`) matches one of the ``dont_load``
  regexes (``re.fullmatch``) keeps its value from ``init_params``; every other
  leaf is read from the checkpoint, must have the init leaf's shape, and is cast
  to its dtype. Checkpoint leaves that the model does not use are an error
  unless they match ``dont_load``. Only the needed leaves are read.

  Placement follows the init leaf: a ``jax.Array`` (or a ``jax.ShapeDtypeStruct``
  with a sharding) gets a ``jax.Array`` with the same sharding, whatever mesh the
  checkpoint was written from; anything else (NumPy) gets a NumPy array.

  Args:
    path: an orbax checkpoint directory written by :func:`save_params`.
    init_params: the freshly initialised parameters of the fine-tuning model.
    dont_load: regexes (or one regex) of the paths not to load; the default
      keeps the head.

  Returns:
    A pytree with the structure of ``init_params``.

  Raises:
    CheckpointError: ``path`` is missing, not an orbax checkpoint, or corrupt.
    ValueError: a shape mismatch, model parameters missing from the
      checkpoint, or unused checkpoint parameters (all named by path).
  """
  directory = _absolute(path)
  patterns = [re.compile(p) for p in ([dont_load] if isinstance(dont_load, str) else dont_load)]

  def skip(p: str) -> bool:
    return any(r.fullmatch(p) for r in patterns)

  init_paths, init_leaves, init_def = flatten(init_params)
  saved = _read_metadata(directory)
  ckpt_paths, ckpt_meta, _ = flatten(saved)
  for r in patterns:
    if not any(r.fullmatch(p) for p in (*init_paths, *ckpt_paths)):
      warnings.warn(f"dont_load pattern {r.pattern!r} matches no parameter", stacklevel=2)

  init = dict(zip(init_paths, init_leaves))
  ckpt = dict(zip(ckpt_paths, ckpt_meta))
  loaded = [p for p in init_paths if not skip(p)]
  _check_compatible(init, ckpt, loaded, {p for p in ckpt_paths if skip(p)}, directory)

  # orbax's partial restore reads the loaded leaves only, cast to the init dtype and
  # placed like the init leaf.
  wanted = set(loaded)
  keys = {"/".join(map(str, k)): k for k in ocp.tree.to_flat_dict(saved)}
  item = ocp.tree.from_flat_dict({keys[p]: init[p] for p in loaded})
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      restored = checkpointer.restore(
        directory,
        args=ocp.args.PyTreeRestore(
          item=item,
          restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True,
        ),
      )
  except Exception as e:  # orbax/tensorstore raise many types for corrupt files
    raise CheckpointError(
      f"cannot read the arrays of the checkpoint {directory} (corrupt or partial "
      f"checkpoint?): {type(e).__name__}: {e}"
    ) from e

  values = {"/".join(map(str, k)): v for k, v in ocp.tree.to_flat_dict(restored).items()}
  logging.info(
    "loaded %d of %d parameter tensors from %s; kept %d at init",
    len(loaded),
    len(init_paths),
    directory,
    len(init_paths) - len(loaded),
  )
  return jax.tree_util.tree_unflatten(
    init_def, [values[p] if p in wanted else init[p] for p in init_paths]
  )
