"""The study: ``python -m experiments.study --config experiments/configs/study.py``.

Every method x seeds on the benchmark, with per-method selection on ID val and
the radius-signal diagnostic, written up as ``RESULTS.md`` with
``results/study.json`` and plots (:mod:`experiments.analysis.study`). Every
run is cached by its hash: running the command again only redoes what changed.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from experiments import cli


def job(config: ConfigDict, workdir: str) -> None:
  """Runs the study and prints RESULTS.md."""
  import jax  # noqa: PLC0415 (after the runtime is set up)

  from experiments.analysis import results_md, study  # noqa: PLC0415

  if config.study.render_only:  # nothing is run: RESULTS.md and the plots from the JSON files
    out = results_md.write(config.study.out or f"{workdir}/{config.name}")
    print("\n".join([out["path"].read_text(), *out["skipped"]]))
    return
  out = study.study(config, workdir)
  if jax.process_index() == 0:
    print(results_md.write(out["out"])["path"].read_text())


if __name__ == "__main__":
  cli.run(job)
