"""FTP, SPD, L2-SP and WiSE-FT against NumPy oracles, plus errors, dtypes and sharding."""

import doctest
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

import tpgm_jax
from tests import oracle_family as oracle
from tests import test_sharding
from tests.test_projection import make_tree
from tpgm_jax import _digrap, _ftp, _interpolate, _l2sp, _spd

NOT_HEAD = tpgm_jax.path_mask(exclude=r"params/head/.*")


def not_head_path(path):
  return not path.startswith("params/head")


def _grads(params, t, scale=1.0):
  rng = np.random.default_rng(100 + t)
  leaves = [
    (scale * rng.normal(size=np.shape(p))).astype(np.float32) for p in jax.tree.leaves(params)
  ]
  return jax.tree.unflatten(jax.tree.structure(params), [jnp.asarray(g) for g in leaves])


def _step_fn(tx):
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  return jax.jit(step)


def _run(tx, params, steps, anchor=None, dtype=None):
  """``steps`` jitted steps from ``params``, anchor recorded from ``anchor``."""
  state = tx.init(params if anchor is None else anchor)
  step, p = _step_fn(tx), params
  for t in range(steps):
    g = _grads(params, t)
    p, state = step(p, state, g if dtype is None else jax.tree.map(lambda x: x.astype(dtype), g))
  return p, state


def _f64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _anchors(params, mask):
  flags = jax.tree.leaves(mask(params))
  return [w if f else None for w, f in zip(_f64(params), flags)]


def _assert_close(got, want, rtol=1e-4, atol=2e-6):
  for path, a, b in zip(tpgm_jax.leaf_paths(got), jax.tree.leaves(got), want):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=atol, err_msg=path)


# ----------------------------------------------------------------------------- FTP

INNER = {  # name: (optax optimizer, NumPy oracle)
  "sgdp": (
    lambda: optax.chain(
      optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9, nesterov=True)
    ),
    lambda: oracle.SGD(0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
  ),
  "adamp": (
    lambda: optax.adamw(0.05, weight_decay=1e-2),
    lambda: oracle.AdamW(0.05, weight_decay=1e-2),
  ),
  "sgd_small_lr": (
    lambda: optax.sgd(1e-4, momentum=0.9),  # gamma reaches max(norms): ratio 1
    lambda: oracle.SGD(1e-4, momentum=0.9),
  ),
}


@pytest.mark.parametrize(
  "inner,k,norm",
  [
    ("sgdp", 1.0, "mars"),
    ("sgdp", 0.3, "l2"),
    ("adamp", 1.0, "mars"),
    ("adamp", 0.3, "mars"),
    ("adamp", 1.0, "l2"),
    ("sgd_small_lr", 1.0, "mars"),
  ],
)
def test_ftp_matches_numpy_reference(inner, k, norm):
  params, _ = make_tree("nested")
  steps = 6
  got, state = _run(tpgm_jax.ftp(INNER[inner][0](), k=k, mask=NOT_HEAD, norm=norm), params, steps)
  ref = oracle.FTP(INNER[inner][1](), _anchors(params, NOT_HEAD), k=k, norm=norm)
  ws = _f64(params)
  for t in range(steps):
    ws = ref.step(ws, _f64(_grads(params, t)))
  _assert_close(got, ws)
  paths = tpgm_jax.leaf_paths(params)
  gammas = jax.tree.leaves(state.gamma)
  assert len(gammas) == len(ref.gamma) == 3  # the head is not constrained
  for i, g in zip(sorted(ref.gamma), gammas):
    np.testing.assert_allclose(float(g), ref.gamma[i], rtol=1e-4, atol=2e-6, err_msg=paths[i])
  assert int(state.count) == steps
  ratios = [float(g) / float(jnp.max(n)) for g, n in zip(gammas, jax.tree.leaves(state.prev_norms))]
  if inner == "sgd_small_lr":
    assert max(ratios) > 1 - 1e-6  # the upper clip of gamma is exercised
  else:
    assert min(ratios) < 0.5  # the projection is active


