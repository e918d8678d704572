"""Step time and compiled memory of TPGM (and its family) against plain optax.

Usage::

    python -m benchmarks.step_overhead [--model resnet_small] [--dtype float32]
        [--batch 128] [--steps 15] [--warmup 3] [--methods plain,project,...]
        [--overrides '{"depth": 14}']

A 100 M-parameter model on the CPU (ViT-B/16 with 14 blocks, 100.7 M parameters; slow,
so a small batch and few rounds)::

    python -m benchmarks.step_overhead --model vit_b16 --overrides '{"depth": 14}'
        --batch 2 --steps 2 --warmup 1

The paper's recipes on a GPU (bfloat16 params and compute)::

    python -m benchmarks.step_overhead --model clip_resnet50 --dtype bfloat16 --batch 256
    python -m benchmarks.step_overhead --model clip_vit_b16 --dtype bfloat16 --batch 128

LoRA (an MLP of frozen dense layers with rank-r adapters; Adam with and without the
merged-update constraint ``tpgm(radii=..., lora=...)``, :func:`run_lora`)::

    python -m benchmarks.step_overhead --lora-rank 8 [--lora-width 512] [--lora-depth 4]

Prints one JSON object. Every figure comes from one run: the step functions are timed round-
robin (one step of each per round, ``--steps`` rounds after ``--warmup``), so slow drifts of
a shared machine hit all of them alike, and each reported time is the median over rounds.
Each round starts one method later than the last (``--fixed-order``: always in the order of
``--methods``), so no method always runs first, or right after the same neighbour. Ratios
divide by the time of the method's baseline (:data:`METHODS`): a jitted SGD-momentum step
(``plain``) on the same model and batch, or Adam (``adam``) for the methods that modify Adam
(SPD, DiGraP: ``digrap_ratio``). ``<method>_paired_ratio`` is the median of the per-round
ratios (method and baseline timed in the same round), ``_paired_ratio_iqr`` their
quartiles (the spread of a ratio within the run) and ``_paired_ratio_ci95`` the 95 %
confidence interval of their median (:func:`median_interval`: distribution-free, from the
order statistics; it narrows as ``--steps`` grows, so enough rounds resolve a ratio that one
round's spread hides).

Model: any preset of ``experiments.models`` (``--model``), on random images of
its default size (32x32 for the CPU presets, 224x224 for the paper ones), with
10 classes (CPU presets) or 1000. The default, ``resnet_small`` (stem conv
3->32, four residual blocks 32/64/128/256 with strides 1/2/2/2, GroupNorm,
global pool, dense 10; ~1.2 M parameters), is the project's CPU benchmark.
``--dtype bfloat16`` stores the params (and so the optimizer state) and feeds
the images in bfloat16, so the model computes in bfloat16; the loss is taken in
float32 and TPGM's radii stay float32.

``project_bf16_anchor`` is ``project`` with ``tpgm(anchor_dtype=jnp.bfloat16)``;
``bf16_anchor_max_abs_error`` (and ``_rel_error``, over the largest parameter)
compares one step of the two from the same params. ``project_only`` is the
projection link alone on fixed updates, a program of its own, and
``project_alone_ratio = (plain + project_only) / plain`` what the step would cost
with the projection run after it as a separate program: the projection's own
arithmetic and memory traffic, unfused (inside the step XLA fuses it with the
optimizer's update, so it can cost less there).

Memory: XLA's ``compiled.memory_analysis()`` of each step, with params and
optimizer state donated as in a real training loop: ``*_argument_bytes``,
``*_output_bytes``, ``*_alias_bytes`` (outputs written into donated arguments),
``*_temp_bytes`` and ``*_total_bytes = argument + output - alias + temp`` (what
the step holds at once). ``*_extra_bytes_per_param`` divides the total's excess
over the method's baseline (its timing baseline; plain SGD for Adam) by the
number of parameters, ``*_extra_state_bytes_per_param`` the optimizer state's
(exact: the arrays' sizes). Keys use ``memory_key`` (``tpgm`` for ``project``).

Traffic: ``*_bytes_accessed`` is XLA's count of the bytes each step's operations read and
write (``compiled.cost_analysis()``); ``memory_gbps`` the bandwidth of a params-sized
``x <- 1.0001 x + y`` timed in the same rounds; ``<method>_traffic_floor_ratio = 1 +
(extra bytes / bandwidth) / baseline time``, what the ratio would be if the method's extra
work were only its extra bytes streamed at that bandwidth: the floor of memory-bound work.
``*_fusions`` and ``*_copies`` count the compiled program's kernels outside fused
computations (``compiled.as_text()``).

The kernel's share: ``<method>_page_faults`` and ``<method>_sys_ms`` are the process's minor
page faults and system (kernel) time during one step (``resource.getrusage``, median over
rounds), and ``malloc_env`` the ``MALLOC_*`` variables of glibc's allocator it ran with. On
XLA:CPU a step's temporary buffers are allocated and freed every step; large ones come from
``mmap`` and go back with ``munmap``, so each step faults their pages in again. Keeping freed
memory in the heap avoids it (docs/benchmarks.md)::

    MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 \
      MALLOC_TOP_PAD_=536870912 python -m benchmarks.step_overhead

The schedule: ``xla_flags`` is the ``XLA_FLAGS`` the run had (for the whole process, e.g.
``--xla_cpu_enable_concurrency_optimized_scheduler=false``, XLA:CPU's memory-optimized
schedule instead of its default), and the ``*_memory_schedule`` methods (plain, projection,
FTP, Adam) compile the same steps with that schedule (:data:`MEMORY_SCHEDULE`, per program)
in the same run, each against ``plain_memory_schedule`` (docs/benchmarks.md, "The
schedule's share").

Apart: ``sgd_only``, ``adam_only``, ``ftp_only``, ``spd_only`` and ``digrap_only`` are the
optimizer's update and its application alone, on a fixed gradient (no forward or backward
pass); ``<method>_alone_ratio = (baseline + method_only - baseline_only) / baseline`` (FTP vs
SGD, SPD and DiGraP vs Adam) is what the step would cost with the method's own optimizer work
run as a program of its own: its arithmetic and memory traffic, unfused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats

import tpgm_jax
from experiments import models

NOT_HEAD = tpgm_jax.path_mask(exclude="head/.*")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def num_classes(model: str) -> int:
  return 10 if models.default_image_size(model) <= 32 else 1000


class Setup:
  """One model, its params, batches and loss, shared by every method's step.

  Every step is ``step(carry, fixed) -> carry``; the carry (params, optimizer
  state, radii) is donated.
  """

  def __init__(
    self, model: str, batch_size: int, dtype: str, overrides: dict[str, Any] | None = None
  ):
    self.classes = num_classes(model)
    self.size = models.default_image_size(model)
    self.dtype = DTYPES[dtype]
    self.model = models.get_model(model, self.classes, **(overrides or {}))
    self.train = self._batch(jax.random.key(1), batch_size)
    self.heldout = self._batch(jax.random.key(2), batch_size)
    init = jax.jit(self.model.init)(jax.random.key(0, impl="rbg"), self.train[0][:1])
    self.params = jax.tree.map(lambda x: x.astype(self.dtype), init["params"])
    self.radii = jax.tree.map(lambda x: jnp.float32(0.05), self.params)
    self.sgd = optax.sgd(1e-2, momentum=0.9, nesterov=True)
    self.adam = optax.adam(1e-4)

  def _batch(self, key, n):
    kx, ky = jax.random.split(key)
    return (
      jax.random.normal(kx, (n, self.size, self.size, 3), jnp.float32).astype(self.dtype),
      jax.random.randint(ky, (n,), 0, self.classes),
    )

  def loss(self, params, batch):
    logits = self.model.apply({"params": params}, batch[0]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

  def _copy(self, tree):
    return jax.tree.map(jnp.copy, tree)

  def optax_step(self, tx: optax.GradientTransformation) -> tuple[Callable, tuple]:
    """A plain optax step with ``tx`` (optimizers and the wrappers FTP, SPD, ...)."""

    def step(carry, batch):
      p, s = carry
      updates, s = tx.update(jax.grad(self.loss)(p, batch), s, p)
      return optax.apply_updates(p, updates), s

    return step, ((self._copy(self.params), tx.init(self.params)), self.train)

  def first_grads(self) -> Any:
    """The gradient of the first training batch at the initial params (computed once)."""
    if not hasattr(self, "_grads"):
      self._grads = jax.jit(jax.grad(self.loss))(self.params, self.train)
    return self._grads

  def update_only(self, tx: optax.GradientTransformation) -> tuple[Callable, tuple]:
    """``tx``'s update and its application alone, on a fixed gradient: what the optimizer
    costs as a program of its own, without the forward and backward pass."""

    def step(carry, grads):
      p, s = carry
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s

    return step, ((self._copy(self.params), tx.init(self.params)), self.first_grads())

  def project_step(self, anchor_dtype: Any = None) -> tuple[Callable, tuple]:
    """SGD followed by the TPGM projection with fixed radii (anchor stored in
    ``anchor_dtype``; None: the params' dtype)."""
    chain = optax.chain(
      self.sgd, tpgm_jax.tpgm(norm="mars", mask=NOT_HEAD, anchor_dtype=anchor_dtype)
    )

    def step(carry, fixed):
      (p, s), (batch, radii) = carry, fixed
      updates, s = chain.update(jax.grad(self.loss)(p, batch), s, p, radii=radii)
      return optax.apply_updates(p, updates), s

    return step, ((self._copy(self.params), chain.init(self.params)), (self.train, self.radii))

  def projection_only(self) -> tuple[Callable, tuple]:
    """The TPGM projection link alone, on fixed updates (the SGD step's first update):
    what the projection costs as a program of its own."""
    tx = tpgm_jax.tpgm(norm="mars", mask=NOT_HEAD)
    updates, _ = self.sgd.update(self.first_grads(), self.sgd.init(self.params), self.params)

    def step(carry, fixed):
      (p, s), (u, radii) = carry, fixed
      u, s = tx.update(u, s, p, radii=radii)
      return optax.apply_updates(p, u), s

    return step, ((self._copy(self.params), tx.init(self.params)), (updates, self.radii))

  def radii_step(self) -> tuple[Callable, tuple]:
    """TPGM at proj_freq=1, max_iters=1 (``trainable_projection``): SGD step, radius update
    on the candidate with a held-out batch, projection with the new radii."""
    chain = optax.chain(
      self.sgd, tpgm_jax.trainable_projection(self.loss, norm="mars", mask=NOT_HEAD)
    )

    def step(carry, fixed):
      (p, s), (batch, held) = carry, fixed
      updates, s = chain.update(
        jax.grad(self.loss)(p, batch), s, p, heldout=jax.tree.map(lambda x: x[None], held)
      )
      return optax.apply_updates(p, updates), s

    return step, ((self._copy(self.params), chain.init(self.params)), (self.train, self.heldout))


@dataclasses.dataclass(frozen=True)
class Method:
  """A timed step: ``build(setup) -> (step, (carry, fixed))``; its ratio divides by the
  ``baseline`` method's time (None: it is a baseline); ``memory_key`` prefixes its memory
  figures in the JSON (default: its name). ``alone``: the two optimizer-only programs
  (:meth:`Setup.update_only`, the method's and its baseline's) whose difference is the
  method's own work run apart from the step (``<name>_alone_ratio``). ``part`` marks such
  a program, a part of a step: no memory excess of its own is reported.
  ``compiler_options``: XLA options its step is compiled with (``jax.stages.Lowered.compile``;
  the ``*_memory_schedule`` methods)."""

  build: Callable[[Setup], tuple[Callable, tuple]]
  baseline: str | None = "plain"
  memory_key: str | None = None
  alone: tuple[str, str] | None = None
  part: bool = False
  compiler_options: dict[str, Any] | None = None


def _ftp(s: Setup) -> optax.GradientTransformation:
  return tpgm_jax.ftp(optax.sgd(1e-2, momentum=0.9, nesterov=True), mask=NOT_HEAD)


def _spd(s: Setup) -> optax.GradientTransformation:
  return tpgm_jax.spd(optax.adam(1e-4), weight_decay=0.5, mask=NOT_HEAD)


def _digrap(s: Setup) -> optax.GradientTransformation:
  return optax.chain(tpgm_jax.digrap(strength_lr=0.05, mask=NOT_HEAD), s.adam)


# XLA:CPU's memory-optimized schedule instead of its default, concurrency-optimized one (which
# runs independent kernels side by side): docs/benchmarks.md, "The schedule's share". The same
# program as XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false; that option
# passed per program leaves the program unchanged.
MEMORY_SCHEDULE = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}

