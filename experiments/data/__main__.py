"""Command line: build the ``multidomain_shapes`` dataset and report the time.

    python -m experiments.data --config transfer [--data_dir DIR] [--preview grid.png]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

from experiments.data.shapes import CONFIGS, load_arrays, prepare


def main(argv=None):
  parser = argparse.ArgumentParser(description="Build the multidomain_shapes TFDS dataset.")
  parser.add_argument("--config", default="transfer", choices=sorted(CONFIGS))
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir (default: TFDS's own)")
  parser.add_argument("--preview", default=None, help="optional PNG path for a grid of examples")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  builder = prepare(args.config, args.data_dir)
  print(f"{builder.info.full_name} ready in {builder.data_dir} ({time.perf_counter() - start:.1f} s)")
  for name, split in builder.info.splits.items():
    print(f"  {name}: {split.num_examples}")
  if args.preview:
    rows = []
    for d in builder.builder_config.domains:
      arr = load_arrays(builder, f"{d}_test")
      order = np.concatenate([np.nonzero(arr["label"] == c)[0][:2]
                              for c in builder.builder_config.classes])
      rows.append(np.concatenate(list(arr["image"][order]), axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.preview)


if __name__ == "__main__":
  main()
