"""The configuration resolved once: a :class:`Plan` of frozen run specifications.

:func:`make_plan` reads an experiment config and a workdir and returns

* the pre-training (:class:`PretrainSpec`): the given checkpoint, or the cached
  run that builds it (``<cache_dir>/pretrained/<model>-<data>-<hash>``);
* every run the job needs (:class:`RunSpec`), dependencies first: its method,
  its config section, its train config (``config.train`` with the section's
  ``train`` overrides), its dependencies, its identity (everything that
  determines its result: model, data, pre-training, seed, train config,
  section, and the identities of its dependencies; not the mesh, not the
  paths) and its directory ``<workdir>/<config.name>/<name>-<hash>``.

The job (:mod:`experiments.runner`), the study and the diagnostic consume the
plan; nothing downstream reads the config to decide what to run. The plan is
also where a config is checked: an unknown method, task or config key, a
non-positive step count or batch size, a missing checkpoint path, or a batch
size the mesh cannot split is a :class:`ConfigError` naming the key, raised
before any data is built or any training starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

from etils import epath
from ml_collections import ConfigDict

from experiments.data import tasks
from experiments.data.options import InputOptions
from experiments.training import methods

#: Keys of ``config.data`` read by the plan and the evaluator rather than by InputOptions.
DATA_KEYS = ("task", "task_kwargs", "train_size", "data_dir", "eval_batch_size")
#: Fields of ``config.pretrain`` that say where the checkpoint is, not how it is made.
_PRETRAIN_LOCATION = ("checkpoint", "cache_dir", "seed")
#: The pre-training run's train config, before ``config.pretrain``'s own fields.
PRETRAIN_DEFAULTS = dict(split="pretrain", log_every=25, checkpoint_every=100, max_to_keep=1)
#: Top-level keys of an experiment config (configs/default.py); another key is a typo.
TOP_LEVEL_KEYS = (
  "name",
  "seed",
  "data",
  "model",
  "pretrain",
  "train",
  "methods",
  "diagnose",
  "study",
  "regimes",
  "mechanism",
  "mesh",
  "shard_min_size",
)


class ConfigError(ValueError):
  """A config that cannot run: the message names the key and what was expected."""


def config_hash(value: Any) -> str:
  """A short stable hash of a config (ConfigDict, dict or JSON-able value)."""
  value = value.to_dict() if isinstance(value, ConfigDict) else value
  text = json.dumps(value, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class PretrainSpec:
  """Where the pre-trained weights come from.

  Attributes:
    checkpoint: the params checkpoint (``{'params': ...}``) every run starts from.
    given: ``config.pretrain.checkpoint`` was set: it is read, never built.
    key: ``<model>-<data>-<hash>``, the identity of the pre-training (or the given path).
    directory: the pre-training run's directory (``None`` when given).
    train: the pre-training run's train config (``None`` when given).
    seed: the pre-training seed (one pre-trained model serves every fine-tuning seed).
  """

  checkpoint: epath.Path
  given: bool
  key: str
  directory: epath.Path | None
  train: ConfigDict | None
  seed: int


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of the plan: a trained method or a post-hoc step, a pure function of this spec.

  Attributes:
    name: the config section and result row (variants: the section's name).
    method: the method it runs.
    section: the method's config section (``config.<name>``; an empty one if absent).
    train: the train config (trained methods; ``None`` for post-hoc ones).
    deps: the runs it needs first (``init_from``, ``base``, ``source``).
    seed: the fine-tuning seed (head initialisation and data order).
    identity: everything that determines the result (see the module docstring).
    hash: :func:`config_hash` of ``identity``, saved with the run's checkpoints and results.
    directory: ``<workdir>/<config.name>/<name>-<hash[:8]>``.
  """

  name: str
  method: methods.Method
  section: ConfigDict
  train: ConfigDict | None
  deps: tuple[str, ...]
  seed: int
  identity: Mapping[str, Any]
  hash: str
  directory: epath.Path

  @property
  def trained(self) -> bool:
    return self.method.trained


