"""Image decoding and the reference recipes' augmentation, as grain transformations.

Training (real data): **RandomResizedCrop** -- a box of a random fraction of
the image area (``scale``, default ``(0.08, 1)``) and a random aspect ratio
(log-uniform in ``ratio``, default ``(3/4, 4/3)``) is cropped and resized to
``size x size`` -- then a **horizontal flip** with probability 1/2.
Evaluation (and training without random crops): **resize + center crop** --
the shorter side is resized to ``size / crop_fraction`` (256 for 224 at the
usual 0.875) and the central ``size x size`` crop is kept.

This follows torchvision's ``RandomResizedCrop`` / ``Resize`` + ``CenterCrop``
on PIL images (the recipes of TPGM, FTP and WiSE-FT): 10 attempts to draw a box
that fits, else a central crop with the aspect ratio clamped to ``ratio``;
crop first, then resize with PIL (antialiased when shrinking).

The random choices come from the ``np.random.Generator`` that grain's
``random_map`` passes in, which grain seeds from the pipeline seed and the
element's position in the stream only: the augmentation of an example is a
pure function of ``(seed, step, position in the batch)``, whatever the
number of worker processes, threads or hosts. Everything here is NumPy + PIL
(no JAX), so it runs in grain's worker processes.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

import grain
import numpy as np
from PIL import Image

INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
_ATTEMPTS = 10  # torchvision's number of tries before the central fallback


def decode(image: bytes | np.ndarray) -> Image.Image:
  """An RGB PIL image from encoded bytes (JPEG, PNG, ...) or a uint8 array (h, w[, c])."""
  if isinstance(image, (bytes, bytearray, memoryview)):
    pil = Image.open(io.BytesIO(image))
  else:
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
      array = array[..., 0]
    pil = Image.fromarray(array)
  return pil if pil.mode == "RGB" else pil.convert("RGB")


def crop_box(
  rng: np.random.Generator,
  width: int,
  height: int,
  scale: tuple[float, float] = (0.08, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
  """A RandomResizedCrop box ``(left, top, right, bottom)`` inside a ``width x height`` image.

  Up to 10 times: draw an area ``A = u * width * height`` with ``u`` uniform in
  ``scale`` and an aspect ratio ``r`` (width / height) log-uniform in ``ratio``;
  the box is ``round(sqrt(A r)) x round(sqrt(A / r))``, placed uniformly at
  random, and kept if it fits. Otherwise: the largest central box whose ratio
  is ``width / height`` clamped to ``ratio``.
  """
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(_ATTEMPTS):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  aspect = width / height
  if aspect < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif aspect > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  top, left = (height - h) // 2, (width - w) // 2
  return left, top, left + w, top + h


def resized_crop(
  image: Image.Image,
  box: tuple[int, int, int, int],
  size: int,
  interpolation: str = "bilinear",
  flip: bool = False,
) -> np.ndarray:
  """``box`` of ``image`` resized to ``size x size`` (mirrored left-right if ``flip``): uint8."""
  out = image.crop(box)
  if out.size != (size, size):
    out = out.resize((size, size), INTERPOLATIONS[interpolation])
  if flip:
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(out)


def resize_center_crop(
  image: Image.Image, size: int, crop_fraction: float = 0.875, interpolation: str = "bilinear"
) -> np.ndarray:
  """Resize the shorter side to ``round(size / crop_fraction)``, keep the central ``size`` crop.

  The longer side is scaled by the same factor (truncated, as torchvision's
  ``Resize``); the crop's offset is ``round((side - size) / 2)``.
  """
  width, height = image.size
  short = int(round(size / crop_fraction))
  if width <= height:
    new = (short, int(short * height / width))
  else:
    new = (int(short * width / height), short)
  if new != (width, height):
    image = image.resize(new, INTERPOLATIONS[interpolation])
  left, top = int(round((new[0] - size) / 2)), int(round((new[1] - size) / 2))
  return np.asarray(image.crop((left, top, left + size, top + size)))


def _example(image: np.ndarray, label: Any) -> dict[str, np.ndarray]:
  return {"image": image, "label": np.int32(label)}


@dataclasses.dataclass(frozen=True)
class ResizeCenterCrop(grain.transforms.Map):
  """Decode, resize and center-crop (:func:`resize_center_crop`): the evaluation transform."""

  size: int
  crop_fraction: float = 0.875
  interpolation: str = "bilinear"

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    image = resize_center_crop(
      decode(element["image"]), self.size, self.crop_fraction, self.interpolation
    )
    return _example(image, element["label"])


@dataclasses.dataclass(frozen=True)
class RandomResizedCrop(grain.transforms.RandomMap):
  """Decode, RandomResizedCrop (:func:`crop_box`) to ``size``, and a random flip if ``hflip``."""

  size: int
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  hflip: bool = True
  interpolation: str = "bilinear"

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    image = decode(element["image"])
    box = crop_box(rng, *image.size, self.scale, self.ratio)
    flip = self.hflip and rng.random() < 0.5
    return _example(resized_crop(image, box, self.size, self.interpolation, flip), element["label"])


@dataclasses.dataclass(frozen=True)
class RandomFlip(grain.transforms.RandomMap):
  """Mirror ``image`` (already ``(h, w, 3)`` uint8) left-right with probability 1/2."""

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    image = element["image"]
    if rng.random() < 0.5:
      image = np.ascontiguousarray(image[:, ::-1])
    return _example(image, element["label"])


@dataclasses.dataclass(frozen=True)
class WithMask(grain.transforms.Map):
  """Adds ``mask`` (bool): True for real examples, False for the padding of the last batch."""

  real: bool

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    return {**element, "mask": np.bool_(self.real)}
