"""docs/library_edges.md runs as written: every ```python block, each in a fresh namespace."""

import pathlib
import re

import pytest

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "library_edges.md"


def _blocks() -> list[tuple[str, str]]:
  """``(section, code)`` for every python block, in order."""
  out, section = [], ""
  for part in re.split(r"(?m)^(## .*)$", DOC.read_text()):
    if part.startswith("## "):
      section = part[3:].strip()
      continue
    out += [(section, code) for code in re.findall(r"```python\n(.*?)```", part, re.S)]
  return out


def test_every_section_has_an_example():
  sections = [s for s, _ in _blocks()]
  assert sections.count("Schedules") == 2
  assert "Flax NNX" in sections and "Errors" in sections


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_block_runs(index):
  section, code = _blocks()[index]
  if section == "Flax NNX":
    pytest.importorskip("flax.nnx")
  exec(compile(code, f"{DOC.name}[{index}]", "exec"), {"__name__": "__doc_example__"})  # noqa: S102