@dataclasses.dataclass(frozen=True)
class Plan:
  """A config resolved into what to run, in order.

  Attributes:
    config: the experiment config (a copy; the plan does not change when the caller's does).
    workdir: the job's working directory.
    root: ``<workdir>/<config.name>``, where the job's results go.
    data_dir: the TFDS data directory (``<workdir>/data`` for the built-in benchmark).
    input_options: the augmentation and loader settings (``config.data``).
    pretrain: the pre-training.
    runs: every run, dependencies first.
  """

  config: ConfigDict
  workdir: epath.Path
  root: epath.Path
  data_dir: str | None
  input_options: InputOptions
  pretrain: PretrainSpec
  runs: tuple[RunSpec, ...]

  def __getitem__(self, name: str) -> RunSpec:
    for spec in self.runs:
      if spec.name == name:
        return spec
    raise KeyError(f"the plan has no run {name!r}; it has {[s.name for s in self.runs]}")

  def __iter__(self) -> Iterator[RunSpec]:
    return iter(self.runs)

  @property
  def names(self) -> list[str]:
    return [s.name for s in self.runs]


def input_options(config: ConfigDict) -> InputOptions:
  """The augmentation and loader settings of ``config.data``; an unknown key is an error."""
  return InputOptions.from_config(config.data, read_elsewhere=DATA_KEYS)


def train_size(config: ConfigDict) -> int:
  """``config.data.train_size``: fine-tune on the first that many records of the task's train
  split (0, the default: all of it)."""
  return config.data.get("train_size", 0)


def data_identity(config: ConfigDict, *, fine_tuning: bool = True) -> dict[str, Any]:
  """What in ``config.data`` determines the training batches (not paths, not loader speed);
  without ``fine_tuning``, what determines the pre-training batches (not ``train_size``, which
  only cuts the fine-tuning split; it is left out when 0, so older runs keep their hashes)."""
  identity = {
    "task": config.data.task,
    "task_kwargs": config.data.task_kwargs.to_dict(),
    **input_options(config).augmentation(),
  }
  if fine_tuning and train_size(config):
    identity["train_size"] = train_size(config)
  return identity


def get_task(config: ConfigDict) -> tasks.Task:
  """The data task of ``config``; ``config.model.input_mean`` / ``input_std`` (the input
  normalisation the pre-trained weights expect, e.g. CLIP's), when set, replace the task's."""
  task = tasks.get_task(config.data.task, **config.data.task_kwargs.to_dict())
  n = train_size(config)
  if n != 0:
    try:
      task = dataclasses.replace(task, train=tasks.first_records(task.train, n))
    except ValueError as e:
      raise ValueError(f"config.data.train_size={n!r}: {e} (0 means the whole split)") from e
  mean, std = config.model.get("input_mean"), config.model.get("input_std")
  if mean is None and std is None:
    return task
  if not (
    mean is not None and std is not None and len(mean) == len(std) == 3 and all(s > 0 for s in std)
  ):
    raise ValueError(
      "config.model.input_mean and input_std must both be set, 3 values each "
      f"(std > 0), got {mean} and {std}"
    )
  return dataclasses.replace(task, mean=tuple(map(float, mean)), std=tuple(map(float, std)))


def data_dir(config: ConfigDict, workdir: str | os.PathLike, task: tasks.Task) -> str | None:
  """``config.data.data_dir``; when empty, ``<workdir>/data`` for the built-in benchmark and
  TFDS's default (``None``) for datasets prepared beforehand."""
  if config.data.data_dir:
    return config.data.data_dir
  return os.fspath(epath.Path(workdir) / "data") if task.builtin_config else None


def train_config(config: ConfigDict, name: str) -> ConfigDict:
  """``config.train`` with the overrides in ``config.<name>.train`` (deep-merged)."""
  train = ConfigDict(config.train.to_dict())
  section = config.get(name)
  if section is not None and "train" in section:
    train.update(section.train.to_dict())
  return train