def test_ftp_first_step_stays_at_anchor_and_excludes_head():
  params, _ = make_tree("nested")
  tx = tpgm_jax.ftp(optax.sgd(0.5, momentum=0.9), mask=NOT_HEAD)
  out, state = _run(tx, params, 1)
  for path, a, b in zip(tpgm_jax.leaf_paths(params), jax.tree.leaves(out), jax.tree.leaves(params)):
    if not_head_path(path):
      np.testing.assert_allclose(a, b, atol=1e-7, rtol=0)
      continue
    plain = optax.apply_updates(b, -0.5 * _grads(params, 0)["params"]["head"][path.split("/")[-1]])
    np.testing.assert_allclose(a, plain, rtol=1e-6)
  for gamma in jax.tree.leaves(state.gamma):
    assert float(gamma) == pytest.approx(1e-8) and gamma.dtype == jnp.float32
  assert isinstance(state.gamma["params"]["head"]["kernel"], optax.MaskedNode)


def test_ftp_inner_state_is_not_projected():
  params, _ = make_tree("nested")
  _, state = _run(tpgm_jax.ftp(optax.sgd(0.1, momentum=0.9)), params, 2)
  trace = jax.tree.leaves(state.inner_state)
  want = [0.9 * a + b for a, b in zip(_f64(_grads(params, 0)), _f64(_grads(params, 1)))]
  _assert_close(jax.tree.unflatten(jax.tree.structure(params), trace), want, rtol=1e-6)


def test_ftp_tensor_at_anchor_stays_finite():
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  tx = tpgm_jax.ftp(optax.adam(0.1))
  state, step, p = tx.init(params), _step_fn(tx), params
  for _ in range(3):
    p, state = step(p, state, jax.tree.map(jnp.zeros_like, params))
  for leaf in jax.tree.leaves((p, state)):
    assert np.all(np.isfinite(leaf))
  np.testing.assert_array_equal(p["w"], params["w"])


@pytest.mark.parametrize("kind", ("scalar", "tuple_list", "empty"))
def test_ftp_and_spd_on_other_trees(kind):
  params, _ = make_tree(kind)
  for tx in (
    tpgm_jax.ftp(optax.sgd(0.1, momentum=0.9)),
    tpgm_jax.spd(optax.sgd(0.1), weight_decay=0.5, anchor="zeros"),
  ):
    out, state = _run(tx, params, 2)
    assert jax.tree.structure(out) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(params)):
      assert a.shape == b.shape and a.dtype == b.dtype and np.all(np.isfinite(a))


# ----------------------------------------------------------------------------- SPD


@pytest.mark.parametrize("anchor", ("init", "zeros"))
@pytest.mark.parametrize("inner", ("adam", "sgd"))
def test_spd_matches_numpy_reference(anchor, inner):
  params, pre = make_tree("nested")
  make_inner = {
    "adam": (lambda: optax.adam(0.05), lambda: oracle.AdamW(0.05)),
    "sgd": (lambda: optax.sgd(0.1, momentum=0.9), lambda: oracle.SGD(0.1, momentum=0.9)),
  }[inner]
  tx = tpgm_jax.spd(make_inner[0](), weight_decay=0.5, mask=NOT_HEAD, anchor=anchor)
  got, state = _run(tx, params, 5, anchor=pre)
  opt = make_inner[1]()
  w0s = (
    _anchors(pre, NOT_HEAD)
    if anchor == "init"
    else [0.0 if not_head_path(p) else None for p in tpgm_jax.leaf_paths(params)]
  )
  ws, decayed = _f64(params), 0
  for t in range(5):
    gs = _f64(_grads(params, t))
    new = []
    for i, (w, w0, g) in enumerate(zip(ws, w0s, gs)):
      u = opt.update(i, w, g)
      new.append(w + u if w0 is None else oracle.spd(w, w0, g, u, 0.5))
      decayed += not np.allclose(new[-1], w + u)
    ws = new
  assert decayed >= 1  # the decay branch is exercised
  _assert_close(got, ws)
  stored = jax.tree.leaves(state.anchor)
  assert len(stored) == (3 if anchor == "init" else 0)


def _spd_one_step(w, g, w0=(0.0, 0.0), lr=0.1, weight_decay=0.5):
  tx = tpgm_jax.spd(optax.sgd(lr), weight_decay=weight_decay)
  state = tx.init({"w": jnp.array(w0)})
  u, _ = tx.update({"w": jnp.array(g)}, state, {"w": jnp.array(w)})
  return np.asarray(optax.apply_updates({"w": jnp.array(w)}, u)["w"])


