"""A toy sharded fine-tuning run, shared by test_distributed and its multi-process workers.

As a script it is one of several processes (started by test_distributed)::

  python tests/experiments/_multiprocess_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID OUT_DIR

Each process joins the run, builds a {"data": 4, "model": 2} mesh over all
processes' devices and trains the toy model on its slice of every global
batch. Process 1 gets a SIGTERM after step STOP_SIGNAL_STEP; JAX's preemption
service, asked through PreemptionGuard (orbax's reached_preemption), must make
every process stop at the same later step, where they save a checkpoint to
OUT_DIR/ckpt, restore it and compare. Each process writes
OUT_DIR/result_<id>.json; process 0 also writes the final params to
OUT_DIR/params.npz.
"""

import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np
import optax

import tpgm_jax
from experiments.training import distributed
from experiments.training.checkpointing import Checkpointer, PreemptionGuard

GLOBAL_BATCH = 16
MESH_SHAPE = {"data": 4, "model": 2}
MIN_SIZE = 256  # small enough that the toy kernels are sharded
STOP_SIGNAL_STEP = 3  # process 1 is signalled after this step; all processes stop
MAX_STEPS = 200  # at the step JAX's preemption service picks (a few steps later)
STEP_SECONDS = 0.05  # each step takes at least this long (the service needs a moment)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(64, name="fc1")(x))
    x = nn.gelu(nn.Dense(64, name="fc2")(x))
    return nn.Dense(10, name="head")(x)


MODEL = MLP()
TX = optax.chain(optax.adamw(1e-2), tpgm_jax.tpgm(mask=tpgm_jax.path_mask(exclude=".*head.*")))


def init_state():
  params = MODEL.init(jax.random.key(0), jnp.zeros((1, 32)))
  return {
    "params": params,
    "opt_state": TX.init(params),
    "radii": jax.tree.map(lambda _: jnp.float32(0.5), params),
    "step": jnp.int32(0),
  }


def train_step(state, batch):
  def loss_fn(params):
    logits = MODEL.apply(params, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  updates, opt_state = TX.update(grads, state["opt_state"], state["params"], radii=state["radii"])
  params = optax.apply_updates(state["params"], updates)
  return {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}, loss


def batch_at(step):
  """The global batch of ``step`` (every process can build it; each uses its rows)."""
  rng = np.random.default_rng(step)
  return {
    "x": rng.normal(size=(GLOBAL_BATCH, 32)).astype(np.float32),
    "y": rng.integers(0, 10, size=(GLOBAL_BATCH,)).astype(np.int32),
  }


def compile_run(mesh):
  """(abstract state with shardings, jitted init, jitted step) on ``mesh``."""
  abstract = jax.eval_shape(init_state)
  shardings = distributed.state_sharding(
    abstract, mesh, lambda p, m: distributed.param_sharding(p, m, min_size=MIN_SIZE)
  )
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  init = jax.jit(init_state, out_shardings=shardings)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  step = jax.jit(
    train_step,
    in_shardings=(shardings, distributed.batch_sharding(mesh)),
    out_shardings=(shardings, replicated),
    donate_argnums=0,
  )
  return abstract, init, step


def train(mesh, num_steps):
  """The state and losses after ``num_steps`` steps on ``mesh`` (one process)."""
  _, init, step = compile_run(mesh)
  state, losses = init(), []
  for i in range(1, num_steps + 1):
    state, loss = step(state, distributed.global_batch(batch_at(i), mesh))
    losses.append(float(loss))
  return state, losses


def main(coordinator, num_processes, process_id, out_dir):
  distributed.initialize(coordinator, num_processes, process_id)
  mesh = distributed.make_mesh(MESH_SHAPE)
  rows = distributed.process_slice(GLOBAL_BATCH, mesh)
  abstract, init, step_fn = compile_run(mesh)
  state, losses = init(), []
  ckpt = Checkpointer(os.path.join(out_dir, "ckpt"), save_interval_steps=1000)
  with PreemptionGuard(ckpt) as guard:
    for step in range(1, MAX_STEPS + 1):
      time.sleep(STEP_SECONDS)
      local = {k: v[rows] for k, v in batch_at(step).items()}
      state, loss = step_fn(state, distributed.global_batch(local, mesh))
      losses.append(float(loss))
      if process_id == 1 and step == STOP_SIGNAL_STEP:
        os.kill(os.getpid(), signal.SIGTERM)
      stop = guard.should_stop(step)
      ckpt.save(step, state, force=stop, metadata={"losses": losses})
      if stop:
        break
  ckpt.manager.wait_until_finished()
  restored = ckpt.restore(abstract)
  same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), restored, state)
  ckpt.close()

  from jax.experimental import multihost_utils  # noqa: PLC0415 (after initialize)

  params = multihost_utils.process_allgather(state["params"], tiled=True)
  result = {
    "process_id": process_id,
    "stopped_at": step,
    "losses": losses,
    "rows": [rows.start, rows.stop],
    "devices": jax.device_count(),
    "local_devices": jax.local_device_count(),
    "restored_equal": all(jax.tree.leaves(same)),
    "shardings": sorted({str(x.sharding.spec) for x in jax.tree.leaves(state)}),
  }
  with open(os.path.join(out_dir, f"result_{process_id}.json"), "w") as f:
    json.dump(result, f)
  if process_id == 0:
    np.savez(
      os.path.join(out_dir, "params.npz"), **{"/".join(map(str, k)): v for k, v in _flat(params)}
    )


def _flat(tree):
  return [
    (tuple(jax.tree_util.keystr((k,), simple=True) for k in path), leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
