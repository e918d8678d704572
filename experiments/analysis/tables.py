"""Markdown tables and the number formats of the write-ups.

Every table of ``results.md``, ``RESULTS.md`` and ``diagnose_<method>.md`` is built by
:func:`markdown_table` from a header and rows of cells; the computing code never formats.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

_RULES = {"l": "---", "r": "---:", "c": ":---:"}


def markdown_table(
  header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None
) -> str:
  """A GitHub-flavoured Markdown table, one line per row.

  Args:
    header: the column titles.
    rows: the cells of each row, one per column; each is written with ``str`` (an empty
      string leaves the cell blank).
    align: one letter per column, ``"l"`` (left), ``"r"`` (right) or ``"c"`` (centred);
      by default the first column is left-aligned and the others right-aligned (a name
      followed by numbers).

  Returns:
    The table, its lines joined by newlines (no trailing newline).

  Example:
    >>> print(markdown_table(["run", "acc"], [["ft", "95.6"]]))
    | run | acc |
    |---|---:|
    | ft | 95.6 |
  """
  align = align or "l" + "r" * (len(header) - 1)
  if len(align) != len(header) or set(align) - set(_RULES):
    raise ValueError(f"align must be one of l/r/c per column ({len(header)}), got {align!r}")
  rows = [list(r) for r in rows]
  for r in rows:
    if len(r) != len(header):
      raise ValueError(f"a row has {len(r)} cells for {len(header)} columns: {r}")
  return "\n".join(
    [_line(header), _line([_RULES[a] for a in align], pad=False), *(_line(r) for r in rows)]
  )


def _line(cells: Sequence[Any], pad: bool = True) -> str:
  if not pad:
    return "|" + "|".join(cells) + "|"
  return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"


def mean_std(value: Sequence[float], digits: int = 1) -> str:
  """``(mean, std)`` as ``"mean ± std"`` (e.g. ``"95.6 ± 0.4"``)."""
  return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"


def percent(fraction: float) -> str:
  """A fraction in [0, 1] as a whole percentage (e.g. ``"54 %"``)."""
  return f"{100 * fraction:.0f} %"
