"""Sphinx configuration: the guides (markdown, MyST) and the API reference (autodoc).

Build (warnings are errors):  python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # tpgm_jax and experiments from the checkout

import tpgm_jax  # noqa: E402

project = "tpgm_jax"
author = "tpgm_jax authors"
release = version = tpgm_jax.__version__

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: GitHub-style anchors for "#section" links within and between the guides.
myst_heading_anchors = 4

# autodoc: signatures without the (long) type hints; types are in the docstrings' text.
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": False, "undoc-members": False}

# Google-style docstrings (Args / Returns / Raises).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

nitpicky = False
# The guides link to files outside docs/ (README.md, RESULTS.md, CHANGELOG.md, the
# figures under results/); tests/test_docs_links.py checks that every such link resolves.
suppress_warnings = ["myst.xref_missing"]

html_theme = "alabaster"
html_title = f"tpgm_jax {release}"
