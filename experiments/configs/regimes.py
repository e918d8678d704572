"""The regime map behind RESULTS.md's "Where each method helps".

  python -m experiments.regimes --config experiments/configs/regimes.py --config.regimes.out=.

Cells (``regimes.cells``): a benchmark, a fine-tuning set size (the first ``train_size``
records of the ID train split; 0: all) and a number of steps; the default job's recipe
otherwise. In every cell every method's own hyper-parameters are picked on that cell's ID val
split from the grids of ``regimes.select`` (the same grids in every cell; the fields a method
does not select, e.g. L2-SP's learning rate, are the shared ``train.optimizer.lr`` picked for
FT in that cell), then every method runs with every seed. ``regimes.run`` names the cells to
run now (default: all, by benchmark, then training-set size, then steps); finished runs are
reused.
"""

from ml_collections import ConfigDict

from experiments.configs import study


def get_config() -> ConfigDict:
  c = study.get_config()
  c.name = "regimes"
  variants = ("tpgm_anchor", "tpgm_heldout512")  # variants of the study, not of the map
  c.methods = tuple(m for m in c.methods if m not in variants)
  # TPGM as published and, next to it, the opt-in lazy projection (configs/default.py).
  i = c.methods.index("tpgm") + 1
  c.methods = c.methods[:i] + ("tpgm_lazy",) + c.methods[i:]
  for name in variants:
    del c[name]
  # Methods whose training learning rate is selected on their own carry it in their section.
  c.tpgm.train = ConfigDict({"optimizer": {"lr": 0.03}})
  c.ftp.train = ConfigDict({"optimizer": {"lr": 0.03}})
  c.tpgm_lazy.train = ConfigDict({"optimizer": {"lr": 0.03}})
  c.regimes = ConfigDict()
  c.regimes.seeds = (0, 1, 2)
  c.regimes.select_seed = 0
  c.regimes.run = ()  # cells to run now, in this order; () means every cell
  c.regimes.out = ""  # "" means <workdir>/<name>; "." writes results/ and RESULTS.md here
  # Copies of every finished run's results; "" means <out>/results/regimes_runs.
  c.regimes.store = ""
  c.regimes.partial = False  # True: run nothing, summarise what has finished (partial cells)
  c.regimes.render_only = False  # True: only re-render RESULTS.md from results/regimes*.json
  # Benchmark -> ((config field, value), ...) on top of this config.
  c.regimes.benchmarks = ConfigDict({"shapes": (), "digits": (("data.task", "digits"),)})
  c.regimes.cells = ConfigDict(
    {
      "shapes_scarce": {"benchmark": "shapes", "train_size": 1000, "steps": 400},
      "digits_all": {"benchmark": "digits", "train_size": 0, "steps": 400},
      "digits_scarce": {"benchmark": "digits", "train_size": 250, "steps": 400},
      "shapes_default": {"benchmark": "shapes", "train_size": 0, "steps": 400},
      "shapes_mid": {"benchmark": "shapes", "train_size": 4000, "steps": 400},
      "shapes_long": {"benchmark": "shapes", "train_size": 0, "steps": 1600},
    }
  )
  # (method, config field, values), picked in this order on each cell's ID val split.
  c.regimes.select = (
    ("ft", "train.optimizer.lr", (0.003, 0.01, 0.03)),
    ("lp", "lp.train.optimizer.lr", (0.03, 0.1, 0.3)),
    ("lp_ft", "lp_ft.train.optimizer.lr", (0.003, 0.01)),
    ("l2sp", "l2sp.alpha", (0.01, 0.1, 1.0)),
    ("ftp", "ftp.train.optimizer.lr", (0.01, 0.03)),
    ("ftp", "ftp.k", (0.5, 1.0)),
    ("spd", "spd.train.optimizer.lr", (1e-3, 3e-3)),
    ("spd", "spd.weight_decay", (0.1, 1.0)),
    ("digrap", "digrap.train.optimizer.lr", (1e-3, 3e-3)),
    ("mars_pgm", "mars_pgm.radius", (0.5, 2.0, 8.0)),
    ("tpgm", "tpgm.train.optimizer.lr", (0.01, 0.03, 0.1)),
    ("tpgm", "tpgm.lr", (0.01, 0.1)),
    ("tpgm_lazy", "tpgm_lazy.train.optimizer.lr", (0.01, 0.03, 0.1)),
    ("tpgm_lazy", "tpgm_lazy.lr", (0.01, 0.1)),
    ("tpgm_post_hoc", "tpgm_post_hoc.lr", (0.01, 0.03)),
    ("tpgm_post_hoc_l2", "tpgm_post_hoc_l2.lr", (0.01, 0.03)),
  )
  return c
