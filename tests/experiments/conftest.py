"""Shared fixtures of the experiments tests: the tiny data set and pre-trained checkpoint, built
once."""

from __future__ import annotations

import os

import pytest

from experiments import environment
from experiments.configs import tiny
from experiments.plan import make_plan


@pytest.fixture(scope="session")
def tiny_shared(tmp_path_factory):
  """A directory holding the tiny data set (``data``) and pre-training cache (``cache``).

  (The persistent compilation cache that lets the runs of many tests share their
  compilations is turned on for the whole session: tests/conftest.py.)
  """
  root = tmp_path_factory.mktemp("tiny_shared")
  config = tiny.get_config()
  config.data.data_dir = os.fspath(root / "data")
  config.pretrain.cache_dir = os.fspath(root / "cache")
  environment.setup(make_plan(config, root), progress=False)  # builds the data, pre-trains
  return root


@pytest.fixture
def tiny_config(tiny_shared):
  """``tiny.get_config()`` reading the shared data and pre-trained checkpoint."""
  config = tiny.get_config()
  config.data.data_dir = os.fspath(tiny_shared / "data")
  config.pretrain.cache_dir = os.fspath(tiny_shared / "cache")
  return config
