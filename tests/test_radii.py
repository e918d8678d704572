"""The outer loop: radius updates, the fine-tuning recipe and post-hoc TPGM."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tpgm_jax
from tests import oracle


def _problem():
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(4, 3)).astype(np.float32)
  w = (w0 + rng.normal(size=(4, 3))).astype(np.float32)
  targets = rng.normal(size=(3, 4, 3)).astype(np.float32)

  def loss(p, t):
    return jnp.sum((p["k"] - t) ** 2)

  def np_loss(r, t):
    return float(np.sum((oracle.project(w, w0, r, "mars") - t) ** 2))

  return w, w0, targets, loss, np_loss


def test_update_matches_numpy_adam():
  """Three iterations against finite-difference gradients and a NumPy Adam."""
  w, w0, targets, loss, np_loss = _problem()
  maxn = float(np.max(oracle.norms(w - w0, "mars")))
  trainer = tpgm_jax.radii_trainer(loss, max_iters=3)
  r0 = {"k": jnp.float32(0.6 * maxn)}
  radii, state, losses = jax.jit(trainer.update)(r0, trainer.init(r0), {"k": w}, {"k": w0}, targets)
  r, m, v = 0.6 * maxn, 0.0, 0.0
  for t in range(3):
    r = oracle.clipped_radius(r, oracle.norms(w - w0, "mars"))
    h = 1e-4 * r
    g = (np_loss(r + h, targets[t]) - np_loss(r - h, targets[t])) / (2 * h)
    np.testing.assert_allclose(float(losses[t]), np_loss(r, targets[t]), rtol=1e-5)
    u, m, v = oracle.adam_step(g, m, v, t + 1)
    r = r + u
  np.testing.assert_allclose(float(radii["k"]), r, rtol=1e-5)


def test_stored_radii_are_clipped_before_each_step():
  w, w0, targets, loss, np_loss = _problem()
  maxn = float(np.max(oracle.norms(w - w0, "mars")))
  trainer = tpgm_jax.radii_trainer(loss)
  for r0, start in ((1e3, maxn), (-5.0, 1e-8)):
    r = {"k": jnp.float32(r0)}
    radii, _, losses = trainer.update(r, trainer.init(r), {"k": w}, {"k": w0}, targets[:1])
    np.testing.assert_allclose(float(losses[0]), np_loss(start, targets[0]), rtol=1e-5)
    # Adam's first step has length lr = 1e-2 (in the direction of descent).
    h = 1e-4 * maxn
    g = (
      (np_loss(start + h, targets[0]) - np_loss(start, targets[0])) / h
      if r0 < 0
      else (np_loss(start, targets[0]) - np_loss(start - h, targets[0])) / h
    )
    np.testing.assert_allclose(float(radii["k"]), start - 1e-2 * np.sign(g), rtol=1e-5, atol=1e-7)


def test_bad_batches_and_max_iters():
  def loss(p, b):
    return jnp.sum(p["k"] * b)

  with pytest.raises(ValueError, match="max_iters must be an int >= 1, got 0"):
    tpgm_jax.radii_trainer(loss, max_iters=0)
  trainer = tpgm_jax.radii_trainer(loss, max_iters=2)
  p = {"k": jnp.ones(3)}
  r = {"k": jnp.float32(1)}
  with pytest.raises(ValueError, match="batches at 'x' has shape \\(3,\\).*max_iters=2"):
    trainer.update(r, trainer.init(r), p, p, {"x": jnp.ones(3)})


def _quadratic_problem(dim=6, seed=0):
  """Training optimum w_tr, held-out optimum between the anchor and w_tr.

  With anchor 0 and w_tr = u, the held-out loss ||w - a u||^2 (0 < a < 1) is
  minimised along the segment at w = a u: for "l2" the best radius is
  a * ||u||, the projection of any point beyond it on the same ray.
  """
  rng = np.random.default_rng(seed)
  u = rng.normal(size=(dim,)).astype(np.float32)
  return u, 0.35


def test_radius_converges_to_known_optimum_post_hoc():
  u, a = _quadratic_problem()
  anchor, finetuned = {"w": jnp.zeros_like(u)}, {"w": jnp.asarray(u)}

  def heldout_loss(p, b):
    return jnp.sum((p["w"] - b * u) ** 2)

  batches = [jnp.float32(a)] * 600
  projected, radii = tpgm_jax.learn_radii_post_hoc(
    heldout_loss, finetuned, anchor, batches, norm="l2", optimizer=optax.adam(5e-2)
  )
  np.testing.assert_allclose(float(radii["w"]), a * np.linalg.norm(u), rtol=1e-2)
  np.testing.assert_allclose(projected["w"], a * u, rtol=1e-2, atol=1e-3)


def test_fine_tuning_recipe_converges_to_known_optimum():
  """The during-fine-tuning recipe: SGD step, radius update, projection."""
  u, a = _quadratic_problem(seed=1)
  anchor = {"w": jnp.zeros_like(u)}

  def train_loss(p):
    return 0.5 * jnp.sum((p["w"] - u) ** 2)

  def heldout_loss(p, b):
    return jnp.sum((p["w"] - b * u) ** 2)

  inner = optax.sgd(0.1, momentum=0.9, nesterov=True)
  proj = tpgm_jax.tpgm(norm="l2")
  trainer = tpgm_jax.radii_trainer(heldout_loss, norm="l2", optimizer=optax.adam(2e-2))

  @jax.jit
  def step(params, inner_state, proj_state, radii, radii_state, t):
    updates, inner_state = inner.update(jax.grad(train_loss)(params), inner_state, params)
    candidate = optax.apply_updates(params, updates)
    # The radii start at the first projection update, from the candidate.
    radii = jax.tree.map(
      lambda r, r0: jnp.where(t == 0, r0, r),
      radii,
      tpgm_jax.init_radii(candidate, proj_state.anchor, "l2"),
    )
    radii, radii_state, _ = trainer.update(
      radii, radii_state, candidate, proj_state.anchor, jnp.full((1,), a, jnp.float32)
    )
    updates, proj_state = proj.update(updates, proj_state, params, radii=radii)
    return optax.apply_updates(params, updates), inner_state, proj_state, radii, radii_state

  params = anchor
  inner_state, proj_state = inner.init(params), proj.init(params)
  radii = {"w": jnp.float32(0)}
  radii_state = trainer.init(radii)
  for t in range(400):
    params, inner_state, proj_state, radii, radii_state = step(
      params, inner_state, proj_state, radii, radii_state, t
    )
  np.testing.assert_allclose(np.linalg.norm(params["w"]), a * np.linalg.norm(u), rtol=2e-2)
  np.testing.assert_allclose(params["w"], a * u, rtol=5e-2, atol=5e-3)
  # Without TPGM the same SGD run reaches the training optimum instead.
  assert np.linalg.norm(a * u - u) > 10 * np.linalg.norm(params["w"] - a * u)


def test_bfloat16_params_keep_float32_radii():
  w, w0, targets, _, np_loss = _problem()

  def loss(p, t):
    return jnp.sum((p["k"].astype(jnp.float32) - t) ** 2)

  p, a = {"k": jnp.asarray(w, jnp.bfloat16)}, {"k": jnp.asarray(w0, jnp.bfloat16)}
  trainer = tpgm_jax.radii_trainer(loss, max_iters=3)
  radii = tpgm_jax.init_radii(p, a)
  assert radii["k"].dtype == jnp.float32
  new, state, losses = jax.jit(trainer.update)(radii, trainer.init(radii), p, a, targets)
  assert new["k"].dtype == jnp.float32 and np.all(np.isfinite(np.asarray(losses)))
  ref, _, _ = trainer.update(
    radii,
    trainer.init(radii),
    {"k": jnp.asarray(p["k"], jnp.float32)},
    {"k": jnp.asarray(a["k"], jnp.float32)},
    targets,
  )
  np.testing.assert_allclose(float(new["k"]), float(ref["k"]), rtol=1e-3)
