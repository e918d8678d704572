"""``multidomain_shapes``: an offline, procedural, DomainNet-like TFDS dataset.

The images are rendered by :mod:`experiments.data.render` (ten shape classes,
four domains: real, sketch, painting, clipart) and written by TFDS as
``array_record`` files, so they can be read with random access and without
TensorFlow (``builder.as_data_source()`` / ``tfds.data_source``).  Nothing is
downloaded.

Splits (``<d>`` is each domain, see :data:`SPLIT_KINDS`):

* ``pretrain``: all domains mixed (the ``domain`` feature tells which);
* ``<d>_train``: fine-tuning;
* ``<d>_heldout``: used only to train TPGM's projection radii;
* ``<d>_val``: model selection (disjoint from heldout: another RNG stream);
* ``<d>_test``: evaluation.

Each (split kind, domain) cell is rendered from
``np.random.default_rng([seed, split_id, domain_id])`` with balanced classes,
so a config always produces identical bytes.  Bump :attr:`MultidomainShapes.VERSION`
when the rendering changes: TFDS never regenerates a prepared version.

Build it with :func:`prepare` (or ``python -m experiments.data --config default``).
"""

from __future__ import annotations

import dataclasses
import io
from typing import Mapping

import numpy as np
from etils import epath
import tensorflow_datasets as tfds
from PIL import Image

from experiments.data import render

NAME = "multidomain_shapes"
SPLIT_KINDS = ("pretrain", "train", "heldout", "val", "test")
_SPLIT_IDS = {kind: i for i, kind in enumerate(SPLIT_KINDS)}


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Sizes and seed of one variant; sizes are images per domain.

    ``train`` maps a domain to its ``<d>_train`` size (domains not listed get
    ``train_default``).
    """

    seed: int = 0
    domains: tuple[str, ...] = render.DOMAINS
    pretrain: int = 4000
    train: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"real": 3000})
    train_default: int = 1000
    heldout: int = 500
    val: int = 500
    test: int = 500

    def split_sizes(self) -> dict[str, int]:
        """Split name -> number of examples."""
        sizes = {"pretrain": self.pretrain * len(self.domains)}
        for d in self.domains:
            sizes[f"{d}_train"] = self.train.get(d, self.train_default)
            for kind in ("heldout", "val", "test"):
                sizes[f"{d}_{kind}"] = getattr(self, kind)
        return sizes

    def cell_size(self, kind: str, domain: str) -> int:
        """Images of ``domain`` in split kind ``kind`` (pretrain: per domain)."""
        if kind == "train":
            return self.train.get(domain, self.train_default)
        return getattr(self, kind)


CONFIGS = {
    "default": ShapesConfig(
        name="default",
        description="Sized for a ~10 minute end-to-end CPU run.",
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
}


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="png")
    return buf.getvalue()


class MultidomainShapes(tfds.core.GeneratorBasedBuilder):
    """Procedural multi-domain shapes, written as array_record by default."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = list(CONFIGS.values())
    DEFAULT_CONFIG_NAME = "default"

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
            for kind in SPLIT_KINDS[1:]:
                gens[f"{d}_{kind}"] = self._generate_examples(kind, (d,))
        return gens

    def _generate_examples(self, kind: str, domains: tuple[str, ...]):
        config = self.builder_config
        for d in domains:
            n = config.cell_size(kind, d)
            images, labels = render.render_split(config.seed, _SPLIT_IDS[kind], d, n)
            dom = config.domains.index(d)
            for i in range(n):
                yield f"{d}-{i:07d}", {"image": _png(images[i]), "label": int(labels[i]), "domain": dom}


def get_builder(config: str | ShapesConfig = "default", data_dir: str | None = None) -> MultidomainShapes:
    """The builder of ``config`` (a name in :data:`CONFIGS` or a custom ``ShapesConfig``
    with its own unique name) reading/writing under ``data_dir`` (TFDS default if None)."""
    return MultidomainShapes(config=config, data_dir=data_dir)


def prepare(config: str | ShapesConfig = "default", data_dir: str | None = None) -> MultidomainShapes:
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
        "image": np.stack([e["image"] for e in examples]) if examples else np.zeros((0, 32, 32, 3), np.uint8),
        "label": np.array([e["label"] for e in examples], np.int32),
        "domain": np.array([e["domain"] for e in examples], np.int32),
    }
