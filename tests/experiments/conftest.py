"""Shared fixtures of the experiments tests: the tiny data set and pre-trained checkpoint, built
once."""

from __future__ import annotations

import os

import jax
import pytest

from experiments import environment
from experiments.configs import tiny
from experiments.plan import make_plan


@pytest.fixture(scope="session")
def tiny_shared(tmp_path_factory):
  """A directory holding the tiny data set (``data``) and pre-training cache (``cache``).

  It also turns on JAX's persistent compilation cache in ``xla`` (for this
  process and, through the environment, the subprocesses the tests start):
  the pipeline tests compile the same small steps many times.
  """
  root = tmp_path_factory.mktemp("tiny_shared")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.fspath(root / "xla")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
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
