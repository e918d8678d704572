"""A seconds-long smoke run of the whole pipeline: tiny data, a ~1.5k-parameter CNN, few steps.

python -m experiments.main --config experiments/configs/tiny.py --workdir /tmp/tiny
"""

from ml_collections import ConfigDict

from experiments.configs import default
from experiments.training import methods


def get_config() -> ConfigDict:
  c = default.get_config()
  c.name = "tiny"
  c.methods = tuple(methods.METHODS)  # every method, each for a few steps
  c.data.task_kwargs.config = "tiny_transfer"
  c.data.eval_batch_size = 16
  c.model.overrides = ConfigDict(
    dict(stage_sizes=(1,), widths=(8,), strides=(1,), stem_width=8, stem_stride=2, norm_groups=4)
  )
  c.pretrain.steps = 4
  c.pretrain.batch_size = 8
  c.train.steps = 4
  c.train.batch_size = 8
  c.train.log_every = 2
  c.train.checkpoint_every = 2
  c.tpgm.proj_freq = 2
  c.tpgm_post_hoc.steps = 2
  c.tpgm_post_hoc.batch_size = 8
  c.diagnose.every = 2
  c.diagnose.batches = 2
  c.shard_min_size = 256  # shard the tiny kernels too, so that tests exercise FSDP / TP
  return c
