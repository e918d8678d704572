"""The main job: ``python -m experiments.main [--workdir runs] [--config FILE] [--config.X=Y]``.

Builds the offline benchmark, pre-trains (cached), fine-tunes with every
method of ``config.methods``, evaluates ID and OOD, prints the results table
and writes ``<workdir>/<config.name>/results.{json,md}`` and ``radii.png``
(:func:`experiments.runner.train_and_evaluate`). Run it again to resume an
interrupted job or reuse finished runs.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from experiments import cli


def job(config: ConfigDict, workdir: str) -> None:
  """Runs the main job and prints its results table."""
  from experiments import runner  # noqa: PLC0415 (imports JAX: after the runtime is set up)

  out = runner.train_and_evaluate(config, workdir)
  if out["paths"]:
    print(out["paths"]["markdown"].read_text())
    print(
      f"wall time {out['info']['wall_s']:.0f} s; results in "
      f"{', '.join(str(p) for p in out['paths'].values())}"
    )


if __name__ == "__main__":
  cli.run(job)
