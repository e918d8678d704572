"""Bad input gets a clear ValueError naming the argument or the parameter path, before any work."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tpgm_jax


def _params():
  return {
    "params": {
      "body": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
      "head": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)},
    }
  }


def _loss(p, batch):
  x, y = batch
  return jnp.mean(jnp.square(x @ p["params"]["body"]["kernel"] - y))


def _batch(n=4):
  return (jnp.ones((n, 3)), jnp.zeros((n, 2)))


# ------------------------------------------------------------------ path_mask arguments


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (
      {"exclude": 3},
      r"exclude must be a regex, a sequence of regexes or a predicate.*got 3 "
      r"\(int\)",
    ),
    ({"include": ["params/.*", 3]}, r"include must be .*element 3 \(int\) is not a string"),
    ({"exclude": [None]}, r"exclude must be .*element None \(NoneType\) is not a string"),
    ({"exclude": []}, r"exclude must be .*the sequence is empty"),
    ({"exclude": b"head"}, r"exclude must be .*\(bytes\)"),
    ({"include": "params/(body"}, r"include must be .*missing \)"),
  ],
)
def test_path_mask_rules_of_the_wrong_type(kwargs, match):
  with pytest.raises(ValueError, match=match):
    tpgm_jax.path_mask(**kwargs)


def test_pattern_matching_nothing_lists_the_paths():
  with pytest.raises(
    ValueError,
    match=r"path_mask\(include='params/bdy/.\*'\) matches no "
    r"parameter path; the paths are \['params/body/bias', 'params/body/kernel'",
  ):
    tpgm_jax.path_mask(include=r"params/bdy/.*")(_params())


def test_partial_name_suggests_the_full_path_pattern():
  mask = tpgm_jax.path_mask(exclude="head")
  with pytest.raises(
    ValueError,
    match=r"exclude='head'\) matches no parameter path.*WHOLE path"
    r".*did you mean r\"\.\*head\.\*\" or \"params/head/\.\*\"",
  ):
    tpgm_jax.tpgm(mask=mask, radii=0.1).init(_params())  # checked when applied, at init


def test_predicates_and_matching_patterns_are_fine():
  flags = tpgm_jax.path_mask(exclude=["params/head/.*", "params/other/.*"])(_params())
  assert jax.tree.leaves(flags) == [True, True, False, False]
  flags = tpgm_jax.path_mask(exclude=lambda path: "nothing" in path)(_params())
  assert all(jax.tree.leaves(flags))


def test_callable_mask_that_raises_is_wrapped():
  tx = tpgm_jax.spd(optax.sgd(0.1), weight_decay=0.1, mask=lambda p: p["head"])
  with pytest.raises(
    ValueError,
    match=r"The mask callable failed on the params \(paths "
    r"\['params/body/bias'.*\): it raised KeyError: 'head'",
  ):
    tx.init(_params())


# ------------------------------------------------------------------ radii values


@pytest.mark.parametrize(
  "value,match",
  [
    (-0.5, r"radii must hold finite numbers >= 0; got 'params/body/kernel': -0.5"),
    (float("nan"), r"radii must hold finite numbers >= 0; got 'params/body/kernel': nan"),
    (np.inf, r"radii must hold finite numbers >= 0; got 'params/body/kernel': inf"),
  ],
)
def test_radii_pytree_with_bad_values_at_construction(value, match):
  radii = jax.tree.map(lambda _: jnp.float32(0.1), _params())
  radii["params"]["body"]["kernel"] = jnp.float32(value)
  with pytest.raises(ValueError, match=match):
    tpgm_jax.tpgm(radii=radii)


def test_one_radius_with_bad_value():
  with pytest.raises(ValueError, match=r"radii must be a finite number >= 0, got nan"):
    tpgm_jax.tpgm(radii=float("nan"))


def test_non_finite_radii_at_update_eager_but_not_traced():
  params = _params()
  tx = tpgm_jax.tpgm()
  state = tx.init(params)
  u = jax.tree.map(jnp.zeros_like, params)
  radii = jax.tree.map(lambda _: jnp.float32(0.1), params)
  radii["params"]["head"]["bias"] = jnp.float32(np.nan)
  with pytest.raises(
    ValueError,
    match=r"radii must hold finite numbers; got "
    r"'params/head/bias': nan",
  ):
    tx.update(u, state, params, radii=radii)
  # Under jit the radii are traced: their values cannot be checked (no host sync).
  jax.jit(lambda u, s, p, r: tx.update(u, s, p, radii=r))(u, state, params, radii)
  # A negative radius (a radius trainer's raw step below the floor) means the 1e-8 floor.
  radii["params"]["head"]["bias"] = jnp.float32(-1e-3)
  tx.update(u, state, params, radii=radii)


# ------------------------------------------------------------------ held-out batches


@pytest.mark.parametrize(
  "batches,match",
  [
    (None, r"batches is None; pass a list \(or a generator\) of held-out batches"),
    ("heldout", r"batches is 'heldout'; pass a list"),
    (
      _batch(),
      r"batches is a tuple of 2 arrays \(shapes \(4, 3\), \(4, 2\)\), which looks like "
      r"a single \(x, y\) batch.*Pass \[\(x, y\)\]",
    ),
    (
      {"x": jnp.ones((4, 3))},
      r"batches must be an iterable of held-out batches, not a single batch \(dict\)",
    ),
    (jnp.ones((2, 4, 3)), r"not a single batch \(ArrayImpl\)"),
    (3, r"batches must be an iterable of held-out batches, got int"),
    (
      [_batch(4), _batch(3)],
      r"batches is ragged: batch 1 at '0' has shape \(3, 3\).*batch 0 has "
      r"\(4, 3\)",
    ),
    ([_batch(4), {"x": jnp.ones((4, 3))}], r"batches is ragged: batch 1 has tree structure"),
  ],
)
def test_learn_radii_post_hoc_bad_batches(batches, match):
  params = _params()
  finetuned = jax.tree.map(lambda x: x + 0.1, params)
  with pytest.raises(ValueError, match=match):
    tpgm_jax.learn_radii_post_hoc(_loss, finetuned, params, batches)


def test_learn_radii_post_hoc_ragged_generator():
  params = _params()
  finetuned = jax.tree.map(lambda x: x + 0.1, params)
  with pytest.raises(ValueError, match=r"batches is ragged: batch 2 at '1' has shape \(3, 2\)"):
    tpgm_jax.learn_radii_post_hoc(
      _loss,
      finetuned,
      params,
      (b for b in (_batch(), _batch(), (jnp.ones((4, 3)), jnp.zeros((3, 2))))),
    )


@pytest.mark.parametrize(
  "batches,match",
  [
    (
      None,
      r"batches is None; expected one pytree of arrays whose leaves have a leading axis "
      r"of length max_iters=2",
    ),
    ("abc", r"batches is 'abc'"),
    ({"x": jnp.ones((2, 4, 3)), "name": "val"}, r"batches at 'name' is a str \('val'\)"),
    (
      [_batch(), _batch()],
      r"batches at '0/0' has shape \(4, 3\); expected a leading axis.*jnp.stack",
    ),
  ],
)
def test_radii_trainer_bad_batches(batches, match):
  params = _params()
  trainer = tpgm_jax.radii_trainer(_loss, max_iters=2)
  radii = tpgm_jax.init_radii(jax.tree.map(lambda x: x + 0.1, params), params)
  with pytest.raises(ValueError, match=match):
    trainer.update(radii, trainer.init(radii), params, params, batches)


# ------------------------------------------------------------------ the held-out loss


@pytest.mark.parametrize(
  "loss,match",
  [
    (
      lambda p, b: jnp.square(b[0] @ p["params"]["body"]["kernel"]).mean(axis=1),
      r"the held-out loss must return a floating-point scalar.*shape \(4,\)",
    ),
    (lambda p, b: (_loss(p, b), {"aux": 1}), r"must return a floating-point scalar.*got a tuple"),
  ],
)
def test_heldout_loss_must_return_a_scalar(loss, match):
  params = _params()
  finetuned = jax.tree.map(lambda x: x + 0.1, params)
  with pytest.raises(ValueError, match=match):
    tpgm_jax.learn_radii_post_hoc(loss, finetuned, params, [_batch()])
  tx = optax.chain(optax.sgd(0.1), tpgm_jax.trainable_projection(loss))
  state = tx.init(params)
  with pytest.raises(ValueError, match=match):
    tx.update(
      jax.tree.map(jnp.ones_like, params),
      state,
      params,
      heldout=jax.tree.map(lambda x: x[None], _batch()),
    )


# ------------------------------------------------------------------ updates and grads shapes

TRANSFORMS = {
  "tpgm": lambda: tpgm_jax.tpgm(radii=0.1),
  "trainable_projection": lambda: tpgm_jax.trainable_projection(_loss),
  "l2sp": lambda: tpgm_jax.l2sp(0.1),
  "ftp": lambda: tpgm_jax.ftp(optax.sgd(0.1)),
  "spd": lambda: tpgm_jax.spd(optax.sgd(0.1), weight_decay=0.1),
  "digrap": lambda: tpgm_jax.digrap(strength_lr=0.1),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_updates_or_grads_of_the_wrong_shape_name_the_path(name):
  params = _params()
  tx = TRANSFORMS[name]()
  state = tx.init(params)
  bad = jax.tree.map(jnp.zeros_like, params)
  bad["params"]["body"]["kernel"] = jnp.zeros((1, 2))  # would broadcast silently
  what = "grads" if name in ("ftp", "spd", "digrap") else "updates"
  with pytest.raises(
    ValueError,
    match=rf"{what} at 'params/body/kernel' has shape \(1, 2\) but "
    r"params have \(3, 2\)",
  ):
    tx.update(bad, state, params)
