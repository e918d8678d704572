"""Step time and compiled memory of TPGM (and its family) against plain optax.

Usage::

    python -m benchmarks.step_overhead [--batch 128] [--steps 15] [--warmup 3]

Prints one JSON object. Every figure comes from one run: the step functions
are timed round-robin (one step of each per round, ``--steps`` rounds after
``--warmup``), so slow drifts of a shared machine hit all of them alike, and
each reported time is the median over rounds. Ratios divide by ``plain_ms``
(a jitted SGD-momentum step on the same model and batch), except
``spd_ratio``, which divides by ``adam_ms`` (SPD wraps Adam).

Model: the project's ``resnet_small`` (stem conv 3->32, four residual blocks
32/64/128/256 with strides 1/2/2/2, GroupNorm, global pool, dense 10; ~1.2 M
parameters), batch of 32x32x3 images. Memory: XLA's
``compiled.memory_analysis()`` of each step, with params and optimizer state
donated as in a real training loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import tpgm_jax
from experiments.models import get_model

NOT_HEAD = lambda path: not path.startswith("head")


def _batch(key, n):
  kx, ky = jax.random.split(key)
  return (jax.random.normal(kx, (n, 32, 32, 3), jnp.float32),
          jax.random.randint(ky, (n,), 0, 10))


def build_steps(batch_size: int, methods: tuple[str, ...]) -> tuple[dict[str, Callable], dict[str, tuple], dict]:
  """Jitted step functions and their initial arguments, one per method."""
  model = get_model("resnet_small", num_classes=10)
  train, heldout = _batch(jax.random.key(1), batch_size), _batch(jax.random.key(2), batch_size)
  params = model.init(jax.random.key(0), train[0][:1])["params"]

  def loss_fn(p, batch):
    logits = model.apply({"params": p}, batch[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

  sgd = optax.sgd(1e-2, momentum=0.9, nesterov=True)
  adam = optax.adam(1e-4)
  proj = tpgm_jax.tpgm(norm="mars", mask=NOT_HEAD)
  trainer = tpgm_jax.radii_trainer(loss_fn, norm="mars", mask=NOT_HEAD, max_iters=1)
  radii = jax.tree.map(lambda x: jnp.float32(0.05), params)

  # Every step is step(carry, fixed) -> carry; the carry is donated.
  def plain(tx):
    def step(carry, batch):
      p, s = carry
      updates, s = tx.update(jax.grad(loss_fn)(p, batch), s, p)
      return optax.apply_updates(p, updates), s
    return step

  def project_step(carry, fixed):
    (p, s), (batch, radii) = carry, fixed
    updates, s = proj_chain.update(jax.grad(loss_fn)(p, batch), s, p, radii=radii)
    return optax.apply_updates(p, updates), s

  def radii_step(carry, fixed):
    # TPGM at proj_freq=1, max_iters=1: SGD step, radius update on the
    # candidate with a held-out batch, projection with the new radii.
    (p, inner_s, proj_s, radii, rstate), (batch, held) = carry, fixed
    updates, inner_s = sgd.update(jax.grad(loss_fn)(p, batch), inner_s, p)
    candidate = optax.apply_updates(p, updates)
    radii, rstate, _ = trainer.update(radii, rstate, candidate, proj_s.anchor,
                                      jax.tree.map(lambda x: x[None], held))
    updates, proj_s = proj.update(updates, proj_s, p, radii=radii)
    return optax.apply_updates(p, updates), inner_s, proj_s, radii, rstate

  proj_chain = optax.chain(sgd, proj)
  steps, args = {}, {}
  copy = lambda t: jax.tree.map(jnp.copy, t)
  for name in methods:
    if name == "plain":
      steps[name], args[name] = plain(sgd), ((copy(params), sgd.init(params)), train)
    elif name == "adam":
      steps[name], args[name] = plain(adam), ((copy(params), adam.init(params)), train)
    elif name == "project":
      steps[name] = project_step
      args[name] = ((copy(params), proj_chain.init(params)), (train, radii))
    elif name == "radii_update":
      steps[name] = radii_step
      args[name] = ((copy(params), sgd.init(params), proj.init(params), copy(radii),
                     trainer.init(radii)), (train, heldout))
    elif name == "ftp":
      tx = tpgm_jax.ftp(optax.sgd(1e-2, momentum=0.9, nesterov=True), mask=NOT_HEAD)
      steps[name], args[name] = plain(tx), ((copy(params), tx.init(params)), train)
    elif name == "spd":
      tx = tpgm_jax.spd(optax.adam(1e-4), weight_decay=0.5, mask=NOT_HEAD)
      steps[name], args[name] = plain(tx), ((copy(params), tx.init(params)), train)
    else:
      raise ValueError(f"unknown method {name!r}")
  info = {"num_params": int(sum(x.size for x in jax.tree.leaves(params))),
          "param_bytes": int(sum(x.nbytes for x in jax.tree.leaves(params))),
          "radii_bytes": int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(radii)))}
  # Donate params and optimizer state (and radii), as a training loop does.
  jitted = {n: jax.jit(f, donate_argnums=0) for n, f in steps.items()}
  return jitted, args, info


def _memory(fn, args) -> dict[str, int]:
  m = fn.lower(*args).compile().memory_analysis()
  return {"temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes)}


def run(batch_size: int = 128, steps: int = 15, warmup: int = 3,
        methods: tuple[str, ...] = ("plain", "project", "radii_update", "adam", "ftp", "spd")) -> dict:
  fns, args, info = build_steps(batch_size, methods)
  memory = {n: _memory(fns[n], args[n]) for n in methods}
  times = {n: [] for n in methods}
  carry = {n: args[n][0] for n in methods}
  for i in range(warmup + steps):
    for n in methods:
      t0 = time.perf_counter()
      carry[n] = jax.block_until_ready(fns[n](carry[n], args[n][1]))
      dt = time.perf_counter() - t0
      if i >= warmup:
        times[n].append(dt * 1e3)
  ms = {n: statistics.median(t) for n, t in times.items()}
  result = {
      "device": jax.devices()[0].device_kind,
      "backend": jax.default_backend(),
      "jax": jax.__version__,
      "batch": batch_size,
      "rounds": steps,
      **info,
  }
  for n in methods:
    result[f"{n}_ms"] = round(ms[n], 2)
  base = {"spd": "adam"}
  for n in methods:
    if n not in ("plain", "adam") and base.get(n, "plain") in ms:
      result[f"{n}_ratio"] = round(ms[n] / ms[base.get(n, "plain")], 3)
  for n in methods:
    key = {"project": "tpgm", "radii_update": "radii_update"}.get(n, n)
    result[f"{key}_temp_bytes"] = memory[n]["temp_bytes"]
    result[f"{key}_argument_bytes"] = memory[n]["argument_bytes"]
  return result


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=15, help="timed rounds (median taken)")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--methods", default="plain,project,radii_update,adam,ftp,spd")
  a = parser.parse_args(argv)
  print(json.dumps(run(a.batch, a.steps, a.warmup, tuple(a.methods.split(","))), indent=1))


if __name__ == "__main__":
  main()
