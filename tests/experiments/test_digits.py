"""The real-data benchmark (real_digits) and the fine-tuning set size (data.train_size)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from experiments import environment, plan
from experiments.configs import default
from experiments.data import digits, tasks

TINY = digits.CONFIGS["tiny_transfer"]


@pytest.fixture(scope="module")
def tiny_splits():
  return digits.make_splits(TINY)


def test_sources_are_the_packages_real_images():
  x, y = digits.load_mnist()
  assert x.shape == (5000, 28, 28) and np.bincount(y).tolist() == [500] * 10
  d, t = digits.load_sklearn_digits()
  assert d.shape == (1797, 8, 8) and d.max() == 255 and set(t.tolist()) == set(range(10))


def test_splits_are_disjoint_sized_and_deterministic(tiny_splits):
  assert {k: len(v[1]) for k, v in tiny_splits.items()} == TINY.split_sizes()
  assert all(v[0].shape[1:] == (16, 16, 3) and v[0].dtype == np.uint8 for v in tiny_splits.values())
  # pre-training on its classes only; the MNIST test set balanced over all ten
  assert set(tiny_splits["pretrain"][1].tolist()) <= set(TINY.pretrain_classes)
  assert np.bincount(tiny_splits["mnist_test"][1], minlength=10).tolist() == [2] * 10
  ids = [tiny_splits[k][0].reshape(len(tiny_splits[k][0]), -1) for k in digits.ID_KINDS]
  rows = {r.tobytes() for part in ids for r in part}
  assert len(rows) == sum(len(p) for p in ids)  # no image in two ID splits
  again = digits.make_splits(TINY)
  for k in tiny_splits:
    np.testing.assert_array_equal(tiny_splits[k][0], again[k][0])
  # each corrupted set is the ID test set at five severities, labels repeated
  for c in digits.CORRUPTIONS:
    np.testing.assert_array_equal(tiny_splits[f"{c}_test"][1], np.tile(tiny_splits["test"][1], 5))


def test_corruptions_against_closed_forms():
  rng = np.random.default_rng(0)
  image = np.zeros((16, 16, 3), np.uint8)
  image[4:12, 6:10] = 200
  x = image.astype(np.float64) / 255
  c = digits.corrupt(image, "contrast", 0.3, rng).astype(np.float64) / 255
  np.testing.assert_allclose(c, (x - x.mean()) * 0.3 + x.mean(), atol=0.5 / 255 + 1e-12)
  b = digits.corrupt(image, "blur", 1.0, rng).astype(np.float64) / 255
  assert abs(b.sum() - x.sum()) < 0.01 * x.sum()  # the mass stays inside the frame
  assert b[8, 5, 0] > 0 and b[8, 8, 0] < x[8, 8, 0]  # it spreads
  flat = np.full((16, 16, 3), 128, np.uint8)
  n = digits.corrupt(flat, "noise", 0.08, np.random.default_rng(1)).astype(np.float64) / 255
  assert abs(n[..., 0].std() - 0.08) < 0.015 and np.all(n[..., 0] == n[..., 2])
  r = digits.corrupt(image, "rotate", 6.0, rng)
  assert r.shape == image.shape and not np.array_equal(r, image)
  with pytest.raises(ValueError, match="unknown corruption 'fog'"):
    digits.corrupt(image, "fog", 1.0, rng)


def test_digits_task_and_its_errors():
  task = tasks.get_task("digits", config="tiny_transfer")
  assert (task.num_classes, task.image_size, task.builtin_config) == (10, 16, "tiny_transfer")
  assert list(task.ood) == ["mnist"]
  every = tasks.get_task("digits", ood_domains=("mnist", *digits.CORRUPTIONS))
  assert list(every.ood) == ["mnist", "noise", "contrast", "blur", "rotate"]
  with pytest.raises(ValueError, match="ood_domains must be among"):
    tasks.get_task("digits", ood_domains=("fog",))
  with pytest.raises(ValueError, match="unknown real_digits config 'nope'"):
    tasks.get_task("digits", config="nope")


def test_the_builder_writes_the_splits(tmp_path, tiny_splits):
  builder = digits.prepare("tiny_transfer", os.fspath(tmp_path))
  source = builder.as_data_source("mnist_test")
  assert len(source) == 20
  np.testing.assert_array_equal(source[0]["image"].shape, (16, 16, 3))
  assert digits.prepare("tiny_transfer", os.fspath(tmp_path)) is not None  # reused, not rebuilt


def test_first_records_slices_from_the_start():
  ref = tasks.SplitRef("d", "train")
  assert tasks.first_records(ref, 10).split == "train[:10]"
  assert tasks.first_records(tasks.SplitRef("d", "train[:-2000]"), 10).split == "train[:10]"
  for bad in ("train[-100:]", "train[10:]", "train[10%:]"):
    with pytest.raises(ValueError, match="slice from its start"):
      tasks.first_records(tasks.SplitRef("d", bad), 10)
  for n in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="positive integer"):
      tasks.first_records(ref, n)


def test_train_size_changes_the_runs_not_the_pre_training():
  config = default.get_config()
  base = (plan.make_plan(config, "w")["ft"].hash, plan.pretrain_key(config))
  config.data.train_size = 0
  assert (plan.make_plan(config, "w")["ft"].hash, plan.pretrain_key(config)) == base
  config.data.train_size = 1000
  assert plan.get_task(config).train.split == "real_train[:1000]"
  assert plan.make_plan(config, "w")["ft"].hash != base[0]
  assert plan.pretrain_key(config) == base[1]
  config.data.train_size = -5
  with pytest.raises(plan.ConfigError, match=r"config.data.train_size=-5: .*positive integer"):
    plan.make_plan(config, "w")


def test_train_size_beyond_the_split_is_an_error_before_training(tiny_config, tmp_path):
  tiny_config.data.train_size = 41  # tiny_transfer has 40 real_train records
  resolved = plan.make_plan(tiny_config, os.fspath(tmp_path))
  with pytest.raises(plan.ConfigError, match="train_size=41 exceeds the 40 records"):
    environment.check_train_size(resolved, plan.get_task(tiny_config))
