"""The main job: ``python -m experiments.main [--workdir runs] [--config FILE] [--config.X=Y]``.

Builds the offline benchmark, pre-trains (cached), fine-tunes with every
method of ``config.methods``, evaluates ID and OOD, prints the results table
and writes ``<workdir>/<config.name>/results.{json,md}`` and ``radii.png``.
Run it again to resume an interrupted job or reuse finished runs.
"""

from __future__ import annotations

import sys

from experiments import cli, report, run, train


def main(argv=None) -> int:
  config, workdir = cli.parse(sys.argv if argv is None else argv)
  try:
    out = run.run_all(config, workdir)
  except train.Preempted as e:
    print(e, file=sys.stderr)
    return 0
  if out["paths"]:
    print(out["paths"]["markdown"].read_text())
    print(f"wall time {out['info']['wall_s']:.0f} s; results in "
          f"{', '.join(str(p) for p in out['paths'].values())}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
