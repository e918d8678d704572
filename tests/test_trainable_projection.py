"""TPGM during fine-tuning as one optax link: tpgm_jax.trainable_projection."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tpgm_jax
from tests import oracle, oracle_family
from tpgm_jax import _transform

NOT_HEAD = tpgm_jax.path_mask(exclude=r"params/head/.*")
SHAPES = {"dense1": (4, 6), "dense2": (6, 5), "head": (5, 3)}


def _mlp_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "params": {
      name: {
        "kernel": jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32),
        "bias": jnp.asarray(0.1 * rng.normal(size=s[1]), jnp.float32),
      }
      for name, s in SHAPES.items()
    }
  }


def _heldout_loss(params, batch):
  x = batch["x"]
  for name in SHAPES:
    layer = params["params"][name]
    x = x @ layer["kernel"] + layer["bias"]
    if name != "head":
      x = jnp.tanh(x)
  return jnp.mean((x - batch["y"]) ** 2)


def _np_heldout_loss(leaves, batch):
  """The same loss on float64 leaves in flattening order (bias before kernel)."""
  x = np.asarray(batch["x"], np.float64)
  layers = dict(zip(sorted(SHAPES), zip(leaves[0::2], leaves[1::2])))
  for name in SHAPES:
    bias, kernel = layers[name]
    x = x @ kernel + bias
    if name != "head":
      x = np.tanh(x)
  return float(np.mean((x - np.asarray(batch["y"], np.float64)) ** 2))


def _batch(seed, n=8):
  rng = np.random.default_rng(1000 + seed)
  return {
    "x": rng.normal(size=(n, 4)).astype(np.float32),
    "y": rng.normal(size=(n, 3)).astype(np.float32),
  }


def _grads(params, t):
  rng = np.random.default_rng(100 + t)
  return jax.tree.map(lambda p: jnp.asarray(0.5 * rng.normal(size=p.shape), p.dtype), params)


def _stacked(batches):
  return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def _run_mlp(norm, units, lazy, steps=6, max_iters=2):
  """Six steps, held-out batches every other step, two radius iterations each: the
  params after each step, the final state and the oracle."""
  params, steps, max_iters = _mlp_params(), 6, 2
  inner = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.2, momentum=0.9, nesterov=True))
  tx = optax.chain(
    inner,
    tpgm_jax.trainable_projection(
      _heldout_loss,
      norm=norm,
      mask=NOT_HEAD,
      radius_optimizer=optax.adam(5e-2),
      max_iters=max_iters,
      radius_units=units,
      lazy=lazy,
    ),
  )
  state = tx.init(params)
  step = jax.jit(lambda p, s, g, h: tx.update(g, s, p, heldout=h))

  def flat(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]

  anchors = [
    None if "head" in path else w for path, w in zip(tpgm_jax.leaf_paths(params), flat(params))
  ]
  ref = oracle.TrainableProjection(
    oracle_family.SGD(0.2, momentum=0.9, nesterov=True, weight_decay=5e-4),
    anchors,
    _np_heldout_loss,
    norm,
    lr=5e-2,
    units=units,
    lazy=lazy,
  )
  p, ws, trajectory = params, flat(params), []
  for t in range(steps):
    batches = [_batch(t * max_iters + k) for k in range(max_iters)] if t % 2 == 0 else None
    updates, state = step(p, state, _grads(p, t), None if batches is None else _stacked(batches))
    p = optax.apply_updates(p, updates)
    ws = ref.step(ws, flat(_grads(params, t)), batches)
    trajectory.append((p, ws))
  return params, trajectory, state, ref


@pytest.mark.parametrize(
  "norm,units,lazy",
  [
    ("mars", "absolute", False),
    ("l2", "absolute", False),
    ("mars", "anchor", False),
    ("l2", "anchor", False),
    ("mars", "absolute", True),
    ("l2", "absolute", True),
  ],
)
def test_matches_numpy_reference(norm, units, lazy):
  """Six steps, held-out batches every other step, two radius iterations each."""
  params, trajectory, state, ref = _run_mlp(norm, units, lazy)
  for t, (p, ws) in enumerate(trajectory):
    for path, got, want in zip(tpgm_jax.leaf_paths(p), jax.tree.leaves(p), ws):
      np.testing.assert_allclose(
        np.asarray(got, np.float64), want, rtol=1e-4, atol=2e-6, err_msg=f"step {t} {path}"
      )
  if lazy:  # the unprojected iterate is the oracle's last candidate
    free = optax.tree.get(state, "free")
    for path, f, want in zip(tpgm_jax.leaf_paths(params), jax.tree.leaves(free), ref.free):
      if "head" not in path:
        np.testing.assert_allclose(np.asarray(f, np.float64), want, rtol=1e-4, atol=2e-6)
  radii = optax.tree.get(state, "radii")
  for path, r in zip(tpgm_jax.leaf_paths(params), jax.tree.leaves(radii)):
    i = tpgm_jax.leaf_paths(params).index(path)
    if "head" in path:
      assert float(r) == 0.0  # unconstrained: never used
    else:
      np.testing.assert_allclose(float(r), ref.radii[i], rtol=1e-4, atol=1e-7, err_msg=path)
  # The constraint is active: some tensor sits on its ball.
  norms = tpgm_jax.distance_norms(p, params, norm, NOT_HEAD)
  on_ball = [
    abs(float(jnp.max(n)) - float(np.clip(r, 1e-8, None))) < 1e-4 * float(r)
    for n, r in zip(jax.tree.leaves(norms), jax.tree.leaves(radii))
    if float(r) > 0
  ]
  assert any(on_ball)


def test_lazy_projection_steps_from_the_unprojected_iterate():
  """Lazy and eager differ from the second step on (the oracle check above could not tell a
  lazy flag that is ignored from one that works otherwise), and the lazy state has the free
  iterate for constrained tensors only."""
  _, eager, _, _ = _run_mlp("mars", "absolute", False)
  params, lazy, state, _ = _run_mlp("mars", "absolute", True)
  assert isinstance(state[1], tpgm_jax.LazyProjectionState)
  for a, b in zip(jax.tree.leaves(eager[0][0]), jax.tree.leaves(lazy[0][0])):
    np.testing.assert_array_equal(a, b)  # the first step starts from the anchor in both
  gaps = [
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(jax.tree.leaves(eager[-1][0]), jax.tree.leaves(lazy[-1][0]))
  ]
  assert max(gaps) > 1e-3
  free = optax.tree.get(state, "free")
  assert tpgm_jax.leaf_paths(free) == [p for p in tpgm_jax.leaf_paths(params) if "head" not in p]


@pytest.mark.parametrize("units,invariant", [("anchor", True), ("absolute", False)])
def test_anchor_units_make_radius_learning_scale_invariant(units, invariant):
  """Scaling weights, anchor and loss argument by c: anchor units give the same run times c."""
  params, c = _mlp_params(), 8.0  # a power of two: the scaling itself is exact

  def run(scale):
    p0 = jax.tree.map(lambda x: scale * x, params)

    def loss(p, b):
      return _heldout_loss(jax.tree.map(lambda x: x / scale, p), b)

    tx = optax.chain(
      optax.sgd(0.05 * scale**2),
      tpgm_jax.trainable_projection(loss, mask=NOT_HEAD, radius_units=units),
    )
    state, p = tx.init(p0), p0
    step = jax.jit(lambda p, s, g, h: tx.update(g, s, p, heldout=h))
    for t in range(4):
      grads = jax.grad(loss)(p, _batch(100 + t))
      updates, state = step(p, state, grads, _stacked([_batch(t)]))
      p = optax.apply_updates(p, updates)
    return p, optax.tree.get(state, "radii")

  (p1, r1), (pc, rc) = run(1.0), run(c)
  same = all(
    np.allclose(c * np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves((p1, r1)), jax.tree.leaves((pc, rc)))
  )
  assert same == invariant


def test_converges_to_known_optimum():
  """Training optimum u, held-out optimum a*u with anchor 0: the ball shrinks to a*||u||."""
  u, a = np.random.default_rng(1).normal(size=(6,)).astype(np.float32), 0.35

  def train_loss(p):
    return 0.5 * jnp.sum((p["w"] - u) ** 2)

  def heldout_loss(p, b):
    return jnp.sum((p["w"] - b * u) ** 2)

  tx = optax.chain(
    optax.sgd(0.1, momentum=0.9, nesterov=True),
    tpgm_jax.trainable_projection(heldout_loss, norm="l2", radius_optimizer=optax.adam(2e-2)),
  )
  params = {"w": jnp.zeros_like(u)}
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(
      jax.grad(train_loss)(params), state, params, heldout=jnp.full((1,), a, jnp.float32)
    )
    return optax.apply_updates(params, updates), state

  for _ in range(400):
    params, state = step(params, state)
  np.testing.assert_allclose(np.linalg.norm(params["w"]), a * np.linalg.norm(u), rtol=2e-2)
  np.testing.assert_allclose(params["w"], a * u, rtol=5e-2, atol=5e-3)
  np.testing.assert_allclose(
    float(optax.tree.get(state, "radii")["w"]), a * np.linalg.norm(u), rtol=2e-2
  )
  # Without TPGM the same SGD run reaches the training optimum instead.
  assert np.linalg.norm(a * u - u) > 10 * np.linalg.norm(params["w"] - a * u)


def _quadratic(seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(6, 3)), jnp.float32), 0.4


def test_matches_the_functional_recipe():
  """chain(inner, trainable_projection) == radii_trainer + tpgm composed by hand."""
  u, a = _quadratic()
  anchor = {"w": jnp.zeros_like(u), "head": jnp.zeros(3)}
  not_head = tpgm_jax.path_mask(exclude="head")

  def train_loss(p):
    return 0.5 * jnp.sum((p["w"] - u) ** 2) + jnp.sum((p["head"] - 1) ** 2)

  def heldout_loss(p, b):
    return jnp.sum((p["w"] - b * u) ** 2)

  inner = optax.sgd(0.1, momentum=0.9, nesterov=True)
  proj_freq, max_iters = 3, 2
  tx = optax.chain(
    inner,
    tpgm_jax.trainable_projection(
      heldout_loss,
      mask=not_head,
      norm="mars",
      max_iters=max_iters,
      radius_optimizer=optax.adam(2e-2),
    ),
  )

  def batches(t):
    return jnp.full((max_iters,), a + 0.01 * (t // proj_freq), jnp.float32)

  @jax.jit
  def chained(params, state, heldout):
    updates, state = tx.update(jax.grad(train_loss)(params), state, params, heldout=heldout)
    return optax.apply_updates(params, updates), state

  proj = tpgm_jax.tpgm("mars", not_head)
  trainer = tpgm_jax.radii_trainer(
    heldout_loss, norm="mars", mask=not_head, optimizer=optax.adam(2e-2), max_iters=max_iters
  )

  def explicit(params, inner_state, proj_state, radii, radii_state, t):
    updates, inner_state = inner.update(jax.grad(train_loss)(params), inner_state, params)
    candidate = optax.apply_updates(params, updates)
    if t == 0:
      radii = tpgm_jax.init_radii(candidate, proj_state.anchor, "mars", not_head)
    if t % proj_freq == 0:
      radii, radii_state, _ = trainer.update(
        radii, radii_state, candidate, proj_state.anchor, batches(t)
      )
    updates, proj_state = proj.update(updates, proj_state, params, radii=radii)
    return optax.apply_updates(params, updates), inner_state, proj_state, radii, radii_state

  params, state = anchor, tx.init(anchor)
  ref = (
    anchor,
    inner.init(anchor),
    proj.init(anchor),
    jax.tree.map(lambda _: jnp.float32(0), anchor),
    None,
  )
  ref = ref[:4] + (trainer.init(ref[3]),)
  for t in range(8):
    params, state = chained(params, state, None if t % proj_freq else batches(t))
    ref = explicit(*ref, t)
    np.testing.assert_allclose(params["w"], ref[0]["w"], rtol=1e-6, atol=1e-7, err_msg=f"step {t}")
    np.testing.assert_allclose(params["head"], ref[0]["head"], rtol=1e-6)
  radii = optax.tree.get(state, "radii")
  np.testing.assert_allclose(radii["w"], ref[3]["w"], rtol=1e-6)
  # The constraint is active: the held-out optimum is a * u, far from the training optimum u.
  assert float(jnp.abs(params["w"]).sum(0).max()) < 0.9 * float(jnp.abs(u).sum(0).max())


def test_first_update_initialises_radii_and_projection_without_heldout():
  params = _mlp_params()
  tx = optax.chain(optax.sgd(0.3), tpgm_jax.trainable_projection(_heldout_loss, mask=NOT_HEAD))
  state = tx.init(params)
  grads = _grads(params, 0)
  updates, state = tx.update(grads, state, params)
  candidate = optax.apply_updates(params, jax.tree.map(lambda g: -0.3 * g, grads))
  want = tpgm_jax.init_radii(candidate, params, mask=NOT_HEAD)
  got = optax.tree.get(state, "radii")
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  np.testing.assert_allclose(
    optax.apply_updates(params, updates)["params"]["dense1"]["kernel"],
    tpgm_jax.project(candidate, params, want, mask=NOT_HEAD)["params"]["dense1"]["kernel"],
    rtol=1e-6,
  )
  # Later updates keep the radii (no held-out batches: no radius step).
  _, state2 = tx.update(grads, state, params)
  for a, b in zip(jax.tree.leaves(optax.tree.get(state2, "radii")), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  assert isinstance(state2[1], tpgm_jax.TrainableProjectionState) and int(state2[1].count) == 2


def test_one_compilation_per_variant_and_donation():
  params = _mlp_params()
  tx = optax.chain(optax.sgd(0.1), tpgm_jax.trainable_projection(_heldout_loss, mask=NOT_HEAD))
  traces = []

  def step(p, s, g, h):
    traces.append(h is None)
    u, s = tx.update(g, s, p, heldout=h)
    return optax.apply_updates(p, u), s

  step = jax.jit(step, donate_argnums=(0, 1))
  p, s = jax.tree.map(jnp.copy, params), tx.init(params)
  for t in range(4):
    p, s = step(p, s, _grads(params, t), _stacked([_batch(t)]) if t % 2 == 0 else None)
  assert sorted(traces) == [False, True]
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((p, s)))


def test_multisteps_accumulates_then_projects():
  params = _mlp_params()

  def make():
    return optax.chain(optax.sgd(0.5), tpgm_jax.trainable_projection(_heldout_loss, mask=NOT_HEAD))

  multi = optax.MultiSteps(make(), every_k_schedule=2)
  state = multi.init(params)
  step = jax.jit(lambda p, s, g, h: multi.update(g, s, p, heldout=h))
  g1, g2, h = _grads(params, 1), _grads(params, 2), _stacked([_batch(0)])
  u, state = step(params, state, g1, h)
  p1 = optax.apply_updates(params, u)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)  # accumulating
  u, state = step(p1, state, g2, h)
  p2 = optax.apply_updates(p1, u)
  # The same as one step of the plain chain with the mean gradient.
  single = make()
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  u_ref, single_state = single.update(mean, single.init(params), params, heldout=h)
  for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(optax.apply_updates(params, u_ref))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(
    jax.tree.leaves(optax.tree.get(state, "radii")),
    jax.tree.leaves(optax.tree.get(single_state, "radii")),
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_bfloat16_params_keep_float32_radii():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _mlp_params())

  def loss(p, b):
    return _heldout_loss(jax.tree.map(lambda x: x.astype(jnp.float32), p), b)

  tx = optax.chain(optax.sgd(0.3), tpgm_jax.trainable_projection(loss, mask=NOT_HEAD))
  state = tx.init(params)
  updates, state = jax.jit(lambda p, s, g, h: tx.update(g, s, p, heldout=h))(
    params, state, _grads(params, 0), _stacked([_batch(0)])
  )
  new = optax.apply_updates(params, updates)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new))
  assert all(r.dtype == jnp.float32 for r in jax.tree.leaves(optax.tree.get(state, "radii")))
  assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves((new, state)))


def test_errors():
  params = _mlp_params()
  tx = tpgm_jax.trainable_projection(_heldout_loss, mask=NOT_HEAD, max_iters=2)
  state = tx.init(params)
  with pytest.raises(ValueError, match="trainable_projection needs the params: call tx.init"):
    tx.init(None)
  with pytest.raises(ValueError, match="trainable_projection needs the params: call update"):
    tx.update(params, state)
  with pytest.raises(
    ValueError,
    match=r"heldout at 'x' has shape \(8, 4\); expected a leading axis "
    r"of length max_iters=2",
  ):
    tx.update(params, state, params, heldout=_batch(0))
  with pytest.raises(ValueError, match="heldout is empty"):
    tx.update(params, state, params, heldout={})
  with pytest.raises(ValueError, match="held-out loss must be a callable"):
    tpgm_jax.trainable_projection("loss")
  with pytest.raises(ValueError, match="max_iters must be an int >= 1, got 0"):
    tpgm_jax.trainable_projection(_heldout_loss, max_iters=0)
  with pytest.raises(ValueError, match="radius optimizer must be an optax GradientTransformation"):
    tpgm_jax.trainable_projection(_heldout_loss, radius_optimizer=1e-2)
  with pytest.raises(ValueError, match="norm must be one of"):
    tpgm_jax.trainable_projection(_heldout_loss, norm="linf")
  with pytest.raises(ValueError, match=r"radius_units must be one of \('absolute', 'anchor'\)"):
    tpgm_jax.trainable_projection(_heldout_loss, radius_units="relative")
  with pytest.raises(ValueError, match="mask must be"):
    tpgm_jax.trainable_projection(_heldout_loss, mask={"x": True}).init(params)
  with pytest.raises(ValueError, match="lazy must be a bool, got 'yes'"):
    tpgm_jax.trainable_projection(_heldout_loss, lazy="yes")
  with pytest.raises(ValueError, match="lazy=True is not available with lora="):
    tpgm_jax.trainable_projection(_heldout_loss, lazy=True, lora=tpgm_jax.lora_adapters(1.0))


def test_docstring_example():
  result = doctest.testmod(_transform, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
