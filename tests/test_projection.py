"""Norms, radius initialisation and projection against a NumPy oracle."""

import doctest

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tpgm_jax
from tests import oracle
from tpgm_jax import _projection, _radii, _transform, _tree

NORMS = ("mars", "l2")
DTYPES = (jnp.float32, jnp.bfloat16)


def _rand(key, shape, dtype=jnp.float32, scale=1.0):
  return (scale * jax.random.normal(key, shape)).astype(dtype)


def make_tree(kind, dtype=jnp.float32, seed=0):
  """(params, anchor) pairs of several pytree kinds and tensor ranks."""
  ks = iter(jax.random.split(jax.random.key(seed), 32))
  shapes = {
    "vector": {"bias": (7,)},
    "dense": {"kernel": (5, 3)},
    "conv": {"kernel": (3, 3, 4, 6)},
    "scalar": {"s": ()},
    "nested": {
      "params": {
        "Dense_0": {"kernel": (4, 3), "bias": (3,)},
        "Conv_0": {"kernel": (2, 2, 3, 5)},
        "head": {"kernel": (5, 2), "bias": (2,)},
      }
    },
    "tuple_list": ((4, 2), [(3,), {"k": (2, 2, 2)}]),
    "empty": {"kernel": (0, 3), "bias": (0,), "w": (3, 2)},
  }[kind]
  anchor = jax.tree.map(
    lambda s: _rand(next(ks), s, dtype),
    shapes,
    is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x),
  )
  params = jax.tree.map(
    lambda a: (a.astype(jnp.float32) + _rand(next(ks), a.shape, scale=0.5)).astype(dtype), anchor
  )
  return params, anchor


KINDS = ("vector", "dense", "conv", "scalar", "nested", "tuple_list", "empty")