def test_spd_condition_both_ways():
  # <g, w - w0> = 1 > 0 and the step moves away (|c - w0| = 1.345 > 1): decayed.
  c = np.array([0.9, 1.0])
  ratio = (np.linalg.norm(c) - 1.0) / np.linalg.norm(c)
  np.testing.assert_allclose(
    _spd_one_step([1.0, 0.0], [1.0, -10.0]), c - 0.5 * ratio * c, rtol=1e-6
  )
  # <g, w - w0> = -1 < 0: plain step even though it moves away.
  np.testing.assert_allclose(_spd_one_step([1.0, 0.0], [-1.0, -10.0]), [1.1, 1.0], rtol=1e-6)
  # Aligned but the step moves closer: ratio clipped to 0, plain step.
  np.testing.assert_allclose(_spd_one_step([1.0, 0.0], [1.0, 0.0]), [0.9, 0.0], rtol=1e-6)


def test_spd_candidate_or_tensor_at_anchor_is_finite():
  # c == w0 with the condition true: the guarded division gives ratio 0.
  out = _spd_one_step([1.0, 2.0], [1.0, 2.0], lr=1.0)
  assert np.all(np.isfinite(out)) and np.allclose(out, 0.0)
  # w == w0 == c.
  out = _spd_one_step([0.0, 0.0], [0.0, 0.0])
  assert np.all(np.isfinite(out)) and np.allclose(out, 0.0)


# ----------------------------------------------------------------------------- DiGraP


def _oscillating_grads(params, t, scale=1.0):
  """Gradients flipping sign every step plus noise: the hyper-gradient is negative."""
  noise = _grads(params, t, 0.3)
  return jax.tree.map(lambda p, n: scale * (-1.0) ** t * jnp.cos(3.0 * p + 1.0) + n, params, noise)


@pytest.mark.parametrize("anchor", ("init", "zeros"))
@pytest.mark.parametrize("grads", ("random", "oscillating"))
def test_digrap_matches_numpy_reference(anchor, grads):
  params, pre = make_tree("nested")
  make_grads = _grads if grads == "random" else _oscillating_grads
  lr, steps = 0.5, 8
  tx = optax.chain(tpgm_jax.digrap(strength_lr=lr, mask=NOT_HEAD, anchor=anchor), optax.adam(0.05))
  state = tx.init(pre)
  step, p = _step_fn(tx), params
  for t in range(steps):
    p, state = step(p, state, make_grads(params, t))
  w0s = (
    _anchors(pre, NOT_HEAD)
    if anchor == "init"
    else [0.0 if not_head_path(q) else None for q in tpgm_jax.leaf_paths(params)]
  )
  ref, opt, ws = oracle.DiGraP(w0s, lr), oracle.AdamW(0.05), _f64(params)
  modified = 0
  for t in range(steps):
    gs = _f64(make_grads(params, t))
    new_gs = ref.grads(ws, gs)
    modified += sum(not np.allclose(a, b) for a, b in zip(new_gs, gs))
    ws = [w + opt.update(i, w, g) for i, (w, g) in enumerate(zip(ws, new_gs))]
  _assert_close(p, ws, rtol=2e-4, atol=5e-6)
  omegas = jax.tree.leaves(optax.tree.get(state, "omega"))
  assert len(omegas) == len(ref.omega) == 3  # the head is not projected
  for i, o in zip(sorted(ref.omega), omegas):
    np.testing.assert_allclose(float(o), ref.omega[i], rtol=1e-4, atol=1e-6)
  assert modified > 0  # the conflict branch was taken
  if grads == "oscillating":
    assert max(map(float, omegas)) == 1.0  # clipped at max_strength
  assert min(map(float, omegas)) >= 0.0


