"""``multidomain_shapes``: an offline, procedural, DomainNet-like TFDS dataset.

The images are rendered by :mod:`experiments.data.render` (thirty shape
classes, four domains: real, sketch, painting, clipart) and written by TFDS as
``array_record`` files, so they can be read with random access and without
TensorFlow (``builder.as_data_source()`` / ``tfds.data_source``).  Nothing is
downloaded.

Splits (``<d>`` is a domain, see :data:`SPLIT_KINDS`):

* ``pretrain``: all domains mixed (the ``domain`` feature tells which), drawn
  from the config's ``pretrain_classes``;
* ``<d>_train``: fine-tuning;
* ``<d>_heldout``: used only to train TPGM's projection radii;
* ``<d>_val``: model selection (disjoint from heldout: another RNG stream);
* ``<d>_test``: evaluation.

The fine-tuning and evaluation splits are drawn from the config's ``classes``.
With ``id_domain`` set, only that domain has train / heldout / val splits (the
others are test-only OOD domains).

Configs:

* ``transfer`` (the benchmark of the main job): pre-training on twenty classes
  in all four domains, fine-tuning on ten OTHER classes in ``real`` only, OOD =
  those ten classes in sketch / painting / clipart. The pre-trained model has
  general shape features but has never seen the target classes, so it does not
  solve the target task; fine-tuning has something to learn in-distribution
  (~20,000 training images, so FT keeps generalising instead of memorising)
  and something to lose out of distribution.
* ``same_classes`` (the first version, ``default`` in 1.0.0, kept as a
  variant): pre-training on the same ten classes in all four domains; its
  pre-trained model is already the best OOD point (docs/experiments.md,
  "Benchmark history").
* ``tiny``: a few dozen images per split, for tests.

Each (split kind, domain) cell is rendered from
``np.random.default_rng([seed, split_id, domain_id])`` with balanced classes,
so a config always produces identical bytes.  Bump :attr:`MultidomainShapes.VERSION`
when the rendering changes: TFDS never regenerates a prepared version.

Build it with :func:`prepare` (or ``python -m experiments.build_data --config transfer``).
"""

from __future__ import annotations

import dataclasses
import io
from typing import Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from experiments.data import render

NAME = "multidomain_shapes"
SPLIT_KINDS = ("pretrain", "train", "heldout", "val", "test")
_SPLIT_IDS = {kind: i for i, kind in enumerate(SPLIT_KINDS)}


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """Sizes, classes and seed of one variant; sizes are images per domain.

  ``train`` maps a domain to its ``<d>_train`` size (domains not listed get
  ``train_default``). ``classes`` and ``pretrain_classes`` are indices into
  :data:`experiments.data.render.CLASS_NAMES`. With ``id_domain`` set, the
  other domains get a test split only.
  """

  seed: int = 0
  domains: tuple[str, ...] = render.DOMAINS
  classes: tuple[int, ...] = render.TARGET_CLASSES
  pretrain_classes: tuple[int, ...] = render.TARGET_CLASSES
  id_domain: str | None = None
  pretrain: int = 4000
  train: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"real": 3000})
  train_default: int = 1000
  heldout: int = 500
  val: int = 500
  test: int = 500

  def kinds(self, domain: str) -> tuple[str, ...]:
    """The split kinds (after ``pretrain``) that ``domain`` has."""
    if self.id_domain is not None and domain != self.id_domain:
      return ("test",)
    return SPLIT_KINDS[1:]

  def split_sizes(self) -> dict[str, int]:
    """Split name -> number of examples."""
    sizes = {"pretrain": self.pretrain * len(self.domains)}
    for d in self.domains:
      for kind in self.kinds(d):
        sizes[f"{d}_{kind}"] = self.cell_size(kind, d)
    return sizes

  def cell_size(self, kind: str, domain: str) -> int:
    """Images of ``domain`` in split kind ``kind`` (pretrain: per domain)."""
    if kind == "train":
      return self.train.get(domain, self.train_default)
    return getattr(self, kind)

  def cell_classes(self, kind: str) -> tuple[int, ...]:
    return self.pretrain_classes if kind == "pretrain" else self.classes


