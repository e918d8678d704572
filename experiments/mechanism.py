"""Why TPGM's radii stay small: ``python -m experiments.mechanism --config
experiments/configs/study.py [--config.mechanism.method=tpgm] [--config.study.out=.]``.

Re-runs one TPGM run recording every radius update per tensor
(:mod:`experiments.analysis.mechanism`), writes ``results/mechanism.json`` and the figure
``results/mechanism.png``, and re-renders RESULTS.md when a ``study.json`` is there.
"""

from __future__ import annotations

from etils import epath
from ml_collections import ConfigDict

from experiments import cli


def job(config: ConfigDict, workdir: str) -> None:
  """Traces the run of ``config.mechanism.method`` and writes the results."""
  import jax  # noqa: PLC0415 (after the runtime is set up)

  from experiments.analysis import mechanism, results_md  # noqa: PLC0415

  out = epath.Path(config.study.out or f"{workdir}/{config.name}")
  data = mechanism.measure(config, workdir)
  if jax.process_index() != 0:
    return
  mechanism.write(data, out)
  print("\n".join(f"- {line}" for line in data["findings"]))
  if (out / "results" / "study.json").exists():
    results_md.write(out)
  else:
    mechanism.render_figures(data, out)


if __name__ == "__main__":
  cli.run(job)