def test_digrap_first_step_and_head_unchanged():
  params, _ = make_tree("nested")
  tx = tpgm_jax.digrap(strength_lr=0.1, mask=NOT_HEAD)
  state = tx.init(params)
  grads = _grads(params, 0)
  out, state = tx.update(grads, state, params)  # r = 0: nothing to project
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(grads)):
    np.testing.assert_array_equal(a, b)
  assert isinstance(state.omega["params"]["head"]["kernel"], optax.MaskedNode)
  moved = jax.tree.map(lambda x: x + 1.0, params)
  out, _ = tx.update(
    jax.tree.map(lambda g: -jnp.abs(g), grads), state, moved
  )  # conflicts everywhere
  np.testing.assert_array_equal(
    out["params"]["head"]["kernel"], -jnp.abs(grads["params"]["head"]["kernel"])
  )


# ------------------------------------------------------------------- L2-SP, WiSE-FT


def test_l2sp_matches_numpy_reference():
  params, pre = make_tree("nested")
  tx = optax.chain(tpgm_jax.l2sp(0.1, beta=0.01, mask=NOT_HEAD), optax.sgd(0.1, momentum=0.9))
  got, state = _run(tx, params, 4, anchor=pre)
  assert isinstance(state[0], tpgm_jax.L2SPState)
  opt, w0s, ws = oracle.SGD(0.1, momentum=0.9), _anchors(pre, NOT_HEAD), _f64(params)
  for t in range(4):
    gs = _f64(_grads(params, t))
    ws = [
      w + opt.update(i, w, oracle.l2sp_grad(g, w, w0, 0.1, 0.01))
      for i, (w, w0, g) in enumerate(zip(ws, w0s, gs))
    ]
  _assert_close(got, ws)


def test_interpolate_formula_head_and_dtypes():
  ft, pre = make_tree("nested")
  ft["step"], pre["step"] = jnp.array(7, jnp.int32), jnp.array(0, jnp.int32)
  pre_values = dict(zip(tpgm_jax.leaf_paths(pre), _f64(pre)))
  pre["params"]["head"] = {"kernel": None, "bias": optax.MaskedNode()}  # a new head
  out = tpgm_jax.interpolate(ft, pre, alpha=0.3)
  want = [
    oracle.interpolate(
      None if p.startswith("params/head") or p == "step" else pre_values[p], w, 0.3
    )
    for p, w in zip(tpgm_jax.leaf_paths(ft), _f64(ft))
  ]
  _assert_close(out, want, rtol=1e-6)
  assert out["step"].dtype == jnp.int32 and int(out["step"]) == 7
  # alpha may be traced; a new alpha does not recompile; masks exclude tensors.
  traces = []

  def fn(ft, pre, alpha):
    traces.append(1)
    return tpgm_jax.interpolate(ft, pre, alpha=alpha, mask=tpgm_jax.path_mask(".*Dense_0.*"))

  jitted = jax.jit(fn)
  jitted(ft, pre, 0.0)
  out = jitted(ft, pre, 1.0)
  assert len(traces) == 1
  np.testing.assert_array_equal(out["params"]["Conv_0"]["kernel"], ft["params"]["Conv_0"]["kernel"])
  out = tpgm_jax.interpolate(ft, pre, alpha=0.0)
  np.testing.assert_array_equal(
    out["params"]["Dense_0"]["kernel"], pre["params"]["Dense_0"]["kernel"]
  )
  bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, ft)
  assert (
    tpgm_jax.interpolate(bf, pre, alpha=0.5)["params"]["Dense_0"]["kernel"].dtype == jnp.bfloat16
  )


# ------------------------------------------------------------- dtypes, jit, errors


def test_bf16_params():
  params, pre = make_tree("nested")
  bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  as_f32 = jax.tree.map(lambda x: x.astype(jnp.float32), bf)
  for make in (
    lambda: tpgm_jax.ftp(optax.sgd(0.1, momentum=0.9, nesterov=True), mask=NOT_HEAD),
    lambda: tpgm_jax.spd(optax.adam(0.05), weight_decay=0.5, mask=NOT_HEAD),
    lambda: optax.chain(tpgm_jax.digrap(strength_lr=0.5, mask=NOT_HEAD), optax.adam(0.05)),
  ):
    out, state = _run(make(), bf, 3, dtype=jnp.bfloat16)
    ref, _ = _run(make(), as_f32, 3)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
      assert a.dtype == jnp.bfloat16
      np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=3e-2, atol=3e-2)
    if isinstance(state, tpgm_jax.FTPState):
      assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(state.gamma))
      assert all(c.dtype == jnp.bfloat16 for c in jax.tree.leaves(state.prev_displacement))


