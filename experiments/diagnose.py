"""Can TPGM learn its radii on this data? ``python -m experiments.diagnose [--config ...]``.

Fine-tunes with ``config.diagnose.method`` (plain FT by default), keeping a
checkpoint every ``config.diagnose.every`` steps, measures TPGM's held-out
radius signal at each (:mod:`experiments.analysis.diagnose`) and writes
``<workdir>/<config.name>/diagnose_<method>.{json,md,png}``.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from experiments import cli


def job(config: ConfigDict, workdir: str) -> None:
  """Measures, writes and prints the diagnostic."""
  from experiments.analysis import diagnose  # noqa: PLC0415 (imports JAX: after the runtime)

  _, text = diagnose.diagnose(config, workdir)
  print(text)
  print(f"written to {workdir}/{config.name}/diagnose_{config.diagnose.method}.md, .json, .png")


if __name__ == "__main__":
  cli.run(job)