# One entry per timed method; a new method is one more entry.
METHODS: dict[str, Method] = {
  "plain": Method(lambda s: s.optax_step(s.sgd), baseline=None),
  # The plain step again, compiled and run as a program of its own: its ratio is what two
  # identical steps differ by here (the benchmark's own floor of noise).
  "plain_twin": Method(lambda s: s.optax_step(s.sgd)),
  "project": Method(Setup.project_step, memory_key="tpgm"),
  "project_bf16_anchor": Method(
    lambda s: s.project_step(anchor_dtype=jnp.bfloat16), memory_key="tpgm_bf16_anchor"
  ),
  "project_only": Method(Setup.projection_only, baseline=None, part=True),
  "radii_update": Method(Setup.radii_step),
  "adam": Method(lambda s: s.optax_step(s.adam), baseline=None),
  "ftp": Method(lambda s: s.optax_step(_ftp(s)), alone=("ftp_only", "sgd_only")),
  "spd": Method(lambda s: s.optax_step(_spd(s)), baseline="adam", alone=("spd_only", "adam_only")),
  "digrap": Method(
    lambda s: s.optax_step(_digrap(s)), baseline="adam", alone=("digrap_only", "adam_only")
  ),
  "sgd_only": Method(lambda s: s.update_only(s.sgd), baseline=None, part=True),
  "adam_only": Method(lambda s: s.update_only(s.adam), baseline=None, part=True),
  "ftp_only": Method(lambda s: s.update_only(_ftp(s)), baseline=None, part=True),
  "spd_only": Method(lambda s: s.update_only(_spd(s)), baseline=None, part=True),
  "digrap_only": Method(lambda s: s.update_only(_digrap(s)), baseline=None, part=True),
}
# The same steps compiled with the memory-optimized schedule, for the same run: the plain one's
# ratio (to the default-scheduled plain step) is what the default schedule gains for it; the
# others divide by it.
METHODS.update(
  {
    f"{n}_memory_schedule": dataclasses.replace(
      METHODS[n],
      baseline="plain" if n == "plain" else "plain_memory_schedule",
      memory_key=None,
      alone=None,
      compiler_options=MEMORY_SCHEDULE,
    )
    for n in ("plain", "project", "ftp", "adam")
  }
)
DEFAULT_METHODS = (
  "plain",
  "plain_twin",
  "project",
  "project_bf16_anchor",
  "project_only",
  "radii_update",
  "adam",
  "ftp",
  "spd",
  "digrap",
  "sgd_only",
  "adam_only",
  "ftp_only",
  "spd_only",
  "digrap_only",
)


