"""Tasks: which TFDS splits an experiment trains, selects, tests and pre-trains on.

A :class:`Task` names every split an experiment uses as a :class:`SplitRef`
(TFDS name + TFDS split, with TFDS's slicing syntax, e.g. ``train[:-2000]``):

* ``train``: in-distribution (ID) fine-tuning data;
* ``heldout``: used only to train TPGM's projection radii;
* ``val``: model selection (disjoint from ``heldout``);
* ``test``: ID test; ``ood``: name -> out-of-distribution test split;
* ``pretrain`` (built-in benchmark only): the pre-training data.

:func:`get_task` builds a preset (``shapes``, ``digits``, ``domainnet``, ``imagenet``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence

from experiments.data import digits, render, shapes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Class subset marker: use the classes whose labels occur in the split.
INFER_FROM_LABELS = "infer_from_labels"


@dataclasses.dataclass(frozen=True)
class SplitRef:
  """A TFDS split: data set name (with config) and split.

  E.g. ``("domainnet/real", "train[:-2000]")``.

  ``split`` accepts TFDS's slicing syntax (``train[:80%]``, ``train[-1000:]``).
  TFDS stores the examples of a split in an order shuffled by key hash, so a
  contiguous slice is a class-random sample, and disjoint slices of one split
  give disjoint example sets.
  """

  dataset: str
  split: str

  def __str__(self) -> str:
    return f"{self.dataset}:{self.split}"


@dataclasses.dataclass(frozen=True)
class Task:
  """Everything the experiments need to know about a robust fine-tuning task.

  ``class_subsets`` maps an evaluation name (``"test"`` or an ``ood`` key) to
  the logit indices that set is evaluated on (e.g. ImageNet-A/-R: 200 of the
  1000 ImageNet classes), or to :data:`INFER_FROM_LABELS`; see :func:`class_subset`.
  ``mean``/``std`` are per channel on the [0, 1] scale.  ``builtin_config``
  names the config of the built-in data set (``multidomain_shapes`` or ``real_digits``, the
  splits' data set) to build on first use (None for external datasets).
  ``pretrain_num_classes`` is the size of the pre-training split's label space when it
  differs from ``num_classes``
  (the pre-trained head is never loaded for fine-tuning).
  """

  name: str
  num_classes: int
  image_size: int
  train: SplitRef
  heldout: SplitRef
  val: SplitRef
  test: SplitRef
  ood: Mapping[str, SplitRef]
  pretrain: SplitRef | None = None
  pretrain_num_classes: int | None = None
  class_subsets: Mapping[str, Sequence[int] | str] = dataclasses.field(default_factory=dict)
  mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
  std: tuple[float, float, float] = (0.5, 0.5, 0.5)
  builtin_config: str | None = None

  def eval_splits(self) -> dict[str, SplitRef]:
    """``{"val", "test", *ood}`` -> split, the sets evaluated during/after training."""
    return {"val": self.val, "test": self.test, **self.ood}

  def split(self, name: str) -> SplitRef:
    """A split by role name (``train``, ``heldout``, ``val``, ``test``, ``pretrain``) or OOD key."""
    if name in ("train", "heldout", "val", "test") or (name == "pretrain" and self.pretrain):
      return getattr(self, name)
    if name in self.ood:
      return self.ood[name]
    raise KeyError(f"task {self.name!r} has no split {name!r}")


def _carve(dataset: str, split: str, heldout: int, val: int) -> dict[str, SplitRef]:
  """``train``/``heldout``/``val`` refs: the last ``heldout + val`` records of ``split``
  are set aside (TFDS slices), ``heldout`` before ``val``."""
  if heldout <= 0 or val <= 0:
    raise ValueError("heldout and val sizes must be positive")
  return {
    "train": SplitRef(dataset, f"{split}[:-{heldout + val}]"),
    "heldout": SplitRef(dataset, f"{split}[-{heldout + val}:-{val}]"),
    "val": SplitRef(dataset, f"{split}[-{val}:]"),
  }


def shapes_task(
  config: str = "transfer",
  id_domain: str = "real",
  ood_domains: Sequence[str] | None = None,
) -> Task:
  """The built-in benchmark: fine-tune on ``id_domain``, evaluate on the other domains.

  The fine-tuning head has one logit per label up to the largest of the
  config's ``classes``; the pre-training head one per label up to the largest
  of its ``pretrain_classes`` (the transfer config pre-trains on other classes).
  """
  if config not in shapes.CONFIGS:
    raise ValueError(
      f"unknown multidomain_shapes config {config!r}; known: {sorted(shapes.CONFIGS)}"
    )
  builder_config = shapes.CONFIGS[config]
  if ood_domains is None:
    ood_domains = [d for d in builder_config.domains if d != id_domain]
  ds = f"{shapes.NAME}/{config}"
  return Task(
    name="shapes",
    num_classes=max(builder_config.classes) + 1,
    pretrain_num_classes=max(builder_config.pretrain_classes) + 1,
    image_size=render.IMAGE_SIZE,
    train=SplitRef(ds, f"{id_domain}_train"),
    heldout=SplitRef(ds, f"{id_domain}_heldout"),
    val=SplitRef(ds, f"{id_domain}_val"),
    test=SplitRef(ds, f"{id_domain}_test"),
    ood={d: SplitRef(ds, f"{d}_test") for d in ood_domains},
    pretrain=SplitRef(ds, "pretrain"),
    builtin_config=config,
  )


def digits_task(config: str = "transfer", ood_domains: Sequence[str] = ("mnist",)) -> Task:
  """The real-data benchmark (:mod:`experiments.data.digits`): pre-trained on MNIST digits
  0-4, fine-tuned on scikit-learn's digits; OOD = ``ood_domains`` among MNIST (the default:
  the premise holds there) and four corruptions of the ID test set (FT beats LP on them, see
  docs/experiments.md)."""
  if config not in digits.CONFIGS:
    raise ValueError(f"unknown real_digits config {config!r}; known: {sorted(digits.CONFIGS)}")
  known = ("mnist", *digits.CORRUPTIONS)
  if not ood_domains or any(d not in known for d in ood_domains):
    raise ValueError(f"real_digits ood_domains must be among {known}, got {tuple(ood_domains)}")
  ds = f"{digits.NAME}/{config}"
  return Task(
    name="digits",
    num_classes=10,
    image_size=digits.IMAGE_SIZE,
    train=SplitRef(ds, "train"),
    heldout=SplitRef(ds, "heldout"),
    val=SplitRef(ds, "val"),
    test=SplitRef(ds, "test"),
    ood={d: SplitRef(ds, f"{d}_test") for d in ood_domains},
    pretrain=SplitRef(ds, "pretrain"),
    builtin_config=config,
  )


def domainnet_task(
  id_domain: str = "real",
  ood_domains: Sequence[str] = ("sketch", "painting", "clipart", "infograph"),
  heldout_size: int = 1000,
  val_size: int = 1000,
  image_size: int = 224,
) -> Task:
  """TFDS ``domainnet`` (345 classes).  It has only train/test splits, so heldout
  and val are the last ``heldout_size + val_size`` records of ``<id>:train``."""
  ds = f"domainnet/{id_domain}"
  return Task(
    name="domainnet",
    num_classes=345,
    image_size=image_size,
    **_carve(ds, "train", heldout_size, val_size),
    test=SplitRef(ds, "test"),
    ood={d: SplitRef(f"domainnet/{d}", "test") for d in ood_domains},
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
  )


def imagenet_task(
  heldout_size: int = 10000,
  val_size: int = 10000,
  image_size: int = 224,
  v2_variant: str = "matched-frequency",
) -> Task:
  """TFDS ``imagenet2012`` (ID; test = its ``validation`` split, heldout and val
  carved from the end of ``train``) with OOD ImageNet-V2, -Sketch, -A and -R.

  ImageNet-A/-R cover 200 of the 1000 classes and TFDS does not list them in
  its metadata (their labels are full ImageNet indices), so their subsets are
  :data:`INFER_FROM_LABELS`: the classes occurring in the prepared split.
  Pass an explicit list via ``dataclasses.replace(task, class_subsets=...)``
  to override.
  """
  return Task(
    name="imagenet",
    num_classes=1000,
    image_size=image_size,
    **_carve("imagenet2012", "train", heldout_size, val_size),
    test=SplitRef("imagenet2012", "validation"),
    ood={
      "imagenet_v2": SplitRef(f"imagenet_v2/{v2_variant}", "test"),
      "imagenet_sketch": SplitRef("imagenet_sketch", "test"),
      "imagenet_a": SplitRef("imagenet_a", "test"),
      "imagenet_r": SplitRef("imagenet_r", "test"),
    },
    class_subsets={"imagenet_a": INFER_FROM_LABELS, "imagenet_r": INFER_FROM_LABELS},
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
  )


def first_records(ref: SplitRef, n: int) -> SplitRef:
  """The first ``n`` records of ``ref`` as a TFDS slice (``real_train`` -> ``real_train[:n]``).

  TFDS stores a split shuffled by key hash, so the first ``n`` records are a class-random
  sample, and the slices of smaller ``n`` are nested in those of larger ones.

  Raises:
    ValueError: ``n`` is not a positive integer, or ``ref`` is a slice that does not start at
      the split's first record (its first ``n`` records have no TFDS slice syntax).
  """
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"the number of records must be a positive integer, got {n!r}")
  m = re.fullmatch(r"([^\[\]]+)(?:\[0?:[^\]]*\])?", ref.split)
  if m is None:
    raise ValueError(
      f"cannot take the first {n} records of {ref}: the split must be whole or a slice "
      "from its start (e.g. 'train' or 'train[:-2000]')"
    )
  return SplitRef(ref.dataset, f"{m[1]}[:{n}]")


TASKS: dict[str, Callable[..., Task]] = {
  "shapes": shapes_task,
  "digits": digits_task,
  "domainnet": domainnet_task,
  "imagenet": imagenet_task,
}


def get_task(name: str, **kwargs) -> Task:
  """A preset task by name (``shapes``, ``digits``, ``domainnet``, ``imagenet``); kwargs go to
  the preset."""
  if name not in TASKS:
    raise KeyError(f"unknown task {name!r}; presets: {sorted(TASKS)}")
  return TASKS[name](**kwargs)