@pytest.mark.parametrize("method", ("ftp", "spd", "l2sp", "digrap"))
def test_jit_no_recompile_and_checkpointable_state(method):
  params, _ = make_tree("nested")
  tx = {
    "ftp": lambda: tpgm_jax.ftp(optax.sgd(0.1)),
    "spd": lambda: tpgm_jax.spd(optax.adam(0.1), weight_decay=0.1),
    "l2sp": lambda: optax.chain(tpgm_jax.l2sp(0.1), optax.sgd(0.1)),
    "digrap": lambda: optax.chain(tpgm_jax.digrap(strength_lr=0.1), optax.adam(0.1)),
  }[method]()
  traces = []

  def step(p, s, g):
    traces.append(1)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  step = jax.jit(step)
  state = tx.init(params)
  p1, s1 = step(params, state, _grads(params, 0))
  # A state restored as host arrays (as from a checkpoint) continues identically.
  restored = jax.tree.map(np.asarray, s1)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(restored))
  p2, _ = step(p1, s1, _grads(params, 1))
  p2r, _ = step(p1, jax.tree.map(jnp.asarray, restored), _grads(params, 1))
  assert len(traces) == 1
  for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p2r)):
    np.testing.assert_array_equal(a, b)


def test_errors():
  params, _ = make_tree("nested")
  grads = _grads(params, 0)
  bad = jax.tree.map(lambda x: x, params)
  bad["params"]["Dense_0"]["kernel"] = jnp.zeros((4, 4))
  missing = {"params": {k: v for k, v in params["params"].items() if k != "head"}}
  for tx in (
    tpgm_jax.ftp(optax.sgd(0.1)),
    tpgm_jax.spd(optax.adam(0.1), weight_decay=0.1),
    tpgm_jax.l2sp(0.1),
    tpgm_jax.digrap(strength_lr=0.1),
  ):
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs the params: call update"):
      tx.update(grads, state)
    with pytest.raises(ValueError, match="needs the params: call tx.init"):
      tx.init(None)
    with pytest.raises(
      ValueError,
      match=r"anchor at 'params/Dense_0/kernel' has shape \(4, 3\) but params have \(4, 4\)",
    ):
      tx.update(grads, state, bad)
    with pytest.raises(
      ValueError,
      match=r"anchor must have the same tree structure as params: "
      r"not in params: \[.params/head/bias",
    ):
      tx.update(grads, state, missing)
  with pytest.raises(
    ValueError, match="grads must have the same tree structure as params: missing from grads"
  ):
    tpgm_jax.ftp(optax.sgd(0.1)).update(missing, tpgm_jax.ftp(optax.sgd(0.1)).init(params), params)
  with pytest.raises(ValueError, match="norm must be one of"):
    tpgm_jax.ftp(optax.sgd(0.1), norm="l1")
  with pytest.raises(ValueError, match="anchor must be one of"):
    tpgm_jax.spd(optax.adam(0.1), weight_decay=0.1, anchor="pretrained")
  with pytest.raises(ValueError, match="mask must be"):
    tpgm_jax.spd(optax.adam(0.1), weight_decay=0.1, mask={"x": True}, anchor="zeros").init(params)
  with pytest.raises(ValueError, match=r"pretrained at 'params/Dense_0/kernel' has shape \(4, 4\)"):
    tpgm_jax.interpolate(params, bad, alpha=0.5)
  with pytest.raises(ValueError, match="alpha must be a scalar"):
    tpgm_jax.interpolate(params, params, alpha=jnp.ones(2))
  with pytest.raises(
    TypeError
  ):  # alpha is keyword-only: the old (pretrained, finetuned, alpha) call fails
    tpgm_jax.interpolate(params, params, 0.5)


