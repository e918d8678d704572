"""Pre-training on the task's pre-training split, cached by configuration.

The default pre-trained checkpoint of a configuration is
``<cache_dir>/pretrained/<model>-<data>-<hash>/params``, where the hash covers
everything that determines it (model, data, ``config.pretrain``, seed). It is
built on first use by the same train loop as fine-tuning (so an interrupted
pre-training resumes), reused afterwards and never overwritten. A
``config.pretrain.checkpoint`` path replaces it (it is then never built).

Command line::

  python -m experiments.pretrain [--workdir runs] [--config experiments/configs/default.py]
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys

import jax
from etils import epath
from ml_collections import ConfigDict

from experiments import train, weights
from experiments.data import pipeline, shapes

PRETRAIN_DEFAULTS = dict(split="pretrain", log_every=25, checkpoint_every=100, max_to_keep=1)


def data_dir(config: ConfigDict, workdir: str | os.PathLike) -> str | None:
  """``config.data.data_dir``; when empty, ``<workdir>/data`` for the built-in benchmark and
  TFDS's default (``None``) for datasets prepared beforehand."""
  if config.data.data_dir:
    return config.data.data_dir
  return os.fspath(epath.Path(workdir) / "data") if get_task(config).builtin_config else None


def get_task(config: ConfigDict) -> pipeline.Task:
  """The data task of ``config``; ``config.model.input_mean`` / ``input_std`` (the input
  normalisation the pre-trained weights expect, e.g. CLIP's), when set, replace the task's."""
  task = pipeline.get_task(config.data.task, **config.data.task_kwargs.to_dict())
  mean, std = config.model.get("input_mean"), config.model.get("input_std")
  if mean is None and std is None:
    return task
  if not (mean is not None and std is not None and len(mean) == len(std) == 3
          and all(s > 0 for s in std)):
    raise ValueError("config.model.input_mean and input_std must both be set, 3 values each "
                     f"(std > 0), got {mean} and {std}")
  return dataclasses.replace(task, mean=tuple(map(float, mean)), std=tuple(map(float, std)))


#: Keys of ``config.data`` read here and by the evaluator rather than by pipeline.InputOptions.
DATA_KEYS = ("task", "task_kwargs", "data_dir", "eval_batch_size")


def input_options(config: ConfigDict) -> pipeline.InputOptions:
  """The augmentation and loader settings of ``config.data``; an unknown key is an error."""
  return pipeline.InputOptions.from_config(config.data, read_elsewhere=DATA_KEYS)


def data_identity(config: ConfigDict) -> dict:
  """What in ``config.data`` determines the training batches (not paths, not loader speed)."""
  return {"task": config.data.task, "task_kwargs": config.data.task_kwargs.to_dict(),
          **input_options(config).augmentation()}


def get_model(config: ConfigDict, task: pipeline.Task, *, pretraining: bool = False):
  """The model of ``config`` for ``task`` (the pre-training label space if ``pretraining``).

  Raises:
    ValueError: the ``head`` group is constrained (kept near its initial value) while the
      head is freshly initialised: only a zero-shot head has a meaningful initial value.
  """
  from experiments import models  # noqa: PLC0415 (flax import kept out of config loading)
  overrides = config.model.overrides.to_dict()
  if pretraining:
    overrides.pop("zero_shot_head", None)
    classes = task.pretrain_num_classes or task.num_classes
    return models.get_model(config.model.name, classes, **overrides)
  if "head" in config.train.get("constrained", ()) and not overrides.get("zero_shot_head"):
    raise ValueError(
        "config.train.constrained includes the 'head' group, but the head is freshly "
        "initialised: set config.model.overrides.zero_shot_head to the .npy file of class text "
        "embeddings, or constrain only the backbone (--config.train.constrained=backbone)")
  return models.get_model(config.model.name, task.num_classes, **overrides)


def prepare_data(config: ConfigDict, workdir: str | os.PathLike) -> None:
  """Builds the built-in benchmark on process 0 if it is missing, then syncs processes."""
  task = get_task(config)
  if task.builtin_config is not None and jax.process_index() == 0:
    shapes.prepare(task.builtin_config, data_dir(config, workdir))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices("prepare_data")


def cache_key(config: ConfigDict) -> str:
  """``<model>-<data>-<hash>`` naming the pre-trained checkpoint of ``config``."""
  section = {k: v for k, v in config.pretrain.to_dict().items()
             if k not in ("checkpoint", "cache_dir", "seed")}
  identity = {"model": config.model.to_dict(), "data": data_identity(config),
              "pretrain": section, "seed": pretrain_seed(config)}
  data = "_".join([config.data.task, *map(str, config.data.task_kwargs.to_dict().values())])
  return f"{config.model.name}-{data}-{train.config_hash(identity)}"


def pretrain_seed(config: ConfigDict) -> int:
  """``config.pretrain.seed``: one pre-trained model serves every fine-tuning seed
  (``config.seed``), as one public checkpoint does in the papers."""
  return int(config.pretrain.seed)


def run_dir(config: ConfigDict, workdir: str | os.PathLike) -> epath.Path:
  """The pre-training run's directory (its ``params`` is the checkpoint)."""
  cache = config.pretrain.cache_dir or os.fspath(epath.Path(workdir) / "cache")
  return epath.Path(cache) / "pretrained" / cache_key(config)


def train_config(config: ConfigDict) -> ConfigDict:
  cfg = ConfigDict(PRETRAIN_DEFAULTS)
  cfg.update({k: v for k, v in config.pretrain.to_dict().items()
              if k not in ("checkpoint", "cache_dir", "seed")})
  return cfg


def pretrained_checkpoint(config: ConfigDict, workdir: str | os.PathLike, *,
                          mesh=None, progress: bool = True) -> epath.Path:
  """The pre-trained params checkpoint of ``config``, pre-training it first if needed."""
  if config.pretrain.checkpoint:
    path = epath.Path(config.pretrain.checkpoint)
    if not path.exists():
      raise weights.CheckpointError(f"config.pretrain.checkpoint={path} does not exist")
    return path
  directory = run_dir(config, workdir)
  if (directory / "params").exists():
    return directory / "params"
  task = get_task(config)
  if task.pretrain is None:
    raise ValueError(
        f"task {task.name!r} has no pre-training split: set config.pretrain.checkpoint to a "
        "params checkpoint (experiments.weights.save_params format, {'params': ...})")
  from experiments import distributed  # noqa: PLC0415
  mesh = mesh if mesh is not None else distributed.make_mesh(config.mesh.to_dict())
  prepare_data(config, workdir)
  run = train.Run(name="pretrain", model=get_model(config, task, pretraining=True), task=task,
                  mesh=mesh, seed=pretrain_seed(config), data_dir=data_dir(config, workdir),
                  progress=progress, input_options=input_options(config),
                  metadata={"pretrain": cache_key(config)},
                  param_sharding=functools.partial(distributed.param_sharding,
                                                   min_size=config.shard_min_size))
  train.train(train_config(config), directory, run)
  return directory / "params"


def main(argv=None) -> int:
  from experiments import cli  # noqa: PLC0415 (defines the absl flags)
  return cli.run(lambda config, workdir: print(
      f"pre-trained checkpoint: {pretrained_checkpoint(config, workdir)}"), argv)


if __name__ == "__main__":
  sys.exit(main())
