"""Smoke test of ``python -m benchmarks.input_pipeline`` and its procedural JPEG data set."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from benchmarks import input_data, input_pipeline


def test_jpeg_data_set_is_photo_sized(tmp_path):
  builder = input_data.prepare(os.fspath(tmp_path), images=64)
  assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  source = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
  assert len(source) == 64
  sizes = np.array([Image.open(io.BytesIO(source[i]["image"])).size for i in range(64)])
  assert sizes.min() >= 300 and sizes.max() <= 450
  assert 340 < sizes.mean() < 420
  assert Image.open(io.BytesIO(source[0]["image"])).format == "JPEG"
  again = input_data.prepare(os.fspath(tmp_path), images=64)  # reused, not rebuilt
  assert again.data_dir == builder.data_dir


def test_command_prints_only_the_json_of_the_rates_per_worker_count(tmp_path, capsys):
  """One benchmark run through the command line (the JSON it prints is run()'s result)."""
  # Building the data set makes TFDS print; stdout must stay one JSON document.
  input_pipeline.main(
    [
      "--workers",
      "1",
      "--batch",
      "4",
      "--batches",
      "2",
      "--repeats",
      "1",
      "--images",
      "64",
      "--data_dir",
      os.fspath(tmp_path),
    ]
  )
  out = json.loads(capsys.readouterr().out)
  assert set(out["images_per_s"]) == set(out["per_worker_images_per_s"]) == {"1"}
  assert out["images_per_s"]["1"] > 0 and out["scaling_efficiency"] == 1.0
  assert out["image_size"] == 224 and out["transform_images_per_s"] > 0
