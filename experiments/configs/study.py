"""The study behind RESULTS.md: every method x 3 seeds, hyper-parameters picked on ID val.

  python -m experiments.study --config experiments/configs/study.py --config.study.out=.

It shares the default job's benchmark, model, pre-trained checkpoint and fine-tuning
optimizer (so its runs and the main job's reuse each other's cache when their
configurations agree) and adds every method of the registry, the paper's post-hoc
ViT recipe ("l2" norm, 200 radius iterations) next to "mars", a finer WiSE-FT
curve, and the selection grids. See experiments/study.py.
"""

from ml_collections import ConfigDict

from experiments.configs import default


def get_config() -> ConfigDict:
  c = default.get_config()
  c.name = "study"
  c.methods = (
    "ft",
    "lp",
    "lp_ft",
    "l2sp",
    "ftp",
    "spd",
    "digrap",
    "mars_pgm",
    "tpgm",
    "tpgm_anchor",
    "tpgm_heldout512",
    "wise_ft",
    "tpgm_post_hoc",
    "tpgm_post_hoc_l2",
  )
  # TPGM with 4x the held-out data per radius update (less noise, 4x the held-out compute).
  c.tpgm_heldout512 = ConfigDict(
    dict(method="tpgm", norm="mars", proj_freq=1, max_iters=1, lr=1e-2, heldout_batch_size=512)
  )
  c.wise_ft.alphas = tuple(round(0.1 * i, 1) for i in range(11))
  c.tpgm_post_hoc.steps = 200
  c.tpgm_post_hoc_l2 = ConfigDict(
    dict(
      method="tpgm_post_hoc",
      source="lp_ft",
      base="lp",
      norm="l2",
      steps=200,
      lr=1e-2,
      batch_size=128,
    )
  )
  # python -m experiments.mechanism: the run whose radius updates are traced.
  c.mechanism = ConfigDict(dict(method="tpgm"))
  c.study = ConfigDict()
  c.study.seeds = (0, 1, 2)
  c.study.select_seed = 0
  c.study.diagnose = ("ft", "tpgm")  # runs along which the radius signal is measured
  c.study.out = ""  # "" means <workdir>/<name>; "." writes RESULTS.md and results/ here
  c.study.render_only = False  # True: only re-render RESULTS.md and plots from study.json
  # (method, config field, values), picked in this order on the ID val split.
  c.study.select = (
    ("ft", "train.optimizer.lr", (0.01, 0.03, 0.1)),
    ("lp", "lp.train.optimizer.lr", (0.03, 0.1, 0.3)),
    ("lp_ft", "lp_ft.train.optimizer.lr", (0.003, 0.01, 0.03)),
    ("l2sp", "l2sp.alpha", (0.01, 0.1, 1.0)),
    ("spd", "spd.train.optimizer.lr", (3e-4, 1e-3, 3e-3)),
    ("spd", "spd.weight_decay", (0.1, 0.5, 1.0)),
    ("digrap", "digrap.train.optimizer.lr", (3e-4, 1e-3, 3e-3)),
    ("mars_pgm", "mars_pgm.radius", (0.5, 2.0, 8.0)),
  )
  return c
