"""Optimizers and parameter groups from configuration.

Parameter groups are ordered ``(regex, group)`` rules on parameter paths
without the ``params/`` prefix (``'head/kernel'``, ``'block1/unit1/conv/kernel'``),
as in big_vision: a parameter belongs to the FIRST rule whose regex fully
matches its path. :func:`param_groups` checks that the rules cover every
parameter (each by exactly one rule, the first match) and that every rule
covers at least one, so a typo cannot silently freeze or free a layer. Groups
then become optax masks (pytrees of bools, :func:`group_mask`): the frozen
groups get ``optax.set_to_zero`` through ``optax.multi_transform`` and the
constrained groups are the robust methods' ``mask``.

Example:
  >>> rules = (("head/.*", "head"), (".*", "backbone"))
  >>> groups = param_groups(params, rules)               # doctest: +SKIP
  >>> groups["head/kernel"], groups["stem/conv/kernel"]  # doctest: +SKIP
  ('head', 'backbone')
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import optax
from ml_collections import ConfigDict

import tpgm_jax
from experiments.training import weights
from experiments.types import PyTree

Rules = Sequence[tuple[str, str]]

FROZEN, TRAINED = "frozen", "trained"


def param_groups(params: PyTree, rules: Rules) -> dict[str, str]:
  """Path -> group for every leaf of ``params`` under the ordered ``rules``.

  Raises:
    ValueError: a parameter matches no rule, or a rule matches no parameter
      (it is shadowed by an earlier rule or misspelt); all are named.
  """
  compiled = [(re.compile(pattern), group) for pattern, group in rules]
  groups, used, unmatched = {}, set(), []
  for path in tpgm_jax.leaf_paths(params):
    for i, (regex, group) in enumerate(compiled):
      if regex.fullmatch(path):
        groups[path] = group
        used.add(i)
        break
    else:
      unmatched.append(path)
  unused = [rules[i][0] for i in range(len(rules)) if i not in used]
  problems = []
  if unmatched:
    problems.append(f"parameters matched by no rule: {weights.listing(unmatched)}")
  if unused:
    problems.append(
      f"rules matching no parameter (misspelt or shadowed by an earlier rule): {unused}"
    )
  if problems:
    raise ValueError(
      f"param_groups {tuple(map(tuple, rules))} do not cover the model "
      "exactly:\n  " + "\n  ".join(problems)
    )
  return groups


def group_mask(params: PyTree, rules: Rules, selected: Sequence[str]) -> PyTree:
  """The mask of the parameters of the ``selected`` groups: a pytree of bools
  with the structure of ``params``, as ``optax.masked`` and ``tpgm_jax`` take it.

  Raises ``ValueError`` for a selected group name that no rule defines.
  """
  groups = param_groups(params, rules)
  unknown = sorted(set(selected) - {g for _, g in rules})
  if unknown:
    raise ValueError(
      f"unknown parameter group(s) {unknown}; the rules define {sorted({g for _, g in rules})}"
    )
  chosen = {path for path, g in groups.items() if g in set(selected)}
  return tpgm_jax.path_mask(include=lambda path: path in chosen)(params)


def freeze(
  tx: optax.GradientTransformation, params: PyTree, rules: Rules, frozen: Sequence[str]
) -> optax.GradientTransformation:
  """``tx`` on the trained parameters and zero updates (no state) on the ``frozen`` groups."""
  if not frozen:
    return tx
  labels = jax.tree.map(lambda f: FROZEN if f else TRAINED, group_mask(params, rules, frozen))
  return optax.multi_transform({TRAINED: tx, FROZEN: optax.set_to_zero()}, labels)


def schedule(settings: ConfigDict, steps: int) -> optax.Schedule:
  """Learning-rate schedule: ``settings.schedule`` ("cosine" or "constant") after
  ``settings.warmup_steps`` of linear warm-up."""
  warmup = int(settings.get("warmup_steps", 0))
  if settings.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, settings.lr, warmup, max(steps, warmup + 1))
  if settings.schedule == "constant":
    if warmup:
      return optax.join_schedules(
        [optax.linear_schedule(0.0, settings.lr, warmup), optax.constant_schedule(settings.lr)],
        [warmup],
      )
    return optax.constant_schedule(settings.lr)
  raise ValueError(f"unknown schedule {settings.schedule!r}; use 'cosine' or 'constant'")


def optimizer(settings: ConfigDict, steps: int) -> optax.GradientTransformation:
  """The inner optimizer of ``settings`` (``name`` in sgd / adam / adamw) over ``steps`` steps.

  ``sgd`` adds ``weight_decay * w`` to the gradient before the momentum (PyTorch's
  coupled decay, as in the TPGM recipe); ``adamw`` decouples it; ``adam`` has none.
  """
  lr = schedule(settings, steps)
  wd = float(settings.get("weight_decay", 0.0))
  if settings.name == "sgd":
    sgd = optax.sgd(
      lr, momentum=settings.get("momentum") or None, nesterov=bool(settings.get("nesterov"))
    )
    return optax.chain(optax.add_decayed_weights(wd), sgd) if wd else sgd
  if settings.name == "adam":
    if wd:
      raise ValueError("adam has no weight decay here: use name='adamw'")
    return optax.adam(lr)
  if settings.name == "adamw":
    return optax.adamw(lr, weight_decay=wd)
  raise ValueError(f"unknown optimizer {settings.name!r}; use 'sgd', 'adam' or 'adamw'")
