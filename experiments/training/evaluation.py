"""Accuracy on the ID test split, every OOD split and the validation split.

:class:`Evaluator` opens the splits once and evaluates any number of
parameter sets: each process reads its slice of every global batch (uint8
images, decoded ahead by the grain pipeline), the batches are assembled into
global arrays on the mesh, normalised and classified on device, and the
correct counts are summed there; the host reads one number per split.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from experiments.data import pipeline, sources, tasks
from experiments.data.options import InputOptions
from experiments.training import distributed
from experiments.types import PyTree


class Evaluator:
  """Top-1 accuracy (%) of a model on named splits of a task.

  Args:
    model: the Flax module.
    task: the data task.
    names: split roles or OOD names (default: ``task.eval_splits()``: val, test, OOD).
    batch_size: global evaluation batch size.
    mesh: the device mesh (the batch is split over its ``data`` axis).
    data_dir: TFDS data directory.
    options: the loader and evaluation-transform settings (``config.data``).
  """

  def __init__(
    self,
    model: nn.Module,
    task: tasks.Task,
    mesh: Mesh,
    *,
    names: Sequence[str] | None = None,
    batch_size: int = 500,
    data_dir: str | None = None,
    options: InputOptions = InputOptions(),
  ):
    self.model, self.task, self.mesh, self.options = model, task, mesh, options
    self.names = tuple(names if names is not None else task.eval_splits())
    layout = distributed.data_layout(batch_size, mesh)
    self.batch_size = batch_size
    self._splits = {
      n: sources.open_split(task, n, options=options, data_dir=data_dir) for n in self.names
    }
    self._batches = {
      n: pipeline.eval_batches(s, batch_size=batch_size, **layout) for n, s in self._splits.items()
    }
    self._subsets = {n: sources.class_subset(task, n, data_dir) for n in self.names}
    self._counts = jax.jit(self._count, static_argnames="subset")

  def _count(self, params, batch, subset):
    images = pipeline.normalize(batch["image"], self.task.mean, self.task.std)
    logits = self.model.apply({"params": params}, images)
    if subset is None:
      pred = jnp.argmax(logits, -1)
    else:
      idx = np.asarray(subset)
      pred = jnp.asarray(idx)[jnp.argmax(logits[:, idx], -1)]
    ok = (pred == batch["label"]) & batch["mask"]
    return jnp.sum(ok, dtype=jnp.int32), jnp.sum(batch["mask"], dtype=jnp.int32)

  def __call__(self, params: PyTree) -> dict[str, float]:
    """``{name: accuracy in %}`` for every split."""
    totals = {}
    for name in self.names:
      subset = self._subsets[name]
      subset = None if subset is None else tuple(int(i) for i in subset)
      correct, count = [], []
      batches = pipeline.iterate(
        self._batches[name], self.options, in_memory=self._splits[name].in_memory
      )
      with contextlib.closing(batches):
        for local in batches:
          c, n = self._counts(params, distributed.global_batch(local, self.mesh), subset)
          correct.append(c)
          count.append(n)
      totals[name] = (sum(correct), sum(count))
    fetched = jax.device_get(totals)
    return {name: 100.0 * int(c) / max(int(n), 1) for name, (c, n) in fetched.items()}