def _leaves64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_numpy_oracle(kind, norm, dtype):
  params, anchor = make_tree(kind, dtype)
  radii = tpgm_jax.init_radii(params, anchor, norm)
  # Radii spread over "inside", "some channels outside", "all outside".
  radii = jax.tree.map(lambda r, p, a: r * (1.0 + 2.0 * (np.size(p) % 3)), radii, params, anchor)
  out = tpgm_jax.project(params, anchor, radii, norm)
  assert jax.tree.structure(out) == jax.tree.structure(params)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for w, w0, r, o in zip(
    _leaves64(params), _leaves64(anchor), _leaves64(radii), jax.tree.leaves(out)
  ):
    assert o.dtype == dtype and o.shape == w.shape
    np.testing.assert_allclose(
      np.asarray(o, np.float64), oracle.project(w, w0, r, norm), rtol=tol, atol=tol
    )
  for w, w0, r in zip(
    _leaves64(params), _leaves64(anchor), jax.tree.leaves(tpgm_jax.init_radii(params, anchor, norm))
  ):
    assert r.dtype == jnp.float32 and r.shape == ()
    np.testing.assert_allclose(float(r), oracle.init_radius(w, w0, norm), rtol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_distance_norms_match_oracle(norm):
  params, anchor = make_tree("nested")
  got = tpgm_jax.distance_norms(params, anchor, norm)
  for w, w0, n in zip(_leaves64(params), _leaves64(anchor), jax.tree.leaves(got)):
    np.testing.assert_allclose(n, oracle.norms(w - w0, norm), rtol=1e-5)
  if norm == "mars":  # per output channel (last axis) for rank >= 2
    assert got["params"]["Conv_0"]["kernel"].shape == (5,)
    assert got["params"]["Dense_0"]["bias"].shape == ()


@pytest.mark.parametrize("kind", ("dense", "conv", "nested"))
@pytest.mark.parametrize("norm", NORMS)
def test_invariants(kind, norm):
  params, anchor = make_tree(kind)
  norms = tpgm_jax.distance_norms(params, anchor, norm)
  maxn = jax.tree.map(lambda n: float(jnp.max(n)), norms)
  # A radius between the smallest and largest norm: channels beyond it land
  # exactly on it, channels inside it stay put.
  mid = jax.tree.map(lambda n: jnp.float32((float(jnp.min(n)) + float(jnp.max(n))) / 2), norms)
  out = tpgm_jax.project(params, anchor, mid, norm)
  new_norms = tpgm_jax.distance_norms(out, anchor, norm)
  for n0, n1, r, w, o in zip(
    jax.tree.leaves(norms),
    jax.tree.leaves(new_norms),
    jax.tree.leaves(mid),
    jax.tree.leaves(params),
    jax.tree.leaves(out),
  ):
    n0, n1, r = np.asarray(n0), np.asarray(n1), float(r)
    np.testing.assert_allclose(n1, np.minimum(n0, r), rtol=1e-5)
    inside = np.broadcast_to(n0 <= r, np.shape(w)[-1:] if np.ndim(n0) else ())
    np.testing.assert_array_equal(np.asarray(o)[..., inside], np.asarray(w)[..., inside])
  # Idempotent.
  again = tpgm_jax.project(out, anchor, mid, norm)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(again)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # Radius >= max norm is the identity.
  big = jax.tree.map(lambda m: jnp.float32(m * 1.5), maxn)
  for a, b in zip(
    jax.tree.leaves(tpgm_jax.project(params, anchor, big, norm)), jax.tree.leaves(params)
  ):
    np.testing.assert_array_equal(a, b)
  # Radius at (or below) the floor gives the anchor.
  tiny = jax.tree.map(lambda m: jnp.float32(0.0), maxn)
  for a, b in zip(
    jax.tree.leaves(tpgm_jax.project(params, anchor, tiny, norm)), jax.tree.leaves(anchor)
  ):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_equal_to_anchor_is_finite_with_zero_gradient(norm, dtype):
  anchor = {"w": _rand(jax.random.key(1), (4, 3), dtype), "b": jnp.zeros(3, dtype)}
  params = jax.tree.map(jnp.copy, anchor)
  radii = tpgm_jax.init_radii(params, anchor, norm)
  assert all(float(r) == 0.0 for r in jax.tree.leaves(radii))
  out = tpgm_jax.project(params, anchor, radii, norm)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(anchor)):
    np.testing.assert_array_equal(a, b)

  def loss(r):
    return sum(
      jnp.sum(jnp.sin(x.astype(jnp.float32)))
      for x in jax.tree.leaves(tpgm_jax.project(params, anchor, r, norm))
    )

  grads = jax.grad(loss)(radii)
  for g in jax.tree.leaves(grads):
    assert float(g) == 0.0
  clipped = tpgm_jax.clip_radii(radii, params, anchor, norm)
  assert all(np.isfinite(float(r)) for r in jax.tree.leaves(clipped))


def test_empty_tensors():
  params, anchor = make_tree("empty")
  radii = tpgm_jax.init_radii(params, anchor)
  out = jax.jit(tpgm_jax.project)(params, anchor, radii)
  assert out["kernel"].shape == (0, 3) and out["bias"].shape == (0,)
  g = jax.grad(lambda r: jnp.sum(tpgm_jax.project(params, anchor, r)["w"] ** 2))(radii)
  assert float(g["kernel"]) == 0.0 and np.isfinite(float(g["w"]))


