"""Sharded (FSDP x tensor-parallel) runs on 8 CPU devices equal unsharded ones."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import tpgm_jax

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (CPU) devices")

SPECS = {
  "dense": {"kernel": P("data", "model"), "bias": P("model")},
  "conv": {"kernel": P(None, None, "data", "model")},
  "norm": {"scale": P("model")},
}
SHAPES = {
  "dense": {"kernel": (16, 8), "bias": (8,)},
  "conv": {"kernel": (3, 3, 8, 4)},
  "norm": {"scale": (4,)},
}


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))


def _trees(seed=0):
  ks = iter(jax.random.split(jax.random.key(seed), 16))

  def is_shape(x):
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)

  anchor = jax.tree.map(lambda s: jax.random.normal(next(ks), s), SHAPES, is_leaf=is_shape)
  params = jax.tree.map(lambda a: a + 0.5 * jax.random.normal(next(ks), a.shape), anchor)
  return params, anchor


def _shard(tree, mesh):
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, SPECS)


def _assert_same_sharding(out, ref):
  for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    assert o.sharding.is_equivalent_to(r.sharding, o.ndim), (o.sharding, r.sharding)


def _assert_close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)


def _no_all_gather(fn, *args):
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  assert "all-gather" not in hlo


@pytest.mark.parametrize("norm", ("mars", "l2"))
def test_project_and_init_radii(mesh, norm):
  params, anchor = _trees()
  sp, sa = _shard(params, mesh), _shard(anchor, mesh)
  radii = jax.jit(tpgm_jax.init_radii, static_argnums=2)(sp, sa, norm)
  _assert_close(radii, tpgm_jax.init_radii(params, anchor, norm))
  radii = jax.tree.map(lambda r: r * 1.7, radii)
  out = jax.jit(tpgm_jax.project, static_argnums=3)(sp, sa, radii, norm)
  _assert_same_sharding(out, sp)
  _assert_close(out, tpgm_jax.project(params, anchor, radii, norm))
  _no_all_gather(lambda p, a, r: tpgm_jax.project(p, a, r, norm), sp, sa, radii)
  _no_all_gather(lambda p, a: tpgm_jax.init_radii(p, a, norm), sp, sa)
  _no_all_gather(lambda r, p, a: tpgm_jax.clip_radii(r, p, a, norm), radii, sp, sa)


def test_transformation(mesh):
  params, _ = _trees()
  grads = jax.tree.map(lambda p: jnp.cos(p * 3.0), params)
  radii = jax.tree.map(lambda p: jnp.float32(0.2), params)
  tx = optax.chain(
    optax.sgd(0.5, momentum=0.9), tpgm_jax.tpgm(mask=tpgm_jax.path_mask(exclude="norm.*"))
  )

  def step(p, s, g, r):
    u, s = tx.update(g, s, p, radii=r)
    return optax.apply_updates(p, u), s

  sp, sg = _shard(params, mesh), _shard(grads, mesh)
  state = jax.jit(tx.init)(sp)
  _assert_same_sharding(state[1].anchor, sp)
  out, _ = jax.jit(step)(sp, state, sg, radii)
  _assert_same_sharding(out, sp)
  ref, _ = step(params, tx.init(params), grads, radii)
  _assert_close(out, ref)
  _no_all_gather(step, sp, state, sg, radii)


def test_radius_update(mesh):
  params, anchor = _trees()
  targets = _trees(seed=5)[0]
  batches = jax.tree.map(lambda t: jnp.stack([t, -t]), targets)

  def loss(p, b):
    return sum(jnp.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(b)))

  trainer = tpgm_jax.radii_trainer(loss, max_iters=2)
  radii = tpgm_jax.init_radii(params, anchor)
  state = trainer.init(radii)
  sp, sa = _shard(params, mesh), _shard(anchor, mesh)
  sb = jax.tree.map(
    lambda x, s: jax.device_put(x, NamedSharding(mesh, P(None, *s))), batches, SPECS
  )
  got = jax.jit(trainer.update)(radii, state, sp, sa, sb)
  ref = trainer.update(radii, state, params, anchor, batches)
  _assert_close(got, ref)
  _no_all_gather(trainer.update, radii, state, sp, sa, sb)


def test_trainable_projection(mesh):
  params, anchor = _trees()
  targets = _trees(seed=5)[0]
  heldout = jax.tree.map(lambda t: jnp.stack([t, 0.5 * t]), targets)

  def loss(p, b):
    return sum(jnp.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(b)))

  grads = jax.tree.map(lambda p: jnp.cos(p * 3.0), params)
  tx = optax.chain(
    optax.sgd(0.5, momentum=0.9),
    tpgm_jax.trainable_projection(loss, mask=tpgm_jax.path_mask(exclude="norm.*"), max_iters=2),
  )

  def two_steps(p, s, g, h):
    for batches in (h, None):  # a radius update, then a projection only
      u, s = tx.update(g, s, p, heldout=batches)
      p = optax.apply_updates(p, u)
    return p, s

  sp, sa, sg = _shard(params, mesh), _shard(anchor, mesh), _shard(grads, mesh)
  sh = jax.tree.map(
    lambda x, s: jax.device_put(x, NamedSharding(mesh, P(None, *s))), heldout, SPECS
  )
  state = jax.jit(tx.init)(sa)
  _assert_same_sharding(state[1].anchor["dense"], sa["dense"])
  out, new_state = jax.jit(two_steps)(sp, state, sg, sh)
  _assert_same_sharding(out, sp)
  ref, ref_state = two_steps(params, tx.init(anchor), grads, heldout)
  _assert_close(out, ref)
  _assert_close(optax.tree.get(new_state, "radii"), optax.tree.get(ref_state, "radii"))
  _no_all_gather(two_steps, sp, state, sg, sh)
