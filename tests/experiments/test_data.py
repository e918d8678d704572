"""Tests of experiments/data: the multidomain_shapes TFDS dataset (the input pipeline:
test_pipeline)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.data import render, shapes, tasks

TINY = shapes.CONFIGS["tiny"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  shapes.prepare("tiny", os.fspath(data_dir))
  return os.fspath(data_dir)


@pytest.fixture(scope="module")
def tiny_builder(tiny_dir):
  return shapes.get_builder("tiny", tiny_dir)


def _all_arrays(builder):
  return {name: shapes.load_arrays(builder, name) for name in builder.info.splits}


# --------------------------------------------------------------------------
# The dataset.


def test_tiny_build_offline_array_record(tiny_builder):
  assert tiny_builder.is_prepared()
  assert tiny_builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  files = os.listdir(tiny_builder.data_dir)
  assert any(".array_record-" in f for f in files)
  assert not any(".tfrecord-" in f for f in files)
  sources = tiny_builder.as_data_source()
  assert {k: len(v) for k, v in sources.items()} == TINY.split_sizes()


def test_tiny_contents(tiny_builder):
  arrays = _all_arrays(tiny_builder)
  for name, arr in arrays.items():
    assert arr["image"].dtype == np.uint8 and arr["image"].shape[1:] == (32, 32, 3), name
    assert arr["label"].min() >= 0 and arr["label"].max() < render.NUM_CLASSES
    if name != "pretrain":
      domain = name.rsplit("_", 1)[0]
      assert set(arr["domain"]) == {TINY.domains.index(domain)}
  pre = arrays["pretrain"]
  assert np.bincount(pre["domain"], minlength=4).tolist() == [TINY.pretrain] * 4
  assert set(pre["label"]) == set(TINY.pretrain_classes) == set(range(10))


def test_transfer_layout_pretrains_on_other_classes(tmp_path):
  config = shapes.CONFIGS["tiny_transfer"]
  builder = shapes.prepare("tiny_transfer", os.fspath(tmp_path))
  arrays = _all_arrays(builder)
  assert set(arrays) == {
    "pretrain",
    "real_train",
    "real_heldout",
    "real_val",
    "real_test",
    "sketch_test",
    "painting_test",
    "clipart_test",
  }
  assert {k: len(v["label"]) for k, v in arrays.items()} == config.split_sizes()
  assert set(arrays["pretrain"]["label"]) == set(render.PRETRAIN_CLASSES)
  for name, arr in arrays.items():
    if name != "pretrain":
      assert set(arr["label"]) == set(render.TARGET_CLASSES), name
  assert not set(render.PRETRAIN_CLASSES) & set(render.TARGET_CLASSES)
  task = tasks.shapes_task("tiny_transfer")
  assert (task.num_classes, task.pretrain_num_classes) == (10, render.NUM_CLASSES)
  assert list(task.ood) == ["sketch", "painting", "clipart"]
  # The full-size transfer config: 20k real training images, OOD domains test-only.
  assert shapes.CONFIGS["transfer"].split_sizes()["real_train"] == 20000
  assert "sketch_train" not in shapes.CONFIGS["transfer"].split_sizes()


def test_every_shape_class_is_drawn_and_distinct():
  masks = [
    np.asarray(fn(*np.meshgrid(np.linspace(-1, 1, 64), np.linspace(1, -1, 64))))
    for fn in render.SHAPE_FNS
  ]
  assert len(masks) == render.NUM_CLASSES == len(render.CLASS_NAMES)
  for name, m in zip(render.CLASS_NAMES, masks):
    assert 0.05 < m.mean() < 0.9, name  # a shape, not empty or full
  for i in range(len(masks)):
    for j in range(i + 1, len(masks)):
      assert np.mean(masks[i] != masks[j]) > 0.02, (render.CLASS_NAMES[i], render.CLASS_NAMES[j])


def test_tfds_data_source_reads_prepared(tiny_dir):
  source = tfds.data_source(
    f"{shapes.NAME}/tiny", split="real_test", data_dir=tiny_dir, download=False
  )
  assert len(source) == TINY.test
  assert source[3]["image"].shape == (32, 32, 3)


def test_prepare_is_deterministic_and_never_overwrites(tiny_builder, tmp_path):
  info = os.path.join(tiny_builder.data_dir, "dataset_info.json")
  stamp = os.stat(info).st_mtime_ns
  again = shapes.prepare("tiny", os.fspath(tiny_builder.data_dir_root))
  assert os.stat(info).st_mtime_ns == stamp
  other = shapes.prepare("tiny", os.fspath(tmp_path))
  first, second = _all_arrays(again), _all_arrays(other)
  for name in first:
    for key in ("image", "label", "domain"):
      np.testing.assert_array_equal(first[name][key], second[name][key])


def test_render_seed_dependence():
  a, la = render.render_split(0, 4, "real", 16)
  b, lb = render.render_split(0, 4, "real", 16)
  c, _ = render.render_split(1, 4, "real", 16)
  d, _ = render.render_split(0, 3, "real", 16)  # another split kind
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(la, lb)
  assert not np.array_equal(a, c) and not np.array_equal(a, d)


def test_render_balanced_and_chunk_independent():
  images, labels = render.render_split(0, 1, "clipart", 300)  # spans two chunks
  assert np.bincount(labels).tolist() == [30] * 10
  head, _ = render.render_split(0, 1, "clipart", 300)
  np.testing.assert_array_equal(images, head)


def test_domains_differ():
  stats = {}
  for d in render.DOMAINS:
    x, _ = render.render_split(0, 4, d, 100)
    x = x.astype(np.float32)
    sat = (x.max(-1) - x.min(-1)).mean()  # colourfulness
    stats[d] = np.array([x.mean(), x.std(), sat])
  assert stats["sketch"][2] < 1.0  # greyscale
  assert stats["clipart"][1] > stats["real"][1] + 10  # flat pale backgrounds and saturated fills
  for i, a in enumerate(render.DOMAINS):
    for b in render.DOMAINS[i + 1 :]:
      assert np.abs(stats[a] - stats[b]).max() > 10, (a, b, stats[a], stats[b])


def _mask_profile(x):
  """Cheap rotation/scale-invariant features of a *real* image: the bright object's
  mask, as area fractions in rings around its centroid (radius / sqrt(area))."""
  v = x.astype(np.float32).max(-1).reshape(len(x), -1)
  thr = 0.5 * (np.percentile(v, 95, axis=1) + np.median(v, axis=1))
  m = (v > thr[:, None]).astype(np.float32).reshape(-1, 32, 32)
  area = m.sum((1, 2)) + 1e-6
  yy, xx = np.mgrid[:32, :32]
  cy, cx = (m * yy).sum((1, 2)) / area, (m * xx).sum((1, 2)) / area
  r = (
    np.hypot(yy[None] - cy[:, None, None], xx[None] - cx[:, None, None])
    / np.sqrt(area)[:, None, None]
  )
  bins = np.clip((r * 8).astype(int), 0, 11)
  return np.stack([(m * (bins == k)).sum((1, 2)) for k in range(12)], axis=1) / area[:, None]


def test_classes_separable_on_real():
  xtr, ytr = render.render_split(0, 1, "real", 500)
  xte, yte = render.render_split(0, 4, "real", 300)
  ftr, fte = _mask_profile(xtr), _mask_profile(xte)
  mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
  ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
  centroids = np.stack([ftr[ytr == c].mean(0) for c in range(10)])
  pred = ((fte[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
  assert (pred == yte).mean() > 0.25  # nearest centroid; chance: 0.10
