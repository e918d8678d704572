"""Train-state checkpoints with exact resume (orbax's ``CheckpointManager``), and preemption.

:class:`Checkpointer` keeps the last few checkpoints of the whole train state
(params, optimizer states, radii, step, RNG key data, data position) in one
directory, one orbax step directory per saved step::

  workdir/ckpt/
    200/state/...                # the state pytree (orbax StandardSave)
    200/_CHECKPOINT_METADATA     # orbax's step metadata, with our custom_metadata
    300/...

The train loop uses it with :class:`PreemptionGuard`:

  >>> ckpt = Checkpointer(workdir / "ckpt", save_interval_steps=100)  # doctest: +SKIP
  >>> if ckpt.manager.latest_step() is not None:                      # doctest: +SKIP
  ...   state = ckpt.restore(abstract_state)     # onto abstract_state's shardings
  >>> with PreemptionGuard(ckpt) as guard:                            # doctest: +SKIP
  ...   for step in range(int(state["step"]), num_steps):
  ...     state = train_step(state, batch)
  ...     stop = guard.should_stop(step + 1)     # same answer on every process
  ...     if stop or ckpt.manager.should_save(step + 1):
  ...       ckpt.save(step + 1, state, force=True)
  ...     if stop:
  ...       break                                # then exit with status 0
  >>> ckpt.close()                               # waits for the last save

orbax does the work, configured through ``CheckpointManagerOptions``: the save
schedule (``save_interval_steps``, plus a save at a preemption sync point),
``max_to_keep``, asynchronous writes, the listing of finalized steps, the
clean-up of unfinished saves, the run metadata (``custom_metadata``) and
``StandardSave`` / ``StandardRestore`` onto any sharding. All processes call
every method; orbax coordinates the writes. What is added on top:

* Steps are orbax's: a step counts once orbax has finalized it (written into
  ``<step>.orbax-checkpoint-tmp-*`` and renamed). A killed save leaves a
  temporary directory, which is not a step and which a writing
  :class:`Checkpointer` removes when it opens the directory (a ``read_only``
  one leaves it alone).
* A damaged step is an error, never a fallback: if the step restored (by
  default the newest) has unreadable metadata or arrays, :meth:`Checkpointer.restore`
  raises :class:`CheckpointError` naming its directory and the previous step,
  and deletes nothing: move the bad directory away to resume from the
  previous step. (The train loop therefore never saves past a damaged step, so
  ``max_to_keep`` never removes the good ones before it.)
* Nothing is overwritten: saving a step that is saved returns ``False``; a
  directory named like a step that orbax does not list is an error.
* The target decides the result exactly: paths, shapes and dtypes must match
  the checkpoint (orbax would cast dtypes silently), errors name the paths.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from experiments.training.weights import CheckpointError, flatten, listing
from experiments.types import PyTree

__all__ = [
  "CheckpointError",
  "Checkpointer",
  "PreemptionGuard",
]


_STATE = "state"


def _is_primary() -> bool:
  return jax.process_index() == 0


def _check_savable(state: PyTree) -> None:
  for path, leaf in zip(*flatten(state)[:2]):
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      raise TypeError(
        f"state leaf '{path}' is a typed PRNG key; save its key data instead "
        "(jax.random.key_data(key)) and rebuild it with jax.random.wrap_key_data"
      )


def _dtype(leaf: Any) -> np.dtype:
  return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.asarray(leaf).dtype


def _check_fits(target: PyTree, saved: PyTree, directory: epath.Path) -> None:
  """Raises CheckpointError unless the ``saved`` metadata has the target's paths, shapes, dtypes."""
  want_paths, want_leaves, _ = flatten(target)
  have_paths, have_meta, _ = flatten(saved)
  want = dict(zip(want_paths, want_leaves))
  have = dict(zip(have_paths, have_meta))
  problems = []
  missing = [p for p in want_paths if p not in have]
  unexpected = [p for p in have_paths if p not in want]
  if missing:
    problems.append(
      f"{len(missing)} leaf(s) of the target missing from the checkpoint: " + listing(missing)
    )
  if unexpected:
    problems.append(
      f"{len(unexpected)} checkpoint leaf(s) not in the target: " + listing(unexpected)
    )
  mismatched = []
  for p in want_paths:
    if p not in have:
      continue
    shape, dtype = tuple(np.shape(want[p])), _dtype(want[p])
    if tuple(have[p].shape) != shape or np.dtype(have[p].dtype) != dtype:
      mismatched.append(
        f"{p}: checkpoint {tuple(have[p].shape)} {np.dtype(have[p].dtype)} "
        f"vs target {shape} {dtype}"
      )
  if mismatched:
    problems.append(f"shape/dtype mismatch for {len(mismatched)} leaf(s): " + listing(mismatched))
  if problems:
    raise CheckpointError(
      f"checkpoint {directory} does not fit the target state:\n  " + "\n  ".join(problems)
    )


