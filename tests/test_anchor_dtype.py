"""The opt-in lower-precision anchor (``anchor_dtype=``) of every method that records one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tpgm_jax
from tests import oracle
from tests.test_projection import make_tree

BF16 = jnp.bfloat16


def _rounded(tree, dtype=BF16):
  return jax.tree.map(lambda x: x.astype(dtype).astype(x.dtype), tree)


def _grads(params, seed):
  ks = iter(jax.random.split(jax.random.key(seed), 16))
  return jax.tree.map(lambda p: jax.random.normal(next(ks), p.shape, p.dtype), params)


def _channel_l1(x, norm):
  x = np.abs(np.asarray(x, np.float64))
  if norm == "l2":
    return np.sqrt(np.sum(x * x))
  return np.max(x.reshape(-1, x.shape[-1]).sum(axis=0)) if x.ndim >= 2 else np.sum(x)


@pytest.mark.parametrize("kind", ("vector", "dense", "conv", "nested"))
@pytest.mark.parametrize("norm", ("mars", "l2"))
def test_bfloat16_anchor_projects_onto_the_rounded_anchor(kind, norm):
  params, anchor = make_tree(kind)
  tx = optax.chain(optax.sgd(0.3), tpgm_jax.tpgm(norm=norm, radii=0.2, anchor_dtype=BF16))
  ref = optax.chain(optax.sgd(0.3), tpgm_jax.tpgm(norm=norm, radii=0.2))
  state, ref_state = tx.init(anchor), ref.init(anchor)
  stored = jax.tree.leaves(state[1].anchor)
  assert all(a.dtype == BF16 for a in stored)
  assert sum(a.nbytes for a in stored) * 2 == sum(a.nbytes for a in jax.tree.leaves(anchor))

  def step(tx, s):
    u, _ = jax.jit(tx.update)(_grads(params, 0), s, params)
    return optax.apply_updates(params, u)

  new, new_ref = step(tx, state), step(ref, ref_state)
  cand = optax.apply_updates(params, jax.tree.map(lambda g: -0.3 * g, _grads(params, 0)))
  for w, w_ref, c, w0 in zip(*(jax.tree.leaves(t) for t in (new, new_ref, cand, anchor))):
    w0_bf16 = np.asarray(w0.astype(BF16), np.float64)
    # Exactly the projection onto the ball around the rounded anchor (float64 oracle).
    np.testing.assert_allclose(w, oracle.project(c, w0_bf16, 0.2, norm), rtol=2e-5, atol=2e-6)
    # Against the float32 anchor, off by at most the anchor's rounding error delta:
    # |w' - w'_ref| <= 2 max|delta| + (the largest norm of delta).
    delta = w0_bf16 - np.asarray(w0, np.float64)
    bound = 2 * np.max(np.abs(delta)) + _channel_l1(delta, norm) + 1e-6
    assert np.max(np.abs(np.asarray(w, np.float64) - np.asarray(w_ref, np.float64))) <= bound


METHODS = {
  "trainable_projection": lambda **kw: optax.chain(
    optax.sgd(0.1),
    tpgm_jax.trainable_projection(
      lambda p, b: sum(jnp.sum(x * b) for x in jax.tree.leaves(p)), **kw
    ),
  ),
  "ftp": lambda **kw: tpgm_jax.ftp(optax.sgd(0.1, momentum=0.9), **kw),
  "spd": lambda **kw: tpgm_jax.spd(optax.adam(0.1), weight_decay=0.5, **kw),
  "digrap": lambda **kw: optax.chain(tpgm_jax.digrap(strength_lr=0.5, **kw), optax.adam(0.1)),
  "l2sp": lambda **kw: optax.chain(tpgm_jax.l2sp(0.1, **kw), optax.sgd(0.1)),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_with_a_bfloat16_anchor_equals_it_on_the_rounded_anchor(method):
  params, anchor = make_tree("dense")
  tx, ref = METHODS[method](anchor_dtype=BF16), METHODS[method]()
  state, ref_state = tx.init(anchor), ref.init(_rounded(anchor))
  arrays = [x for x in jax.tree.leaves(state) if getattr(x, "shape", ()) == (5, 3)]
  assert any(x.dtype == BF16 for x in arrays)  # the anchor
  extra = {"heldout": jnp.ones((1, 5, 3))} if method == "trainable_projection" else {}
  p, q = params, params
  for t in range(3):
    u, state = tx.update(_grads(p, t), state, p, **extra)
    v, ref_state = ref.update(_grads(q, t), ref_state, q, **extra)
    p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
  np.testing.assert_allclose(p["kernel"], q["kernel"], rtol=1e-6, atol=1e-7)


def test_default_keeps_the_params_dtype_and_bad_dtypes_are_named():
  _, anchor = make_tree("dense")
  assert tpgm_jax.tpgm().init(anchor).anchor["kernel"].dtype == jnp.float32
  up = tpgm_jax.tpgm(anchor_dtype=jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
  assert up.init(anchor).anchor["kernel"].dtype == jnp.float32
  for bad in (jnp.int8, "bogus", 3):
    for factory in (
      lambda d: tpgm_jax.tpgm(anchor_dtype=d),
      lambda d: tpgm_jax.ftp(optax.sgd(0.1), anchor_dtype=d),
      lambda d: tpgm_jax.spd(optax.adam(0.1), weight_decay=0.1, anchor_dtype=d),
      lambda d: tpgm_jax.digrap(strength_lr=0.1, anchor_dtype=d),
      lambda d: tpgm_jax.l2sp(0.1, anchor_dtype=d),
      lambda d: tpgm_jax.trainable_projection(lambda p, b: 0.0, anchor_dtype=d),
    ):
      with pytest.raises(ValueError, match=r"anchor_dtype must be None .* floating-point dtype"):
        factory(bad)
