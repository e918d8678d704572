"""The documentation's links resolve, and the API reference covers every public name."""

import pathlib
import re

import pytest

import tpgm_jax

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(path: pathlib.Path) -> str:
  """The text outside fenced code blocks and inline code."""
  text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
  return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path: pathlib.Path) -> set[str]:
  """GitHub's (and MyST's) anchors of a markdown file's headings."""
  text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
  anchors = set()
  for title in re.findall(r"^#{1,6} +(.+?) *$", text, re.M):
    slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
    anchors.add(slug)
  return anchors


def _links():
  for path in DOCS:
    for target in LINK.findall(_prose(path)):
      if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # not http:, https:, mailto: ...
        yield path, target


@pytest.mark.parametrize(
  "path,target", list(_links()), ids=lambda x: x.name if isinstance(x, pathlib.Path) else x
)
def test_relative_link_resolves(path, target):
  file, _, anchor = target.partition("#")
  resolved = (path.parent / file).resolve() if file else path
  assert resolved.exists(), f"{path.relative_to(ROOT)}: {target} -> {resolved} does not exist"
  if anchor and resolved.suffix == ".md":
    assert anchor in _anchors(resolved), (
      f"{path.relative_to(ROOT)}: no heading #{anchor} in {resolved.relative_to(ROOT)}"
    )


def test_links_found():
  assert len(list(_links())) >= 10


def test_api_reference_documents_every_public_name():
  api = (ROOT / "docs" / "api.rst").read_text()
  documented = set(re.findall(r"^\.\. auto(?:function|class):: tpgm_jax\.(\w+)", api, re.M))
  assert documented == set(tpgm_jax.__all__)
