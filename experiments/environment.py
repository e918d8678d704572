"""What every run of a plan shares: the task, the model, the mesh, the data streams.

An :class:`Environment` is built once per data + model configuration
(:func:`setup`) and serves any number of plans of that configuration (the
study's seeds and hyper-parameter values). It is the one place that

* builds the data set if it is built in, and the pre-trained checkpoint if it
  is not cached (:meth:`Environment.pretrained`);
* builds the model and initialises it (:meth:`Environment.init_params`);
* opens the data streams, each seeded by one rule (:data:`STREAM_SEEDS`);
* assembles the training loop's inputs for a run (:meth:`Environment.train_setup`);
* evaluates parameters on the val, ID test and OOD splits (:attr:`Environment.evaluator`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax.sharding import Mesh
from ml_collections import ConfigDict

from experiments import models
from experiments.data import pipeline, sources, tasks
from experiments.plan import ConfigError, Plan, PretrainSpec, RunSpec, get_task, train_size
from experiments.training import distributed, evaluation, loop, weights
from experiments.types import PyTree

#: The data streams of a run with seed ``s`` are seeded ``s + offset``: one table, so that
#: no two streams share their order by accident. ``radii``: TPGM's held-out batches during
#: fine-tuning; ``post_hoc``: post-hoc TPGM's; ``diagnose_*``: the radius-signal diagnostic.
STREAM_SEEDS = {"train": 0, "radii": 1, "post_hoc": 2, "diagnose_train": 10, "diagnose_heldout": 11}


def model_for(config: ConfigDict, task: tasks.Task, *, pretraining: bool = False):
  """The model of ``config`` for ``task`` (the pre-training label space if ``pretraining``).

  Raises:
    ValueError: the ``head`` group is constrained (kept near its initial value) while the
      head is freshly initialised: only a zero-shot head has a meaningful initial value.
  """
  overrides = config.model.overrides.to_dict()
  if pretraining:
    overrides.pop("zero_shot_head", None)
    classes = task.pretrain_num_classes or task.num_classes
    return models.get_model(config.model.name, classes, **overrides)
  if "head" in config.train.get("constrained", ()) and not overrides.get("zero_shot_head"):
    raise ValueError(
      "config.train.constrained includes the 'head' group, but the head is freshly "
      "initialised: set config.model.overrides.zero_shot_head to the .npy file of class text "
      "embeddings, or constrain only the backbone (--config.train.constrained=backbone)"
    )
  return models.get_model(config.model.name, task.num_classes, **overrides)


@dataclasses.dataclass
class Environment:
  """The task, model and mesh of a configuration, and everything built from them.

  Attributes:
    plan: the plan it was set up for (its config fixes the data, the model and the mesh).
    task: the data task.
    model: the fine-tuning model (new head).
    mesh: the device mesh.
    progress: show progress bars (process 0).
  """

  plan: Plan
  task: tasks.Task
  model: Any
  mesh: Mesh
  progress: bool = True

  @property
  def config(self) -> ConfigDict:
    return self.plan.config

  @property
  def data_dir(self) -> str | None:
    return self.plan.data_dir

  @property
  def input_options(self):
    return self.plan.input_options

  # ------------------------------------------------------------------ the model

  def init_params(self, key: jax.Array, *, model: Any = None) -> PyTree:
    """Freshly initialised params of ``model`` (default: the fine-tuning model) from the PRNG
    ``key``; traceable (``jax.eval_shape`` it for the shapes)."""
    return models.init_params(model or self.model, key, self.task.image_size)

  def param_sharding(self, abstract_params: PyTree, mesh: Mesh) -> PyTree:
    """``distributed.param_sharding`` with ``config.shard_min_size``."""
    return distributed.param_sharding(abstract_params, mesh, min_size=self.config.shard_min_size)

  def fresh_params(self, seed: int) -> PyTree:
    """:meth:`init_params`, sharded on the mesh like the train state's."""
    init = lambda: self.init_params(jax.random.key(seed))  # noqa: E731
    return jax.jit(init, out_shardings=self.param_sharding(jax.eval_shape(init), self.mesh))()

  def load(self, path, fresh: PyTree, dont_load=()) -> PyTree:
    """The params checkpoint ``path`` onto ``fresh`` (its shardings), ``dont_load`` kept."""
    return weights.load_pretrained(path, {"params": fresh}, dont_load)["params"]

  # ------------------------------------------------------------------ data

  def open(self, split: str, *, augmented: bool) -> sources.Split:
    """Split role ``split`` of the task, opened once per environment and transform."""
    key = (split, augmented)
    if key not in self._opened:
      self._opened[key] = sources.open_split(
        self.task, split, options=self.input_options, data_dir=self.data_dir, train=augmented
      )
    return self._opened[key]

  def batches(
    self, split: str, stream: str, seed: int, batch_size: int, *, augmented: bool = False
  ):
    """This process's rows of the global batches of ``split``, seeded by :data:`STREAM_SEEDS`
    (``seed + STREAM_SEEDS[stream]``): a random-access grain dataset."""
    layout = distributed.data_layout(batch_size, self.mesh)
    return pipeline.train_batches(
      self.open(split, augmented=augmented),
      batch_size=batch_size,
      seed=seed + STREAM_SEEDS[stream],
      **layout,
    )

  def stream(
    self,
    split: str,
    stream: str,
    seed: int,
    batch_size: int,
    *,
    start: int = 0,
    augmented: bool = False,
  ) -> Iterator[dict[str, Any]]:
    """Batches ``start, start + 1, ...`` of :meth:`batches`, read ahead (close it when done)."""
    opened = self.open(split, augmented=augmented)
    return pipeline.iterate(
      self.batches(split, stream, seed, batch_size, augmented=augmented),
      self.input_options,
      start=start,
      in_memory=opened.in_memory,
    )

  def heldout_batches(
    self, stream: str, seed: int, batch_size: int
  ) -> Callable[[int], Iterator[Any]]:
    """``take(n)`` yields the next ``n`` global held-out batches (not augmented)."""
    position = 0

    def take(n):
      nonlocal position
      start, position = position, position + n
      it = self.stream("heldout", stream, seed, batch_size, start=start)
      try:
        for _ in range(n):
          yield distributed.global_batch(next(it), self.mesh)
      finally:
        it.close()

    return take

  @functools.cached_property
  def evaluator(self) -> evaluation.Evaluator:
    return evaluation.Evaluator(
      self.model,
      self.task,
      self.mesh,
      data_dir=self.data_dir,
      batch_size=self.config.data.eval_batch_size,
      options=self.input_options,
    )

  def loss(self, params: PyTree, batch: dict[str, jax.Array]) -> jax.Array:
    """The fine-tuning model's cross-entropy on a batch (the held-out loss of TPGM)."""
    return loop.cross_entropy(self.model, params, batch, self.task)

  # ------------------------------------------------------------------ runs

  def train_setup(self, spec: RunSpec, init_params=None) -> loop.TrainSetup:
    """The training loop's inputs for the trained run ``spec``."""
    heldout = None
    if spec.method.heldout is not None:  # TPGM's radius updates: the held-out stream

      def heldout(batch_size, start):
        return self.stream("heldout", "radii", spec.seed, batch_size, start=start)

    return loop.TrainSetup(
      name=spec.name,
      train=spec.train,
      model=self.model,
      task=self.task,
      mesh=self.mesh,
      seed=spec.seed,
      method=spec.method,
      section=spec.section,
      init=functools.partial(self.init_params, model=self.model),
      init_params=init_params,
      data=self._train_stream(spec.train.split, spec.seed),
      heldout=heldout,
      metadata={"identity": spec.hash},
      progress=self.progress,
      param_sharding=self.param_sharding,
    )

  def _train_stream(self, split: str, seed: int):
    return lambda batch_size, start: self.stream(
      split, "train", seed, batch_size, start=start, augmented=True
    )

  def pretrained(self) -> os.PathLike:
    """The pre-trained params checkpoint, pre-training it first if it is not cached."""
    spec: PretrainSpec = self.plan.pretrain
    if spec.given or spec.checkpoint.exists():
      return spec.checkpoint
    model = model_for(self.config, self.task, pretraining=True)
    loop.train(
      loop.TrainSetup(
        name="pretrain",
        train=spec.train,
        model=model,
        task=self.task,
        mesh=self.mesh,
        seed=spec.seed,
        init=functools.partial(self.init_params, model=model),
        data=self._train_stream(spec.train.split, spec.seed),
        progress=self.progress,
        metadata={"pretrain": spec.key},
        param_sharding=self.param_sharding,
      ),
      spec.directory,
    )
    return spec.checkpoint

  def compatible(self, plan: Plan) -> bool:
    """Whether ``plan`` runs on this environment's data, model, pre-training and mesh."""
    same = lambda key: plan.config[key].to_dict() == self.config[key].to_dict()  # noqa: E731
    return (
      all(same(k) for k in ("data", "model", "pretrain", "mesh"))
      and plan.config.shard_min_size == self.config.shard_min_size
      and plan.workdir == self.plan.workdir
    )

  def __post_init__(self):
    self._opened: dict[tuple[str, bool], sources.Split] = {}


