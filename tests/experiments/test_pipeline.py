"""Tests of the grain input pipeline (experiments/data/pipeline.py).

Batches are checked against independent computations: a stream of epochs is
a permutation per epoch; process slices concatenate to the global batch;
resuming, holding a split in memory and reading with worker processes give
the same bits as random access; evaluation covers a split once.

Real data sets (DomainNet, ImageNet) are exercised two ways, both offline and
without TensorFlow:

* ``tfds.testing.mock_data`` (policy ``USE_CODE``) drives the *real* TFDS
  builders' ``as_data_source`` with random examples. It does not mock
  ``is_prepared`` (patched here), gives every split the same size and cannot
  encode images without TensorFlow (the pipeline reads images encoded), so it
  only covers the carving into TFDS slices.
* Tiny local builders registered under the real names (``skip_registration``)
  write genuine array_record files into ``data_dir``; the real TFDS builders
  then read them, covering the whole read path (variable-size images,
  RandomResizedCrop, resize, label-only reads for class subsets).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import signal
import subprocess
import sys
import time
from unittest import mock

import grain
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from experiments import environment, plan, runner
from experiments.configs import default, domainnet_resnet50, imagenet_vit_b16
from experiments.data import augment, pipeline, shapes, sources, tasks
from experiments.data.options import MAX_AUTO_WORKERS, InputOptions, available_cores
from experiments.training import loop
from tests.experiments.helpers import run_dir

TINY = shapes.CONFIGS["tiny"]
SHAPES = InputOptions(crop_fraction=1.0, num_workers=0)  # the default config's loader


class _Examples:
  """``n`` random 4x4 images; the label of example ``i`` is ``i``."""

  def __init__(self, n, seed=0):
    self.images = np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": np.int32(i)}


def synthetic_split(n, flip=True):
  return sources.Split(
    tasks.SplitRef("synthetic", "train"),
    grain.MapDataset.source(_Examples(n)),
    augment.RandomFlip() if flip else None,
    in_memory=True,
  )


def stack(batches, key):
  return np.concatenate([b[key] for b in batches])


# --------------------------------------------------------------------------
# The training stream.


def test_stream_is_a_permutation_per_epoch():
  n, bs = 37, 8
  batches = pipeline.train_batches(synthetic_split(n), batch_size=bs, seed=5)
  stream = stack([batches[i] for i in range(10)], "label")
  for e in range(2):
    assert sorted(stream[e * n : (e + 1) * n]) == list(range(n))
  assert not np.array_equal(stream[:n], stream[n : 2 * n])  # reshuffled per epoch
  other = pipeline.train_batches(synthetic_split(n), batch_size=bs, seed=6)
  assert not np.array_equal(stream[: 5 * bs], stack([other[i] for i in range(5)], "label"))
  # Each image is its example's, mirrored or not.
  images = _Examples(n).images
  for b in (batches[0], batches[7]):
    for image, label in zip(b["image"], b["label"]):
      assert np.array_equal(image, images[label]) or np.array_equal(image, images[label][:, ::-1])


@settings(max_examples=30, deadline=None)
@given(
  n=st.integers(1, 50),
  local=st.integers(1, 6),
  procs=st.integers(1, 4),
  step=st.integers(0, 30),
  seed=st.integers(0, 2**31),
)
def test_process_slices_partition_global_batch(n, local, procs, step, seed):
  split = synthetic_split(n)
  whole = pipeline.train_batches(split, batch_size=local * procs, seed=seed)[step]
  parts = [
    pipeline.train_batches(
      split, batch_size=local * procs, seed=seed, process_index=p, process_count=procs
    )[step]
    for p in range(procs)
  ]
  for key in ("image", "label"):  # the augmentation does not depend on the layout either
    np.testing.assert_array_equal(stack(parts, key), whole[key])
  assert whole["label"].min() >= 0 and whole["label"].max() < n


@pytest.mark.parametrize("batch_size, index, count", [(6, 0, 4), (8, 2, 2), (0, 0, 1)])
def test_bad_process_layout(batch_size, index, count):
  with pytest.raises(ValueError, match="process"):
    pipeline.train_batches(
      synthetic_split(5), batch_size=batch_size, seed=0, process_index=index, process_count=count
    )


def test_resumed_and_in_memory_streams_are_the_same(tiny_shared):
  task = tasks.get_task("shapes", config="tiny")
  data_dir = os.fspath(tiny_shared / "data")
  options = dataclasses.replace(SHAPES, hflip=True)
  opened = sources.open_split(task, "train", options=options, data_dir=data_dir, train=True)
  assert opened.in_memory and len(opened) == TINY.train_default
  batches = pipeline.train_batches(opened, batch_size=8, seed=3)
  b = batches[0]
  assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.uint8
  assert b["label"].dtype == np.int32
  with contextlib.closing(
    pipeline.train_iterator(task, batch_size=8, seed=3, step=4, options=options, opened=opened)
  ) as it:
    for i in range(4, 9):
      got = next(it)
      for key in ("image", "label"):
        np.testing.assert_array_equal(got[key], batches[i][key])
  # Read from the array_record files (not held in memory): the same batches.
  on_disk = dataclasses.replace(options, cache_max_mb=0)
  opened = sources.open_split(task, "train", options=on_disk, data_dir=data_dir, train=True)
  assert not opened.in_memory
  for i in (0, 5):
    np.testing.assert_array_equal(
      pipeline.train_batches(opened, batch_size=8, seed=3)[i]["image"], batches[i]["image"]
    )


@pytest.mark.parametrize("procs", [1, 2, 4])
def test_eval_covers_split_exactly_once(tiny_shared, procs):
  task = tasks.get_task("shapes", config="tiny")
  data_dir = os.fspath(tiny_shared / "data")
  opened = sources.open_split(task, "sketch", options=SHAPES, data_dir=data_dir)
  bs = 8
  per_proc = []
  for p in range(procs):
    with contextlib.closing(
      pipeline.eval_iterator(
        task,
        "sketch",
        batch_size=bs,
        options=SHAPES,
        opened=opened,
        process_index=p,
        process_count=procs,
      )
    ) as it:
      per_proc.append(list(it))
  counts = {len(batches) for batches in per_proc}
  assert counts == {pipeline.num_eval_batches(len(opened), bs)}
  images, labels = [], []
  for step in range(counts.pop()):
    for p in range(procs):
      b = per_proc[p][step]
      assert b["image"].shape[0] == bs // procs and b["mask"].dtype == bool
      images.append(b["image"][b["mask"]])
      labels.append(b["label"][b["mask"]])
  expected = shapes.load_arrays(shapes.get_builder("tiny", data_dir), "sketch_test")
  assert len(np.concatenate(labels)) == TINY.test
  np.testing.assert_array_equal(np.concatenate(labels), expected["label"])
  np.testing.assert_array_equal(np.concatenate(images), expected["image"])  # at size: identity


def test_normalize_on_device():
  images = np.random.default_rng(0).integers(0, 256, (2, 3, 3, 3), dtype=np.uint8)
  mean, std = tasks.IMAGENET_MEAN, tasks.IMAGENET_STD
  got = jax.jit(lambda x: pipeline.normalize(x, mean, std))(images)
  want = (images / 255.0 - np.array(mean)) / np.array(std)
  assert got.dtype == np.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# Options.


def test_options_from_the_configs():
  assert plan.input_options(default.get_config()) == InputOptions(crop_fraction=1.0)
  for module in (domainnet_resnet50, imagenet_vit_b16):
    options = plan.input_options(module.get_config())
    assert options.hflip and options.random_resized_crop and options.crop_fraction == 0.875
    assert options.crop_scale == (0.08, 1.0)
  config = default.get_config()
  config.data.crop_scale = [0.2, 1]
  assert plan.input_options(config).crop_scale == (0.2, 1.0)


def test_an_unknown_data_key_is_an_error(tmp_path):
  config = default.get_config()
  config.unlock()
  config.data.hfilp = True
  with pytest.raises(ValueError, match=r"unknown key\(s\) in the data section: data\.hfilp"):
    plan.input_options(config)
  with pytest.raises(plan.ConfigError, match=r"data\.hfilp"):
    plan.make_plan(config, tmp_path)  # before anything is built
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
  "field, value, match",
  [
    ("crop_scale", (0.5, 0.1), r"data\.crop_scale=\(0\.5, 0\.1\)"),
    ("crop_scale", (0.5, 2.0), "at most 1"),
    ("crop_ratio", (0.0, 1.0), r"data\.crop_ratio"),
    ("crop_fraction", 1.5, r"data\.crop_fraction=1\.5: expected a fraction"),
    ("interpolation", "nearest", r"data\.interpolation='nearest': expected one of"),
    ("num_workers", -2, r"data\.num_workers"),
    ("prefetch", 0, r"data\.prefetch"),
  ],
)
def test_bad_option_values_name_the_key(field, value, match):
  with pytest.raises(ValueError, match=match):
    InputOptions(**{field: value})


def test_worker_count():
  assert InputOptions(num_workers=3).workers() == 3
  assert InputOptions(num_workers=3).workers(in_memory=True) == 0
  assert InputOptions().workers() == min(available_cores(), MAX_AUTO_WORKERS)


def test_augmentation_is_part_of_the_run_identity():
  config = default.get_config()
  before = (run_dir(config, "w", "ft"), plan.pretrain_key(config))
  config.data.hflip = True
  assert run_dir(config, "w", "ft") != before[0] and plan.pretrain_key(config) != before[1]
  config.data.hflip, config.data.num_workers, config.data.prefetch = False, 4, 8
  assert (run_dir(config, "w", "ft"), plan.pretrain_key(config)) == before  # speed only


# --------------------------------------------------------------------------
# Tasks over real TFDS datasets.


def test_presets_name_real_tfds_datasets():
  for name in ("domainnet", "imagenet"):
    task = tasks.get_task(name)
    for ref in [task.train, task.heldout, task.val, task.test, *task.ood.values()]:
      builder_cls = tfds.builder_cls(ref.dataset.split("/")[0])
      if "/" in ref.dataset:
        assert ref.dataset.split("/")[1] in builder_cls.builder_configs
  imagenet = tasks.get_task("imagenet")
  assert imagenet.test == tasks.SplitRef("imagenet2012", "validation")
  assert imagenet.val == tasks.SplitRef("imagenet2012", "train[-10000:]")
  assert set(imagenet.class_subsets) == {"imagenet_a", "imagenet_r"}


def test_domainnet_carving_with_mock_data():
  """The real ``domainnet`` builder accepts the carved slices (mock_data ignores slices: every
  split has 30 examples; the sizes are checked on prepared files below)."""
  task = tasks.get_task("domainnet", heldout_size=5, val_size=4, image_size=24)
  with (
    tfds.testing.mock_data(num_examples=30, policy=tfds.testing.MockPolicy.USE_CODE),
    mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True),
  ):
    for name in ("train", "heldout", "val", "clipart"):
      assert len(sources.open_data_source(task.split(name))) == 30
  assert [task.train.split, task.heldout.split, task.val.split] == [
    "train[:-9]",
    "train[-9:-4]",
    "train[-4:]",
  ]


def _encode(array, fmt="png"):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt)
  return buf.getvalue()


class _FakeDomainnet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes tiny files with the layout of TFDS ``domainnet/<domain>`` (train/test)."""

  name = "domainnet"
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=d) for d in ("real", "sketch")]

  def _info(self):
    features = {
      "image": tfds.features.Image(shape=(None, None, 3)),
      "label": tfds.features.ClassLabel(num_classes=345),
    }
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(40), "test": self._generate_examples(10)}

  def _generate_examples(self, n):
    rng = np.random.default_rng(n)
    for i in range(n):
      h, w = rng.integers(20, 60, 2)
      yield i, {"image": _encode(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)), "label": i}