@pytest.mark.parametrize(
  "make,message",
  [
    (lambda: tpgm_jax.ftp(optax.sgd(0.1), k=-1.0), r"k must be a finite number >= 0, got -1.0"),
    (
      lambda: tpgm_jax.ftp(optax.sgd(0.1), k=float("nan")),
      r"k must be a finite number >= 0, got nan",
    ),
    (lambda: tpgm_jax.ftp(0.1), r"ftp wraps an optax optimizer.*got 0.1"),
    (
      lambda: tpgm_jax.spd(optax.adam(0.1), weight_decay=-0.5),
      r"weight_decay must be a finite number >= 0",
    ),
    (
      lambda: tpgm_jax.spd(optax.adam(0.1), weight_decay=float("inf")),
      r"weight_decay must be a finite",
    ),
    (
      lambda: tpgm_jax.spd(optax.adam(0.1), weight_decay="0.1"),
      r"weight_decay must be a real number",
    ),
    (lambda: tpgm_jax.l2sp(-0.1), r"alpha must be a finite number >= 0, got -0.1"),
    (lambda: tpgm_jax.l2sp(0.1, beta=float("nan")), r"beta must be a finite number >= 0"),
    (lambda: tpgm_jax.digrap(strength_lr=0.0), r"strength_lr must be a finite number > 0, got 0.0"),
    (lambda: tpgm_jax.digrap(strength_lr=-1e-2), r"strength_lr must be a finite number > 0"),
    (
      lambda: tpgm_jax.digrap(strength_lr=0.1, max_strength=0.0),
      r"max_strength must be a finite number > 0",
    ),
    (
      lambda: tpgm_jax.digrap(strength_lr=0.1, anchor="pretrained"),
      r"anchor must be one of \('init', 'zeros'\)",
    ),
    (
      lambda: tpgm_jax.interpolate({"w": jnp.ones(2)}, {"w": jnp.ones(2)}, alpha=float("nan")),
      r"alpha must be a finite number, got nan",
    ),
    (
      lambda: tpgm_jax.radii_trainer(lambda p, b: 0.0, max_iters=1.5),
      r"max_iters must be an int >= 1, got 1.5",
    ),
    (
      lambda: tpgm_jax.radii_trainer(lambda p, b: 0.0, optimizer="adam"),
      r"radius optimizer must be an optax",
    ),
    (
      lambda: tpgm_jax.learn_radii_post_hoc(
        lambda p, b: jnp.sum(p["w"]), {"w": jnp.ones(2)}, {"w": jnp.zeros(2)}, []
      ),
      r"batches is empty",
    ),
    (
      lambda: tpgm_jax.learn_radii_post_hoc(
        lambda p, b: jnp.sum(p["w"]), {"w": jnp.ones(2)}, {"w": jnp.zeros(2)}, {"x": jnp.ones(2)}
      ),
      r"batches must be an iterable of held-out batches",
    ),
    (
      lambda: tpgm_jax.project({"w": jnp.ones(2)}, {"w": jnp.ones(2)}, {"w": jnp.ones(2)}),
      r"radii at 'w' must be a floating-point scalar; got shape \(2,\)",
    ),
  ],
)
def test_bad_hyper_parameters(make, message):
  with pytest.raises(ValueError, match=message):
    make()


@pytest.mark.parametrize("module", (_ftp, _spd, _l2sp, _interpolate, _digrap))
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------- sharding


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (CPU) devices")
@pytest.mark.parametrize("method", ("ftp", "spd", "l2sp", "digrap"))
def test_sharded_equals_unsharded(mesh, method):
  params, anchor = test_sharding._trees()
  not_norm = tpgm_jax.path_mask(exclude="norm.*")
  tx = {
    "ftp": lambda: tpgm_jax.ftp(optax.sgd(0.1, momentum=0.9, nesterov=True), mask=not_norm),
    "spd": lambda: tpgm_jax.spd(optax.adam(0.1), weight_decay=0.5, mask=not_norm),
    "l2sp": lambda: optax.chain(tpgm_jax.l2sp(0.1, beta=0.1, mask=not_norm), optax.sgd(0.1)),
    "digrap": lambda: optax.chain(tpgm_jax.digrap(strength_lr=0.5, mask=not_norm), optax.adam(0.1)),
  }[method]()

  def two_steps(p, s, g):
    for scale in (1.0, -0.5):
      u, s = tx.update(jax.tree.map(lambda x: scale * x, g), s, p)
      p = optax.apply_updates(p, u)
    return p, s

  grads = jax.tree.map(lambda p: jnp.cos(p * 3.0), params)
  sp, sa, sg = (test_sharding._shard(t, mesh) for t in (params, anchor, grads))
  state = jax.jit(tx.init)(sa)
  out, new_state = jax.jit(two_steps)(sp, state, sg)
  test_sharding._assert_same_sharding(out, sp)
  if method == "ftp":
    test_sharding._assert_same_sharding(state.anchor, {"dense": sa["dense"], "conv": sa["conv"]})
    test_sharding._assert_same_sharding(
      new_state.prev_displacement, {"dense": sp["dense"], "conv": sp["conv"]}
    )
  ref, _ = two_steps(params, tx.init(anchor), grads)
  test_sharding._assert_close(out, ref)
  test_sharding._no_all_gather(two_steps, sp, state, sg)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (CPU) devices")
