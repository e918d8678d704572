"""Accuracy on the ID test split, every OOD split and the validation split.

:class:`Evaluator` opens the splits once and evaluates any number of
parameter sets: each process reads its slice of every global batch, the
batches are assembled into global arrays on the mesh, and the correct counts
are summed on device; the host reads one number per split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from experiments import distributed, train
from experiments.data import pipeline

PyTree = Any


class Evaluator:
  """Top-1 accuracy (%) of a model on named splits of a task.

  Args:
    model: the Flax module.
    task: the data task.
    names: split roles or OOD names (default: ``task.eval_splits()``: val, test, OOD).
    batch_size: global evaluation batch size.
    mesh: the device mesh (the batch is split over its ``data`` axis).
    data_dir: TFDS data directory.
  """

  def __init__(self, model: nn.Module, task: pipeline.Task, mesh: Mesh, *,
               names: Sequence[str] | None = None, batch_size: int = 500,
               data_dir: str | None = None):
    self.model, self.task, self.mesh = model, task, mesh
    self.names = tuple(names if names is not None else task.eval_splits())
    self._layout = train.data_layout(batch_size, mesh)
    self.batch_size = batch_size
    self._sources = {n: pipeline.open_source(task, n, data_dir) for n in self.names}
    self._subsets = {n: pipeline.class_subset(task, n, data_dir) for n in self.names}
    self._counts = jax.jit(self._count, static_argnames="subset")

  def _count(self, params, batch, subset):
    logits = self.model.apply({"params": params}, batch["image"])
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
      for local in pipeline.eval_iterator(self.task, name, batch_size=self.batch_size,
                                          source=self._sources[name], **self._layout):
        c, n = self._counts(params, distributed.global_batch(local, self.mesh), subset)
        correct.append(c)
        count.append(n)
      totals[name] = (sum(correct), sum(count))
    fetched = jax.device_get(totals)
    return {name: 100.0 * int(c) / max(int(n), 1) for name, (c, n) in fetched.items()}
