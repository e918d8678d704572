"""Images/s of the real-data training input path, for 1, 2, ... grain worker processes.

Usage::

    python -m benchmarks.input_pipeline [--workers 1,2] [--batch 64] [--batches 24]
                                        [--repeats 3] [--data_dir DIR]

Prints one JSON object. The path is the one real-data training runs use
(``experiments.data.pipeline.train_iterator`` with ``random_resized_crop`` and
``hflip``, as in ``configs/domainnet_resnet50.py``): array_record records
read through TFDS's data source, JPEG decoding, RandomResizedCrop to 224 x
224, flip, batching, in ``num_workers`` grain worker processes (one thread
each), uint8 batches handed to this process through shared memory.

The data: ``input_benchmark_jpegs`` (:mod:`benchmarks.input_data`), a TFDS
data set of procedurally drawn photo-like JPEGs of ImageNet-like size (sides
300-450, ~400 x 350 on average), built offline into ``--data_dir`` (default: a
temporary directory) on first use.

Timing: each worker count is measured ``--repeats`` times, round-robin (1, 2,
..., 1, 2, ...), so drifts of a shared machine hit all counts alike; each
measurement starts a fresh pipeline, discards the batches of the first
``2 x workers`` (process start-up) and times the next ``--batches``.
``images_per_s`` maps a worker count to the median rate, ``spread`` to the
(min, max); ``per_worker_images_per_s`` is the rate divided by the worker
count; ``scaling_efficiency`` is ``rate(W) / (W * rate(1))`` at the largest W
(the core count by default). ``transform_images_per_s`` is the decode +
augmentation alone, in this process, without grain (the per-core ceiling).

On a shared machine the wall-clock scaling says as much about the other jobs
as about the pipeline, so the CPU time is reported too (Linux):
``worker_cpu_ms_per_image`` (all workers together, median) and
``main_cpu_ms_per_image`` (this process: receiving the batches). If the CPU
time per image does not grow with the worker count
(``cpu_scaling_efficiency = cpu(1) / cpu(W)`` near 1), the workers do not
slow each other down and the wall-clock rate scales with the free cores.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from benchmarks.input_data import IMAGE_SIZE, benchmark_task, prepare
from experiments.data import augment, pipeline, sources, tasks
from experiments.data.options import InputOptions, available_cores


def options(workers: int) -> InputOptions:
  """The real-data training settings (configs/domainnet_resnet50.py) with ``workers`` workers."""
  return InputOptions(
    hflip=True,
    random_resized_crop=True,
    crop_fraction=0.875,
    num_workers=workers,
    num_threads=1,
    prefetch=2,
  )


def _cpu_seconds(pid: int) -> float | None:
  """User + system CPU time of process ``pid`` (Linux /proc), or None elsewhere."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return None
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def measure(
  task: tasks.Task, data_dir: str, workers: int, batch: int, batches: int
) -> dict[str, float | None]:
  """One fresh pipeline with ``workers`` workers, after its start-up: images/s, and the CPU
  time per image of the worker processes and of this process."""
  it = pipeline.train_iterator(
    task, batch_size=batch, seed=0, data_dir=data_dir, options=options(workers)
  )
  with contextlib.closing(it):
    for _ in range(2 * workers):
      next(it)
    pids = [p.pid for p in multiprocessing.active_children()]  # grain's workers
    cpu = [_cpu_seconds(p) for p in pids]
    own, start = _self_cpu_seconds(), time.perf_counter()
    for _ in range(batches):
      b = next(it)
      assert b["image"].shape == (batch, IMAGE_SIZE, IMAGE_SIZE, 3)
    wall = time.perf_counter() - start
    own = _self_cpu_seconds() - own
    after = [_cpu_seconds(p) for p in pids]
  n = batches * batch
  known = pids and None not in cpu + after
  return {
    "rate": n / wall,
    "main_cpu_ms": 1e3 * own / n,
    "worker_cpu_ms": 1e3 * sum(a - c for a, c in zip(after, cpu)) / n if known else None,
  }


