"""The regime map: ``python -m experiments.regimes --config experiments/configs/regimes.py``.

Every method x seeds in every cell (benchmark, fine-tuning set size, steps), each method's
hyper-parameters picked per cell on ID val (:mod:`experiments.analysis.regimes`); writes
``results/regimes.json`` and the "Where each method helps" section of RESULTS.md. Long (hours
on a CPU): run it in the background, e.g. ``nohup python -m experiments.regimes ... &``; it
resumes from its finished runs. ``--config.regimes.run='("shapes_scarce",)'`` runs one cell.
"""

from __future__ import annotations

from etils import epath
from ml_collections import ConfigDict

from experiments import cli


def job(config: ConfigDict, workdir: str) -> None:
  """Runs the cells of ``config.regimes.run`` (all by default) and re-renders RESULTS.md."""
  import jax  # noqa: PLC0415 (after the runtime is set up)

  from experiments.analysis import regimes, results_md  # noqa: PLC0415

  out = epath.Path(config.regimes.out or f"{workdir}/{config.name}")
  if not config.regimes.render_only:
    out = regimes.regime_map(config, workdir)
  if jax.process_index() != 0:
    return
  if not (out / "results" / "study.json").exists():
    print(f"regimes: wrote {out / 'results' / 'regimes.json'} (no study.json there: not rendered)")
    return
  print(results_md.write(out)["path"].read_text())


if __name__ == "__main__":
  cli.run(job)
