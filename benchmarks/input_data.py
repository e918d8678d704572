"""``input_benchmark_jpegs``: procedural photo-like JPEGs of ImageNet-like size, as a TFDS data set.

The input benchmark (:mod:`benchmarks.input_pipeline`) reads it like a real
data set: array_record files written by TFDS, read through
``builder.as_data_source``. Nothing is downloaded. Each image has sides drawn
in 300-450 (a quarter portrait; ~400 x 350 on average, like ImageNet), a
smooth colour gradient, a dozen filled shapes and sensor-like noise, and is
stored as a quality-90 JPEG (~50 KB). The builder lives in its own module
so that grain's worker processes import it by name.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, ImageDraw

from experiments.data import tasks

NAME = "input_benchmark_jpegs"
IMAGE_SIZE = 224
NUM_CLASSES = 100


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A photo-like uint8 RGB image: a smooth colour gradient, a dozen shapes, sensor noise."""
  corners = rng.uniform(0, 255, (2, 2, 3))
  y = np.linspace(0, 1, height)[:, None, None]
  x = np.linspace(0, 1, width)[None, :, None]
  base = (
    corners[0, 0] * (1 - y) * (1 - x)
    + corners[0, 1] * (1 - y) * x
    + corners[1, 0] * y * (1 - x)
    + corners[1, 1] * y * x
  )
  image = Image.fromarray(base.astype(np.uint8))
  draw = ImageDraw.Draw(image)
  for _ in range(int(rng.integers(8, 16))):
    x0, x1 = sorted(rng.integers(0, width, 2))
    y0, y1 = sorted(rng.integers(0, height, 2))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    shape = (draw.ellipse, draw.rectangle)[int(rng.integers(2))]
    shape((int(x0), int(y0), int(x1), int(y1)), fill=colour)
  pixels = np.asarray(image, np.float32) + rng.normal(0, 12, (height, width, 3))
  return np.clip(pixels, 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="jpeg", quality=quality)
  return buf.getvalue()


class InputBenchmarkJpegs(tfds.core.GeneratorBasedBuilder):
  """Procedural photo-like JPEGs of ImageNet-like size (one ``train`` split), for benchmarks."""

  name = NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name=str(n), description=f"{n} images") for n in (64, 512)
  ]
  DEFAULT_CONFIG_NAME = "512"

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup needs the optional ``importlib_resources`` backport here.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples(int(self.builder_config.name))}

  def _generate_examples(self, n: int):
    rng = np.random.default_rng(0)
    for i in range(n):
      height, width = int(rng.integers(300, 401)), int(rng.integers(350, 451))
      if rng.random() < 0.25:  # some portrait images
        height, width = width, height
      yield (
        i,
        {"image": jpeg(photo_like(rng, height, width)), "label": int(rng.integers(NUM_CLASSES))},
      )


def benchmark_task(images: int = 512) -> tasks.Task:
  ref = tasks.SplitRef(f"{NAME}/{images}", "train")
  return tasks.Task(
    name="input_benchmark",
    num_classes=NUM_CLASSES,
    image_size=IMAGE_SIZE,
    train=ref,
    heldout=ref,
    val=ref,
    test=ref,
    ood={},
  )


def prepare(data_dir: str, images: int = 512) -> tfds.core.DatasetBuilder:
  """Builds the data set (array_record) in ``data_dir`` unless it is there."""
  builder = InputBenchmarkJpegs(config=str(images), data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    builder.download_and_prepare()
  return builder