def transform_rate(task: tasks.Task, data_dir: str, n: int = 200) -> float:
  """Images/s of decode + RandomResizedCrop + flip alone, in this process, without grain."""
  source = sources.open_data_source(
    task.train, data_dir, decoders={"image": tfds.decode.SkipDecoding()}
  )
  examples = [source[i % len(source)] for i in range(n)]
  settings = options(0)
  crop = augment.RandomResizedCrop(
    IMAGE_SIZE, settings.crop_scale, settings.crop_ratio, settings.hflip, settings.interpolation
  )
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  for e in examples:
    crop.random_map(e, rng)
  return n / (time.perf_counter() - start)


def run(
  workers: list[int],
  batch: int = 64,
  batches: int = 24,
  repeats: int = 3,
  data_dir: str | None = None,
  images: int = 512,
) -> dict:
  tmp = None if data_dir else tempfile.mkdtemp(prefix="input_benchmark_")
  try:
    builder = prepare(data_dir or tmp, images)
    task = benchmark_task(images)
    source = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    sample = [source[i] for i in range(min(len(source), 64))]
    shapes = np.array([Image.open(io.BytesIO(e["image"])).size for e in sample])
    runs = {w: [] for w in workers}
    for _ in range(repeats):
      for w in workers:
        runs[w].append(measure(task, data_dir or tmp, w, batch, batches))
    per_core = transform_rate(task, data_dir or tmp)
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  rates = {w: [r["rate"] for r in rs] for w, rs in runs.items()}
  median = {w: statistics.median(r) for w, r in rates.items()}
  top = max(workers)
  worker_cpu = {w: [r["worker_cpu_ms"] for r in rs] for w, rs in runs.items()}
  worker_cpu = (
    {w: statistics.median(c) for w, c in worker_cpu.items()}
    if all(None not in c for c in worker_cpu.values())
    else None
  )
  return {
    "images_per_s": {str(w): round(median[w], 1) for w in workers},
    "per_worker_images_per_s": {str(w): round(median[w] / w, 1) for w in workers},
    "scaling_efficiency": round(median[top] / (top * median[min(workers)] / min(workers)), 3),
    "scaling_efficiency_workers": top,
    "spread": {str(w): [round(min(r), 1), round(max(r), 1)] for w, r in rates.items()},
    "runs": {str(w): [round(x, 1) for x in r] for w, r in rates.items()},
    "transform_images_per_s": round(per_core, 1),
    "worker_cpu_ms_per_image": (
      {str(w): round(c, 3) for w, c in worker_cpu.items()} if worker_cpu else None
    ),
    "cpu_scaling_efficiency": (
      round(worker_cpu[min(workers)] / worker_cpu[top], 3) if worker_cpu else None
    ),
    "main_cpu_ms_per_image": {
      str(w): round(statistics.median(r["main_cpu_ms"] for r in rs), 3) for w, rs in runs.items()
    },
    "cores": available_cores(),
    "batch": batch,
    "timed_batches": batches,
    "repeats": repeats,
    "image_size": IMAGE_SIZE,
    "source_images": len(source),
    "mean_source_size_wh": [round(float(v)) for v in shapes.mean(0)],
    "mean_jpeg_kb": round(float(np.mean([len(e["image"]) for e in sample])) / 1024, 1),
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--workers", default=None, help="comma-separated worker counts (default: 1 .. the core count)"
  )
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--batches", type=int, default=24, help="timed batches per measurement")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--images", type=int, default=512, choices=(64, 512))
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir to build/reuse the data in")
  a = parser.parse_args(argv)
  tfds.disable_progress_bar()
  workers = (
    [int(w) for w in a.workers.split(",")] if a.workers else list(range(1, available_cores() + 1))
  )
  with contextlib.redirect_stdout(sys.stderr):  # TFDS prints while building: stdout is the JSON
    result = run(workers, a.batch, a.batches, a.repeats, a.data_dir, a.images)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
