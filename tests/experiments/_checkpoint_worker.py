"""Subprocess for test_checkpointing: a save killed half-way, a loop stopped by SIGTERM.

python tests/experiments/_checkpoint_worker.py kill_mid_save DIR
    saves step 1, starts saving a larger step 2 and SIGKILLs itself.
python tests/experiments/_checkpoint_worker.py train_until_sigterm DIR
    runs a toy loop under a PreemptionGuard, saving every 1000 steps; prints
    "step N" lines; on SIGTERM saves the current step, prints "stopped N"
    and exits with status 0.
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from experiments.training.checkpointing import Checkpointer, PreemptionGuard


def small_state(step):
  return {"w": jnp.full((4, 4), float(step)), "step": np.int32(step)}


def kill_mid_save(directory):
  ckpt = Checkpointer(directory, save_interval_steps=1)
  ckpt.save(1, small_state(1))
  ckpt.manager.wait_until_finished()
  big = np.random.default_rng(0).standard_normal((8, 2**20), dtype=np.float32)  # 32 MiB
  state = small_state(2)
  state["w"] = jnp.asarray(big)
  ckpt.save(2, state)  # returns once the background write has started
  os.kill(os.getpid(), signal.SIGKILL)


def train_until_sigterm(directory):
  ckpt = Checkpointer(directory, save_interval_steps=1000)
  state = small_state(0)
  update = jax.jit(lambda s: {"w": s["w"] + 1.0, "step": s["step"] + 1})
  with PreemptionGuard() as guard:
    for step in range(1, 100_000):
      state = update(state)
      print(f"step {step}", flush=True)
      time.sleep(0.01)
      stop = guard.should_stop(step)
      ckpt.save(step, state, force=stop)
      if stop:
        break
  ckpt.close()
  print(f"stopped {step}", flush=True)


if __name__ == "__main__":
  {"kill_mid_save": kill_mid_save, "train_until_sigterm": train_until_sigterm}[sys.argv[1]](
    sys.argv[2]
  )
