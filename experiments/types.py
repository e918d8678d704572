"""Type aliases shared by the experiments."""

from __future__ import annotations

from typing import Any

#: A nested structure of arrays (what ``jax.tree_util`` flattens), e.g. Flax params.
PyTree = Any