class _FakeImagenetA(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes a tiny file with the layout of TFDS ``imagenet_a`` (test, 1000-way labels)."""

  name = "imagenet_a"
  VERSION = tfds.core.Version("0.1.0")

  def _info(self):
    features = {
      "image": tfds.features.Image(encoding_format="jpeg"),
      "label": tfds.features.ClassLabel(num_classes=1000),
      "file_name": tfds.features.Text(),
    }
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    return {"test": self._generate_examples()}

  def _generate_examples(self):
    for i in range(9):
      image = np.full((30, 40, 3), 20 * i, np.uint8)
      yield (
        i,
        {"image": _encode(image, "jpeg"), "label": (3, 17, 999)[i % 3], "file_name": f"{i}.jpg"},
      )


@pytest.fixture(scope="module")
def fake_real_dir(tmp_path_factory):
  data_dir = os.fspath(tmp_path_factory.mktemp("fake_tfds"))
  for config in ("real", "sketch"):
    _FakeDomainnet(
      config=config, data_dir=data_dir, file_format="array_record"
    ).download_and_prepare()
  _FakeImagenetA(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def test_domainnet_task_reads_prepared_files(fake_real_dir):
  task = tasks.get_task(
    "domainnet", ood_domains=("sketch",), heldout_size=5, val_size=5, image_size=16
  )
  options = InputOptions(num_workers=0)
  labels = {}
  for name in ("train", "heldout", "val", "test", "sketch"):
    opened = sources.open_split(task, name, options=options, data_dir=fake_real_dir)
    examples = [opened.examples[i] for i in range(len(opened))]
    assert all(e["image"].shape == (16, 16, 3) and e["image"].dtype == np.uint8 for e in examples)
    labels[name] = {int(e["label"]) for e in examples}
  assert [len(labels[k]) for k in ("train", "heldout", "val", "test")] == [30, 5, 5, 10]
  assert labels["train"] | labels["heldout"] | labels["val"] == set(range(40))  # labels = ids
  with contextlib.closing(
    pipeline.eval_iterator(task, "heldout", batch_size=4, data_dir=fake_real_dir, options=options)
  ) as it:
    assert [int(b["mask"].sum()) for b in it] == [4, 1]


def test_random_resized_crops_with_worker_processes(fake_real_dir):
  """Real-data training batches: the same bits with 0 and 2 worker processes, and when resumed."""
  task = tasks.get_task(
    "domainnet", ood_domains=("sketch",), heldout_size=5, val_size=5, image_size=16
  )
  options = InputOptions(hflip=True, random_resized_crop=True, num_workers=0)
  opened = sources.open_split(task, "train", options=options, data_dir=fake_real_dir, train=True)
  assert not opened.in_memory and isinstance(opened.augmentation, augment.RandomResizedCrop)
  batches = pipeline.train_batches(opened, batch_size=6, seed=1, process_index=1, process_count=2)
  assert batches[0]["image"].shape == (3, 16, 16, 3) and batches[0]["image"].dtype == np.uint8
  workers = dataclasses.replace(options, num_workers=2)
  with contextlib.closing(
    pipeline.train_iterator(
      task,
      batch_size=6,
      seed=1,
      step=3,
      data_dir=fake_real_dir,
      options=workers,
      process_index=1,
      process_count=2,
    )
  ) as it:
    for i in range(3, 9):
      got = next(it)
      for key in ("image", "label"):
        np.testing.assert_array_equal(got[key], batches[i][key], err_msg=f"batch {i} {key}")


def test_class_subset_inferred_from_labels(fake_real_dir):
  task = tasks.get_task("imagenet")
  subset = sources.class_subset(task, "imagenet_a", fake_real_dir)
  np.testing.assert_array_equal(subset, [3, 17, 999])
  assert sources.class_subset(task, "test", fake_real_dir) is None
  logits = np.zeros((2, 1000), np.float32)
  logits[0, 500] = 9.0  # outside the subset: ignored
  logits[0, 17] = 1.0
  logits[1, 999] = 2.0
  np.testing.assert_array_equal(sources.subset_predictions(logits, subset), [17, 999])
  np.testing.assert_array_equal(sources.subset_predictions(logits, None), [500, 999])


def test_not_prepared_error_names_dataset_and_dir(tmp_path):
  task = tasks.get_task("domainnet")
  with pytest.raises(sources.DatasetNotPreparedError) as err:
    sources.open_split(task, "train", data_dir=os.fspath(tmp_path))
  assert "'domainnet/real'" in str(err.value) and os.fspath(tmp_path) in str(err.value)
  with pytest.raises(sources.DatasetNotPreparedError, match="imagenet_v2/matched-frequency"):
    sources.open_split(tasks.get_task("imagenet"), "imagenet_v2", data_dir=os.fspath(tmp_path))


def test_bad_split_is_named(tiny_shared):
  ref = tasks.SplitRef(f"{shapes.NAME}/tiny", "real_train[:-1000]")
  with pytest.raises(ValueError, match=r"has no split 'real_train\[:-1000\]'"):
    sources.open_data_source(ref, os.fspath(tiny_shared / "data"), builtin_config="tiny")


def test_builtin_task_builds_on_first_use(tmp_path):
  task = tasks.get_task("shapes", config="tiny")
  opened = sources.open_split(task, "clipart", options=SHAPES, data_dir=os.fspath(tmp_path))
  assert len(opened) == TINY.test and opened.in_memory
  assert shapes.get_builder("tiny", os.fspath(tmp_path)).is_prepared()


def test_runs_train_with_the_data_section(tiny_config, tmp_path, monkeypatch):
  """``config.data.hflip`` (and the rest of the section) reaches pre-training and fine-tuning."""
  checkpoint = environment.setup(
    plan.make_plan(tiny_config, tmp_path), progress=False
  ).pretrained()  # cached
  tiny_config.data.hflip = True
  seen = []

  class Stop(Exception):  # noqa: N818
    pass

  def capture(setup, workdir):
    seen.append(setup)
    raise Stop  # before training

  monkeypatch.setattr(loop, "train", capture)
  with pytest.raises(Stop):  # another pre-training: hflip changed
    environment.setup(plan.make_plan(tiny_config, tmp_path), progress=False)
  tiny_config.pretrain.checkpoint = str(checkpoint)
  resolved = plan.make_plan(tiny_config, tmp_path)
  env = environment.setup(resolved, progress=False)
  assert env.input_options == dataclasses.replace(SHAPES, hflip=True, num_workers=-1)
  with pytest.raises(Stop):
    runner.run_method(env, resolved, resolved["ft"])
  assert [s.name for s in seen] == ["pretrain", "ft"]
  for setup in seen:  # both read their split through the environment: flipped at random
    setup.data(8, 0).close()
    assert isinstance(env.open(setup.train.split, augmented=True).augmentation, augment.RandomFlip)


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc")
def test_workers_ignore_sigterm_and_exit_with_their_parent(fake_real_dir):
  script = os.path.join(os.path.dirname(__file__), "_pipeline_worker.py")
  proc = subprocess.Popen(
    [sys.executable, script, fake_real_dir],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  try:
    pids = [int(p) for p in proc.stdout.readline().split()[1:]]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    for pid in pids:
      os.kill(pid, signal.SIGTERM)  # e.g. a scheduler signalling the whole process group
    proc.stdin.write("".join(f"{i}\n" for i in range(20)))  # more than the workers buffer
    proc.stdin.flush()
    assert [proc.stdout.readline().strip() for _ in range(20)] == [f"batch {i}" for i in range(20)]
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
      time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "grain workers outlived their parent"
  finally:
    proc.kill()


def test_the_old_train_hflip_key_is_an_error(tiny_config, tmp_path):
  tiny_config.unlock()
  tiny_config.train.hflip = True
  with pytest.raises(plan.ConfigError, match=r"train\.hflip is not read.*config\.data\.hflip"):
    runner.train_and_evaluate(tiny_config.lock(), tmp_path, progress=False)
