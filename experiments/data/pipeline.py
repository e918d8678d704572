"""Input pipeline: grain batches over the opened splits, for training and evaluation.

The pipeline is a grain ``MapDataset``, so batches keep random access::

  source -> [decode, resize, center crop] -> shuffle (per epoch) -> repeat
         -> [augment: RandomResizedCrop + flip] -> batch -> this process's rows

Batch ``i`` is a pure function of ``(seed, i)`` (grain seeds the shuffle from
``seed + epoch`` and the augmentation from the seed and the example's position
in the stream), so a run resumes from one int, the data position, and the
batches do not depend on the number of worker processes or hosts. A global
batch is split evenly over processes (``process_index``/``process_count`` are
arguments, never read from JAX here). :func:`eval_batches` covers a split
exactly once, padding the last global batch and marking real examples with
``mask``. :func:`iterate` reads ahead in threads and, for splits that are not
held in memory, in grain worker processes (``mp_prefetch``), so decoding and
augmentation overlap the device's work. Batches hold uint8 images; the model
inputs are normalised on the device (:func:`normalize`, inside ``jit``).

:class:`InputOptions` holds the augmentation and loader settings; it is read
from the ``data`` section of an experiment config, where an unknown key is an
error.
"""

from __future__ import annotations

import os

import grain
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments.data import augment, worker
from experiments.data.options import InputOptions
from experiments.data.sources import Split, open_split
from experiments.data.tasks import Task


def normalize(images, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
  """uint8 images -> float32 ``(x / 255 - mean) / std`` (defaults: [-1, 1]), with jax.numpy.

  Called inside the jitted train and eval steps, so that the host sends uint8
  images (4x fewer bytes than float32) and the device normalises them.
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (jnp.asarray(images, jnp.float32) * jnp.float32(1 / 255) - mean) / std


def _local_batch(batch_size: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"bad process_index={process_index} / process_count={process_count}")
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(
      f"global batch {batch_size} is not a positive multiple of {process_count} processes"
    )
  return batch_size // process_count


def _shuffle_seed(seed: int) -> int:
  return seed % 2**32


def _augment_seed(seed: int) -> int:
  return int(np.random.SeedSequence([seed % 2**32, 1]).generate_state(1)[0])


def train_batches(
  split: Split, *, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1
) -> grain.MapDataset:
  """This process's part of every global training batch: element ``i`` is batch ``i``.

  The example stream is the concatenation of epochs, each a permutation of
  the split drawn from ``seed + epoch`` (grain's ``shuffle``); global batch
  ``i`` is its positions ``[i * batch_size, (i + 1) * batch_size)`` (batches
  straddle epochs), so every epoch visits each example once. The augmentation
  of position ``p`` is drawn from a generator seeded by ``(seed, p)``. This
  process gets rows ``[process_index * b, (process_index + 1) * b)`` of each
  global batch, ``b = batch_size // process_count``: ``{"image": uint8 (b, s,
  s, 3), "label": int32 (b,)}``.
  """
  local = _local_batch(batch_size, process_index, process_count)
  if not len(split):
    raise ValueError(f"{split.ref} has no examples to train on")
  stream = split.examples.shuffle(seed=_shuffle_seed(seed)).repeat()
  if split.augmentation is not None:
    stream = stream.random_map(split.augmentation, seed=_augment_seed(seed))
  return stream.batch(local, drop_remainder=True)[process_index::process_count]


def num_eval_batches(num_examples: int, batch_size: int) -> int:
  """Number of global batches :func:`eval_batches` yields."""
  return -(-num_examples // batch_size)


def eval_batches(
  split: Split, *, batch_size: int, process_index: int = 0, process_count: int = 1
) -> grain.MapDataset:
  """Batches covering ``split`` exactly once, in order, across all processes.

  Every batch has the full local size ``batch_size // process_count``; the
  last global batch is padded (with example 0) and ``mask`` (bool) is False
  on padding, so sums over ``mask`` count each example once. Every process
  gets the same number of batches (:func:`num_eval_batches`).
  """
  local = _local_batch(batch_size, process_index, process_count)
  n = len(split)
  padding = num_eval_batches(n, batch_size) * batch_size - n
  parts = [split.examples.map(augment.WithMask(True))]
  if padding:
    parts.append(split.examples[:1].repeat(padding).map(augment.WithMask(False)))
  return grain.MapDataset.concatenate(parts).batch(local)[process_index::process_count]


def iterate(
  batches: grain.MapDataset,
  options: InputOptions = InputOptions(),
  *,
  start: int = 0,
  in_memory: bool = False,
) -> grain.DatasetIterator:
  """An iterator over ``batches[start:]`` that reads ahead while the caller computes.

  ``options.num_threads`` threads read ``options.prefetch`` batches ahead; in
  ``options.workers(in_memory)`` grain worker processes when there are any
  (each reads every ``workers``-th batch; grain interleaves them back in
  order, so the batches are the same for any number of workers). The workers
  ignore SIGTERM and exit with this process (:mod:`experiments.data.worker`).
  Close the iterator (``it.close()``) to stop them early.
  """
  workers = options.workers(in_memory)
  ds = batches[start:] if start else batches
  buffered = options.num_threads if workers else options.prefetch
  ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=options.num_threads, prefetch_buffer_size=buffered)
  )
  if workers:
    if not flags.FLAGS.is_parsed():
      # grain 0.2.18 reads an absl flag when it starts workers (google/grain#1355, fixed
      # upstream): programs that do not parse absl flags get the flags' defaults.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=options.prefetch),
      worker_init_fn=worker.init,
    )
  return iter(ds)


def train_iterator(
  task: Task,
  split: str = "train",
  *,
  batch_size: int,
  seed: int,
  step: int = 0,
  data_dir: str | os.PathLike | None = None,
  process_index: int = 0,
  process_count: int = 1,
  options: InputOptions = InputOptions(),
  augmented: bool = True,
  opened: Split | None = None,
) -> grain.DatasetIterator:
  """Training batches ``step, step + 1, ...`` of split role ``split`` of ``task``
  (:func:`train_batches`); ``augmented=False`` uses the evaluation transform
  (e.g. held-out batches). Pass ``opened`` to reuse an opened :class:`Split`."""
  opened = opened or open_split(task, split, options=options, data_dir=data_dir, train=augmented)
  batches = train_batches(
    opened,
    batch_size=batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
  )
  return iterate(batches, options, start=step, in_memory=opened.in_memory)


def eval_iterator(
  task: Task,
  split: str,
  *,
  batch_size: int,
  data_dir: str | os.PathLike | None = None,
  process_index: int = 0,
  process_count: int = 1,
  options: InputOptions = InputOptions(),
  opened: Split | None = None,
) -> grain.DatasetIterator:
  """:func:`eval_batches` over split role / OOD name ``split`` of ``task``."""
  opened = opened or open_split(task, split, options=options, data_dir=data_dir)
  batches = eval_batches(
    opened, batch_size=batch_size, process_index=process_index, process_count=process_count
  )
  return iterate(batches, options, in_memory=opened.in_memory)
