"""Opening splits: TFDS array_record data sources, decoded and cached splits, class subsets.

Splits are read with random access from array_record files
(``builder.as_data_source``, no TensorFlow); images stay encoded until a
grain transformation decodes them (:mod:`experiments.data.augment`). Data sets
that TFDS cannot build offline must be prepared beforehand; when one is
missing :class:`DatasetNotPreparedError` names it and the ``data_dir``. The
built-in benchmarks (``multidomain_shapes``, ``real_digits``) are built on first use. Splits small
enough (``InputOptions.cache_max_mb``) are decoded once and held in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from experiments.data import augment, digits, shapes
from experiments.data.options import InputOptions, available_cores
from experiments.data.tasks import INFER_FROM_LABELS, SplitRef, Task


class DatasetNotPreparedError(RuntimeError):
  """A TFDS dataset needed by a task has not been prepared (as array_record) in ``data_dir``."""


def _describe_data_dir(data_dir) -> str:
  return (
    repr(os.fspath(data_dir))
    if data_dir
    else "None (TFDS default: $TFDS_DATA_DIR or ~/tensorflow_datasets)"
  )


#: The built-in data sets (built on first use, nothing downloaded): name -> ``prepare``.
BUILTIN = {shapes.NAME: shapes.prepare, digits.NAME: digits.prepare}


def prepare_builtin(dataset: str, config: str, data_dir: str | os.PathLike | None = None):
  """Builds config ``config`` of the built-in data set of ``dataset`` (``name/config``) unless
  prepared; returns its builder."""
  name = dataset.split("/")[0]
  if name not in BUILTIN:
    raise ValueError(f"{dataset!r} is not a built-in data set ({sorted(BUILTIN)})")
  return BUILTIN[name](config, data_dir)


def open_data_source(
  ref: SplitRef,
  data_dir: str | os.PathLike | None = None,
  *,
  builtin_config: str | None = None,
  decoders: Any = None,
) -> Sequence[dict]:
  """The random-access TFDS data source of ``ref`` (its slice of the split).

  If ``builtin_config`` is set that config of the built-in data set (:data:`BUILTIN`) is
  built when missing; any other dataset must already be prepared, otherwise
  :class:`DatasetNotPreparedError` is raised.
  """
  if builtin_config is not None:
    builder = prepare_builtin(ref.dataset, builtin_config, data_dir)
  else:
    try:
      builder = tfds.builder(ref.dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise DatasetNotPreparedError(
        f"TFDS dataset {ref.dataset!r} is unknown to TFDS and not prepared in "
        f"data_dir={_describe_data_dir(data_dir)}: {e}"
      ) from e
    if not builder.is_prepared():
      raise DatasetNotPreparedError(
        f"TFDS dataset {ref.dataset!r} is not prepared in data_dir={_describe_data_dir(data_dir)} "
        f"(looked for {os.fspath(builder.data_dir)}). Prepare it first in array_record "
        f"format, e.g. `tfds build {ref.dataset} --data_dir=DIR --file_format=array_record` or "
        f"tfds.builder({ref.dataset!r}, data_dir=DIR)"
        ".download_and_prepare(file_format='array_record') (preparing image datasets needs "
        "TensorFlow; some, like imagenet2012, need a manual download)."
      )
  try:
    return builder.as_data_source(ref.split, decoders=decoders)
  except NotImplementedError as e:
    raise DatasetNotPreparedError(
      f"TFDS dataset {ref.dataset!r} in data_dir={_describe_data_dir(data_dir)} is prepared in a "
      f"format without random access; re-prepare it with file_format='array_record'. ({e})"
    ) from e
  except (KeyError, ValueError) as e:
    raise ValueError(
      f"TFDS dataset {ref.dataset!r} has no split {ref.split!r} "
      f"(splits: {sorted(builder.info.splits)}): {e}"
    ) from e


_ENCODED_IMAGES = {"image": tfds.decode.SkipDecoding()}


class _Arrays:
  """A split held in memory: ``{"image": uint8 (h, w, 3), "label": int32}`` by index."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": self.images[index], "label": self.labels[index]}


