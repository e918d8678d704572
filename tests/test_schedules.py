"""Hyper-parameters given as optax schedules of the step count, against NumPy oracles.

The schedule is evaluated in NumPy float64 at the 0-based update index ``t``
(the ``count`` in the transformation's state before the update) and the
oracle takes the method's step with that value. Every run is jitted, traced
once, and the schedule is evaluated on device from the state's int32 count.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tpgm_jax
from tests import oracle, oracle_family
from tests.test_family import (
  NOT_HEAD,
  _anchors,
  _assert_close,
  _f64,
  _grads,
  _oscillating_grads,
  not_head_path,
)
from tests.test_projection import make_tree

STEPS = 6


def _linear(start, end, steps):
  """optax.linear_schedule and its float64 NumPy twin."""
  return (
    optax.linear_schedule(start, end, steps),
    lambda t: start + (end - start) * min(t, steps) / steps,
  )


def _run_counted(tx, params, steps, grads=_grads, anchor=None, **kwargs):
  """``steps`` jitted steps; asserts that the step was traced once."""
  traces = []

  def step(p, s, g):
    traces.append(1)
    u, s = tx.update(g, s, p, **kwargs)
    return optax.apply_updates(p, u), s

  step = jax.jit(step)
  state = tx.init(params if anchor is None else anchor)
  p = params
  for t in range(steps):
    p, state = step(p, state, grads(params, t))
  assert len(traces) == 1  # no recompilation per step
  return p, state


@pytest.mark.parametrize("inner", ("sgd", "adam"))
def test_spd_weight_decay_schedule(inner):
  params, pre = make_tree("nested")
  sched, ref_sched = _linear(0.0, 1.0, 4)
  make = {
    "adam": (lambda: optax.adam(0.05), lambda: oracle_family.AdamW(0.05)),
    "sgd": (lambda: optax.sgd(0.1, momentum=0.9), lambda: oracle_family.SGD(0.1, momentum=0.9)),
  }[inner]
  tx = tpgm_jax.spd(make[0](), weight_decay=sched, mask=NOT_HEAD)
  got, state = _run_counted(tx, params, STEPS, anchor=pre)
  assert state.count.dtype == jnp.int32 and int(state.count) == STEPS
  opt, w0s, ws, decayed = make[1](), _anchors(pre, NOT_HEAD), _f64(params), 0
  for t in range(STEPS):
    gs, new = _f64(_grads(params, t)), []
    for i, (w, w0, g) in enumerate(zip(ws, w0s, gs)):
      u = opt.update(i, w, g)
      new.append(w + u if w0 is None else oracle_family.spd(w, w0, g, u, ref_sched(t)))
      decayed += t > 0 and not np.allclose(new[-1], w + u)
    ws = new
  assert decayed >= 1  # a non-zero scheduled decay was applied
  _assert_close(got, ws)


def test_l2sp_alpha_and_beta_schedules():
  params, pre = make_tree("nested")
  alpha, ref_alpha = _linear(0.0, 0.5, 3)

  def beta(count):  # any jnp-traceable callable of the count
    return 0.01 * (count + 1)

  tx = optax.chain(tpgm_jax.l2sp(alpha, beta=beta, mask=NOT_HEAD), optax.sgd(0.1, momentum=0.9))
  got, state = _run_counted(tx, params, STEPS, anchor=pre)
  assert int(state[0].count) == STEPS
  opt, w0s, ws = oracle_family.SGD(0.1, momentum=0.9), _anchors(pre, NOT_HEAD), _f64(params)
  for t in range(STEPS):
    gs = _f64(_grads(params, t))
    ws = [
      w + opt.update(i, w, oracle_family.l2sp_grad(g, w, w0, ref_alpha(t), 0.01 * (t + 1)))
      for i, (w, w0, g) in enumerate(zip(ws, w0s, gs))
    ]
  _assert_close(got, ws)


@pytest.mark.parametrize("norm", ("mars", "l2"))
def test_ftp_k_schedule(norm):
  params, _ = make_tree("nested")
  k, ref_k = _linear(1.0, 0.0, 4)
  tx = tpgm_jax.ftp(optax.adamw(0.05, weight_decay=1e-2), k=k, mask=NOT_HEAD, norm=norm)
  got, state = _run_counted(tx, params, STEPS)
  ref = oracle_family.FTP(
    oracle_family.AdamW(0.05, weight_decay=1e-2), _anchors(params, NOT_HEAD), norm=norm
  )
  ws = _f64(params)
  for t in range(STEPS):
    ref.k = ref_k(t)
    ws = ref.step(ws, _f64(_grads(params, t)))
  _assert_close(got, ws)
  for i, g in zip(sorted(ref.gamma), jax.tree.leaves(state.gamma)):
    np.testing.assert_allclose(float(g), ref.gamma[i], rtol=1e-4, atol=2e-6)


def test_digrap_strength_lr_and_max_strength_schedules():
  params, pre = make_tree("nested")
  lr, ref_lr = _linear(0.5, 0.05, 5)
  kappa, ref_kappa = _linear(1.0, 0.5, 5)
  tx = optax.chain(
    tpgm_jax.digrap(strength_lr=lr, max_strength=kappa, mask=NOT_HEAD), optax.adam(0.05)
  )
  got, state = _run_counted(tx, params, 8, grads=_oscillating_grads, anchor=pre)
  ref = oracle_family.DiGraP(_anchors(pre, NOT_HEAD), 0.5)
  opt, ws = oracle_family.AdamW(0.05), _f64(params)
  for t in range(8):
    ref.lr, ref.kappa = ref_lr(t), ref_kappa(t)
    new_gs = ref.grads(ws, _f64(_oscillating_grads(params, t)))
    ws = [w + opt.update(i, w, g) for i, (w, g) in enumerate(zip(ws, new_gs))]
  _assert_close(got, ws, rtol=2e-4, atol=5e-6)
  omegas = jax.tree.leaves(optax.tree.get(state, "omega"))
  for i, o in zip(sorted(ref.omega), omegas):
    np.testing.assert_allclose(float(o), ref.omega[i], rtol=1e-4, atol=1e-6)
  assert max(map(float, omegas)) == pytest.approx(0.5)  # clipped at the scheduled kappa


@pytest.mark.parametrize("norm", ("mars", "l2"))
def test_mars_pgm_radius_schedule(norm):
  params, _ = make_tree("nested")
  radius, ref_radius = _linear(0.01, 0.3, 4)
  tx = optax.chain(optax.sgd(0.1), tpgm_jax.tpgm(norm=norm, mask=NOT_HEAD, radii=radius))
  got, state = _run_counted(tx, params, STEPS)
  assert int(state[1].count) == STEPS and state[1].count.dtype == jnp.int32
  w0s, ws = _anchors(params, NOT_HEAD), _f64(params)
  for t in range(STEPS):
    gs = _f64(_grads(params, t))
    ws = [
      w - 0.1 * g if w0 is None else oracle.project(w - 0.1 * g, w0, ref_radius(t), norm)
      for w, w0, g in zip(ws, w0s, gs)
    ]
  _assert_close(got, ws)


def test_schedule_overridden_by_update_radii_and_head_untouched():
  params, _ = make_tree("nested")
  tx = tpgm_jax.tpgm(mask=NOT_HEAD, radii=optax.constant_schedule(0.1))
  state = tx.init(params)
  moved = jax.tree.map(lambda x: x + 1.0, params)
  u = jax.tree.map(lambda a, b: a - b, moved, params)
  out, _ = tx.update(u, state, params, radii=jax.tree.map(lambda _: jnp.float32(1e3), params))
  _assert_close(optax.apply_updates(params, out), _f64(moved), rtol=1e-6)
  out, _ = tx.update(u, state, params)
  new = optax.apply_updates(params, out)
  for path, a, b in zip(tpgm_jax.leaf_paths(params), jax.tree.leaves(new), _f64(moved)):
    assert np.allclose(a, b, rtol=1e-6) == (not not_head_path(path))


@pytest.mark.parametrize(
  "make",
  [
    lambda s: tpgm_jax.spd(optax.sgd(0.1), weight_decay=s),
    lambda s: tpgm_jax.l2sp(s),
    lambda s: tpgm_jax.ftp(optax.sgd(0.1), k=s),
    lambda s: tpgm_jax.digrap(strength_lr=s),
    lambda s: tpgm_jax.tpgm(radii=s),
  ],
)
def test_a_schedule_must_return_a_scalar(make):
  params, _ = make_tree("dense")
  tx = make(lambda count: jnp.ones(3) * count)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"the schedule given as \w+ must return a real scalar"):
    tx.update(_grads(params, 0), state, params)