def prepare_data(plan: Plan, task: tasks.Task) -> None:
  """Builds the built-in benchmark on process 0 if it is missing, then syncs processes."""
  if task.builtin_config is not None and jax.process_index() == 0:
    sources.prepare_builtin(task.train.dataset, task.builtin_config, plan.data_dir)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices("prepare_data")


def check_train_size(plan: Plan, task: tasks.Task) -> None:
  """Raises :class:`ConfigError` if ``config.data.train_size`` exceeds the records of the
  task's whole train split (TFDS would silently give fewer, or with a sliced split records
  of the next one)."""
  n = train_size(plan.config)
  if not n:
    return
  config = plan.config
  whole = tasks.get_task(config.data.task, **config.data.task_kwargs.to_dict()).train
  source = sources.open_data_source(whole, plan.data_dir, builtin_config=task.builtin_config)
  if n > len(source):
    raise ConfigError(
      f"config.data.train_size={n} exceeds the {len(source)} records of the train split {whole}"
    )


def setup(plan: Plan, *, mesh: Mesh | None = None, progress: bool = True) -> Environment:
  """The environment of ``plan``: the mesh (default: ``config.mesh`` over all devices), the
  data (built if it is built in and missing), the model, and the pre-trained checkpoint
  (pre-trained if needed)."""
  config = plan.config
  mesh = mesh if mesh is not None else distributed.make_mesh(config.mesh.to_dict())
  task = get_task(config)
  env = Environment(plan, task, model_for(config, task), mesh, progress)
  prepare_data(plan, task)
  check_train_size(plan, task)
  env.pretrained()
  return env