def _decode_all(examples: grain.MapDataset, image_size: int, threads: int) -> _Arrays:
  """Every example of ``examples`` (uint8 images at their final size) as arrays."""
  images = np.zeros((len(examples), image_size, image_size, 3), np.uint8)
  labels = np.zeros((len(examples),), np.int32)
  chunk = 256
  read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
  with contextlib.closing(iter(examples.batch(chunk).to_iter_dataset(read))) as batches:
    for i, batch in enumerate(batches):
      images[i * chunk : i * chunk + len(batch["label"])] = batch["image"]
      labels[i * chunk : i * chunk + len(batch["label"])] = batch["label"]
  return _Arrays(images, labels)


@dataclasses.dataclass(frozen=True)
class Split:
  """An opened split: its examples as a grain ``MapDataset`` and the random augmentation.

  Attributes:
    ref: the TFDS split.
    examples: ``examples[i]`` is example ``i`` of the split after the
      deterministic stage: ``{"image": uint8 (s, s, 3), "label": int32}``, or
      the TFDS example with its image still encoded when ``augmentation``
      crops at random.
    augmentation: a grain ``RandomMap`` applied to ``examples`` in the
      training stream (None: none).
    in_memory: ``examples`` are arrays in memory (read in this process).
  """

  ref: SplitRef
  examples: grain.MapDataset
  augmentation: grain.transforms.RandomMap | None
  in_memory: bool

  def __len__(self) -> int:
    return len(self.examples)


def open_split(
  task: Task,
  name: str,
  *,
  options: InputOptions = InputOptions(),
  data_dir: str | os.PathLike | None = None,
  train: bool = False,
) -> Split:
  """Split role / OOD name ``name`` of ``task``, with the training (``train=True``) or the
  evaluation transformation of ``options``.

  Without random crops, the resized examples of a split small enough
  (``options.cache_max_mb``) are decoded once and held in memory.
  """
  ref = task.split(name)
  source = open_data_source(
    ref, data_dir, builtin_config=task.builtin_config, decoders=_ENCODED_IMAGES
  )
  size = task.image_size
  examples = grain.MapDataset.source(source)
  if train and options.random_resized_crop:
    return Split(
      ref,
      examples,
      augment.RandomResizedCrop(
        size, options.crop_scale, options.crop_ratio, options.hflip, options.interpolation
      ),
      False,
    )
  examples = examples.map(
    augment.ResizeCenterCrop(size, options.crop_fraction, options.interpolation)
  )
  flip = augment.RandomFlip() if train and options.hflip else None
  if len(examples) * size * size * 3 > options.cache_max_mb * 2**20:
    return Split(ref, examples, flip, False)
  arrays = _decode_all(examples, size, max(options.num_threads, available_cores()))
  logging.info("%s: %d examples decoded and held in memory", ref, len(arrays))
  return Split(ref, grain.MapDataset.source(arrays), flip, True)


def infer_class_subset(
  ref: SplitRef, data_dir=None, *, builtin_config: str | None = None
) -> np.ndarray:
  """Sorted distinct labels of ``ref`` (reads labels only, images stay encoded)."""
  source = open_data_source(ref, data_dir, builtin_config=builtin_config, decoders=_ENCODED_IMAGES)
  return np.unique(np.array([int(source[r]["label"]) for r in range(len(source))], np.int64))


def class_subset(task: Task, eval_name: str, data_dir=None) -> np.ndarray | None:
  """Logit indices ``eval_name`` is evaluated on, or None for all classes."""
  subset = task.class_subsets.get(eval_name)
  if subset is None:
    return None
  if isinstance(subset, str):
    if subset != INFER_FROM_LABELS:
      raise ValueError(f"unknown class subset marker {subset!r}")
    return infer_class_subset(task.split(eval_name), data_dir, builtin_config=task.builtin_config)
  return np.asarray(subset, np.int64)


def subset_predictions(logits, subset: np.ndarray | None):
  """Predicted labels (in the full label space) with logits restricted to ``subset``."""
  if subset is None:
    return logits.argmax(-1)
  return np.asarray(subset)[np.asarray(logits[..., np.asarray(subset)].argmax(-1))]
