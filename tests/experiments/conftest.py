"""Shared fixtures of the experiments tests: the tiny data set and pre-trained checkpoint, built
once, and the tiny config's FT and TPGM runs, trained once."""

from __future__ import annotations

import os

import pytest

from experiments import environment, runner
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


@pytest.fixture(scope="session")
def tiny_runs(tiny_shared, tmp_path_factory):
  """A workdir where the tiny config's FT and TPGM runs are finished (trained once): several
  tests need one of them finished. Copy it into a test's own workdir
  (``shutil.copytree(tiny_runs, tmp_path, dirs_exist_ok=True)``): the runs are then reused
  there, as any finished run of the same configuration is."""
  workdir = tmp_path_factory.mktemp("tiny_runs")
  config = tiny.get_config()
  config.data.data_dir = os.fspath(tiny_shared / "data")
  config.pretrain.cache_dir = os.fspath(tiny_shared / "cache")
  config.methods = ("ft", "tpgm")
  resolved = make_plan(config, workdir)
  runner.execute(environment.setup(resolved, progress=False), resolved)  # no report needed
  return workdir