def _kernels(hlo: str) -> dict[str, int]:
  """Counts of the compiled program's fusions and copies outside fused computations (each
  one a kernel of its own), from ``compiled.as_text()``."""
  fusions = copies = 0
  fused = False
  for line in hlo.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      fused = "fused" in line.split("(")[0] or line.startswith("%fused")
    elif not fused:
      fusions += bool(re.search(r"=.* fusion\(", line))
      copies += bool(re.search(r"=.* copy\(", line))
  return {"fusions": fusions, "copies": copies}


def _compile(
  step: Callable, args: tuple, options: dict[str, Any] | None = None
) -> tuple[Any, dict[str, int]]:
  """The compiled step (params and optimizer state donated, as a training loop does; XLA
  ``options``) and XLA's memory analysis of it."""
  compiled = jax.jit(step, donate_argnums=0).lower(*args).compile(compiler_options=options)
  m = compiled.memory_analysis()
  out = {
    "temp_bytes": int(m.temp_size_in_bytes),
    "argument_bytes": int(m.argument_size_in_bytes),
    "output_bytes": int(m.output_size_in_bytes),
    "alias_bytes": int(m.alias_size_in_bytes),
  }
  # What the step holds at once: its arguments, the outputs that do not reuse a donated
  # argument's buffer, and its temporaries.
  out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
  out["total_bytes"] += out["temp_bytes"]
  out["state_bytes"] = int(sum(x.nbytes for x in jax.tree.leaves(args[0][1])))
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list in older jax
  out["bytes_accessed"] = int(cost.get("bytes accessed", 0))
  out.update(_kernels(compiled.as_text()))
  return compiled, out