def pretrain_key(config: ConfigDict) -> str:
  """``<model>-<data>-<hash>`` naming the pre-trained checkpoint of ``config``."""
  section = {k: v for k, v in config.pretrain.to_dict().items() if k not in _PRETRAIN_LOCATION}
  identity = {
    "model": config.model.to_dict(),
    "data": data_identity(config, fine_tuning=False),
    "pretrain": section,
    "seed": int(config.pretrain.seed),
  }
  data = "_".join([config.data.task, *map(str, config.data.task_kwargs.to_dict().values())])
  return f"{config.model.name}-{data}-{config_hash(identity)}"


def _pretrain_spec(config: ConfigDict, workdir: epath.Path) -> PretrainSpec:
  seed = int(config.pretrain.seed)
  if config.pretrain.checkpoint:
    path = epath.Path(config.pretrain.checkpoint)
    if not path.exists():
      raise ConfigError(f"config.pretrain.checkpoint={path} does not exist")
    return PretrainSpec(path, True, config.pretrain.checkpoint, None, None, seed)
  key = pretrain_key(config)
  cache = config.pretrain.cache_dir or os.fspath(workdir / "cache")
  directory = epath.Path(cache) / "pretrained" / key
  train = ConfigDict(PRETRAIN_DEFAULTS)
  train.update({k: v for k, v in config.pretrain.to_dict().items() if k not in _PRETRAIN_LOCATION})
  return PretrainSpec(directory / "params", False, key, directory, train, seed)


def dependencies(config: ConfigDict, name: str) -> tuple[str, ...]:
  """The runs ``name`` needs first: its ``init_from``, ``base`` and ``source``, if any."""
  section = config.get(name) or {}
  return tuple(section[k] for k in ("init_from", "base", "source") if section.get(k))


def method_names(config: ConfigDict) -> list[str]:
  """``config.methods``; an entry may list several names, comma-separated
  (``--config.methods=ft,lp`` on the command line)."""
  return [n.strip() for item in config.methods for n in item.split(",") if n.strip()]


def run_order(config: ConfigDict) -> list[str]:
  """``config.methods`` with their dependencies first, each once."""
  order: list[str] = []

  def visit(name, chain=()):
    if name in chain:
      raise ConfigError(f"methods depend on each other in a cycle: {' -> '.join(chain + (name,))}")
    methods.get(name, config)
    for dep in dependencies(config, name):
      visit(dep, chain + (name,))
    if name not in order:
      order.append(name)

  for name in method_names(config):
    visit(name)
  return order


def _identity(config: ConfigDict, name: str, pretrained: str) -> dict[str, Any]:
  section = config.get(name)
  return {
    "method": name,
    "seed": config.seed,
    "model": config.model.to_dict(),
    "data": data_identity(config),
    "pretrained": pretrained,
    "train": (train_config(config, name).to_dict() if methods.get(name, config).trained else None),
    "section": section.to_dict() if section is not None else None,
    "deps": {d: _identity(config, d, pretrained) for d in dependencies(config, name)},
  }


def _positive(value: Any, key: str) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError(f"config.{key} must be a positive integer, got {value!r}")


def _check_train(train: ConfigDict, where, data_parallel: int | None) -> None:
  """Checks a train config; ``where(field)`` names the config key the field came from."""
  for field in ("steps", "batch_size", "log_every"):
    _positive(train.get(field), where(field))
  if "hflip" in train:
    raise ConfigError(
      f"config.{where('hflip')} is not read: the augmentation is set in the "
      "data section (config.data.hflip, experiments.data.options.InputOptions)"
    )
  if data_parallel and train.batch_size % data_parallel:
    raise ConfigError(
      f"config.{where('batch_size')}={train.batch_size} cannot be split over the "
      f"{data_parallel} data-parallel devices of config.mesh: use a multiple "
      f"of {data_parallel}"
    )