def test_interpolate_sharded(mesh):
  params, anchor = test_sharding._trees()
  sp, sa = test_sharding._shard(params, mesh), test_sharding._shard(anchor, mesh)

  def mix(p, a):
    return tpgm_jax.interpolate(p, a, alpha=0.25)

  out = jax.jit(mix)(sp, sa)
  test_sharding._assert_same_sharding(out, sp)
  test_sharding._assert_close(out, mix(params, anchor))
  test_sharding._no_all_gather(mix, sp, sa)


@pytest.mark.parametrize("method", ("ftp", "digrap"))
def test_donated_step_updates_the_state_in_place(method):
  # FTP's c_{t-1} / n_{t-1} and DiGraP's p_{t-1} are read, then replaced: the compiled step
  # must write the new values into the donated buffers, not copy the tensors (only 0-D
  # scalars may be copied).
  params = {"k": jnp.ones((3, 3, 4, 8)), "b": jnp.ones((8,))}
  sgd = optax.sgd(0.1, momentum=0.9)
  tx = tpgm_jax.ftp(sgd) if method == "ftp" else optax.chain(tpgm_jax.digrap(strength_lr=0.05), sgd)

  def step(carry, g):
    p, s = carry
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  hlo = jax.jit(step, donate_argnums=0).lower((params, tx.init(params)), params).compile()
  copies = re.findall(r"= (\S+) copy\(", hlo.as_text())
  assert all(shape.endswith("[]") for shape in copies), copies


def _step_temp_bytes(tx, depth, dtype):
  """XLA's temporary bytes of a donated step (gradient of a ``depth``-layer tanh MLP of
  64 x 64 kernels, then ``tx``), compiled, not run."""
  keys = jax.random.split(jax.random.key(0), depth)
  params = {f"l{i}": (jax.random.normal(k, (64, 64)) / 8).astype(dtype) for i, k in enumerate(keys)}
  x = jnp.ones((8, 64), dtype)

  def loss(p):
    h = x
    for i in range(depth):
      h = jnp.tanh(h @ p[f"l{i}"])
    return jnp.mean(jnp.square(h.astype(jnp.float32)))

  def step(carry):
    p, s = carry
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  compiled = jax.jit(step, donate_argnums=0).lower((params, tx.init(params))).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("dtype", (jnp.float32, jnp.bfloat16))
@pytest.mark.parametrize("method", ("spd", "digrap"))
def test_step_temporaries_do_not_grow_with_the_model(method, dtype):
  # SPD's and DiGraP's per-tensor values (w - w0, its conversion to float32, the inner
  # update) may need a temporary while their tensor is updated, never one per tensor held
  # through the backward pass: twice the layers, at most one more tensor of temporaries
  # than the plain Adam step (which has none to hold).
  adam = optax.adam(1e-3)
  tx = (
    tpgm_jax.spd(adam, weight_decay=0.5)
    if method == "spd"
    else optax.chain(tpgm_jax.digrap(strength_lr=0.05), adam)
  )
  extra = [
    _step_temp_bytes(tx, depth, dtype) - _step_temp_bytes(adam, depth, dtype) for depth in (8, 16)
  ]
  tensor = 64 * 64 * jnp.dtype(dtype).itemsize
  assert extra[1] - extra[0] <= tensor, (extra, tensor)
