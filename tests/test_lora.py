"""LoRA adapters: every method constrains the merged update ``s A B`` (NumPy float64 oracles)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import tpgm_jax
from tests import oracle, oracle_lora

S = 0.5
SPEC = tpgm_jax.lora_adapters(S)
NORMS = ("mars", "l2")


def _params(seed=0, in_shape=(6,), rank=2, out=4, b_scale=0.3, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 4)
  return {
    "dense": {
      "kernel_lora_a": jax.random.normal(ks[0], (*in_shape, rank)).astype(dtype),
      "kernel_lora_b": (b_scale * jax.random.normal(ks[1], (rank, out))).astype(dtype),
    },
    "bias": jax.random.normal(ks[2], (out,)).astype(dtype),
  }


def _ab(p):
  return np.asarray(p["dense"]["kernel_lora_a"], np.float64), np.asarray(
    p["dense"]["kernel_lora_b"], np.float64
  )


def _target(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _merged_loss(target):
  """A loss of the merged update only, and its gradient in the merged weight."""

  def loss(p):
    d = S * jnp.tensordot(p["dense"]["kernel_lora_a"], p["dense"]["kernel_lora_b"], 1)
    return 0.5 * jnp.sum((d - target) ** 2)

  def g_w(p):
    a, b = _ab(p)
    return oracle_lora.merged(a, b, S) - np.asarray(target, np.float64)

  return loss, g_w


# ---------------------------------------------------------------------------- the spec


def test_pairs_nnx_and_qwix_spellings():
  nnx_like = {"layer": {"lora": {"lora_a": jnp.ones((3, 2)), "lora_b": jnp.ones((2, 4))}}}
  qwix_like = {"l": {"kernel": jnp.ones((3, 4)), "kernel_lora_a": jnp.ones((3, 2))}}
  qwix_like["l"]["kernel_lora_b"] = jnp.ones((2, 4))
  assert SPEC.pairs(nnx_like) == [("layer/lora/lora_a", "layer/lora/lora_b", S)]
  assert SPEC.pairs(qwix_like) == [("l/kernel_lora_a", "l/kernel_lora_b", S)]
  per_path = tpgm_jax.lora_adapters(lambda path: 2.0 if path.startswith("l/") else 1.0)
  assert per_path.pairs(qwix_like)[0][2] == 2.0


@pytest.mark.parametrize(
  "params,spec,message",
  [
    ({"x": {"lora_a": jnp.ones((3, 2))}}, SPEC, "A without its B at \\['x/lora_a'\\]"),
    ({"x": {"lora_b": jnp.ones((2, 3))}}, SPEC, "B without its A at \\['x/lora_b'\\]"),
    (
      {"x": {"lora_a": jnp.ones((3, 2)), "lora_b": jnp.ones((3, 4))}},
      SPEC,
      "shapes of 'x/lora_a' \\(3, 2\\) and 'x/lora_b' \\(3, 4\\) do not chain",
    ),
    (
      {"x": {"lora_a": jnp.ones((3,)), "lora_b": jnp.ones((3, 4))}},
      SPEC,
      "do not chain",
    ),
    ({"w": jnp.ones(3)}, SPEC, "matches no parameter path; the paths are \\['w'\\]"),
    (
      {"x": {"lora_a": jnp.ones((3, 2), jnp.int32), "lora_b": jnp.ones((2, 4))}},
      SPEC,
      "'x/lora_a' has dtype int32",
    ),
  ],
)
def test_bad_adapters_are_clear_errors(params, spec, message):
  with pytest.raises(ValueError, match=message):
    spec.pairs(params)
  with pytest.raises(ValueError, match=message):  # the same error from every method
    tpgm_jax.tpgm(radii=1.0, lora=spec).init(params)


def test_bad_specs():
  with pytest.raises(ValueError, match="needs a group"):
    tpgm_jax.lora_adapters(a="lora_a")
  with pytest.raises(ValueError, match="does not compile"):
    tpgm_jax.lora_adapters(b="(")
  with pytest.raises(ValueError, match="scale"):
    tpgm_jax.lora_adapters(0.0)
  with pytest.raises(ValueError, match="lora_adapters"):
    tpgm_jax.project(_params(), _params(), {}, lora="lora")


# ---------------------------------------------------------------------------- norms and projection


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("in_shape", [(6,), (3, 3, 2)], ids=["dense", "conv"])
def test_norms_and_init_radii(norm, in_shape):
  p = _params(in_shape=in_shape)
  n = tpgm_jax.distance_norms(p, p, norm, lora=SPEC)
  a, b = _ab(p)
  want = oracle.norms(oracle_lora.merged(a, b, S), norm)
  np.testing.assert_allclose(n["dense"]["kernel_lora_b"], want, rtol=1e-5)
  assert n["dense"]["kernel_lora_a"] is None
  r = tpgm_jax.init_radii(p, p, norm, lora=SPEC)
  np.testing.assert_allclose(r["dense"]["kernel_lora_b"], np.min(want) / 2, rtol=1e-5)
  assert float(r["dense"]["kernel_lora_a"]) == 0


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("where", ["inside", "on", "outside"])
def test_projection_scales_b_onto_the_ball(norm, where):
  p = _params()
  a, b = _ab(p)
  top = float(np.max(oracle.norms(oracle_lora.merged(a, b, S), norm)))
  r = {"inside": 2 * top, "on": top, "outside": 0.3 * top}[where]
  radii = jax.tree.map(lambda _: jnp.float32(r), p)
  out = jax.jit(lambda p, r: tpgm_jax.project(p, p, r, norm, lora=SPEC))(p, radii)
  want_a, want_b = oracle_lora.project(a, b, S, r, norm)
  np.testing.assert_array_equal(out["dense"]["kernel_lora_a"], p["dense"]["kernel_lora_a"])
  np.testing.assert_allclose(out["dense"]["kernel_lora_b"], want_b, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(out["bias"], p["bias"])  # its anchor is itself
  got = oracle.norms(oracle_lora.merged(*_ab(out), S), norm)
  assert np.all(got <= r * (1 + 1e-5))
  if where != "outside":
    np.testing.assert_allclose(out["dense"]["kernel_lora_b"], b, rtol=1e-6)


def test_mask_selects_adapters_by_b():
  p = _params()
  radii = jax.tree.map(lambda _: jnp.float32(1e-3), p)
  off = tpgm_jax.path_mask(exclude=r"dense/kernel_lora_b")
  out = tpgm_jax.project(p, p, radii, lora=SPEC, mask=off)
  np.testing.assert_array_equal(out["dense"]["kernel_lora_b"], p["dense"]["kernel_lora_b"])
  pre = {**p, "dense": {**p["dense"], "kernel_lora_b": None}}  # None at B: left alone
  out = tpgm_jax.project(p, pre, radii, lora=SPEC)
  np.testing.assert_array_equal(out["dense"]["kernel_lora_b"], p["dense"]["kernel_lora_b"])


@pytest.mark.parametrize("norm", NORMS)
def test_radius_gradient_matches_finite_differences(norm):
  p = _params()
  target = _target(1, (6, 4))
  loss, _ = _merged_loss(target)
  trainer = tpgm_jax.radii_trainer(
    lambda q, _: loss(q), norm=norm, optimizer=optax.sgd(1.0), lora=SPEC
  )
  r0 = tpgm_jax.init_radii(p, p, norm, lora=SPEC)
  radii, _, _ = trainer.update(r0, trainer.init(r0), p, p, jnp.zeros((1,)))
  a, b = _ab(p)
  r, t = float(r0["dense"]["kernel_lora_b"]), np.asarray(target, np.float64)

  def f(r):
    pa, pb = oracle_lora.project(a, b, S, r, norm)
    return 0.5 * np.sum((oracle_lora.merged(pa, pb, S) - t) ** 2)

  h = 1e-5 * r
  g = (f(r + h) - f(r - h)) / (2 * h)
  np.testing.assert_allclose(radii["dense"]["kernel_lora_b"], r - g, rtol=1e-4)


# ---------------------------------------------------------------------------- the transformations


@pytest.mark.parametrize("norm", NORMS)
def test_tpgm_step_keeps_dw_in_the_ball_and_compiles_once(norm):
  p = _params(b_scale=0.0)  # LoRA's own initialisation: B = 0, dW = 0
  loss, _ = _merged_loss(_target(2, (6, 4)))
  tx = optax.chain(optax.sgd(0.1), tpgm_jax.tpgm(norm, radii=0.05, lora=SPEC))
  state = tx.init(p)
  assert state[1].anchor["dense"]["kernel_lora_b"].shape == ()  # nothing of B stored
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
  for _ in range(4):
    plain = jax.tree.map(lambda w, g: w - 0.1 * g, p, jax.grad(loss)(p))
    u, state = step(p, state)
    new = optax.apply_updates(p, u)
    a, b_c = _ab(plain)
    want_a, want_b = oracle_lora.project(a, b_c, S, 0.05, norm)
    np.testing.assert_allclose(new["dense"]["kernel_lora_a"], want_a, rtol=1e-6)
    np.testing.assert_allclose(new["dense"]["kernel_lora_b"], want_b, rtol=1e-5, atol=1e-7)
    p = new
  assert np.max(oracle.norms(oracle_lora.merged(*_ab(p), S), norm)) == pytest.approx(0.05, 1e-4)
  assert step._cache_size() == 1


def test_trainable_projection_learns_one_radius_per_adapter():
  p = _params(b_scale=0.0)
  loss, _ = _merged_loss(_target(2, (6, 4)))
  tx = optax.chain(optax.sgd(0.1), tpgm_jax.trainable_projection(lambda q, _: loss(q), lora=SPEC))
  state = tx.init(p)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p, heldout=jnp.zeros((1, 1))))
  for _ in range(3):
    u, state = step(p, state)
    p = optax.apply_updates(p, u)
  radii = optax.tree.get(state, "radii")
  assert float(radii["dense"]["kernel_lora_a"]) == 0 and float(radii["dense"]["kernel_lora_b"]) > 0
  got = np.max(oracle.norms(oracle_lora.merged(*_ab(p), S), "mars"))
  assert got <= float(radii["dense"]["kernel_lora_b"]) * (1 + 1e-5)


def test_post_hoc_on_adapters():
  p = _params()
  loss, _ = _merged_loss(jnp.zeros((6, 4)))
  out, radii = tpgm_jax.learn_radii_post_hoc(
    lambda q, _: loss(q), p, p, [jnp.zeros(1)] * 3, norm="l2", lora=SPEC
  )
  a, b = _ab(p)
  want = oracle_lora.project(a, b, S, float(radii["dense"]["kernel_lora_b"]), "l2")[1]
  np.testing.assert_allclose(out["dense"]["kernel_lora_b"], want, rtol=1e-5)
  assert float(radii["dense"]["kernel_lora_b"]) < float(np.linalg.norm(oracle_lora.merged(a, b, S)))


@pytest.mark.parametrize("norm", NORMS)
def test_ftp_steps_match_the_oracle(norm):
  p = _params()
  target = _target(3, (6, 4))
  loss, g_w = _merged_loss(target)
  tx = tpgm_jax.ftp(optax.sgd(0.2), norm=norm, mask=tpgm_jax.path_mask(exclude="bias"), lora=SPEC)
  state = tx.init(p)
  assert state.prev_displacement["dense"]["kernel_lora_b"].shape == (2, 4)
  assert jax.tree.leaves(state.gamma["dense"]["kernel_lora_a"]) == []
  ref = oracle_lora.FTP(S, 0.2, norm)
  a, b = _ab(p)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
  for _ in range(5):
    want_a, want_b = ref.step(a, b, g_w(p))
    u, state = step(p, state)
    p = optax.apply_updates(p, u)
    a, b = _ab(p)
    np.testing.assert_allclose(a, want_a, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b, want_b, rtol=2e-4, atol=1e-6)
    a, b = want_a, want_b
  assert ref.gamma > 1e-4  # the constraint grew, so the steps compared are not trivial
  np.testing.assert_allclose(state.gamma["dense"]["kernel_lora_b"], ref.gamma, rtol=2e-4)


@pytest.mark.parametrize("seed", [0, 4])
def test_spd_step_matches_the_oracle(seed):
  p = _params(seed)
  target = _target(seed, (6, 4))
  loss, g_w = _merged_loss(target)
  tx = tpgm_jax.spd(
    optax.sgd(0.3), weight_decay=0.7, mask=tpgm_jax.path_mask(exclude="bias"), lora=SPEC
  )
  u, _ = tx.update(jax.grad(loss)(p), tx.init(p), p)
  new = optax.apply_updates(p, u)
  a, b = _ab(p)
  want_a, want_dw = oracle_lora.spd(a, b, S, g_w(p), 0.3, 0.7)
  np.testing.assert_allclose(new["dense"]["kernel_lora_a"], want_a, rtol=1e-5)
  np.testing.assert_allclose(oracle_lora.merged(*_ab(new), S), want_dw, rtol=1e-4, atol=1e-6)


def test_spd_decays_when_selected():
  p = _params(b_scale=1.0)
  target = jnp.zeros((6, 4))  # the gradient points back to the base model: <G, dW> > 0
  loss, g_w = _merged_loss(target)
  tx = tpgm_jax.spd(optax.sgd(-0.01), weight_decay=1.0, lora=SPEC)  # a step away from it
  u, _ = tx.update(jax.grad(loss)(p), tx.init(p), p)
  new = optax.apply_updates(p, u)
  a, b = _ab(p)
  want_a, want_dw = oracle_lora.spd(a, b, S, g_w(p), -0.01, 1.0)
  np.testing.assert_allclose(oracle_lora.merged(*_ab(new), S), want_dw, rtol=1e-4, atol=1e-6)
  plain = oracle_lora.merged(a + 0.01 * (S * g_w(p) @ b.T), b, S)
  assert np.linalg.norm(want_dw) < np.linalg.norm(plain)  # decayed


def test_l2sp_gradients_match_the_oracle():
  p = _params()
  zero = jax.tree.map(jnp.zeros_like, p)
  tx = tpgm_jax.l2sp(0.3, beta=0.1, mask=tpgm_jax.path_mask(exclude="bias"), lora=SPEC)
  u, _ = tx.update(zero, tx.init(p), p)
  a, b = _ab(p)
  g_a, g_b = oracle_lora.l2sp_grads(a, b, S, 0.3)
  np.testing.assert_allclose(u["dense"]["kernel_lora_a"], g_a, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(u["dense"]["kernel_lora_b"], g_b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(u["bias"], 0.1 * np.asarray(p["bias"]), rtol=1e-6)  # beta


def test_digrap_is_zeros_anchored_digrap_on_b():
  p = _params()
  loss, g_w = _merged_loss(_target(5, (6, 4)))
  a, b = _ab(p)
  g = jax.grad(loss)(p)
  # The conflict test on B is the merged update's: <g_B, B> = <G, dW>.
  np.testing.assert_allclose(
    np.sum(np.asarray(g["dense"]["kernel_lora_b"]) * b),
    np.sum(g_w(p) * oracle_lora.merged(a, b, S)),
    rtol=1e-5,
  )
  tx = tpgm_jax.digrap(strength_lr=0.5, lora=SPEC, mask=tpgm_jax.path_mask(exclude="bias"))
  ref = tpgm_jax.digrap(
    strength_lr=0.5, anchor="zeros", mask=tpgm_jax.path_mask(include="dense/kernel_lora_b")
  )
  s, s_ref = tx.init(p), ref.init(p)
  for k in range(3):
    gk = jax.tree.map(lambda x, k=k: x * (-1.0) ** k, g)
    out, s = tx.update(gk, s, p)
    want, s_ref = ref.update(gk, s_ref, p)
    for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
      np.testing.assert_array_equal(x, y)
  assert float(s.omega["dense"]["kernel_lora_b"]) > 0


def test_interpolate_scales_b():
  p = _params()
  out = tpgm_jax.interpolate(p, p, alpha=0.3, lora=SPEC, mask=tpgm_jax.path_mask(exclude="bias"))
  a, b = _ab(p)
  np.testing.assert_allclose(
    oracle_lora.merged(*_ab(out), S), 0.3 * oracle_lora.merged(a, b, S), rtol=1e-5
  )
  np.testing.assert_array_equal(out["dense"]["kernel_lora_a"], p["dense"]["kernel_lora_a"])


@pytest.mark.parametrize(
  "make",
  [
    lambda: optax.chain(optax.sgd(0.1), tpgm_jax.tpgm(radii=0.05, lora=SPEC)),
    lambda: tpgm_jax.ftp(optax.sgd(0.1), lora=SPEC),
    lambda: tpgm_jax.spd(optax.sgd(0.1), weight_decay=1.0, lora=SPEC),
    lambda: optax.chain(tpgm_jax.l2sp(0.1, lora=SPEC), optax.sgd(0.1)),
  ],
  ids=["tpgm", "ftp", "spd", "l2sp"],
)
def test_bfloat16_adapters(make):
  p = _params(dtype=jnp.bfloat16)
  loss, _ = _merged_loss(_target(2, (6, 4)))
  tx = make()
  state = tx.init(p)
  for _ in range(3):
    u, state = jax.jit(tx.update)(jax.grad(loss)(p), state, p)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
    p = optax.apply_updates(p, u)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))


def test_bfloat16_projection_matches_the_oracle():
  p = _params(dtype=jnp.bfloat16)
  radii = jax.tree.map(lambda _: jnp.float32(0.2), p)
  out = tpgm_jax.project(p, p, radii, lora=SPEC)
  assert out["dense"]["kernel_lora_b"].dtype == jnp.bfloat16
  want = oracle_lora.project(*_ab(p), S, 0.2, "mars")[1]
  np.testing.assert_allclose(np.asarray(out["dense"]["kernel_lora_b"], np.float64), want, rtol=1e-2)


# ---------------------------------------------------------------------------- sharding


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (CPU) devices")
@pytest.mark.parametrize("method", ["tpgm", "ftp"])
def test_sharded_adapters(method):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  specs = {"dense": {"kernel_lora_a": P("data", None), "kernel_lora_b": P(None, "model")}}
  specs["bias"] = P("model")
  p = _params(in_shape=(8,), out=4)
  loss, _ = _merged_loss(_target(2, (8, 4)))
  tx = (
    optax.chain(optax.sgd(0.1), tpgm_jax.tpgm(radii=0.05, lora=SPEC))
    if method == "tpgm"
    else tpgm_jax.ftp(optax.sgd(0.1), lora=SPEC)
  )

  def two_steps(p, s):
    for _ in range(2):
      u, s = tx.update(jax.grad(loss)(p), s, p)
      p = optax.apply_updates(p, u)
    return p, s

  sp = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), p, specs)
  out, _ = jax.jit(two_steps)(sp, jax.jit(tx.init)(sp))
  ref, _ = two_steps(p, tx.init(p))
  for o, r, x in zip(jax.tree.leaves(out), jax.tree.leaves(ref), jax.tree.leaves(sp)):
    assert o.sharding.is_equivalent_to(x.sharding, o.ndim), (o.sharding, x.sharding)
    np.testing.assert_allclose(np.asarray(o), np.asarray(r), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- real clients

X = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)
Y = jnp.arange(8) % 3
CLIENT_METHODS = {
  "tpgm": lambda spec: optax.chain(optax.adam(0.05), tpgm_jax.tpgm(radii=0.05, lora=spec)),
  "ftp": lambda spec: tpgm_jax.ftp(optax.adam(0.05), lora=spec),
  "spd": lambda spec: tpgm_jax.spd(optax.adam(0.05), weight_decay=1.0, lora=spec),
  "digrap": lambda spec: optax.chain(tpgm_jax.digrap(strength_lr=0.5, lora=spec), optax.adam(0.05)),
  "l2sp": lambda spec: optax.chain(tpgm_jax.l2sp(1.0, lora=spec), optax.adam(0.05)),
}


def _train(model, tx, nnx):
  def loss(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(X), Y).mean()

  opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, opt):
    opt.update(model, nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model))

  for _ in range(4):
    step(model, opt)
  return opt


def _merged_max(pairs, state, norm="mars"):
  flat = dict(zip(tpgm_jax.leaf_paths(state), jax.tree.leaves(state)))
  return max(
    float(np.max(oracle.norms(oracle_lora.merged(flat[a], flat[b], s), norm))) for a, b, s in pairs
  )


@pytest.mark.parametrize("method", sorted(CLIENT_METHODS))
def test_nnx_lora_linear_under_nnx_optimizer(method):
  nnx = pytest.importorskip("flax.nnx")

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.body = nnx.LoRALinear(4, 6, lora_rank=2, rngs=rngs)
      self.head = nnx.LoRALinear(6, 3, lora_rank=2, rngs=rngs)

    def __call__(self, x):
      return self.head(jax.nn.tanh(self.body(x)))

  model = Model(nnx.Rngs(0))
  kernel = np.asarray(model.body.kernel[...])
  spec = tpgm_jax.lora_adapters(1.0)  # nnx.LoRA computes x @ A @ B
  opt = _train(model, CLIENT_METHODS[method](spec), nnx)
  state = nnx.as_pure(nnx.state(model, nnx.LoRAParam))
  pairs = spec.pairs(state)
  assert [p[:2] for p in pairs] == [
    ("body/lora/lora_a", "body/lora/lora_b"),
    ("head/lora/lora_a", "head/lora/lora_b"),
  ]
  np.testing.assert_array_equal(model.body.kernel[...], kernel)  # the base is frozen
  assert _merged_max(pairs, state) > 0  # the adapters moved
  if method == "tpgm":
    assert _merged_max(pairs, state) <= 0.05 * (1 + 1e-5)
  if method == "ftp":
    gamma = optax.tree.get(nnx.as_pure(opt.opt_state), "gamma")
    assert jax.tree.leaves(gamma["body"]["lora"]["lora_a"]) == []


def test_qwix_lora_under_nnx_optimizer():
  nnx = pytest.importorskip("flax.nnx")
  qwix = pytest.importorskip("qwix")

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(4, 6, rngs=rngs)
      self.l2 = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(jax.nn.tanh(self.l1(x)))

  rank, alpha = 2, 4.0
  provider = qwix.LoraProvider(module_path=".*", rank=rank, alpha=alpha)
  model = qwix.apply_lora_to_model(MLP(nnx.Rngs(0)), provider, X, rngs=nnx.Rngs(1))
  spec = tpgm_jax.lora_adapters(alpha / rank)
  state = nnx.as_pure(nnx.state(model, nnx.LoRAParam))
  assert [p[:2] for p in spec.pairs(state)] == [
    ("l1/kernel_lora_a", "l1/kernel_lora_b"),
    ("l2/kernel_lora_a", "l2/kernel_lora_b"),
  ]
  # The scale is qwix's: each adapted layer computes x (W0 + s A B) + bias.
  rng = np.random.default_rng(1)
  weights = []
  for layer in (model.l1, model.l2):
    b = layer.kernel_lora_b[...]
    layer.kernel_lora_b[...] = jnp.asarray(rng.normal(size=b.shape), jnp.float32)
    merged = oracle_lora.merged(layer.kernel_lora_a[...], layer.kernel_lora_b[...], alpha / rank)
    weights.append((np.asarray(layer.kernel[...]) + merged, np.asarray(layer.bias[...])))
  (w1, b1), (w2, b2) = weights
  want = np.tanh(np.asarray(X, np.float64) @ w1 + b1) @ w2 + b2
  np.testing.assert_allclose(model(X), want, rtol=1e-4, atol=1e-4)
  for layer in (model.l1, model.l2):
    layer.kernel_lora_b[...] = jnp.zeros_like(layer.kernel_lora_b[...])
  _train(model, CLIENT_METHODS["tpgm"](spec), nnx)
  state = nnx.as_pure(nnx.state(model, nnx.LoRAParam))
  assert 0 < _merged_max(spec.pairs(state), state) <= 0.05 * (1 + 1e-5)
