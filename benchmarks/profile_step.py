"""Kernel time per step of several methods' steps, from a ``jax.profiler`` trace.

Usage::

    python -m benchmarks.profile_step [--methods plain,adam,project,ftp] [--steps 4]

Builds the steps of :mod:`benchmarks.step_overhead` (same model, batch and donation), runs each
twice, then traces ``--steps`` rounds of them and prints JSON: per method the wall time of
each traced step and the kernel time per step (summed over the runtime's threads) by kind of
kernel (the HLO name without its number), the share of the convolutions
(``ynn_fusion``, ``transpose_copy_fusion``, ``convolution``), and ``concurrency``: kernel time
over wall time, the mean number of kernels XLA:CPU's runtime ran at once during the step
(it runs independent kernels side by side; how many overlap depends on the program's
schedule).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import statistics
import tempfile
import time
from typing import Any

import jax

from benchmarks import step_overhead

RUNTIME = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction", "CommonPjRt", "STEP_")
CONVOLUTION = ("ynn_fusion", "transpose_copy_fusion", "convolution")


def kind(name: str) -> str:
  """An HLO instruction's kind: its name without the numbers XLA appends."""
  return re.sub(r"[._]\d+$", "", re.sub(r"\.\d+", "", name))


def run(
  methods: tuple[str, ...] = ("plain", "adam", "project", "ftp"),
  steps: int = 4,
  model: str = "resnet_small",
  batch_size: int = 128,
  overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """Traces ``steps`` rounds of ``methods``' steps; the JSON dict (module docstring)."""
  setup = step_overhead.Setup(model, batch_size, "float32", overrides)
  fns, carry, fixed = {}, {}, {}
  for n in methods:
    step, (carry[n], fixed[n]) = step_overhead.METHODS[n].build(setup)
    fns[n] = jax.jit(step, donate_argnums=0).lower(carry[n], fixed[n]).compile()
  for _ in range(2):
    for n in methods:
      carry[n] = jax.block_until_ready(fns[n](carry[n], fixed[n]))
  wall = collections.defaultdict(list)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(steps):
        for n in methods:
          t0 = time.perf_counter()
          with jax.profiler.TraceAnnotation(f"STEP_{n}"):
            carry[n] = jax.block_until_ready(fns[n](carry[n], fixed[n]))
          wall[n].append(round((time.perf_counter() - t0) * 1e3, 2))
    (trace,) = list(pathlib.Path(d).rglob("perfetto_trace.json.gz"))
    events = [e for e in json.load(gzip.open(trace))["traceEvents"] if e.get("ph") == "X"]
  spans = [(e["ts"], e["ts"] + e["dur"], e["name"][5:]) for e in events if e["name"][:5] == "STEP_"]
  per = {n: collections.Counter() for n in methods}
  for e in events:
    if e["name"].startswith(RUNTIME):
      continue
    owner = next((n for a, b, n in spans if a <= e["ts"] <= b), None)
    if owner is not None:
      per[owner][kind(e["name"])] += e["dur"] / 1e3 / steps
  out = {"model": model, "batch": batch_size, "steps": steps, "methods": {}}
  for n in methods:
    total = sum(per[n].values())
    conv = sum(v for k, v in per[n].items() if k.startswith(CONVOLUTION))
    out["methods"][n] = {
      "wall_ms": wall[n],
      "kernel_ms": round(total, 2),
      "concurrency": round(total / statistics.median(wall[n]), 3),
      "convolution_share": round(conv / total, 4) if total else None,
      "by_kind_ms": {k: round(v, 3) for k, v in per[n].most_common(20)},
    }
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", default="plain,adam,project,ftp")
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--model", default="resnet_small")
  parser.add_argument("--batch", type=int, default=128)
  a = parser.parse_args(argv)
  print(json.dumps(run(tuple(a.methods.split(",")), a.steps, a.model, a.batch), indent=1))


if __name__ == "__main__":
  main()