def _abstract(leaf: Any) -> Any:
  """A restore target for orbax: a jax.Array's shape, dtype and sharding, else a host array."""
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  return jax.ShapeDtypeStruct(np.shape(leaf), _dtype(leaf))  # restored as np.ndarray


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
    directory: the checkpoint directory (created if needed, unless read-only).
    max_to_keep: how many steps to keep; older ones are deleted after a newer
      one is finalized. ``None`` keeps all.
    save_interval_steps: :meth:`should_save` is true on multiples of it (and
      at a preemption sync point of a multi-process run).
    async_save: write in a background thread (the train step goes on once
      the arrays are copied to host memory); :meth:`wait_until_finished`
      waits for the write.
    read_only: only read (e.g. an evaluator following a training run); a
      writer deletes the ``*.orbax-checkpoint-tmp-*`` directories of killed
      saves when it opens the directory, so open a directory that another
      job is writing to with ``read_only=True``.

  Example:
    >>> ckpt = Checkpointer("/tmp/ckpt", save_interval_steps=10)  # doctest: +SKIP
    >>> ckpt.save(10, {"w": w, "step": np.int32(10)})              # doctest: +SKIP
    True
    >>> ckpt.restore({"w": w, "step": np.int32(0)})["step"]        # doctest: +SKIP
    np.int32(10)
  """

  def __init__(
    self,
    directory: str | os.PathLike[str],
    *,
    max_to_keep: int | None = 2,
    save_interval_steps: int = 100,
    async_save: bool = True,
    read_only: bool = False,
  ):
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
    self.directory = epath.Path(os.path.abspath(os.fspath(directory)))
    self.read_only = read_only
    policy = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_interval_steps,
      max_to_keep=max_to_keep,
      enable_async_checkpointing=async_save,
      read_only=read_only,
      create=not read_only,
      cleanup_tmp_directories=not read_only,
      # orbax's default policy also saves the first step seen; the interval and
      # preemption are what a resumable loop needs.
      save_decision_policy=policy.AnySavePolicy(
        [policy.FixedIntervalPolicy(save_interval_steps), policy.PreemptionCheckpointingPolicy()]
      ),
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_handlers={_STATE: ocp.StandardCheckpointHandler()}
    )

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

  @property
  def manager(self) -> ocp.CheckpointManager:
    """The orbax ``CheckpointManager``: ``latest_step()``, ``should_save(step)``,
    ``reached_preemption(step)``, ``wait_until_finished()`` are orbax's own."""
    return self._manager

  def step_directory(self, step: int) -> epath.Path:
    """The directory of the checkpoint of ``step`` (it may not exist)."""
    return self.directory / str(step)

  def all_steps(self) -> list[int]:
    """The saved steps (finalized, or being saved by this object), oldest first."""
    return sorted(self._manager.all_steps())

  def save(
    self, step: int, state: PyTree, *, force: bool = False, metadata: dict[str, Any] | None = None
  ) -> bool:
    """Starts saving ``state`` as the checkpoint of ``step``, if it is due.

    Call it from every process with the same arguments. The write goes on in
    the background; the step counts once orbax has finalized it.

    Args:
      step: the train step the state is at (after ``step`` updates).
      state: a pytree of ``jax.Array`` (any sharding), NumPy arrays and
        scalars, and empty nodes (``None``, ``()``, ``optax.MaskedNode()``).
        Store PRNG keys as key data (``jax.random.key_data``).
      force: save even if :meth:`should_save` is false (e.g. on preemption).
      metadata: an optional JSON-serialisable dict saved with the step (orbax's
        ``custom_metadata``; :meth:`restore_metadata`).

    Returns:
      True if a save was started; False if it was not due, or if ``step`` is
      already saved (the existing checkpoint is kept as it is).

    Raises:
      CheckpointError: a directory named like the step exists but is not a
        step orbax lists; it is left untouched. Or the checkpointer is read-only.
    """
    if self.read_only:
      raise CheckpointError(f"cannot save step {step}: {self.directory} is opened read-only")
    if not force and not self._manager.should_save(step):
      return False
    if step in self._manager.all_steps():
      if _is_primary():
        logging.info(
          "checkpoint step %d already exists in %s; not saving it again", step, self.directory
        )
      return False
    path = self.step_directory(step)
    if path.exists():
      raise CheckpointError(
        f"cannot save step {step}: {path} exists but is not a checkpoint orbax lists; it is "
        "left untouched: move it away to save this step"
      )
    _check_savable(state)
    saved = self._manager.save(
      step,
      args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state)}),
      custom_metadata=metadata,
      force=True,
    )
    if saved and _is_primary():
      logging.info("saving checkpoint step %d to %s", step, path)
    return saved

  def _previous_step_hint(self, step: int) -> str:
    older = [s for s in self.all_steps() if s < step]
    if not older:
      return ""
    return (
      f"; the previous checkpoint is step {older[-1]}: move "
      f"{self.step_directory(step)} away to resume from it"
    )

  def _checked_step(self, step: int | None) -> int:
    if step is None:
      latest = self._manager.latest_step()
      if latest is None:
        raise CheckpointError(f"no checkpoint in {self.directory}")
      return latest
    if step not in self._manager.all_steps():
      raise CheckpointError(f"no checkpoint for step {step} at {self.step_directory(step)}")
    return step

  def restore(self, target: PyTree, step: int | None = None) -> PyTree:
    """The state saved at ``step`` (default: the latest step).

    The result has exactly the tree structure, shapes and dtypes of
    ``target`` and the saved values bit for bit. Each leaf is placed like the
    target leaf: a ``jax.Array`` or a ``jax.ShapeDtypeStruct`` with a sharding
    gives a ``jax.Array`` with that sharding (whatever mesh the checkpoint was
    written from); a NumPy array or ``ShapeDtypeStruct`` without sharding
    gives a NumPy array; NumPy and Python scalars keep their type. Call it
    from every process.

    Raises:
      CheckpointError: there is no checkpoint (for ``step``), the checkpoint
        does not fit ``target`` (paths, shapes, dtypes; no silent casts), or
        its metadata or arrays cannot be read. The message names the step
        directory and the previous step: nothing falls back to an older
        checkpoint by itself.
    """
    self._manager.wait_until_finished()
    step = self._checked_step(step)
    path = self.step_directory(step)
    items = self._step_metadata(step).item_metadata
    saved = items.get(_STATE) if items is not None else None
    if saved is None or not hasattr(saved, "tree"):
      raise CheckpointError(
        f"cannot read the metadata of the checkpoint of step {step} at "
        f"{path} (damaged checkpoint?){self._previous_step_hint(step)}"
      )
    _check_fits(target, saved.tree, path / _STATE)
    args = ocp.args.StandardRestore(jax.tree.map(_abstract, target))
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{_STATE: args}))[_STATE]
    except Exception as e:  # orbax/tensorstore raise many types for corrupt files
      raise CheckpointError(
        f"cannot read the arrays of the checkpoint of step {step} at {path} (corrupt or "
        f"partial files?){self._previous_step_hint(step)}: {type(e).__name__}: {e}"
      ) from e
    if _is_primary():
      logging.info("restored checkpoint step %d from %s", step, path)
    return jax.tree.map(_like, target, restored)

  def restore_metadata(self, step: int | None = None) -> dict[str, Any] | None:
    """The metadata saved with ``step`` (default: latest), or None if none was.

    Raises:
      CheckpointError: no checkpoint (for ``step``), or its step metadata is
        missing or unreadable (a damaged step).
    """
    self._manager.wait_until_finished()
    return self._step_metadata(self._checked_step(step)).custom_metadata or None

  def _step_metadata(self, step: int) -> Any:
    """orbax's metadata of a saved step; CheckpointError if it is missing or unreadable."""
    where = (
      f"the metadata of the checkpoint of step {step} at {self.step_directory(step)} "
      "(damaged checkpoint?)"
    )
    try:
      metadata = self._manager.metadata(step)
    except Exception as e:  # orbax/tensorstore raise many types for unreadable files
      raise CheckpointError(
        f"cannot read {where}{self._previous_step_hint(step)}: {type(e).__name__}: {e}"
      ) from e
    if metadata.commit_timestamp_nsecs is None:  # orbax found no readable step metadata
      raise CheckpointError(f"cannot read {where}{self._previous_step_hint(step)}")
    return metadata

  def close(self) -> None:
    """Waits for the save in progress and releases orbax's resources."""
    self._manager.wait_until_finished()
    self._manager.close()


