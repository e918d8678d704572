"""Builds the ``multidomain_shapes`` TFDS data set and reports the time.

  python -m experiments.build_data --config transfer [--data_dir DIR] [--preview grid.png]

The main job builds it on first use; this command builds it alone (e.g. to
look at it: ``--preview`` writes a grid of two test images per class and domain).
"""

from __future__ import annotations

import time

from absl import app, flags

from experiments.data.shapes import CONFIGS

_CONFIG = flags.DEFINE_enum("config", "transfer", sorted(CONFIGS), "Builder config.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: TFDS's own).")
_PREVIEW = flags.DEFINE_string("preview", None, "Optional PNG path for a grid of examples.")


def build(config: str, data_dir: str | None = None, preview: str | None = None) -> None:
  """Builds the data set (if missing), prints its splits and optionally writes a preview."""
  import numpy as np  # noqa: PLC0415
  from PIL import Image  # noqa: PLC0415

  from experiments.data.shapes import load_arrays, prepare  # noqa: PLC0415

  start = time.perf_counter()
  builder = prepare(config, data_dir)
  print(
    f"{builder.info.full_name} ready in {builder.data_dir} ({time.perf_counter() - start:.1f} s)"
  )
  for name, split in builder.info.splits.items():
    print(f"  {name}: {split.num_examples}")
  if preview:
    rows = []
    for d in builder.builder_config.domains:
      arr = load_arrays(builder, f"{d}_test")
      order = np.concatenate(
        [np.nonzero(arr["label"] == c)[0][:2] for c in builder.builder_config.classes]
      )
      rows.append(np.concatenate(list(arr["image"][order]), axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(preview)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}: every setting is a --flag")
  build(_CONFIG.value, _DATA_DIR.value, _PREVIEW.value)


if __name__ == "__main__":
  app.run(main)
