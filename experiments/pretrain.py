"""Pre-training alone: ``python -m experiments.pretrain [--workdir runs] [--config FILE]``.

Builds (or finds) the pre-trained checkpoint of a configuration and prints its
path. The checkpoint is ``<cache_dir>/pretrained/<model>-<data>-<hash>/params``,
the hash covering everything that determines it (model, data,
``config.pretrain``); it is built by the same train loop as fine-tuning (so an
interrupted pre-training resumes), reused afterwards and never overwritten. A
``config.pretrain.checkpoint`` path replaces it (it is then never built).
"""

from __future__ import annotations

from ml_collections import ConfigDict

from experiments import cli


def job(config: ConfigDict, workdir: str) -> None:
  """Builds (or finds) the pre-trained checkpoint and prints its path."""
  import jax  # noqa: PLC0415 (after the runtime is set up)

  from experiments import environment, plan  # noqa: PLC0415

  resolved = plan.make_plan(config, workdir, device_count=jax.device_count())
  env = environment.setup(resolved)
  print(f"pre-trained checkpoint: {env.pretrained()}")


if __name__ == "__main__":
  cli.run(job)
