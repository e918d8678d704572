"""Helpers shared by the experiments tests."""

from __future__ import annotations

import dataclasses
import os

from experiments import environment, plan
from experiments.training import loop


def subprocess_env(devices: int) -> dict[str, str]:
  """The environment of a subprocess that is one process of a multi-process run on ``devices``
  CPU devices: this session's (its XLA flags, compilation cache), with ``devices``."""
  flag = "--xla_force_host_platform_device_count"
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(flag)]
  return {
    **os.environ,
    "XLA_FLAGS": " ".join([f"{flag}={devices}", *flags]),
    "JAX_PLATFORMS": "cpu",
  }


def run_dir(config, workdir, name):
  """The directory of run ``name`` of ``config`` (its plan's)."""
  return plan.make_plan(plan.with_fields(config, methods=(name,)), workdir)[name].directory


def env_for(config, mesh, workdir="unused"):
  """An environment of ``config`` on ``mesh`` without building anything (no data, no
  pre-training): enough to build train steps."""
  resolved = plan.make_plan(config, os.fspath(workdir))
  task = plan.get_task(config)
  return environment.Environment(
    resolved, task, environment.model_for(config, task), mesh, progress=False
  )


def build_step(config, name, mesh, **replace):
  """The train step of run ``name`` of ``config`` on ``mesh`` (TrainSetup fields replaced)."""
  config = plan.with_fields(config, methods=(name,))
  env = env_for(config, mesh)
  return loop.build_step(dataclasses.replace(env.train_setup(env.plan[name]), **replace))
