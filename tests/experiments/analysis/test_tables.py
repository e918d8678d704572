"""The Markdown table helper and the number formats."""

from __future__ import annotations

import pytest

from experiments.analysis import tables


@pytest.mark.parametrize(
  "align, rule",
  [
    (None, "|---|---:|---:|"),
    ("lll", "|---|---|---|"),
    ("lrc", "|---|---:|:---:|"),
  ],
)
def test_markdown_table_alignment(align, rule):
  text = tables.markdown_table(["run", "a", "b"], [["ft", 1.5, "x"]], align=align)
  assert text.splitlines() == ["| run | a | b |", rule, "| ft | 1.5 | x |"]


def test_markdown_table_blank_cells_and_no_rows():
  text = tables.markdown_table(["run", "lower", ""], [["ft", "", "tighter"]], align="lrl")
  assert text.splitlines() == ["| run | lower | |", "|---|---:|---|", "| ft | | tighter |"]
  assert tables.markdown_table(["a", "b"], []) == "| a | b |\n|---|---:|"


@pytest.mark.parametrize(
  "header, rows, align",
  [
    (["a", "b"], [["1"]], None),  # a row too short
    (["a", "b"], [["1", "2", "3"]], None),  # too long
    (["a", "b"], [], "l"),  # one letter for two columns
    (["a", "b"], [], "lx"),  # not an alignment
  ],
)
def test_markdown_table_rejects_mismatches(header, rows, align):
  with pytest.raises(ValueError):
    tables.markdown_table(header, rows, align=align)


def test_number_formats():
  assert tables.mean_std((95.64, 0.36)) == "95.6 ± 0.4"
  assert tables.mean_std([1.0, 0.25], digits=2) == "1.00 ± 0.25"
  assert tables.percent(0.537) == "54 %"
  assert tables.percent(1) == "100 %"
