"""Flax NNX: under ``nnx.Optimizer`` a path mask means the same tensors at init and update.

``nnx.Optimizer(model, tx, wrt=nnx.Param)`` calls ``tx.init`` on a state of
``nnx.Param`` Variables (leaf paths end in ``value``) and ``tx.update`` on plain
arrays (paths without it). A mask written for the update's paths must exclude
the head at init too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tpgm_jax

nnx = pytest.importorskip("flax.nnx")

LR = 0.1
NOT_HEAD = tpgm_jax.path_mask(exclude=r"head/(kernel|bias)")


class Model(nnx.Module):
  def __init__(self, rngs):
    self.body = nnx.Linear(3, 4, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.tanh(self.body(x)))


X = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
Y = jnp.arange(8) % 2


def _loss(model):
  return optax.softmax_cross_entropy_with_integer_labels(model(X), Y).mean()


def _heldout(params, batch):
  x, y = batch
  return jnp.mean(jnp.square(x @ params["body"]["kernel"] + params["body"]["bias"] - y[:, None]))


METHODS = {
  "trainable_projection": lambda: optax.chain(
    optax.sgd(LR), tpgm_jax.trainable_projection(_heldout, mask=NOT_HEAD)
  ),
  "tpgm": lambda: optax.chain(optax.sgd(LR), tpgm_jax.tpgm(mask=NOT_HEAD, radii=1e-3)),
  "ftp": lambda: tpgm_jax.ftp(optax.sgd(LR), mask=NOT_HEAD),
  "spd": lambda: tpgm_jax.spd(optax.sgd(LR), weight_decay=1.0, mask=NOT_HEAD),
  "digrap": lambda: optax.chain(tpgm_jax.digrap(strength_lr=0.5, mask=NOT_HEAD), optax.sgd(LR)),
  "l2sp": lambda: optax.chain(tpgm_jax.l2sp(1.0, mask=NOT_HEAD), optax.sgd(LR)),
}


def test_init_and_update_see_the_same_paths():
  model = Model(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  assert tpgm_jax.leaf_paths(state) == ["body/bias", "body/kernel", "head/bias", "head/kernel"]
  assert tpgm_jax.leaf_paths(nnx.as_pure(state)) == tpgm_jax.leaf_paths(state)
  flags = jax.tree.leaves(NOT_HEAD(state))
  assert flags == jax.tree.leaves(NOT_HEAD(nnx.as_pure(state))) == [True, True, False, False]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_path_mask_excludes_the_head_under_nnx_optimizer(method):
  model = Model(nnx.Rngs(0))
  pre = jax.tree.map(np.asarray, nnx.as_pure(nnx.state(model, nnx.Param)))
  opt = nnx.Optimizer(model, METHODS[method](), wrt=nnx.Param)
  heldout = (X[None], jnp.ones((1, 8)))
  for _ in range(3):
    grads = nnx.grad(_loss)(model)
    kwargs = {"heldout": heldout} if method == "trainable_projection" else {}
    updates = opt.update(model, grads, **kwargs)
    g = nnx.as_pure(nnx.state(grads, nnx.Param))
    for name in ("kernel", "bias"):  # the head takes the plain SGD step
      np.testing.assert_allclose(
        updates["head"][name],
        -LR * g["head"][name],
        rtol=1e-6,
        atol=1e-8,
        err_msg=f"{method}: head/{name} was modified",
      )

  # The anchor holds the body only.
  anchor = nnx.as_pure(optax.tree.get(nnx.as_pure(opt.opt_state), "anchor"))
  assert jax.tree.leaves(anchor["head"]) == []
  assert len(jax.tree.leaves(anchor["body"])) == 2
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  if method == "tpgm":  # the body stays in its ball (per-channel L1 <= 1e-3)
    d = np.abs(np.asarray(params["body"]["kernel"]) - pre["body"]["kernel"]).sum(axis=0)
    assert np.all(d <= 1e-3 * (1 + 1e-4))
    assert np.abs(np.asarray(params["head"]["kernel"]) - pre["head"]["kernel"]).max() > 1e-3
  if method == "trainable_projection":
    radii = nnx.as_pure(optax.tree.get(nnx.as_pure(opt.opt_state), "radii"))
    assert float(radii["head"]["kernel"]) == 0 and float(radii["body"]["kernel"]) > 0
  if method == "ftp":
    gamma = optax.tree.get(nnx.as_pure(opt.opt_state), "gamma")
    assert jax.tree.leaves(gamma["head"]) == [] and len(jax.tree.leaves(gamma["body"])) == 2


def test_jitted_nnx_step_with_split_and_merge():
  model = Model(nnx.Rngs(1))
  opt = nnx.Optimizer(model, METHODS["tpgm"](), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    opt.update(model, nnx.grad(_loss)(model))

  for _ in range(2):
    step(model, opt)
  anchor = nnx.as_pure(optax.tree.get(nnx.as_pure(opt.opt_state), "anchor"))
  assert jax.tree.leaves(anchor["head"]) == []
