"""Train-state checkpoints with exact resume, and a SIGTERM guard for preemption.

:class:`Checkpointer` keeps the last few checkpoints of the whole train state
(params, optimizer states, radii, step, RNG key data, data position) in one
directory, one orbax step directory per saved step::

  workdir/ckpt/
    200/state/...          # the state pytree (orbax PyTree checkpoint)
    200/metadata/metadata  # optional JSON, e.g. the config hash
    300/...

The train loop uses it with :class:`PreemptionGuard`:

  >>> ckpt = Checkpointer(workdir / "ckpt", save_interval_steps=100)  # doctest: +SKIP
  >>> if ckpt.latest_step() is not None:                              # doctest: +SKIP
  ...   state = ckpt.restore(abstract_state)     # onto abstract_state's shardings
  >>> with PreemptionGuard() as guard:                                # doctest: +SKIP
  ...   for step in range(int(state["step"]), num_steps):
  ...     state = train_step(state, batch)
  ...     stop = guard.should_stop(step + 1)     # same answer on every process
  ...     ckpt.save(step + 1, state, force=stop) # every save_interval_steps, or now
  ...     if stop:
  ...       break                                # then exit with status 0
  >>> ckpt.close()                               # waits for the last save

Policies (all processes call every method; orbax coordinates the writes and
only process 0 writes the JSON metadata and logs):

* Complete checkpoints only. A step directory is complete when orbax finalized
  it (killed saves leave ``<step>.orbax-checkpoint-tmp-*`` directories, which
  are never complete and are removed when a writing :class:`Checkpointer`
  opens the directory) and its commit marker and metadata files are present and parse.
  :meth:`Checkpointer.latest_step` and orbax's ``max_to_keep`` clean-up see
  complete steps only: an incomplete step is logged, never counted, never
  deleted, and never makes a good checkpoint go away.
* A corrupt checkpoint is an error, not a fallback. ``restore(step=None)``
  restores the newest complete step; if its arrays cannot be read (say a
  truncated file) it raises :class:`CheckpointError` naming the step directory
  and the previous complete step, instead of silently resuming from an older
  step: move the bad directory away to resume from the previous one.
* Nothing is overwritten. Saving a step that is already saved (or being saved)
  is skipped and returns ``False``; saving a step whose directory exists but is
  incomplete raises :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from experiments.weights import CheckpointError, _absolute, _flatten, _listing, _read_metadata
from experiments.weights import _restore_arg

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "PreemptionGuard",
]

PyTree = Any

_STATE = "state"
_METADATA = "metadata"
# Files orbax writes into a step directory; the commit marker and the step
# metadata are written last, just before the directory is renamed into place.
_COMMIT_MARKER = "commit_success.txt"
_STEP_METADATA = "_CHECKPOINT_METADATA"


def _is_primary() -> bool:
  return jax.process_index() == 0


def _read_json(path: epath.Path) -> Any:
  return json.loads(path.read_text())


def _step_problem(path: epath.Path) -> str | None:
  """Why the step directory ``path`` is not a complete checkpoint, or None."""
  if not path.is_dir():
    return "the directory does not exist"
  for name in (_COMMIT_MARKER, _STEP_METADATA, f"{_STATE}/_METADATA"):
    if not (path / name).exists():
      return f"{name} is missing (partial or unfinished save)"
  for name in (_STEP_METADATA, f"{_STATE}/_METADATA"):
    try:
      _read_json(path / name)
    except (OSError, ValueError) as e:
      return f"{name} is unreadable ({type(e).__name__}: {e})"
  if (path / _METADATA).is_dir() and not (path / _METADATA / _METADATA).exists():
    return f"{_METADATA}/{_METADATA} is missing (partial save)"
  return None


class _CompleteSteps(ocp.step.NameFormat):
  """Orbax's standard step names (``<step>``), listing complete steps only.

  Orbax lists every finalized step directory; this hides the incomplete ones
  (see :func:`_step_problem`) so that they are neither resumed from, nor
  counted by ``max_to_keep``, nor deleted.
  """

  def __init__(self):
    self._standard = ocp.step.standard_name_format()

  def build_name(self, step: int) -> str:
    return self._standard.build_name(step)

  def find_all(self, base_path: epath.PathLike) -> Iterator[ocp.step.Metadata]:
    complete = []
    for metadata in self._standard.find_all(base_path):
      problem = _step_problem(metadata.path)
      if problem is None:
        complete.append(metadata)
      elif _is_primary():
        logging.warning("ignoring the incomplete checkpoint %s (step %d): %s",
                        metadata.path, metadata.step, problem)
    return iter(complete)

  def find_step(self, base_path: epath.PathLike, step: int) -> ocp.step.Metadata:
    return self._standard.find_step(base_path, step)


def _check_savable(state: PyTree) -> None:
  for path, leaf in zip(*_flatten(state)[:2]):
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      raise TypeError(
          f"state leaf '{path}' is a typed PRNG key; save its key data instead "
          "(jax.random.key_data(key)) and rebuild it with jax.random.wrap_key_data")


def _check_fits(target: PyTree, saved: tuple[list[str], list[Any], Any],
                directory: epath.Path) -> None:
  """Raises CheckpointError unless the ``saved`` metadata has target's paths, shapes, dtypes."""
  want_paths, want_leaves, _ = _flatten(target)
  have_paths, have_meta, _ = saved
  want = dict(zip(want_paths, want_leaves))
  have = dict(zip(have_paths, have_meta))
  problems = []
  missing = [p for p in want_paths if p not in have]
  unexpected = [p for p in have_paths if p not in want]
  if missing:
    problems.append(f"{len(missing)} leaf(s) of the target missing from the checkpoint: "
                    + _listing(missing))
  if unexpected:
    problems.append(f"{len(unexpected)} checkpoint leaf(s) not in the target: "
                    + _listing(unexpected))
  mismatched = []
  for p in want_paths:
    if p not in have:
      continue
    shape, dtype = tuple(np.shape(want[p])), np.dtype(_dtype(want[p]))
    if tuple(have[p].shape) != shape or np.dtype(have[p].dtype) != dtype:
      mismatched.append(f"{p}: checkpoint {tuple(have[p].shape)} {np.dtype(have[p].dtype)} "
                        f"vs target {shape} {dtype}")
  if mismatched:
    problems.append(f"shape/dtype mismatch for {len(mismatched)} leaf(s): "
                    + _listing(mismatched))
  if problems:
    raise CheckpointError(f"checkpoint {directory} does not fit the target state:\n  "
                          + "\n  ".join(problems))


