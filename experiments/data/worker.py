"""What every grain worker process of the input pipeline does first (``mp_prefetch``'s init).

* SIGTERM is ignored: a preemption notice is for the training process, which
  saves its state and then closes the pipeline (stopping the workers). Without
  this, a scheduler that signals the whole process group (e.g. Slurm) kills
  the workers first and the training process fails on its next batch instead
  of saving.
* The worker exits when the process that started it is gone (SIGKILL
  included), instead of staying behind, blocked on its full output queue.

No JAX here: the workers only import what they run.
"""

from __future__ import annotations

import os
import signal
import threading
import time

#: How often (s) a worker checks that its parent is alive.
PARENT_POLL_SECONDS = 1.0


def _exit_with_parent(parent: int) -> None:
  while os.getppid() == parent:
    time.sleep(PARENT_POLL_SECONDS)
  os._exit(0)  # the parent is gone: nobody reads our batches


def init(worker_index: int, worker_count: int) -> None:
  """grain's ``worker_init_fn``: ignore SIGTERM, exit with the parent process."""
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  threading.Thread(
    target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="exit-with-parent"
  ).start()