class PreemptionGuard:
  """Stops the train loop at the same step on every process after SIGTERM, to save and exit 0.

  With one process, a Python handler for ``signals`` sets a flag that
  :meth:`should_stop` returns. With several processes (``jax.distributed``),
  JAX's preemption service catches SIGTERM in every process and agrees on a
  step; :meth:`should_stop` is orbax's ``reached_preemption`` (through
  ``checkpointer``), true on that step on every process. No Python handler is
  installed for SIGTERM then (it would replace JAX's).

  The loop checks :meth:`should_stop` after each step, saves with
  ``force=True``, waits for the save and returns normally, so the process
  exits with status 0. A second SIGINT raises ``KeyboardInterrupt`` (to get
  out of a hang); repeated SIGTERMs only set the flag, so a save is never
  interrupted.

  Args:
    checkpointer: the run's :class:`Checkpointer` (needed with several processes).
    signals: the signals to catch (by default SIGTERM only).

  Example:
    >>> with PreemptionGuard(signals=(signal.SIGTERM, signal.SIGINT)) as guard:
    ...   stop = guard.should_stop(0)
    >>> stop
    False
  """

  def __init__(
    self, checkpointer: Checkpointer | None = None, signals: Iterable[int] = (signal.SIGTERM,)
  ):
    if threading.current_thread() is not threading.main_thread():
      raise ValueError(
        "PreemptionGuard must be created in the main thread "
        "(Python runs signal handlers there only)"
      )
    self._multiprocess = jax.process_count() > 1
    if self._multiprocess and checkpointer is None:
      raise ValueError(
        "PreemptionGuard needs the run's Checkpointer with several processes "
        "(it asks orbax whether the preemption sync point is reached)"
      )
    self._checkpointer = checkpointer
    self._requested = False
    self._stop = False
    self._previous = {}
    for sig in signals:
      if not (self._multiprocess and sig == signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if signum == signal.SIGINT and self._requested:
      raise KeyboardInterrupt
    self._requested = True
    logging.warning(
      "received %s: stopping at the next step after a save", signal.Signals(signum).name
    )

  @property
  def requested(self) -> bool:
    """Whether this process got a signal (or :meth:`request`); with several processes, a
    SIGINT only (SIGTERM goes to JAX's preemption service)."""
    return self._requested

  def request(self) -> None:
    """Asks for a stop as if SIGTERM had arrived (e.g. at a time limit)."""
    if self._multiprocess:
      signal.raise_signal(signal.SIGTERM)  # JAX's preemption service agrees on the step
    else:
      self._requested = True

  def should_stop(self, step: int) -> bool:
    """Whether all processes should save and stop after ``step``.

    Once true it stays true. Call it from every process at every step.
    """
    if not self._stop:
      if self._multiprocess:
        self._stop = self._checkpointer.manager.reached_preemption(step)
      else:
        self._stop = self._requested
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
