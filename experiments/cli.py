"""The command line of the config-driven entry points (main, pretrain, study, diagnose).

Every entry point is an absl program: its module defines ``job(config,
workdir)`` (what tests call) and ends with ``cli.run(job)``.

``--config`` is an ``ml_collections`` config file (default:
``experiments/configs/default.py``); single fields are overridden with
``--config.train.steps=100``, ``--config.methods=ft,lp`` and so on (an unknown
field is a flag error). ``--workdir`` (default ``runs``) holds the data, the
pre-training cache, checkpoints and results. Several processes (one per host)
pass ``--coordinator_address``, ``--num_processes`` and ``--process_id`` (or
set ``JAX_COORDINATOR_ADDRESS`` and friends).

A config that cannot run (:class:`experiments.plan.ConfigError`) is reported
in one line, before any data is built, with exit status 2; a job stopped by a
preemption (:class:`experiments.training.loop.Preempted`: its state is saved)
says so and exits 0: running the command again resumes.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from absl import app, flags
from ml_collections import ConfigDict, config_flags

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")

_FLAGS: dict[str, flags.FlagHolder] = {}


def _define_flags() -> None:
  """Defines the flags (once). ml_collections parses the default config file, with the
  ``--config.X`` overrides of ``sys.argv``, when ``--config`` is defined: here, not at import."""
  if _FLAGS:
    return
  _FLAGS["config"] = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Experiment config file (configs as code).", lock_config=True
  )
  _FLAGS["workdir"] = flags.DEFINE_string(
    "workdir", "runs", "Directory for data, the pre-training cache, checkpoints and results."
  )
  _FLAGS["coordinator_address"] = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process runs)."
  )
  _FLAGS["num_processes"] = flags.DEFINE_integer("num_processes", None, "Number of processes.")
  _FLAGS["process_id"] = flags.DEFINE_integer("process_id", None, "This process's index.")


Job = Callable[[ConfigDict, str], None]


def _set_up_runtime() -> None:
  """Starts JAX's multi-process runtime if asked; logging (warnings only off process 0)."""
  from experiments.training import distributed  # noqa: PLC0415 (nothing touches JAX before)

  distributed.initialize(
    *(_FLAGS[n].value for n in ("coordinator_address", "num_processes", "process_id"))
  )
  import jax  # noqa: PLC0415
  import tensorflow_datasets as tfds  # noqa: PLC0415

  tfds.disable_progress_bar()
  level = logging.INFO if jax.process_index() == 0 else logging.WARNING
  logging.basicConfig(
    level=level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr, force=True
  )
  for noisy in ("absl", "orbax", "jax", "tensorflow_datasets", "etils"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def main(job: Job) -> Callable[[list[str]], int]:
  """The ``main(argv)`` that ``absl.app.run`` calls for ``job``: checks that no positional
  argument was given, sets up the runtime and calls ``job(config, workdir)``."""

  def run(argv: list[str]) -> int:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}: every setting is a --flag")
    _set_up_runtime()
    from experiments.plan import ConfigError  # noqa: PLC0415
    from experiments.training.loop import Preempted  # noqa: PLC0415

    try:
      job(_FLAGS["config"].value, _FLAGS["workdir"].value)
    except ConfigError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    except Preempted as e:
      print(e, file=sys.stderr)
    return 0

  return run


def _flag_error(error: Exception) -> None:
  """Reports a flag or config override error in one line, as absl does, and exits 1."""
  message = str(error)
  if isinstance(error, (AttributeError, KeyError)):
    overrides = [a for a in sys.argv[1:] if a.startswith(("--config.", "-config."))]
    message = (
      f"the config has no field {message.strip(chr(34) + chr(39))!r} "
      f"(--config overrides given: {' '.join(overrides)})"
    )
  print(
    f"FATAL Flags parsing error: {message}\nPass --helpshort or --helpfull to see help on flags.",
    file=sys.stderr,
  )
  sys.exit(1)


#: What ml_collections raises for an override of a field the config does not have.
_OVERRIDE_ERRORS = (AttributeError, KeyError, TypeError, ValueError)


def _parse(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except (flags.Error, *_OVERRIDE_ERRORS) as e:
    _flag_error(e)


def run(job: Job) -> None:
  """The body of every entry point: defines the flags, then ``absl.app.run`` of ``job``
  (see :func:`main`)."""
  try:
    _define_flags()
  except _OVERRIDE_ERRORS as e:
    _flag_error(e)
  app.run(main(job), flags_parser=_parse)
