"""Input options: the augmentation and loader settings of a config's ``data`` section."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from experiments.data import augment

#: At most this many grain worker processes when ``num_workers=-1`` (one per core).
MAX_AUTO_WORKERS = 32


def available_cores() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class InputOptions:
  """Augmentation and loader settings (the ``data`` section of a config, see :meth:`from_config`).

  Attributes:
    hflip: training images are mirrored left-right with probability 1/2.
    random_resized_crop: train on RandomResizedCrop boxes (real data);
      otherwise training images are resized and center-cropped like
      evaluation images.
    crop_scale: RandomResizedCrop's range of the box area, as a fraction of
      the image.
    crop_ratio: RandomResizedCrop's range of the box aspect ratio (w / h).
    crop_fraction: evaluation (and training without random crops) resizes the
      shorter side to ``image_size / crop_fraction`` and keeps the central
      ``image_size`` crop (0.875: 256 -> 224; 1.0: resize to ``image_size``).
    interpolation: ``"bilinear"`` or ``"bicubic"`` (PIL, antialiased).
    num_workers: grain worker processes decoding and augmenting batches
      (``mp_prefetch``); 0 reads in this process; -1: one per available core
      (at most :data:`MAX_AUTO_WORKERS`). Splits held in memory are always
      read in this process.
    num_threads: threads reading batches in each worker (or in this process).
    prefetch: batches read ahead by each worker (or by this process).
    cache_max_mb: a split whose images at their final size (no random crop)
      take at most this many MiB is decoded once and held in memory as uint8
      arrays (the built-in benchmark); 0 never.
  """

  hflip: bool = False
  random_resized_crop: bool = False
  crop_scale: tuple[float, float] = (0.08, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  crop_fraction: float = 0.875
  interpolation: str = "bilinear"
  num_workers: int = -1
  num_threads: int = 1
  prefetch: int = 2
  cache_max_mb: int = 256

  #: The fields that change the batches (the others only change how fast they come).
  AUGMENTATION = (
    "hflip",
    "random_resized_crop",
    "crop_scale",
    "crop_ratio",
    "crop_fraction",
    "interpolation",
  )

  def __post_init__(self):
    def bad(name, expected):
      raise ValueError(f"data.{name}={getattr(self, name)!r}: expected {expected}")

    for name in ("crop_scale", "crop_ratio"):
      lo, hi = getattr(self, name)
      if not 0 < lo <= hi:
        bad(name, "a pair (low, high) with 0 < low <= high")
    if self.crop_scale[1] > 1:
      bad("crop_scale", "fractions of the image area, at most 1")
    if not 0 < self.crop_fraction <= 1:
      bad("crop_fraction", "a fraction in (0, 1]")
    if self.interpolation not in augment.INTERPOLATIONS:
      bad("interpolation", f"one of {sorted(augment.INTERPOLATIONS)}")
    if self.num_workers < -1:
      bad("num_workers", ">= 0, or -1 for one per core")
    if self.num_threads < 1 or self.prefetch < 1:
      bad("num_threads" if self.num_threads < 1 else "prefetch", ">= 1")
    if self.cache_max_mb < 0:
      bad("cache_max_mb", ">= 0")

  @classmethod
  def from_config(
    cls, section: Mapping[str, Any], *, read_elsewhere: Sequence[str] = ()
  ) -> InputOptions:
    """The options set in a config section (``config.data``); missing keys keep their defaults.

    Args:
      section: a mapping (e.g. an ``ml_collections.ConfigDict``).
      read_elsewhere: keys of the section that other code reads (e.g. ``task``).

    Raises:
      ValueError: a key that is neither an option nor in ``read_elsewhere``
        (nothing would read it), or a bad value; the message names the key.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - fields - set(read_elsewhere))
    if unknown:
      raise ValueError(
        f"unknown key(s) in the data section: {', '.join(f'data.{k}' for k in unknown)} "
        f"(nothing reads them); the input options are {sorted(fields)}, other keys "
        f"{sorted(read_elsewhere)}"
      )
    values = {k: section[k] for k in fields if k in section}
    for k in ("crop_scale", "crop_ratio"):
      if k in values:
        values[k] = tuple(float(x) for x in values[k])
    return cls(**values)

  def augmentation(self) -> dict[str, Any]:
    """The settings that change the batches, as a JSON-able dict (for run identities)."""
    return {k: getattr(self, k) for k in self.AUGMENTATION}

  def workers(self, in_memory: bool = False) -> int:
    """How many grain worker processes read a split (0: this process)."""
    if in_memory:
      return 0
    if self.num_workers >= 0:
      return self.num_workers
    return min(available_cores(), MAX_AUTO_WORKERS)
