"""Subprocess for test_pipeline: reads a split with grain worker processes, then waits.

  python tests/experiments/_pipeline_worker.py DATA_DIR

prints "workers PID PID" once two batches have been read, then sleeps (the
test signals the workers and kills this process).
"""

import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments.data import pipeline, tasks  # noqa: E402
from experiments.data.options import InputOptions  # noqa: E402


def main(data_dir):
  task = tasks.get_task(
    "domainnet", ood_domains=("sketch",), heldout_size=5, val_size=5, image_size=16
  )
  options = InputOptions(random_resized_crop=True, num_workers=2)
  it = pipeline.train_iterator(task, batch_size=4, seed=0, data_dir=data_dir, options=options)
  next(it)
  next(it)
  print("workers", *[p.pid for p in multiprocessing.active_children()], flush=True)
  for line in sys.stdin:  # one line per batch asked for by the test
    next(it)
    print("batch", line.strip(), flush=True)
  time.sleep(600)


if __name__ == "__main__":
  main(sys.argv[1])
