"""The default experiment with every method of the registry (FTP, SPD, DiGraP and MARS-PGM added).

  python -m experiments.main --config experiments/configs/all_methods.py

It keeps the name ``default``: the runs it shares with the default job (same
configuration, same directories) are reused, not repeated.
"""

from ml_collections import ConfigDict

from experiments.configs import default
from experiments.training import methods


def get_config() -> ConfigDict:
  c = default.get_config()
  c.methods = tuple(methods.METHODS)
  return c
