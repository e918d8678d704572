"""FTP (Fast Trainable Projection): TPGM with amortised, held-out-free radii."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tpgm_jax import _lora, _projection, _tree, _wrapper

PyTree = Any
EPS = _projection.EPS
# FTP's own Adam on the per-tensor constraint gamma (fixed in the reference).
GAMMA_LR = 1e-2
GAMMA_B1 = 0.9
GAMMA_B2 = 0.999


class FTPState(NamedTuple):
  """State of :func:`ftp`.

  Every per-tensor field holds ``optax.MaskedNode()`` for unconstrained
  tensors, so the state is a pytree of arrays only (checkpointable as is).

  Attributes:
    count: int32 scalar, the number of completed steps (``t - 1`` during step
      ``t``).
    anchor: the pre-trained value ``w0`` of every constrained tensor (shape,
      sharding of the parameter; its dtype, or ``anchor_dtype``), recorded by ``init``.
    gamma: the constraint of each constrained tensor after the last step:
      a float32 scalar (float64 for float64 parameters); 1e-8 initially.
    gamma_mu: Adam's first moment of gamma (scalar, dtype of ``gamma``).
    gamma_nu: Adam's second moment of gamma (scalar, dtype of ``gamma``).
    prev_displacement: the previous step's candidate displacement
      ``c_{t-1}`` (shape and dtype of the parameter); zeros initially.
    prev_norms: the norms of ``c_{t-1}`` plus 1e-8, dtype of ``gamma``,
      shape ``(out,)`` (``"mars"``, rank >= 2) or ``()``; ones initially.
    inner_state: the inner optimizer's state, never projected.
  """

  count: jax.Array
  anchor: PyTree
  gamma: PyTree
  gamma_mu: PyTree
  gamma_nu: PyTree
  prev_displacement: PyTree
  prev_norms: PyTree
  inner_state: optax.OptState


def _norms_shape(shape: tuple[int, ...], norm: str) -> tuple[int, ...]:
  return (shape[-1],) if norm == "mars" and len(shape) >= 2 else ()


def ftp(
  inner: optax.GradientTransformation,
  *,
  k: _tree.ScalarOrSchedule = 1.0,
  mask: _tree.Mask = None,
  norm: _projection.Norm = "mars",
  lora: _lora.LoRAAdapters | None = None,
  anchor_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Wraps an optimizer with FTP's trainable projection toward the anchor.

  For every constrained tensor ``w`` (anchor ``w0``) with raw gradient
  ``g_t`` and inner update ``u_t`` (``w + u_t`` is the plain next value,
  weight decay included), step ``t``:

  1. candidate displacement ``c_t = w_t + u_t - w0`` and its norms
     ``n_t = norms(c_t) + 1e-8`` (``"mars"``: one L1 norm per output channel,
     the last axis; one for 0-D/1-D tensors; ``"l2"``: one Frobenius norm);
  2. amortised gradient of the constraint ``gamma`` (a scalar per tensor):
     ``h = sum_j <g_t, c_{t-1}>_j / n_{t-1, j}`` (``<.,.>_j`` sums over the
     axes the norm ``j`` reduces), i.e. the derivative of the loss along the
     previous projection ``w0 + (gamma / n_{t-1}) c_{t-1}``, with the
     ``[0, 1]`` clip of the ratio ignored; ``h <- k h`` if ``h > 0``;
  3. Adam on gamma with its own constants (learning rate 1e-2, betas 0.9 and
     0.999, eps 1e-8): ``m = 0.9 m + 0.1 h``, ``v = 0.999 v + 0.001 h^2``,
     ``gamma <- gamma - 1e-2 (m / (1 - 0.9^t)) / (sqrt(v / (1 - 0.999^t))
     + 1e-8)``. As in the reference, the bias corrections use the global
     step ``t`` although the moments have seen ``t - 1`` gradients;
  4. ``gamma <- clip(gamma, 1e-8, max(n_t))``;
  5. ``w_{t+1} = w0 + clip(gamma / n_t, 0, 1) * c_t``.

  On the first step gamma is 1e-8, so the constrained tensors stay at the
  anchor (within an L1 distance of 1e-8 per channel). This needs no branch:
  with ``c_0 = 0`` the amortised gradient and both moments are 0, and the
  Adam step leaves gamma at its initial 1e-8. Unconstrained tensors take the
  plain inner update, and the inner optimizer's state is never projected.

  FTP needs the raw gradient, so it wraps the optimizer rather than following
  it in a chain: ``ftp(optax.sgd(lr, momentum=0.9, nesterov=True))`` is the
  reference "SGDP" (add weight decay with
  ``optax.chain(optax.add_decayed_weights(wd), optax.sgd(...))``) and
  ``ftp(optax.adamw(lr, weight_decay=wd))`` its "AdamP". Gradient clipping,
  schedules etc. go inside ``inner``. The work per step is two reductions
  per constrained tensor (the norms of ``c_t`` and ``<g_t, c_{t-1}>``) and
  O(1) scalar work; the state adds ``c_{t-1}`` (one copy of the constrained
  parameters) to the anchor.

  Args:
    inner: any optax optimizer (``GradientTransformation``; extra keyword
      arguments of ``update`` are passed on to it).
    k: multiplies positive gamma gradients (the paper's gradient annealing
      factor; ``k < 1`` makes the constraint tighten more slowly): a number or
      an optax schedule of the step count (a finite number >= 0, or
      ``schedule(count) -> scalar`` evaluated at ``count = t - 1``, the number
      of steps before this one, the ``count`` field of :class:`FTPState`).
    mask: which tensors are constrained, as ``optax.masked`` takes it:
      ``None`` (every floating-point tensor), a pytree of static bools (or a
      prefix), or a callable ``params -> bool pytree`` such as
      ``tpgm_jax.path_mask(exclude=r"params/head/.*")``. Always exclude a
      freshly initialised head.
    norm: ``"mars"`` (the reference) or ``"l2"`` (a generalisation: one
      Frobenius norm per tensor in steps 1, 2 and 4).
    lora: LoRA adapters (:func:`lora_adapters`, opt-in). For an adapter
      (``A``, ``B``, scale ``s``; one gamma per adapter, at ``B``) the
      constrained quantity is the merged update ``dW = s A B`` (anchor 0):
      with the candidates ``A' = A + u_A`` and ``B' = B + u_B``, step 1 takes
      ``c_t = B'`` and ``n_t = norms(s A' B') + 1e-8``, step 5 scales ``B'``'s
      columns, ``B_{t+1} = clip(gamma / n_t, 0, 1) B'`` (so ``dW_{t+1} =
      clip(gamma / n_t, 0, 1) s A' B'`` column by column), and ``A_{t+1} =
      A'``. Step 2 is then exact on ``dW``: with ``G`` the loss gradient in
      the merged weight, ``dW_t = (gamma / n_{t-1}) s A_t B'_{t-1}`` and
      ``g_B = s A_t^T G``, so ``dL/dgamma = sum_j <G, s A_t B'_{t-1}>_j /
      n_{t-1, j} = sum_j <g_B, B'_{t-1}>_j / n_{t-1, j}`` (``<.,.>_j`` sums
      column ``j``; the rank axis for ``g_B``): the formula of step 2 on the
      ``B`` leaf with ``c_{t-1} = B'_{t-1}``. The cost is one ``A' B'``
      product (``"mars"``) or two r x r Gram matrices (``"l2"``) per adapter.
    anchor_dtype: the dtype the anchor is stored in (opt-in; ``None``, the
      default: the params'), e.g. ``jnp.bfloat16``; see :func:`tpgm`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`FTPState` (the anchor is recorded by ``init``: call it on the
    pre-trained parameters). ``update(grads, state, params)`` returns updates
    such that ``optax.apply_updates(params, updates)`` is the FTP step; it
    raises ``ValueError`` if ``params`` is missing or does not match the
    anchor, or the gradients' (or the inner updates') structure or shapes
    differ from the params (naming the path).

  Example:
    >>> import jax.numpy as jnp, optax, tpgm_jax
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = tpgm_jax.ftp(optax.sgd(0.1))
    >>> state = tx.init(params)                              # anchor = params
    >>> g = {"w": jnp.array([-1.0, 1.0])}
    >>> updates, state = tx.update(g, state, params)
    >>> params = optax.apply_updates(params, updates)        # step 1: at w0
    >>> bool(jnp.abs(params["w"]).sum() <= 1e-8)
    True
    >>> updates, state = tx.update(g, state, params)         # step 2: gamma grows
    >>> params = optax.apply_updates(params, updates)
    >>> round(float(state.gamma["w"]), 5), [round(float(x), 4) for x in params["w"]]
    (0.00744, [0.0037, -0.0037])

  References:
    Tian, Liu, Kira, "Fast Trainable Projection for Robust Fine-Tuning",
    NeurIPS 2023, arXiv:2310.19182.
  """
  anchor_dtype = _tree.check_anchor_dtype(anchor_dtype)
  _projection._check_norm(norm)
  _tree.check_number("k", k)
  inner = optax.with_extra_args_support(_wrapper.check_inner(inner, "ftp"))

  def init_fn(params):
    _tree.require_params(params, "ftp", "tx.init(params) with the pre-trained params")
    anchor = _lora.record_anchor(params, mask, lora, anchor_dtype)
    like = _lora.constrained_like(anchor, params)

    def scalar(value):
      return lambda a: jnp.full((), value, _projection.compute_dtype(a.dtype))

    return FTPState(
      count=jnp.zeros((), jnp.int32),
      anchor=anchor,
      gamma=_wrapper.per_anchor(like, scalar(EPS)),
      gamma_mu=_wrapper.per_anchor(like, scalar(0.0)),
      gamma_nu=_wrapper.per_anchor(like, scalar(0.0)),
      prev_displacement=_wrapper.per_anchor(like, jnp.zeros_like),
      prev_norms=_wrapper.per_anchor(
        like, lambda a: jnp.ones(_norms_shape(a.shape, norm), _projection.compute_dtype(a.dtype))
      ),
      inner_state=inner.init(params),
    )

  def update_fn(grads, state, params=None, **extra_args):
    _tree.require_params(params, "ftp", "update(grads, state, params)")
    anchor = state.anchor
    if lora is None:
      _tree.check_anchor(params, anchor)
    else:
      anchor = _lora.anchor_tree(params, anchor, None, lora)
    updates, inner_state = _wrapper.inner_update(
      inner, grads, state.inner_state, params, extra_args
    )
    adapters = _lora.adapters(optax.apply_updates(params, updates), lora)
    k_t = _tree.schedule_value("k", k, state.count)
    count = optax.safe_int32_increment(state.count)
    rows = _tree.map_constrained(
      lambda w0, *xs: _ftp_tensor(
        w0, *xs, count=count, k=k_t, norm=norm, scheduled=_tree.is_schedule(k)
      ),
      anchor,
      params,
      grads,
      updates,
      state.gamma,
      state.gamma_mu,
      state.gamma_nu,
      state.prev_displacement,
      state.prev_norms,
      adapters,
      otherwise=lambda w, g, u, *rest: (u, *rest[:-1]),
    )
    updates, *fields = _tree.unzip(anchor, rows, 6)
    return updates, FTPState(count, state.anchor, *fields, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _ftp_tensor(
  w0, w, g, u, gamma, mu, nu, prev_c, prev_n, adapter=_lora.NONE, *, count, k, norm, scheduled=False
):
  """One constrained tensor's FTP step: ``(update, gamma, mu, nu, c, n)``.

  For an adapter's ``B`` (``w0 = 0``, so ``c = B'``) the norms are those of ``s A' B'``.
  """
  ct = gamma.dtype
  k = _tree.in_dtype(k, ct, scheduled)
  c = w.astype(ct) + u.astype(ct) - w0.astype(ct)
  if adapter:
    norms = _lora.merged_norms(adapter.partner, c, adapter.scale, norm).astype(ct)
  else:
    norms = _projection.channel_norms(c, norm)
  norms = jax.lax.stop_gradient(norms) + EPS
  h = jnp.sum(_projection.channel_sum(g.astype(ct) * prev_c.astype(ct), norm) / prev_n)
  h = jnp.where(h > 0, k * h, h)
  step, mu, nu = _wrapper.scalar_adam(h, mu, nu, count, GAMMA_B1, GAMMA_B2, EPS)
  gamma = _projection.clip_radius(gamma - GAMMA_LR * step, norms)
  new_w = w0.astype(ct) + jnp.clip(gamma / norms, 0.0, 1.0) * c
  update = (new_w - w.astype(ct)).astype(jnp.result_type(u))
  # c_t and n_t reuse the donated buffers of c_{t-1} and n_{t-1}, which h reads.
  c = _wrapper.in_place(h, count, prev_c, c.astype(prev_c.dtype))
  return update, gamma, mu, nu, c, _wrapper.in_place(h, count, prev_n, norms)