def _triad(num: int) -> tuple[Callable, tuple]:
  """A memory-bound program over params-sized float32 arrays, ``x <- 1.0001 x + y`` (reads two
  arrays, writes one, in place): its time gives the bandwidth the extra bytes stream at."""
  fn = jax.jit(lambda x, y: 1.0001 * x + y, donate_argnums=0)
  x, y = jnp.ones((num,), jnp.float32), jnp.ones((num,), jnp.float32)
  return fn, (x, y)


def median_interval(x: Any, level: float = 0.95) -> tuple[float, float]:
  """A distribution-free confidence interval of the median of the samples ``x``.

  SciPy's sign-test interval (``scipy.stats.quantile_test(...).confidence_interval``): with
  ``x`` sorted, ``(x[j - 1], x[n - j])`` for the largest ``j`` whose coverage
  ``1 - 2 P(B <= j - 1)``, ``B ~ Binomial(n, 1/2)``, is >= ``level``. With too few samples for
  any (n <= 5 at 95 %; SciPy gives NaN), the interval is ``(min, max)``.

  Args:
    x: the samples (a sequence of numbers, at least one).
    level: the coverage asked for, in (0, 1).

  Returns:
    ``(low, high)``.
  """
  xs = np.asarray(x, np.float64)
  if xs.size == 0 or not 0 < level < 1:
    raise ValueError(f"median_interval needs samples and a level in (0, 1); got {xs.size}, {level}")
  ci = scipy.stats.quantile_test(xs, q=float(np.median(xs)), p=0.5).confidence_interval(level)
  if np.isnan(ci.low) or np.isnan(ci.high):
    return float(xs.min()), float(xs.max())
  return float(ci.low), float(ci.high)