def _dtype(leaf: Any) -> np.dtype:
  return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype


def _like(target_leaf: Any, restored: Any) -> Any:
  """The restored leaf with the Python/NumPy type of the target leaf."""
  if isinstance(target_leaf, (bool, int, float, complex)):
    return type(target_leaf)(np.asarray(restored).item())
  if isinstance(target_leaf, np.generic):
    return np.asarray(restored, dtype=target_leaf.dtype)[()]
  return restored


class Checkpointer:
  """Periodic, asynchronous checkpoints of a train-state pytree (see the module doc).

  Args:
    directory: the checkpoint directory (created if needed).
    max_to_keep: how many complete checkpoints to keep; older ones are
      deleted after a newer one is complete. ``None`` keeps all.
    save_interval_steps: :meth:`should_save` is true on multiples of it.
    async_save: write in a background thread (the train step goes on once
      the arrays are copied to host memory); :meth:`wait_until_finished`
      waits for the write.
    read_only: only read (e.g. an evaluator following a training run).
      A writer deletes the ``*.orbax-checkpoint-tmp-*`` directories left by
      killed saves when it opens the directory, so open a directory that
      another job is writing to with ``read_only=True``.

  Example:
    >>> ckpt = Checkpointer("/tmp/ckpt", save_interval_steps=10)  # doctest: +SKIP
    >>> ckpt.save(10, {"w": w, "step": np.int32(10)})              # doctest: +SKIP
    True
    >>> ckpt.restore({"w": w, "step": np.int32(0)})["step"]        # doctest: +SKIP
    np.int32(10)
  """

  def __init__(self, directory: str | os.PathLike[str], *, max_to_keep: int | None = 2,
               save_interval_steps: int = 100, async_save: bool = True,
               read_only: bool = False):
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
    self.directory = _absolute(directory)
    self.save_interval_steps = save_interval_steps
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, cleanup_tmp_directories=not read_only,
        read_only=read_only, enable_async_checkpointing=async_save,
        step_name_format=_CompleteSteps())
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(_STATE, _METADATA))

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

  def step_directory(self, step: int) -> epath.Path:
    """The directory of the checkpoint of ``step`` (it may not exist)."""
    return self.directory / str(step)

  def all_steps(self) -> list[int]:
    """The complete (or being saved by this object) steps, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None if there is none.

    A save still in progress does not count until it is complete.
    """
    for step in reversed(self.all_steps()):
      if _step_problem(self.step_directory(step)) is None:
        return step
    return None

  def should_save(self, step: int) -> bool:
    """True on multiples of ``save_interval_steps`` not saved yet."""
    return (step % self.save_interval_steps == 0 and step not in self._manager.all_steps()
            and not self.step_directory(step).exists())

  def save(self, step: int, state: PyTree, *, force: bool = False,
           metadata: dict[str, Any] | None = None) -> bool:
    """Starts saving ``state`` as the checkpoint of ``step``, if it is due.

    Call it from every process with the same arguments. The write goes on in
    the background; the checkpoint counts once it is complete.

    Args:
      step: the train step the state is at (after ``step`` updates).
      state: a pytree of ``jax.Array`` (any sharding), NumPy arrays and
        scalars, and empty nodes (``None``, ``()``, ``optax.MaskedNode()``).
        Store PRNG keys as key data (``jax.random.key_data``).
      force: save even if :meth:`should_save` is false (e.g. on preemption).
      metadata: an optional JSON-serialisable dict saved with the step.

    Returns:
      True if a save was started; False if it was not due, or if ``step`` is
      already saved (the existing checkpoint is kept as it is).

    Raises:
      CheckpointError: the directory of ``step`` exists but is not a complete
        checkpoint; it is left untouched (move it away to save this step).
        Or the checkpointer is read-only.
    """
    if self.read_only:
      raise CheckpointError(f"cannot save step {step}: {self.directory} is opened read-only")
    if not force and not self.should_save(step):
      return False
    if step in self._manager.all_steps():
      if _is_primary():
        logging.info("checkpoint step %d already exists in %s; not saving it again",
                     step, self.directory)
      return False
    path = self.step_directory(step)
    if path.exists():
      raise CheckpointError(
          f"cannot save step {step}: {path} exists but is not a complete checkpoint "
          f"({_step_problem(path)}); it is left untouched: move it away to save this step")
    _check_savable(state)
    items = {_STATE: ocp.args.PyTreeSave(state)}
    if metadata is not None:
      items[_METADATA] = ocp.args.JsonSave(metadata)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    if saved and _is_primary():
      logging.info("saving checkpoint step %d to %s", step, path)
    return saved

  def _previous_step_hint(self, step: int) -> str:
    older = [s for s in self.all_steps() if s < step]
    if not older:
      return ""
    return (f"; the previous complete checkpoint is step {older[-1]}: move "
            f"{self.step_directory(step)} away to resume from it")

  def _checked_step(self, step: int | None) -> int:
    if step is None:
      latest = self.latest_step()
      if latest is None:
        raise CheckpointError(f"no complete checkpoint in {self.directory}")
      return latest
    problem = _step_problem(self.step_directory(step))
    if problem is not None:
      raise CheckpointError(
          f"no complete checkpoint for step {step} at {self.step_directory(step)}: {problem}")
    return step

  def restore(self, target: PyTree, step: int | None = None) -> PyTree:
    """The state saved at ``step`` (default: the latest complete step).

    The result has exactly the tree structure, shapes and dtypes of
    ``target`` and the saved values bit for bit. Each leaf is placed like the
    target leaf: a ``jax.Array`` or a ``jax.ShapeDtypeStruct`` with a sharding
    gives a ``jax.Array`` with that sharding (whatever mesh the checkpoint was
    written from); a NumPy array or ``ShapeDtypeStruct`` without sharding
    gives a NumPy array; NumPy and Python scalars keep their type. Call it
    from every process.

    Raises:
      CheckpointError: there is no complete checkpoint (for ``step``), the
        checkpoint does not fit ``target`` (paths, shapes, dtypes; no silent
        casts), or its files cannot be read. The message names the step
        directory; with ``step=None`` it also names the previous complete
        step: nothing falls back to an older checkpoint by itself.
    """
    self.wait_until_finished()
    step = self._checked_step(step)
    path = self.step_directory(step)
    try:
      saved = _read_metadata(path / _STATE)
    except CheckpointError as e:
      raise CheckpointError(f"cannot read the checkpoint of step {step} at {path}"
                            f"{self._previous_step_hint(step)}: {e}") from e
    _check_fits(target, saved, path / _STATE)
    item = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), _dtype(x)), target)
    restore_args = jax.tree.map(_restore_arg, target)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          _STATE: ocp.args.PyTreeRestore(item=item, restore_args=restore_args)}))[_STATE]
    except Exception as e:  # orbax/tensorstore raise many types for corrupt files
      raise CheckpointError(
          f"cannot read the arrays of the checkpoint of step {step} at {path} (corrupt or "
          f"partial files?){self._previous_step_hint(step)}: {type(e).__name__}: {e}") from e
    if _is_primary():
      logging.info("restored checkpoint step %d from %s", step, path)
    return jax.tree.map(_like, target, restored)

  def restore_metadata(self, step: int | None = None) -> dict[str, Any] | None:
    """The JSON metadata saved with ``step`` (default: latest), or None if none was."""
    self.wait_until_finished()
    step = self._checked_step(step)
    path = self.step_directory(step) / _METADATA / _METADATA
    if not path.exists():
      return None
    try:
      return _read_json(path)
    except (OSError, ValueError) as e:
      raise CheckpointError(f"cannot read the metadata of step {step} at {path}: "
                            f"{type(e).__name__}: {e}") from e

  def wait_until_finished(self) -> None:
    """Blocks until the save in progress (if any) is complete."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the save in progress and releases orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()


class PreemptionGuard:
  """Turns SIGTERM (and optionally SIGINT) into a flag the train loop polls.

  The handler only sets :attr:`requested`; the loop checks
  :meth:`should_stop` after each step, saves with ``force=True``, waits for
  the save and returns normally, so the process exits with status 0.

  With several processes, every process must stop at the same step, or the
  collective save hangs. :meth:`should_stop` therefore answers for all
  processes together: every ``sync_every_steps`` steps it all-gathers the
  local flags (one tiny collective, not a host sync per step) and says stop
  if any process was signalled. All processes must call it at the same
  steps. With one process it returns the local flag at once.

  JAX's own preemption service (``jax.experimental.multihost_utils.
  reached_preemption_sync_point``, used by orbax's ``reached_preemption``)
  listens to SIGTERM from C++; installing this guard replaces that listener,
  so this guard is the one place that decides when to stop.

  A second SIGINT raises ``KeyboardInterrupt`` (to get out of a hang);
  repeated SIGTERMs only set the flag, so a save is never interrupted.

  Args:
    signals: the signals to catch (by default SIGTERM only).
    sync_every_steps: how often (in steps) the processes compare flags.

  Example:
    >>> with PreemptionGuard(signals=(signal.SIGTERM, signal.SIGINT)) as guard:
    ...   stop = guard.should_stop(0)
    >>> stop
    False
  """

  def __init__(self, signals: Iterable[int] = (signal.SIGTERM,), *,
               sync_every_steps: int = 10):
    if sync_every_steps < 1:
      raise ValueError(f"sync_every_steps must be >= 1, got {sync_every_steps}")
    if threading.current_thread() is not threading.main_thread():
      raise ValueError("PreemptionGuard must be created in the main thread "
                       "(Python runs signal handlers there only)")
    self.sync_every_steps = sync_every_steps
    self._requested = False
    self._stop = False
    self._previous = {}
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if signum == signal.SIGINT and self._requested:
      raise KeyboardInterrupt
    self._requested = True
    logging.warning("received %s: stopping at the next synchronised step after a save",
                    signal.Signals(signum).name)

  @property
  def requested(self) -> bool:
    """Whether this process got a signal (or :meth:`request`)."""
    return self._requested

  def request(self) -> None:
    """Asks for a stop as if a signal had arrived (e.g. at a time limit)."""
    self._requested = True

  def should_stop(self, step: int) -> bool:
    """Whether all processes should save and stop after ``step``.

    Once true it stays true. Call it from every process at every step.
    """
    if self._stop:
      return True
    if jax.process_count() == 1:
      self._stop = self._requested
    elif step % self.sync_every_steps == 0:
      flags = multihost_utils.process_allgather(np.int32(self._requested))
      self._stop = bool(np.any(flags))
    return self._stop

  def close(self) -> None:
    """Restores the previous signal handlers."""
    for sig, previous in self._previous.items():
      # None: the handler was not installed from Python; the default is the
      # closest we can restore.
      signal.signal(sig, signal.SIG_DFL if previous is None else previous)
    self._previous = {}

  def __enter__(self) -> PreemptionGuard:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()