@pytest.mark.parametrize("norm", NORMS)
def test_radius_gradient_matches_finite_differences(norm):
  with jax.enable_x64(True):
    params, anchor = make_tree("nested", jnp.float64, seed=3)
    norms = tpgm_jax.distance_norms(params, anchor, norm)
    # Radii strictly between the min and max norm, away from the kinks.
    radii = jax.tree.map(
      lambda n: jnp.float64(0.37 * float(jnp.min(n)) + 0.63 * float(jnp.max(n))), norms
    )
    target = jax.tree.map(
      lambda a: jnp.cos(jnp.arange(a.size, dtype=jnp.float64).reshape(a.shape)), params
    )

    def loss(r):
      out = tpgm_jax.project(params, anchor, r, norm)
      return sum(
        jnp.sum((o - t) ** 2) for o, t in zip(jax.tree.leaves(out), jax.tree.leaves(target))
      )

    grads = jax.jit(jax.grad(loss))(radii)  # jitted: one compilation, not one per operation
    flat, unravel = jax.flatten_util.ravel_pytree(radii)
    flat_loss = jax.jit(lambda f: loss(unravel(f)))  # one compilation for every difference
    h = 1e-6
    for i in range(flat.size):
      e = jnp.zeros_like(flat).at[i].set(h)
      fd = (flat_loss(flat + e) - flat_loss(flat - e)) / (2 * h)
      got = jax.flatten_util.ravel_pytree(grads)[0][i]
      np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-9)
      assert abs(float(got)) > 0  # the radius is active: a real check


def test_gradient_zero_where_radius_or_ratio_clipped():
  params, anchor = make_tree("dense")
  maxn = float(jnp.max(tpgm_jax.distance_norms(params, anchor)["kernel"]))

  def loss(r):
    return jnp.sum(tpgm_jax.project(params, anchor, r)["kernel"] ** 3)

  for r in (2.0 * maxn, 0.0):
    assert float(jax.grad(loss)({"kernel": jnp.float32(r)})["kernel"]) == 0.0