def memory_baseline(name: str) -> str | None:
  """The method whose memory ``name``'s extra bytes are counted from: its timing
  baseline, or plain SGD for a baseline (Adam's moments) other than plain itself."""
  base = METHODS[name].baseline
  return base if base is not None else (None if name == "plain" else "plain")


def run(
  batch_size: int = 128,
  steps: int = 15,
  warmup: int = 3,
  methods: tuple[str, ...] = DEFAULT_METHODS,
  model: str = "resnet_small",
  dtype: str = "float32",
  overrides: dict[str, Any] | None = None,
  rotate: bool = True,
) -> dict:
  """Times ``methods`` on ``model`` (a preset, with attribute ``overrides``); the JSON dict.

  ``rotate``: each round starts one method later than the last (False: every round in the
  order of ``methods``)."""
  unknown = [n for n in methods if n not in METHODS]
  if unknown:
    raise ValueError(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
  if dtype not in DTYPES:
    raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
  setup = Setup(model, batch_size, dtype, overrides)
  fns, carry, fixed, memory = {}, {}, {}, {}
  for n in methods:
    step, (carry[n], fixed[n]) = METHODS[n].build(setup)
    fns[n], memory[n] = _compile(step, (carry[n], fixed[n]), METHODS[n].compiler_options)
  leaves = jax.tree.leaves(setup.params)
  num = int(sum(x.size for x in leaves))
  triad, (tx, ty) = _triad(num)
  times = {n: [] for n in (*methods, "triad")}
  faults = {n: [] for n in methods}
  sys_ms = {n: [] for n in methods}
  for i in range(warmup + steps):
    # Round i starts at method i (rotated order): a method's place in the round (first after
    # the triad, say) then favours no method in particular.
    k = i % len(methods) if rotate else 0
    for n in (*methods[k:], *methods[:k]):
      r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
      carry[n] = jax.block_until_ready(fns[n](carry[n], fixed[n]))
      dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
      if i >= warmup:
        times[n].append(dt * 1e3)
        faults[n].append(r1.ru_minflt - r0.ru_minflt)
        sys_ms[n].append((r1.ru_stime - r0.ru_stime) * 1e3)
    t0 = time.perf_counter()
    tx = jax.block_until_ready(triad(tx, ty))
    if i >= warmup:
      times["triad"].append((time.perf_counter() - t0) * 1e3)
  ms = {n: statistics.median(t) for n, t in times.items()}
  gbps = 3 * 4 * num / (ms["triad"] * 1e6)
  result = {
    "device": jax.devices()[0].device_kind,
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "model": model,
    "dtype": dtype,
    "image_size": setup.size,
    "batch": batch_size,
    "rounds": steps,
    "order": "rotated" if rotate else "fixed",
    "num_params": int(sum(x.size for x in leaves)),
    "param_bytes": int(sum(x.nbytes for x in leaves)),
    "radii_bytes": int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(setup.radii))),
    # Read 2, write 1 params-sized float32 arrays, in the same rounds as the steps.
    "memory_gbps": float(f"{gbps:.4g}"),
    # glibc's malloc settings from the environment (they change the page faults below).
    "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
    # XLA's flags (the CPU scheduler, say: docs/benchmarks.md).
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  for n in methods:
    result[f"{n}_ms"] = round(ms[n], 2)
  for n in methods:
    # The whole process's minor page faults and kernel time during the step (median).
    result[f"{n}_page_faults"] = int(statistics.median(faults[n]))
    result[f"{n}_sys_ms"] = round(statistics.median(sys_ms[n]), 1)
  for n in methods:
    base = METHODS[n].baseline
    if base is not None and base in ms:
      result[f"{n}_ratio"] = round(ms[n] / ms[base], 3)
      # The same ratio round by round (the two steps ran next to each other): its median and
      # quartiles show, within one run, how far the machine moves a ratio.
      paired = np.array(times[n]) / np.array(times[base])
      result[f"{n}_paired_ratio"] = round(float(np.median(paired)), 3)
      result[f"{n}_paired_ratio_iqr"] = [
        round(float(q), 3) for q in np.quantile(paired, [0.25, 0.75])
      ]
      result[f"{n}_paired_ratio_ci95"] = [round(q, 3) for q in median_interval(paired)]
  if "project" in ms and "project_only" in ms:
    # The plain step plus the projection as a program of its own.
    result["project_alone_ratio"] = round((ms["plain"] + ms["project_only"]) / ms["plain"], 3)
  for n in methods:
    key = METHODS[n].memory_key or n
    for field in ("temp", "argument", "output", "alias", "total"):
      result[f"{key}_{field}_bytes"] = memory[n][f"{field}_bytes"]
    result[f"{key}_bytes_accessed"] = memory[n]["bytes_accessed"]
    result[f"{key}_fusions"] = memory[n]["fusions"]
    result[f"{key}_copies"] = memory[n]["copies"]
    base = METHODS[n].baseline
    if base is not None and base in ms:
      # The ratio if the step's extra bytes (XLA's count) streamed at the triad's bandwidth
      # and nothing else changed: the floor of memory-bound extra work.
      extra_s = (memory[n]["bytes_accessed"] - memory[base]["bytes_accessed"]) / (gbps * 1e9)
      result[f"{n}_traffic_floor_ratio"] = round(1 + extra_s / (ms[base] / 1e3), 4)
    alone = METHODS[n].alone
    if alone and base in ms and all(a in ms for a in alone):
      # The step plus the method's own optimizer work as a program of its own.
      result[f"{n}_alone_ratio"] = round((ms[base] + ms[alone[0]] - ms[alone[1]]) / ms[base], 4)
    base = memory_baseline(n)
    if base in memory and not METHODS[n].part:
      extra = memory[n]["total_bytes"] - memory[base]["total_bytes"]
      state = memory[n]["state_bytes"] - memory[base]["state_bytes"]
      result[f"{key}_extra_bytes_per_param"] = round(extra / num, 3)
      result[f"{key}_extra_state_bytes_per_param"] = round(state / num, 3)
  if "project" in methods and "project_bf16_anchor" in methods:
    result.update(_anchor_error(fns, setup))
  return result