CONFIGS = {
  "transfer": ShapesConfig(
    name="transfer",
    description="Pre-train on 20 classes in 4 domains; fine-tune on 10 other classes in real.",
    pretrain_classes=render.PRETRAIN_CLASSES,
    id_domain="real",
    pretrain=8000,
    train={"real": 20000},
    heldout=1000,
    val=1000,
    test=1000,
  ),
  "same_classes": ShapesConfig(
    name="same_classes",
    description="The first version: pre-training on the fine-tuning classes in all domains.",
  ),
  "tiny": ShapesConfig(
    name="tiny",
    description="A few dozen images per split, for tests.",
    pretrain=40,
    train={},
    train_default=30,
    heldout=20,
    val=20,
    test=20,
  ),
  "tiny_transfer": ShapesConfig(
    name="tiny_transfer",
    description="The transfer benchmark's layout with a few dozen images per split, for tests.",
    pretrain_classes=render.PRETRAIN_CLASSES,
    id_domain="real",
    pretrain=40,
    train={"real": 40},
    heldout=20,
    val=20,
    test=20,
  ),
}


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="png")
  return buf.getvalue()


class MultidomainShapes(tfds.core.GeneratorBasedBuilder):
  """Procedural multi-domain shapes, written as array_record by default."""

  name = NAME
  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
    "1.0.0": "First release.",
    "2.0.0": "Thirty classes; configs transfer and tiny_transfer (pre-training classes "
    "differ from the fine-tuning classes, OOD domains test-only).",
  }
  BUILDER_CONFIGS = list(CONFIGS.values())
  DEFAULT_CONFIG_NAME = "transfer"

  def __init__(self, *, file_format="array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup fails for namespace packages without the optional
    # ``importlib_resources`` backport; the answer is simply this file.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(render.IMAGE_SIZE, render.IMAGE_SIZE, 3)),
          "label": tfds.features.ClassLabel(names=render.CLASS_NAMES),
          "domain": tfds.features.ClassLabel(names=config.domains),
        }
      ),
      supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    gens = {"pretrain": self._generate_examples("pretrain", config.domains)}
    for d in config.domains:
      for kind in config.kinds(d):
        gens[f"{d}_{kind}"] = self._generate_examples(kind, (d,))
    return gens

  def _generate_examples(self, kind: str, domains: tuple[str, ...]):
    config = self.builder_config
    for d in domains:
      n = config.cell_size(kind, d)
      images, labels = render.render_split(
        config.seed, _SPLIT_IDS[kind], d, n, config.cell_classes(kind)
      )
      dom = config.domains.index(d)
      for i in range(n):
        yield f"{d}-{i:07d}", {"image": _png(images[i]), "label": int(labels[i]), "domain": dom}


def get_builder(
  config: str | ShapesConfig = "transfer", data_dir: str | None = None
) -> MultidomainShapes:
  """The builder of ``config`` (a name in :data:`CONFIGS` or a custom ``ShapesConfig``
  with its own unique name) reading/writing under ``data_dir`` (TFDS default if None)."""
  return MultidomainShapes(config=config, data_dir=data_dir)


def prepare(
  config: str | ShapesConfig = "transfer", data_dir: str | None = None
) -> MultidomainShapes:
  """Builds the dataset offline into array_record unless already prepared; returns the builder.

  Never overwrites a prepared dataset.  Concurrent builds into the same
  ``data_dir`` are not supported: build once (e.g. on process 0) first.
  """
  builder = get_builder(config, data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(file_format="array_record")
  return builder


def load_arrays(builder: MultidomainShapes, split: str) -> dict[str, np.ndarray]:
  """A whole split as NumPy arrays: ``image`` uint8 (n,32,32,3), ``label`` and ``domain`` int32."""
  source = builder.as_data_source(split)
  examples = [source[i] for i in range(len(source))]
  return {
    "image": np.stack([e["image"] for e in examples])
    if examples
    else np.zeros((0, 32, 32, 3), np.uint8),
    "label": np.array([e["label"] for e in examples], np.int32),
    "domain": np.array([e["domain"] for e in examples], np.int32),
  }
