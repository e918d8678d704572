"""The tpgm optax transformation inside chains, schedules and MultiSteps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tpgm_jax
from tests import oracle
from tests.test_projection import make_tree

NOT_HEAD = tpgm_jax.path_mask(exclude=r"params/head/.*")


def _grads(params, seed):
  ks = iter(jax.random.split(jax.random.key(seed), 16))
  return jax.tree.map(lambda p: jax.random.normal(next(ks), p.shape, p.dtype), params)


def _run_reference(inner, params, radii, steps, norm, mask):
  """Plain optax optimizer followed by an explicit NumPy projection."""
  anchor = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
  flags = jax.tree.leaves(mask(params))
  state = inner.init(params)
  for t in range(steps):
    updates, state = inner.update(_grads(params, t), state, params)
    cand = optax.apply_updates(params, updates)
    leaves = [
      oracle.project(np.asarray(c, np.float64), a, float(r), norm).astype(np.float32) if f else c
      for c, a, r, f in zip(jax.tree.leaves(cand), anchor, jax.tree.leaves(radii), flags)
    ]
    params = jax.tree.unflatten(jax.tree.structure(params), [jnp.asarray(x) for x in leaves])
  return params


OPTIMIZERS = {
  "sgd_nesterov": lambda: optax.sgd(1e-1, momentum=0.9, nesterov=True),
  "adamw": lambda: optax.adamw(1e-1, weight_decay=5e-4),
  "sgd_cosine": lambda: optax.sgd(optax.cosine_decay_schedule(0.2, 10), momentum=0.9),
}


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("norm", ("mars", "l2"))
def test_chain_matches_optimizer_then_projection(opt, norm):
  params, _ = make_tree("nested")
  radii = jax.tree.map(lambda x: jnp.float32(0.3 + 0.01 * x.size), params)
  tx = optax.chain(OPTIMIZERS[opt](), tpgm_jax.tpgm(norm=norm, mask=NOT_HEAD))
  state = tx.init(params)
  step = jax.jit(lambda p, s, g, r: tx.update(g, s, p, radii=r))
  p = params
  for t in range(4):
    updates, state = step(p, state, _grads(p, t), radii)
    p = optax.apply_updates(p, updates)
  ref = _run_reference(OPTIMIZERS[opt](), params, radii, 4, norm, NOT_HEAD)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  # Inside the constraint set; the head is not constrained and has moved far.
  norms = tpgm_jax.distance_norms(p, params, norm, NOT_HEAD)
  for path, n, r in zip(
    tpgm_jax.leaf_paths(params),
    jax.tree.leaves(norms, is_leaf=lambda x: x is None),
    jax.tree.leaves(radii),
  ):
    if n is not None:
      assert float(jnp.max(n)) <= float(r) * (1 + 1e-5), path
  assert float(jnp.max(tpgm_jax.distance_norms(p, params, norm)["params"]["head"]["kernel"])) > 0.5


def test_state_holds_anchor_once_and_not_as_constant():
  params, _ = make_tree("nested")
  tx = tpgm_jax.tpgm(mask=NOT_HEAD)
  state = tx.init(params)
  assert isinstance(state, tpgm_jax.TPGMState)
  assert isinstance(state.anchor["params"]["head"]["kernel"], optax.MaskedNode)
  np.testing.assert_array_equal(
    state.anchor["params"]["Dense_0"]["kernel"], params["params"]["Dense_0"]["kernel"]
  )
  # The anchor has buffers of its own, so params and state can both be donated.
  assert state.anchor["params"]["Dense_0"]["kernel"] is not params["params"]["Dense_0"]["kernel"]
  # The anchor enters the traced step through the state, not as a constant.
  radii = tpgm_jax.init_radii(params, params)
  jaxpr = jax.make_jaxpr(lambda u, s, p, r: tx.update(u, s, p, radii=r))(
    params, state, params, radii
  )
  assert all(np.size(c) <= 1 for c in jaxpr.consts)


def test_donation_of_params_and_state():
  params, _ = make_tree("dense")
  tx = optax.chain(optax.sgd(0.1), tpgm_jax.tpgm())
  state = tx.init(params)
  radii = jax.tree.map(lambda _: jnp.float32(0.1), params)

  def step(p, s, r):
    u, s = tx.update(p, s, p, radii=r)
    return optax.apply_updates(p, u), s

  step = jax.jit(step, donate_argnums=(0, 1))
  p, s = step(params, state, radii)
  assert np.all(np.isfinite(np.asarray(p["kernel"])))


def test_multisteps_accumulates_then_projects():
  params, _ = make_tree("dense")
  radii = {"kernel": jnp.float32(0.2)}
  inner = optax.chain(optax.sgd(0.5), tpgm_jax.tpgm())
  tx = optax.MultiSteps(inner, every_k_schedule=2)
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p, radii=radii))
  g1, g2 = _grads(params, 1), _grads(params, 2)
  u, state = step(params, state, g1)
  p1 = optax.apply_updates(params, u)
  np.testing.assert_array_equal(p1["kernel"], params["kernel"])  # accumulating
  u, state = step(p1, state, g2)
  p2 = optax.apply_updates(p1, u)
  cand = params["kernel"] - 0.5 * (g1["kernel"] + g2["kernel"]) / 2
  np.testing.assert_allclose(
    p2["kernel"], oracle.project(cand, params["kernel"], 0.2, "mars"), rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize("dtype", (jnp.float32, jnp.bfloat16))
def test_low_precision_params(dtype):
  params, _ = make_tree("conv", dtype)
  tx = optax.chain(optax.sgd(1.0), tpgm_jax.tpgm())
  state = tx.init(params)
  radii = {"kernel": jnp.float32(0.5)}
  updates, state = jax.jit(lambda p, s: tx.update(_grads(p, 0), s, p, radii=radii))(params, state)
  new = optax.apply_updates(params, updates)
  assert new["kernel"].dtype == dtype
  n = np.asarray(tpgm_jax.distance_norms(new, params)["kernel"])
  # Storing the projected f32 values in `dtype` moves each element by at most
  # half an ulp: the channel's L1 norm can exceed the radius by their sum.
  half_ulp = 2.0 ** -(jnp.finfo(dtype).nmant + 1)
  slack = np.sum(np.abs(np.asarray(new["kernel"], np.float64)), axis=(0, 1, 2)) * half_ulp
  assert np.all(n <= 0.5 + slack + 1e-6)
  assert np.any(n >= 0.5 - slack)  # the radius is active


def test_errors():
  params, _ = make_tree("nested")
  tx = tpgm_jax.tpgm()
  state = tx.init(params)
  radii = tpgm_jax.init_radii(params, params)
  with pytest.raises(ValueError, match="tpgm needs the params: call update"):
    tx.update(params, state, None, radii=radii)
  with pytest.raises(ValueError, match="tpgm needs the params: call tx.init"):
    tx.init(None)
  with pytest.raises(ValueError, match="radii are required"):
    tx.update(params, state, params)
  bad = {"params": dict(radii["params"])}
  del bad["params"]["head"]
  with pytest.raises(
    ValueError, match="radii must have the same tree structure as params: missing from radii"
  ):
    tx.update(params, state, params, radii=bad)
  other = jax.tree.map(lambda x: x, params)
  other["params"]["Dense_0"]["kernel"] = jnp.zeros((4, 4))
  with pytest.raises(
    ValueError,
    match="anchor at 'params/Dense_0/kernel' has shape \\(4, 3\\) but params have \\(4, 4\\)",
  ):
    tx.update(other, state, other, radii=radii)
  with pytest.raises(ValueError, match="norm must be one of"):
    tpgm_jax.tpgm(norm="linf")


def test_fixed_radii_mars_pgm():
  params, _ = make_tree("nested")
  grads = _grads(params, 0)
  one = optax.chain(optax.sgd(1.0), tpgm_jax.tpgm(mask=NOT_HEAD, radii=0.3))
  per_tensor = optax.chain(
    optax.sgd(1.0),
    tpgm_jax.tpgm(mask=NOT_HEAD, radii=jax.tree.map(lambda _: jnp.float32(0.3), params)),
  )
  given = optax.chain(optax.sgd(1.0), tpgm_jax.tpgm(mask=NOT_HEAD))
  outs = [
    tx.update(grads, tx.init(params), params, **kw)[0]
    for tx, kw in (
      (one, {}),
      (per_tensor, {}),
      (given, {"radii": jax.tree.map(lambda _: jnp.float32(0.3), params)}),
    )
  ]
  for out in outs[1:]:
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(outs[0])):
      np.testing.assert_array_equal(a, b)
  new = optax.apply_updates(params, outs[0])
  norms = tpgm_jax.distance_norms(new, params, mask=NOT_HEAD)
  assert max(float(jnp.max(n)) for n in jax.tree.leaves(norms)) <= 0.3 * (1 + 1e-5)
  with pytest.raises(ValueError, match="radii must be a finite number >= 0, got -1.0"):
    tpgm_jax.tpgm(radii=-1.0)
