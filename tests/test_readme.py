"""Every python block of the README and of the library guide runs as written.

The blocks run on a small Flax-like problem defined here (``params``, ``train_loss``,
``heldout_loss``, ``batch``...). The tour blocks (README "A quick tour", guide "TPGM during
fine-tuning") are also checked to train the radii.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LIBRARY = ROOT / "docs" / "library.md"

# What a block may assume from the blocks above it in its document.
PRELUDE = "import jax, optax, tpgm_jax\nnot_head = tpgm_jax.path_mask(exclude=r'params/head/.*')\n"


def _blocks(path: pathlib.Path, section: str | None = None) -> list[str]:
  text = path.read_text()
  if section is not None:
    start = text.index(section)
    end = text.find("\n## ", start + 1)
    text = text[start : end if end >= 0 else None]
  return re.findall(r"```python\n(.*?)```", text, re.S)


def _namespace():
  rng = np.random.default_rng(0)
  params = {
    "params": {
      "Dense_0": {"kernel": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)},
      "head": {"kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)},
    }
  }

  def model(p, x):
    return jnp.tanh(x @ p["params"]["Dense_0"]["kernel"]) @ p["params"]["head"]["kernel"]

  def xent(p, batch):
    return optax.softmax_cross_entropy_with_integer_labels(model(p, batch["x"]), batch["y"]).mean()

  batch = {"x": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "y": jnp.arange(8) % 3}
  return {
    "params": params,
    "anchor": params,
    "pretrained": params,
    "finetuned": jax.tree.map(lambda x: x + 0.1, params),
    "train_loss": xent,
    "heldout_loss": xent,
    "batch": batch,
    "batches": jax.tree.map(lambda x: x[None], batch),
    "train_batches": [batch] * 3,
    "heldout_batches": [batch, batch],
    "lr": 1e-2,
    "wd": 1e-4,
    "lam": 0.1,
    "alpha": 0.1,
  }


def _check_trains(ns):
  params, opt_state = ns["params"], ns["opt_state"]
  for step in range(3):
    heldout = jax.tree.map(lambda x: x[None], ns["batch"]) if step % 2 == 0 else None
    params, opt_state = ns["train_step"](params, opt_state, ns["batch"], heldout)
  radii = optax.tree.get(opt_state, "radii")
  assert float(radii["params"]["Dense_0"]["kernel"]) > 0
  assert float(radii["params"]["head"]["kernel"]) == 0  # not constrained


@pytest.mark.parametrize(
  "path,section", [(README, "## A quick tour"), (LIBRARY, "## TPGM during fine-tuning")]
)
def test_tour_runs_and_trains(path, section):
  blocks = _blocks(path, section)  # the first block of the section is the tour
  ns = _namespace()
  exec(blocks[0], ns)  # noqa: S102 (the document's own code)
  _check_trains(ns)


def test_readme_tour_is_the_guides_tour():
  readme, guide = _blocks(README, "## A quick tour")[0], _blocks(LIBRARY, "## TPGM during")[0]
  code = lambda block: [ln for ln in block.splitlines() if ln and not ln.startswith("#")]  # noqa: E731
  assert set(code(readme)) - set(code(guide)) == set()


def test_pieces_post_hoc_and_family_run():
  for section, names in [
    ("## The pieces", {"radii", "tx", "trainer_state", "losses"}),
    ("## Post hoc", {"projected", "radii"}),
    ("## The family", {"tx", "merged"}),
  ]:
    blocks = _blocks(LIBRARY, section)
    assert len(blocks) == 1, section
    ns = _namespace()
    exec(PRELUDE + blocks[0], ns)  # noqa: S102
    assert names <= set(ns), section
  assert set(ns["merged"]) == {"params"}


@pytest.mark.parametrize("path", [README, LIBRARY], ids=lambda p: p.name)
def test_every_python_block_runs(path):
  blocks = _blocks(path)
  assert blocks
  for block in blocks:
    ns = _namespace()
    exec(PRELUDE + block, ns)  # noqa: S102
