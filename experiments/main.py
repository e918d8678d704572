"""The main job: ``python -m experiments.main [--workdir runs] [--config FILE] [--config.X=Y]``.

Builds the offline benchmark, pre-trains (cached), fine-tunes with every
method of ``config.methods``, evaluates ID and OOD, prints the results table
and writes ``<workdir>/<config.name>/results.{json,md}`` and ``radii.png``.
Run it again to resume an interrupted job or reuse finished runs.
"""

from __future__ import annotations

import sys

from experiments import cli, run


def _job(config, workdir) -> None:
  out = run.run_all(config, workdir)
  if out["paths"]:
    print(out["paths"]["markdown"].read_text())
    print(f"wall time {out['info']['wall_s']:.0f} s; results in "
          f"{', '.join(str(p) for p in out['paths'].values())}")


def main(argv=None) -> int:
  return cli.run(_job, argv)


if __name__ == "__main__":
  sys.exit(main())