def test_norms_carry_no_gradient_to_params():
  params, anchor = make_tree("dense")
  radii = tpgm_jax.init_radii(params, anchor)
  # d(w0 + ratio * (w - w0))/dw = ratio when the norms are constants.
  g = jax.grad(lambda p: jnp.sum(tpgm_jax.project(p, anchor, radii)["kernel"]))(params)
  n = tpgm_jax.distance_norms(params, anchor)["kernel"]
  r = float(radii["kernel"])
  expected = np.clip(r / (np.asarray(n) + 1e-8), 0, 1)
  np.testing.assert_allclose(g["kernel"], np.broadcast_to(expected, (5, 3)), rtol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
def test_jit_matches_eager_and_does_not_recompile(norm):
  params, anchor = make_tree("nested")
  radii = tpgm_jax.init_radii(params, anchor, norm)
  eager = tpgm_jax.project(params, anchor, radii, norm)
  traces = []

  def counted(params, anchor, radii):
    traces.append(1)
    return tpgm_jax.project(params, anchor, radii, norm)

  fn = jax.jit(counted)
  jitted = fn(params, anchor, radii)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  params2 = jax.tree.map(lambda x: x * 1.1, params)
  radii2 = jax.tree.map(lambda r: r * 0.5, radii)
  fn(params2, anchor, radii2)
  assert len(traces) == 1


def test_mask_kinds_as_in_optax_masked():
  params, anchor = make_tree("nested")
  radii = jax.tree.map(lambda r: r * 0, tpgm_jax.init_radii(params, anchor))  # project to anchor
  not_head = tpgm_jax.path_mask(exclude=r"params/head/.*")

  def optax_style(p):
    return jax.tree.map(lambda x: x.shape[-1] != 2, p)  # head: 2 classes

  prefix = {"params": {"Dense_0": True, "Conv_0": True, "head": False}}
  full = jax.tree.map(lambda _: True, params)
  full["params"]["head"] = {"kernel": False, "bias": False}
  predicate = tpgm_jax.path_mask(exclude=lambda path: path.startswith("params/head"))
  listed = tpgm_jax.path_mask(include=[r"params/Dense_0/.*", r"params/Conv_0/.*"])
  for m in (not_head, optax_style, prefix, full, predicate, listed):
    out = tpgm_jax.project(params, anchor, radii, mask=m)
    np.testing.assert_array_equal(
      out["params"]["head"]["kernel"], params["params"]["head"]["kernel"]
    )
    np.testing.assert_allclose(
      out["params"]["Dense_0"]["kernel"], anchor["params"]["Dense_0"]["kernel"], atol=1e-6
    )
    # The same mask selects the same tensors in optax.masked.
    tx = optax.masked(optax.set_to_zero(), m)
    updates, _ = tx.update(params, tx.init(params))
    assert float(jnp.abs(updates["params"]["Dense_0"]["kernel"]).max()) == 0
    assert float(jnp.abs(updates["params"]["head"]["kernel"]).max()) > 0
  # The same through a masked anchor (the form stored by the transformations).
  masked_anchor = _tree.record_anchor(anchor, not_head)
  assert isinstance(masked_anchor["params"]["head"]["bias"], optax.MaskedNode)
  out = tpgm_jax.project(params, masked_anchor, radii)
  np.testing.assert_array_equal(out["params"]["head"]["bias"], params["params"]["head"]["bias"])


def test_path_mask_matches_whole_paths_and_skips_integers():
  params = {
    "params": {"head": {"kernel": jnp.ones(2)}, "multihead": {"kernel": jnp.ones(2)}},
    "step": jnp.array(3, jnp.int32),
    "layers": [jnp.ones(1), jnp.ones(1)],
  }
  assert tpgm_jax.path_mask(exclude="params/head/.*")(params) == {
    "params": {"head": {"kernel": False}, "multihead": {"kernel": True}},
    "step": False,
    "layers": [True, True],
  }
  assert tpgm_jax.path_mask(include=r"layers/\d")(params)["layers"] == [True, True]
  assert tpgm_jax.path_mask(include=["layers", "step"])(params)["layers"] == [
    False,
    False,
  ]  # fullmatch
  with pytest.raises(
    ValueError,
    match=r"include='layers'\) matches no parameter path.*"
    r"did you mean r\"\.\*layers\.\*\" or \"layers/\.\*\"",
  ):
    tpgm_jax.path_mask(include="layers")(params)  # a partial name matching nothing: an error
  with pytest.raises(ValueError, match="exclude must be a regex"):
    tpgm_jax.path_mask(exclude="params/(")


def test_bad_masks_are_clear_errors():
  params, anchor = make_tree("nested")
  radii = tpgm_jax.init_radii(params, anchor)
  with pytest.raises(
    ValueError,
    match=r"path_mask.*raised AttributeError.*receives the params pytree, not a path string",
  ):
    tpgm_jax.project(params, anchor, radii, mask=lambda path: not path.startswith("params/head"))
  with pytest.raises(
    ValueError,
    match=r"does not fit params: missing from mask: "
    r"\['params/Conv_0/kernel', 'params/Dense_0/bias'",
  ):
    tpgm_jax.project(params, anchor, radii, mask={"params": {"head": False}})
  with pytest.raises(ValueError, match=r"at 'params/Conv_0/kernel' is 'yes'; expected a bool"):
    tpgm_jax.project(params, anchor, radii, mask=jax.tree.map(lambda _: "yes", params))
  with pytest.raises(ValueError, match="traced value"):
    jax.jit(lambda m: tpgm_jax.project(params, anchor, radii, mask=m))(
      jax.tree.map(lambda _: True, params)
    )


def test_non_float_leaves_pass_through_and_cannot_be_selected():
  params = {"w": jnp.ones(3), "step": jnp.array(4, jnp.int32)}
  anchor = {"w": jnp.zeros(3), "step": jnp.array(0, jnp.int32)}
  radii = tpgm_jax.init_radii(params, anchor)
  out = tpgm_jax.project(params, anchor, radii)
  assert int(out["step"]) == 4
  with pytest.raises(ValueError, match="'step'.*int32"):
    tpgm_jax.project(params, anchor, radii, mask=lambda p: True)


def test_errors_name_the_path():
  params, anchor = make_tree("nested")
  radii = tpgm_jax.init_radii(params, anchor)
  bad_anchor = jax.tree.map(lambda x: x, anchor)
  bad_anchor["params"]["Dense_0"]["kernel"] = jnp.zeros((3, 4))
  with pytest.raises(
    ValueError,
    match=r"anchor at 'params/Dense_0/kernel' has shape \(3, 4\) but params have \(4, 3\)",
  ):
    tpgm_jax.project(params, bad_anchor, radii)
  missing = {"params": {k: v for k, v in anchor["params"].items() if k != "head"}}
  with pytest.raises(ValueError, match="missing from anchor.*params/head/bias"):
    tpgm_jax.project(params, missing, radii)
  bad_radii = jax.tree.map(lambda x: x, radii)
  bad_radii["params"]["Conv_0"]["kernel"] = jnp.ones(5)
  with pytest.raises(
    ValueError, match="radii at 'params/Conv_0/kernel' must be a floating-point scalar"
  ):
    tpgm_jax.project(params, anchor, bad_radii)
  with pytest.raises(ValueError, match="radii are required"):
    tpgm_jax.project(params, anchor, None)
  extra = dict(radii, other=jnp.float32(1))
  with pytest.raises(ValueError, match="not in params: \\['other'\\]"):
    tpgm_jax.project(params, anchor, extra)
  with pytest.raises(ValueError, match="norm must be one of"):
    tpgm_jax.project(params, anchor, radii, norm="l1")
  with pytest.raises(ValueError, match="mask must be"):
    tpgm_jax.project(params, anchor, radii, mask={"nope": True})


def test_check_finite_names_the_path():
  tpgm_jax.check_finite({"a": jnp.ones(2)})
  with pytest.raises(ValueError, match=r"params has non-finite values at \['b/0'\]"):
    tpgm_jax.check_finite({"a": jnp.ones(2), "b": [jnp.array([1.0, jnp.nan])]}, "params")


def test_flax_nnx_state():
  from flax import nnx  # noqa: PLC0415 (only this test needs Flax)

  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
  _, anchor = nnx.split(model)
  params = jax.tree.map(
    lambda x: x + 0.3 * jnp.sign(jnp.cos(jnp.arange(x.size).reshape(x.shape))), anchor
  )
  radii = tpgm_jax.init_radii(params, anchor)
  out = jax.jit(tpgm_jax.project)(params, anchor, radii)
  assert type(out) is type(params)
  for w, w0, r, o in zip(
    _leaves64(params), _leaves64(anchor), jax.tree.leaves(radii), jax.tree.leaves(out)
  ):
    np.testing.assert_allclose(o, oracle.project(w, w0, float(r), "mars"), rtol=1e-5, atol=1e-6)


_shapes = st.lists(
  hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4), min_size=1, max_size=4
)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
  shapes=_shapes,
  norm=st.sampled_from(NORMS),
  seed=st.integers(0, 2**16),
  scale=st.floats(0.0, 3.0),
  nest=st.booleans(),
)
def test_property_random_pytrees(shapes, norm, seed, scale, nest):
  rng = np.random.default_rng(seed)
  anchor = [rng.normal(size=s).astype(np.float32) for s in shapes]
  params = [a + rng.normal(size=a.shape).astype(np.float32) for a in anchor]
  if nest:
    anchor, params = {"x": tuple(anchor)}, {"x": tuple(params)}
  radii = jax.tree.map(lambda r: r * scale, tpgm_jax.init_radii(params, anchor, norm))
  out = tpgm_jax.project(params, anchor, radii, norm)
  for w, w0, r, o in zip(
    jax.tree.leaves(params), jax.tree.leaves(anchor), jax.tree.leaves(radii), jax.tree.leaves(out)
  ):
    assert o.shape == w.shape and np.all(np.isfinite(o))
    np.testing.assert_allclose(o, oracle.project(w, w0, float(r), norm), rtol=1e-5, atol=1e-5)
    if w.size:
      n_out = oracle.norms(np.asarray(o, np.float64) - w0, norm)
      assert np.all(
        n_out
        <= max(oracle.clipped_radius(float(r), oracle.norms(w - w0, norm)), 1e-8) * (1 + 1e-5)
        + 1e-6
      )


@pytest.mark.parametrize("module", (_projection, _transform, _radii))
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
