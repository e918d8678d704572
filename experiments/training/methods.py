"""The fine-tuning methods: each is an optax transformation or a post-hoc step.

Every trained method runs through the same loop (:mod:`experiments.training.loop`);
they differ only in the transformation built here from the inner optimizer
(``config.train.optimizer``) and the mask of constrained parameters
(``config.train.constrained``), and in a few hooks:

=================  ===========================================================
``ft``             the inner optimizer
``lp``             the same, with the backbone frozen by config (``lp.train.frozen``)
``lp_ft``          FT started from the LP result (``lp_ft.init_from``)
``l2sp``           ``chain(l2sp(alpha, beta), inner)``: pull toward the anchor
``ftp``            ``ftp(inner, k)``: amortised trainable projection
``spd``            ``spd(inner, weight_decay)``: selective projection decay
``digrap``         ``chain(digrap(strength_lr), inner)``: directional gradient projection
``mars_pgm``       ``chain(inner, tpgm(radii=radius))``: projection with one fixed radius
``tpgm``           ``chain(inner, trainable_projection(...))``: TPGM during fine-tuning,
                   radii learned on held-out batches every ``proj_freq`` steps
``wise_ft``        post hoc: interpolate the ``base`` and ``source`` weights
``tpgm_post_hoc``  post hoc: learn radii between ``source`` and the ``base``
                   weights on the held-out split, project once

A post-hoc method's ``base`` is the run at the anchor end: with ``base=""``
the pre-trained backbone (the new head is taken from ``source``, unconstrained);
with ``base="lp"`` the linear probe (the pre-trained backbone with a head fitted
to it), every tensor included: WiSE-FT's variant for models without a zero-shot
head (Wortsman et al. 2022, section "linear classifier").
=================  ===========================================================

A method's hyper-parameters are ``config.<name>``; its ``train`` sub-section
overrides fields of ``config.train`` (see :func:`experiments.plan.train_config`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import optax
from ml_collections import ConfigDict

import tpgm_jax
from experiments.types import PyTree

Mask = PyTree  # a pytree of bools, as optax.masked takes it
LossFn = Callable[[PyTree, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class Context:
  """What a method's transformation is built from.

  Attributes:
    section: the method's own config section (``config.<name>``).
    inner: the inner optimizer (``config.train.optimizer``, with its schedule).
    constrained: mask of the parameters kept near the anchor (never the new head).
    heldout_loss: ``loss(params, batch) -> scalar`` on a held-out batch.
  """

  section: ConfigDict
  inner: optax.GradientTransformation
  constrained: Mask
  heldout_loss: LossFn


@dataclasses.dataclass(frozen=True)
class PostHocContext:
  """What a post-hoc method works from.

  Attributes:
    name: the method's name (its result row).
    section: the method's config section.
    pretrained: the pre-trained parameters; the new head is ``None``.
    finetuned: the parameters of the ``section.source`` run.
    constrained: mask of the constrained parameters.
    heldout_loss: as in :class:`Context`.
    heldout_batches: ``heldout_batches(n)`` yields ``n`` held-out batches.
  """

  name: str
  section: ConfigDict
  pretrained: PyTree
  finetuned: PyTree
  constrained: Mask
  heldout_loss: LossFn
  heldout_batches: Callable[[int], Iterable[Any]]


class PostHocResult(NamedTuple):
  """Named parameter sets (one per variant) and the learned radii, if any."""

  params: dict[str, PyTree]
  radii: PyTree | None = None


@dataclasses.dataclass(frozen=True)
class Method:
  """One fine-tuning method.

  Attributes:
    name: registry key and config section name.
    transform: ``transform(ctx) -> optax transformation`` for a trained method.
    post_hoc: ``post_hoc(ctx) -> PostHocResult`` for a post-hoc method.
    heldout: for a transformation whose ``update`` takes ``heldout=`` batches:
      ``heldout(section) -> (every, iters)``: the loop passes ``iters`` held-out
      batches (stacked on a leading axis) at the steps that are multiples of
      ``every``, and none at the others.
    radii: ``radii(opt_state) -> radii pytree`` for methods that learn radii.
  """

  name: str
  transform: Callable[[Context], optax.GradientTransformation] | None = None
  post_hoc: Callable[[PostHocContext], PostHocResult] | None = None
  heldout: Callable[[ConfigDict], tuple[int, int]] | None = None
  radii: Callable[[optax.OptState], PyTree] | None = None

  @property
  def trained(self) -> bool:
    return self.transform is not None


# --------------------------------------------------------------------------
# Post-hoc methods.


def _wise_ft(ctx: PostHocContext) -> PostHocResult:
  return PostHocResult(
    {
      f"{ctx.name}_{alpha:g}": tpgm_jax.interpolate(
        ctx.finetuned, ctx.pretrained, alpha=alpha, mask=ctx.constrained
      )
      for alpha in ctx.section.alphas
    }
  )


def _tpgm_post_hoc(ctx: PostHocContext) -> PostHocResult:
  params, radii = tpgm_jax.learn_radii_post_hoc(
    ctx.heldout_loss,
    ctx.finetuned,
    ctx.pretrained,
    ctx.heldout_batches(ctx.section.steps),
    norm=ctx.section.norm,
    mask=ctx.constrained,
    optimizer=optax.adam(ctx.section.lr),
    radius_units=ctx.section.get("radius_units", "absolute"),
  )
  return PostHocResult({ctx.name: params}, radii)


# --------------------------------------------------------------------------
# The registry.


def _radii(opt_state) -> PyTree:
  return optax.tree.get(opt_state, "radii")


def _tpgm(ctx: Context) -> optax.GradientTransformation:
  return optax.chain(
    ctx.inner,
    tpgm_jax.trainable_projection(
      ctx.heldout_loss,
      norm=ctx.section.norm,
      mask=ctx.constrained,
      max_iters=ctx.section.max_iters,
      radius_optimizer=optax.adam(ctx.section.lr),
      radius_units=ctx.section.get("radius_units", "absolute"),
      lazy=ctx.section.get("lazy", False),
    ),
  )


def _mars_pgm(ctx: Context) -> optax.GradientTransformation:
  return optax.chain(
    ctx.inner, tpgm_jax.tpgm(norm=ctx.section.norm, mask=ctx.constrained, radii=ctx.section.radius)
  )


METHODS: dict[str, Method] = {
  m.name: m
  for m in (
    Method("ft", transform=lambda ctx: ctx.inner),
    Method("lp", transform=lambda ctx: ctx.inner),
    Method("lp_ft", transform=lambda ctx: ctx.inner),
    Method(
      "l2sp",
      transform=lambda ctx: optax.chain(
        tpgm_jax.l2sp(ctx.section.alpha, ctx.section.beta, mask=ctx.constrained), ctx.inner
      ),
    ),
    Method(
      "ftp", transform=lambda ctx: tpgm_jax.ftp(ctx.inner, k=ctx.section.k, mask=ctx.constrained)
    ),
    Method(
      "spd",
      transform=lambda ctx: tpgm_jax.spd(
        ctx.inner, weight_decay=ctx.section.weight_decay, mask=ctx.constrained
      ),
    ),
    Method(
      "digrap",
      transform=lambda ctx: optax.chain(
        tpgm_jax.digrap(strength_lr=ctx.section.strength_lr, mask=ctx.constrained), ctx.inner
      ),
    ),
    Method("mars_pgm", transform=_mars_pgm),
    Method(
      "tpgm",
      heldout=lambda section: (section.proj_freq, section.max_iters),
      radii=_radii,
      transform=_tpgm,
    ),
    Method("wise_ft", post_hoc=_wise_ft),
    Method("tpgm_post_hoc", post_hoc=_tpgm_post_hoc),
  )
}


def get(name: str, config: ConfigDict | None = None) -> Method:
  """The method ``name``: a key of :data:`METHODS`, or a variant defined in ``config``.

  A variant is a config section with a ``method`` field naming the method it
  runs with the section's own hyper-parameters, e.g.
  ``config.tpgm_post_hoc_l2 = dict(method="tpgm_post_hoc", norm="l2", ...)``;
  its runs and result rows are named after the section.
  """
  section = config.get(name) if config is not None else None
  if name not in METHODS and section is not None and "method" in section:
    if section.method not in METHODS:
      raise ValueError(
        f"config.{name}.method={section.method!r} is not a method; known: {', '.join(METHODS)}"
      )
    return dataclasses.replace(METHODS[section.method], name=name)
  if name not in METHODS:
    raise ValueError(
      f"unknown method {name!r}; known: {', '.join(METHODS)} (or a config "
      "section with a `method` field)"
    )
  return METHODS[name]
