"""Command-line flags shared by the entry points.

``--config`` is an ``ml_collections`` config file (default:
``experiments/configs/default.py``); single fields are overridden with
``--config.train.steps=100``, ``--config.methods=ft,lp`` and so on.
``--workdir`` (default ``runs``) holds the data, the pre-training cache,
checkpoints and results. Several processes (one per host) pass
``--coordinator_address``, ``--num_processes`` and ``--process_id`` (or set
``JAX_COORDINATOR_ADDRESS`` and friends).
"""

from __future__ import annotations

import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Experiment config file (configs as code).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", "runs", "Directory for data, the pre-training cache, checkpoints and results.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def parse(argv):
  """Parses ``argv`` (``sys.argv`` style), starts JAX's multi-process runtime if asked,
  sets up logging (warnings only on processes other than 0); ``(config, workdir)``."""
  argv = list(argv)
  if not any(a == "--config" or a.startswith("--config=") for a in argv):
    # Parse the default config now, so that it registers the --config.X overrides.
    argv.insert(1, f"--config={DEFAULT_CONFIG}")
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)  # registered by an earlier parse (tests call main twice)
  saved, sys.argv = sys.argv, argv  # config_flags reads the --config.X overrides from there
  try:
    flags.FLAGS(argv)
  finally:
    sys.argv = saved
  from experiments import distributed  # noqa: PLC0415 (after flags: nothing touches JAX before)
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  import jax  # noqa: PLC0415
  import tensorflow_datasets as tfds  # noqa: PLC0415

  tfds.disable_progress_bar()
  level = logging.INFO if jax.process_index() == 0 else logging.WARNING
  logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s",
                      stream=sys.stderr, force=True)
  for noisy in ("absl", "orbax", "jax", "tensorflow_datasets", "etils"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  return _CONFIG.value, _WORKDIR.value


def run(job, argv=None) -> int:
  """The body of every entry point: parses ``argv`` (default ``sys.argv``; see
  :func:`parse`) and calls ``job(config, workdir)``. A job stopped by a preemption
  (``experiments.train.Preempted``: its state is saved) prints why; the exit status
  is 0 either way, and running the command again resumes."""
  config, workdir = parse(sys.argv if argv is None else argv)
  from experiments import train  # noqa: PLC0415 (imports JAX: after parse)
  try:
    job(config, workdir)
  except train.Preempted as e:
    print(e, file=sys.stderr)
  return 0