def _data_parallel(config: ConfigDict, device_count: int | None) -> int | None:
  """How many ways the batch is split by ``config.mesh`` on ``device_count`` devices."""
  if device_count is None:
    return None
  shape = dict(config.mesh.to_dict())
  fixed = 1
  for size in shape.values():
    fixed *= size if size != -1 else 1
  if device_count % fixed:
    raise ConfigError(f"config.mesh={shape} does not fit {device_count} devices")
  return shape.get("data", 1) if shape.get("data", 1) != -1 else device_count // fixed


def make_plan(
  config: ConfigDict, workdir: str | os.PathLike, *, device_count: int | None = None
) -> Plan:
  """Resolves ``config`` into a :class:`Plan`, checking it first (see the module docstring).

  Args:
    config: an experiment config (``configs/default.py`` and its variants).
    workdir: the job's working directory.
    device_count: the devices the mesh will span, to check that the batch sizes split over
      it (``None``: not checked here).

  Raises:
    ConfigError: the config cannot run; the message names the key.
  """
  workdir = epath.Path(workdir)
  config = ConfigDict(config.to_dict())
  unknown = sorted(set(config.keys()) - set(TOP_LEVEL_KEYS) - set(_method_sections(config)))
  if unknown:
    raise ConfigError(
      f"unknown config key(s) {unknown}: neither a setting "
      f"({', '.join(TOP_LEVEL_KEYS)}) nor a method section "
      f"({', '.join(methods.METHODS)} or a section with a `method` field)"
    )
  try:
    options = input_options(config)
    task = get_task(config)
  except (KeyError, ValueError) as e:
    raise ConfigError(str(e).strip("'\"")) from e
  parallel = _data_parallel(config, device_count)
  _positive(config.data.get("eval_batch_size"), "data.eval_batch_size")
  pretrain = _pretrain_spec(config, workdir)
  if not pretrain.given:
    if task.pretrain is None:
      raise ConfigError(
        f"task {task.name!r} has no pre-training split: set config.pretrain.checkpoint to a "
        "params checkpoint (experiments.training.weights.save_params format, "
        "{'params': ...})"
      )
    _check_train(pretrain.train, lambda field: f"pretrain.{field}", parallel)
  try:
    order = run_order(config)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  root = workdir / config.name
  runs = []
  for name in order:
    method = methods.get(name, config)
    train = train_config(config, name) if method.trained else None
    if train is not None:
      overrides = (config.get(name) or {}).get("train") or {}
      _check_train(
        train,
        lambda field, name=name, overrides=overrides: (
          f"{name}.train.{field}" if field in overrides else f"train.{field}"
        ),
        parallel,
      )
    identity = _identity(config, name, config.pretrain.checkpoint or pretrain.key)
    digest = config_hash(identity)
    section = config.get(name)
    runs.append(
      RunSpec(
        name=name,
        method=method,
        section=ConfigDict(section.to_dict()) if section is not None else ConfigDict(),
        train=train,
        deps=dependencies(config, name),
        seed=int(config.seed),
        identity=identity,
        hash=digest,
        directory=root / f"{name}-{digest[:8]}",
      )
    )
  return Plan(
    config=config,
    workdir=workdir,
    root=root,
    data_dir=data_dir(config, workdir, task),
    input_options=options,
    pretrain=pretrain,
    runs=tuple(runs),
  )


def _method_sections(config: ConfigDict) -> list[str]:
  """The top-level keys that are method sections (a registered name or a ``method`` field)."""
  return [
    k
    for k, v in config.items()
    if k in methods.METHODS or (isinstance(v, ConfigDict) and "method" in v)
  ]


def with_fields(config: ConfigDict, **fields: Any) -> ConfigDict:
  """A copy of ``config`` with dotted ``fields`` (``**{"l2sp.alpha": 0.1}``) set, through
  ConfigDict's own flattened update; an unknown field is a :class:`ConfigError`."""
  out = ConfigDict(config.to_dict())
  out.lock()
  try:
    out.update_from_flattened_dict(fields)
  except KeyError as e:
    raise ConfigError(f"config has no field among {sorted(fields)}: {e}") from e
  out.unlock()
  return out
