"""Tests of experiments.methods and experiments.optim: the method registry, the
learned-projection link (TPGM during fine-tuning), parameter groups and optimizers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

import tpgm_jax
from experiments import methods, optim
from experiments.configs import default

PARAMS = {"stem": {"kernel": jnp.ones((3, 4))}, "block1": {"kernel": jnp.ones((4, 4)),
                                                          "bias": jnp.zeros(4)},
          "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}
RULES = (("head/.*", "head"), (".*", "backbone"))


def test_param_groups_first_match_wins():
  groups = optim.param_groups(PARAMS, RULES)
  assert groups == {"block1/bias": "backbone", "block1/kernel": "backbone",
                    "head/bias": "head", "head/kernel": "head", "stem/kernel": "backbone"}


@pytest.mark.parametrize("rules, message", [
    ((("head/.*", "head"),), "matched by no rule: block1/bias"),
    ((("head/.*", "head"), ("hed/.*", "x"), (".*", "b")), "rules matching no parameter .*hed"),
    (((".*", "b"), ("head/.*", "head")), "shadowed.*'head/\\.\\*'"),
])
def test_param_groups_must_cover_exactly(rules, message):
  with pytest.raises(ValueError, match=message):
    optim.param_groups(PARAMS, rules)


def test_group_mask_and_unknown_group():
  mask = optim.group_mask(PARAMS, RULES, ["backbone"])
  assert [p for p in tpgm_jax.leaf_paths(PARAMS) if mask(p)] == [
      "block1/bias", "block1/kernel", "stem/kernel"]
  with pytest.raises(ValueError, match="unknown parameter group"):
    optim.group_mask(PARAMS, RULES, ["backbon"])


def test_freeze_gives_zero_updates_and_no_state_to_frozen_groups():
  tx = optim.freeze(optax.sgd(0.1, momentum=0.9), PARAMS, RULES, ["backbone"])
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
  cfg = ConfigDict(dict(name=name, lr=0.1, momentum=0.9, nesterov=True, weight_decay=wd,
                        schedule=schedule, warmup_steps=2))
  tx = optim.optimizer(cfg, 10)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, PARAMS), tx.init(PARAMS), PARAMS)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))  # warmup starts at 0
  lr = optim.schedule(cfg, 10)
  np.testing.assert_allclose(float(lr(2)), 0.1, rtol=1e-6)


def test_optimizer_errors():
  with pytest.raises(ValueError, match="unknown optimizer"):
    optim.optimizer(ConfigDict(dict(name="lamb", lr=1.0, schedule="constant")), 1)
  with pytest.raises(ValueError, match="adamw"):
    optim.optimizer(ConfigDict(dict(name="adam", lr=1.0, weight_decay=0.1, schedule="constant")), 1)
  with pytest.raises(ValueError, match="unknown schedule"):
    optim.schedule(ConfigDict(dict(lr=1.0, schedule="linear")), 1)


def test_registry_and_run_order():
  config = default.get_config()
  assert set(config.methods) <= set(methods.METHODS)
  order = methods.run_order(config)
  assert order.index("ft") < order.index("wise_ft") < len(order)
  assert order.index("lp") < order.index("lp_ft")
  assert order.index("ft") < order.index("tpgm_post_hoc")
  config.methods = ("wise_ft",)
  assert methods.run_order(config) == ["ft", "wise_ft"]  # dependencies run too
  config.methods = ("sgdp",)
  with pytest.raises(ValueError, match="unknown method 'sgdp'"):
    methods.run_order(config)
  config.methods = ("lp_ft",)
  config.lp.init_from = "lp_ft"
  with pytest.raises(ValueError, match="cycle: lp_ft -> lp -> lp_ft"):
    methods.run_order(config)


def test_train_config_merges_method_overrides():
  config = default.get_config()
  lp = methods.train_config(config, "lp")
  assert lp.frozen == ("backbone",) and lp.optimizer.lr == config.lp.train.optimizer.lr
  assert lp.optimizer.momentum == config.train.optimizer.momentum  # untouched fields kept
  assert methods.train_config(config, "ft").to_dict() == config.train.to_dict()


@pytest.mark.parametrize("name", [n for n, m in methods.METHODS.items() if m.trained])
def test_every_trained_method_steps_and_keeps_the_head_free(name):
  config = default.get_config()
  cfg = methods.train_config(config, name)
  mask = optim.group_mask(PARAMS, RULES, ["backbone"])
  loss = lambda p, b: jnp.sum(jnp.square(p["head"]["kernel"] - b["x"]))
  ctx = methods.Context(config.get(name), optim.optimizer(cfg.optimizer, 10), mask, loss)
  tx = optim.freeze(methods.get(name).transform(ctx), PARAMS, RULES, cfg.frozen)
  state = tx.init(PARAMS)
  extra = {"heldout": {"x": jnp.zeros((config.tpgm.max_iters, 1))}} if name == "tpgm" else {}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), PARAMS)
  for _ in range(2):
    updates, state = jax.jit(lambda g, s, p: tx.update(g, s, p, **extra))(grads, state, PARAMS)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  assert float(jnp.abs(updates["head"]["kernel"]).sum()) > 0


def _quadratic(seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(6, 3)), jnp.float32), 0.4


def test_learned_projection_matches_the_explicit_recipe():
  """chain(inner, learned_projection) == the recipe written out step by step (tests/test_radii)."""
  u, a = _quadratic()
  anchor = {"w": jnp.zeros_like(u), "head": jnp.zeros(3)}
  not_head = lambda path: not path.startswith("head")
  train_loss = lambda p: 0.5 * jnp.sum((p["w"] - u) ** 2) + jnp.sum((p["head"] - 1) ** 2)
  heldout_loss = lambda p, b: jnp.sum((p["w"] - b * u) ** 2)
  inner = optax.sgd(0.1, momentum=0.9, nesterov=True)
  proj_freq, max_iters = 3, 2
  tx = optax.chain(inner, methods.learned_projection(
      heldout_loss, mask=not_head, norm="mars", max_iters=max_iters, lr=2e-2))
  batches = lambda t: jnp.full((max_iters,), a + 0.01 * (t // proj_freq), jnp.float32)

  @jax.jit
  def chained(params, state, heldout):
    updates, state = tx.update(jax.grad(train_loss)(params), state, params, heldout=heldout)
    return optax.apply_updates(params, updates), state

  proj = tpgm_jax.tpgm("mars", not_head)
  trainer = tpgm_jax.radii_trainer(heldout_loss, norm="mars", mask=not_head,
                                   optimizer=optax.adam(2e-2), max_iters=max_iters)

  def explicit(params, inner_state, proj_state, radii, radii_state, t):
    updates, inner_state = inner.update(jax.grad(train_loss)(params), inner_state, params)
    candidate = optax.apply_updates(params, updates)
    if t == 0:
      radii = tpgm_jax.init_radii(candidate, proj_state.anchor, "mars", not_head)
    if t % proj_freq == 0:
      radii, radii_state, _ = trainer.update(radii, radii_state, candidate, proj_state.anchor,
                                             batches(t))
    updates, proj_state = proj.update(updates, proj_state, params, radii=radii)
    return optax.apply_updates(params, updates), inner_state, proj_state, radii, radii_state

  params, state = anchor, tx.init(anchor)
  ref = (anchor, inner.init(anchor), proj.init(anchor),
         jax.tree.map(lambda _: jnp.float32(0), anchor), None)
  ref = ref[:4] + (trainer.init(ref[3]),)
  for t in range(8):
    params, state = chained(params, state, None if t % proj_freq else batches(t))
    ref = explicit(*ref, t)
    np.testing.assert_allclose(params["w"], ref[0]["w"], rtol=1e-6, atol=1e-7, err_msg=f"step {t}")
    np.testing.assert_allclose(params["head"], ref[0]["head"], rtol=1e-6)
  radii = methods.get("tpgm").radii(state)
  np.testing.assert_allclose(radii["w"], ref[3]["w"], rtol=1e-6)
  # The constraint is active: the held-out optimum is a * u, far from the training optimum u.
  assert float(jnp.abs(params["w"]).sum(0).max()) < 0.9 * float(jnp.abs(u).sum(0).max())


def test_learned_projection_needs_params():
  link = methods.learned_projection(lambda p, b: 0.0, mask=lambda p: True)
  state = link.init({"w": jnp.zeros(2)})
  with pytest.raises(ValueError, match="needs the params"):
    link.update({"w": jnp.ones(2)}, state)
