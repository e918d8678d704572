"""Tests of experiments.training.methods and .optimizers: the method registry, parameter
groups and optimizers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

import tpgm_jax
from experiments import plan
from experiments.configs import default
from experiments.training import methods, optimizers

PARAMS = {
  "stem": {"kernel": jnp.ones((3, 4))},
  "block1": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)},
  "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)},
}
RULES = (("head/.*", "head"), (".*", "backbone"))


def test_param_groups_first_match_wins():
  groups = optimizers.param_groups(PARAMS, RULES)
  assert groups == {
    "block1/bias": "backbone",
    "block1/kernel": "backbone",
    "head/bias": "head",
    "head/kernel": "head",
    "stem/kernel": "backbone",
  }


@pytest.mark.parametrize(
  "rules, message",
  [
    ((("head/.*", "head"),), "matched by no rule: block1/bias"),
    ((("head/.*", "head"), ("hed/.*", "x"), (".*", "b")), "rules matching no parameter .*hed"),
    (((".*", "b"), ("head/.*", "head")), "shadowed.*'head/\\.\\*'"),
  ],
)
def test_param_groups_must_cover_exactly(rules, message):
  with pytest.raises(ValueError, match=message):
    optimizers.param_groups(PARAMS, rules)


def test_group_mask_and_unknown_group():
  mask = optimizers.group_mask(PARAMS, RULES, ["backbone"])
  assert mask == {
    "stem": {"kernel": True},
    "block1": {"kernel": True, "bias": True},
    "head": {"kernel": False, "bias": False},
  }
  with pytest.raises(ValueError, match="unknown parameter group"):
    optimizers.group_mask(PARAMS, RULES, ["backbon"])


def test_freeze_gives_zero_updates_and_no_state_to_frozen_groups():
  tx = optimizers.freeze(optax.sgd(0.1, momentum=0.9), PARAMS, RULES, ["backbone"])
  state = tx.init(PARAMS)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  updates, _ = tx.update(grads, state, PARAMS)
  for path, u in zip(tpgm_jax.leaf_paths(updates), jax.tree.leaves(updates)):
    assert bool(jnp.all(u == 0)) == (not path.startswith("head")), path
  momentum_leaves = sum(x.size for x in jax.tree.leaves(state))
  assert momentum_leaves == 4 * 2 + 2  # the head only


@pytest.mark.parametrize("name, wd", [("sgd", 0.0), ("sgd", 5e-4), ("adam", 0.0), ("adamw", 0.1)])
@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_optimizer_from_config(name, wd, schedule):
  settings = ConfigDict(
    dict(
      name=name,
      lr=0.1,
      momentum=0.9,
      nesterov=True,
      weight_decay=wd,
      schedule=schedule,
      warmup_steps=2,
    )
  )
  tx = optimizers.optimizer(settings, 10)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, PARAMS), tx.init(PARAMS), PARAMS)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))  # warmup starts at 0
  lr = optimizers.schedule(settings, 10)
  np.testing.assert_allclose(float(lr(2)), 0.1, rtol=1e-6)


def test_optimizer_errors():
  with pytest.raises(ValueError, match="unknown optimizer"):
    optimizers.optimizer(ConfigDict(dict(name="lamb", lr=1.0, schedule="constant")), 1)
  with pytest.raises(ValueError, match="adamw"):
    optimizers.optimizer(
      ConfigDict(dict(name="adam", lr=1.0, weight_decay=0.1, schedule="constant")), 1
    )
  with pytest.raises(ValueError, match="unknown schedule"):
    optimizers.schedule(ConfigDict(dict(lr=1.0, schedule="linear")), 1)


def test_registry_and_run_order():
  config = default.get_config()
  assert set(config.methods) <= set(methods.METHODS)
  order = plan.run_order(config)
  assert order.index("ft") < order.index("wise_ft") < len(order)
  assert order.index("lp") < order.index("lp_ft")
  assert order.index("ft") < order.index("tpgm_post_hoc")
  config.methods = ("wise_ft",)
  assert plan.run_order(config) == ["lp", "lp_ft", "wise_ft"]  # dependencies run too
  config.methods = ("sgdp",)
  with pytest.raises(ValueError, match="unknown method 'sgdp'"):
    plan.run_order(config)
  config.methods = ("lp_ft",)
  config.lp.init_from = "lp_ft"
  with pytest.raises(ValueError, match="cycle: lp_ft -> lp -> lp_ft"):
    plan.run_order(config)


def test_train_config_merges_method_overrides():
  config = default.get_config()
  lp = plan.train_config(config, "lp")
  assert lp.frozen == ("backbone",) and lp.optimizer.lr == config.lp.train.optimizer.lr
  assert lp.optimizer.momentum == config.train.optimizer.momentum  # untouched fields kept
  assert plan.train_config(config, "ft").to_dict() == config.train.to_dict()


@pytest.mark.parametrize("name", [n for n, m in methods.METHODS.items() if m.trained])
def test_every_trained_method_steps_and_keeps_the_head_free(name):
  config = default.get_config()
  settings = plan.train_config(config, name)
  mask = optimizers.group_mask(PARAMS, RULES, ["backbone"])

  def loss(p, b):
    return jnp.sum(jnp.square(p["head"]["kernel"] - b["x"]))

  ctx = methods.Context(config.get(name), optimizers.optimizer(settings.optimizer, 10), mask, loss)
  tx = optimizers.freeze(methods.get(name).transform(ctx), PARAMS, RULES, settings.frozen)
  state = tx.init(PARAMS)
  extra = {"heldout": {"x": jnp.zeros((config.tpgm.max_iters, 1))}} if name == "tpgm" else {}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), PARAMS)
  for _ in range(2):
    updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, **extra))(grads, state, PARAMS)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  assert float(jnp.abs(updates["head"]["kernel"]).sum()) > 0


@pytest.mark.parametrize("section, lazy", [("tpgm", False), ("tpgm_lazy", True)])
def test_tpgm_sections_choose_eager_or_lazy_projection(section, lazy):
  """configs/default.py's tpgm_lazy reaches the library as lazy=True; tpgm stays as published."""
  config = default.get_config()
  settings = plan.train_config(config, section)
  mask = optimizers.group_mask(PARAMS, RULES, ["backbone"])
  ctx = methods.Context(
    config.get(section), optimizers.optimizer(settings.optimizer, 10), mask, lambda p, b: 0.0
  )
  state = methods.get(config.get(section).get("method", section)).transform(ctx).init(PARAMS)
  kind = tpgm_jax.LazyProjectionState if lazy else tpgm_jax.TrainableProjectionState
  assert isinstance(state[-1], kind)
