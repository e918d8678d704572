"""``python -m experiments.main`` that signals itself once a given checkpoint save has started.

  python tests/experiments/_main_worker.py STEP SIGNAL [main flags...]

Right after the fine-tuning loop starts saving the checkpoint of step STEP
(orbax writes it in the background), the process sends itself SIGNAL
(``SIGKILL``: killed mid-write; ``SIGTERM``: a preemption notice). Used by
test_train to interrupt runs at deterministic points.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments import cli, main  # noqa: E402
from experiments.training import checkpointing

STEP, SIGNAL = int(sys.argv[1]), getattr(signal, sys.argv[2])
_save = checkpointing.Checkpointer.save


def _save_then_signal(self, step, state, **kwargs):
  started = _save(self, step, state, **kwargs)
  if started and step == STEP and "pretrained" not in os.fspath(self.directory):
    os.kill(os.getpid(), SIGNAL)
  return started


checkpointing.Checkpointer.save = _save_then_signal

if __name__ == "__main__":
  sys.argv = [sys.argv[0], *sys.argv[3:]]
  cli.run(main.job)