def _anchor_error(fns: dict, setup: Setup) -> dict[str, float]:
  """One projection step from the same params, gradient and (zero) momentum with a
  float32 and a bfloat16 anchor: the largest absolute difference of the results, and
  it over the largest parameter value (bfloat16 rounds a value by <= 2^-9 of it)."""
  outs = []
  for n in ("project", "project_bf16_anchor"):
    _, (carry, fixed) = METHODS[n].build(setup)
    outs.append(fns[n](carry, fixed)[0])
  diff = max(
    float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]))
  )
  scale = max(float(jnp.max(jnp.abs(x.astype(jnp.float32)))) for x in jax.tree.leaves(setup.params))
  return {
    "bf16_anchor_max_abs_error": float(f"{diff:.3g}"),
    "bf16_anchor_max_rel_error": float(f"{diff / scale:.3g}"),
  }


# ---------------------------------------------------------------------------- LoRA


LORA_METHODS = ("lora_adam", "lora_tpgm_mars", "lora_tpgm_l2")


def run_lora(
  width: int = 512,
  depth: int = 4,
  rank: int = 8,
  batch_size: int = 128,
  steps: int = 15,
  warmup: int = 3,
  dtype: str = "float32",
) -> dict:
  """Times a LoRA step of an MLP (``depth`` dense layers ``width x width``, frozen base
  kernels, rank-``rank`` adapters trained by Adam) without and with the merged-update
  constraint ``tpgm(radii=..., lora=...)`` (``"mars"``: one ``A @ B`` per adapter and step;
  ``"l2"``: two ``r x r`` Gram matrices), round-robin in one process; the JSON dict."""
  if dtype not in DTYPES:
    raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
  dt = DTYPES[dtype]
  keys = iter(jax.random.split(jax.random.key(0), 3 * depth + 2))
  base = [
    (jax.random.normal(next(keys), (width, width)) / np.sqrt(width)).astype(dt)
    for _ in range(depth)
  ]
  adapters = {
    f"layer{i}": {
      "lora_a": (jax.random.normal(next(keys), (width, rank)) / np.sqrt(width)).astype(dt),
      "lora_b": jnp.zeros((rank, width), dt),
    }
    for i in range(depth)
  }
  x = jax.random.normal(next(keys), (batch_size, width)).astype(dt)
  y = jax.random.normal(next(keys), (batch_size, width)).astype(jnp.float32)
  scale = 2.0
  lora = tpgm_jax.lora_adapters(scale)

  def loss(params, base, x, y):
    h = x
    for i, w in enumerate(base):
      ab = params[f"layer{i}"]
      h = jnp.tanh(h @ w + scale * (h @ ab["lora_a"]) @ ab["lora_b"])
    return jnp.mean(jnp.square(h.astype(jnp.float32) - y))

  txs = {
    "lora_adam": optax.adam(1e-3),
    "lora_tpgm_mars": optax.chain(optax.adam(1e-3), tpgm_jax.tpgm("mars", radii=0.1, lora=lora)),
    "lora_tpgm_l2": optax.chain(optax.adam(1e-3), tpgm_jax.tpgm("l2", radii=0.1, lora=lora)),
  }

  def make_step(tx):
    def step(carry, fixed):
      params, state = carry
      grads = jax.grad(loss)(params, *fixed)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    return step

  fixed = (base, x, y)
  fns, carry, memory = {}, {}, {}
  for n, tx in txs.items():
    carry[n] = (jax.tree.map(jnp.copy, adapters), tx.init(adapters))
    fns[n], memory[n] = _compile(make_step(tx), (carry[n], fixed))
  times = {n: [] for n in txs}
  for i in range(warmup + steps):
    for n in txs:
      t0 = time.perf_counter()
      carry[n] = jax.block_until_ready(fns[n](carry[n], fixed))
      if i >= warmup:
        times[n].append((time.perf_counter() - t0) * 1e3)
  ms = {n: statistics.median(t) for n, t in times.items()}
  result = {
    "device": jax.devices()[0].device_kind,
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "model": f"lora_mlp_{depth}x{width}_r{rank}",
    "dtype": dtype,
    "batch": batch_size,
    "rounds": steps,
    "num_adapter_params": int(sum(v.size for v in jax.tree.leaves(adapters))),
    "merged_flops_per_step": 2 * depth * width * rank * width,
  }
  for n in txs:
    result[f"{n}_ms"] = round(ms[n], 3)
    result[f"{n}_temp_bytes"] = memory[n]["temp_bytes"]
  for n in LORA_METHODS[1:]:
    result[f"{n}_ratio"] = round(ms[n] / ms["lora_adam"], 3)
  return result


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet_small", choices=models.model_names())
  parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=15, help="timed rounds (median taken)")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument(
    "--overrides",
    type=json.loads,
    default=None,
    help="model attributes over the preset's, as JSON, e.g. '{\"depth\": 14}'",
  )
  parser.add_argument(
    "--methods",
    default=",".join(DEFAULT_METHODS),
    help=f"comma-separated, from {', '.join(METHODS)}",
  )
  parser.add_argument(
    "--lora-rank",
    type=int,
    default=0,
    help="if > 0: time a LoRA MLP (--lora-width, --lora-depth) with rank-r adapters instead",
  )
  parser.add_argument(
    "--fixed-order",
    action="store_true",
    help="time every round in the order of --methods (default: each round starts one later)",
  )
  parser.add_argument("--lora-width", type=int, default=512)
  parser.add_argument("--lora-depth", type=int, default=4)
  a = parser.parse_args(argv)
  if a.lora_rank > 0:
    out = run_lora(a.lora_width, a.lora_depth, a.lora_rank, a.batch, a.steps, a.warmup, a.dtype)
  else:
    out = run(
      a.batch,
      a.steps,
      a.warmup,
      tuple(a.methods.split(",")),
      a.model,
      a.dtype,
      a.overrides,
      rotate=not a.fixed_order,
    )
    if a.overrides:
      out["overrides"] = a.overrides
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
