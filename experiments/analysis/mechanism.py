"""Why TPGM's radii stay small: a per-step trace of the radius update (filled in below)."""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath


def load(out_dir: str | os.PathLike) -> dict[str, Any] | None:
  """``results/mechanism.json`` of ``out_dir``; None if absent."""
  path = epath.Path(out_dir) / "results" / "mechanism.json"
  return json.loads(path.read_text()) if path.exists() else None
