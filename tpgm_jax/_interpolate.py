"""WiSE-FT: weight-space interpolation between pre-trained and fine-tuned models."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tpgm_jax import _lora, _projection, _tree

PyTree = Any


def interpolate(
  finetuned: PyTree,
  pretrained: PyTree,
  *,
  alpha: float | jax.Array,
  mask: _tree.Mask = None,
  lora: _lora.LoRAAdapters | None = None,
) -> PyTree:
  """WiSE-FT: ``(1 - alpha) * pretrained + alpha * finetuned`` per tensor.

  ``alpha = 0`` gives the pre-trained model, ``alpha = 1`` the fine-tuned one
  (WiSE-FT reports ``alpha = 0.5`` as a good default). Pure, jit-able
  (``alpha`` may be traced) and sharding-preserving (element-wise only).
  Like every function of this library, it takes the current (fine-tuned)
  tree first and the anchor (pre-trained) tree second; ``alpha`` is
  keyword-only.

  The head: a new head has no pre-trained value, so it is taken from the
  fine-tuned model. Mark it with a ``None`` (or ``optax.MaskedNode()``) leaf
  in ``pretrained`` or exclude it with ``mask``; a pre-trained tensor whose
  shape differs from the fine-tuned one (e.g. a 1000-class head against a
  345-class head) is an error naming its path, even if masked out, so replace
  such a leaf by ``None``.

  Post-hoc TPGM (:func:`tpgm_jax.learn_radii_post_hoc`) is the learned,
  per-layer generalisation: each tensor gets its own ratio in ``[0, 1]``
  (per output channel for ``"mars"``), learned on held-out data, instead of
  one hand-picked ``alpha`` for the whole model.

  Args:
    finetuned: the fine-tuned parameters.
    pretrained: the pre-trained parameters; same structure as ``finetuned``,
      a leaf may be ``None`` / ``optax.MaskedNode()`` (no pre-trained value).
    alpha: the mixing coefficient, a finite float or a scalar array (values
      outside ``[0, 1]`` extrapolate).
    mask: which tensors are interpolated, as ``optax.masked`` takes it:
      ``None`` (every floating-point tensor with a pre-trained value), a
      pytree of static bools (or a prefix), or a callable ``params -> bool
      pytree``. The others are taken from ``finetuned``.
    lora: LoRA adapters (:func:`tpgm_jax.lora_adapters`): the pre-trained
      model is the frozen base kernel, so interpolating an adapted layer,
      ``(1 - alpha) W0 + alpha (W0 + s A B) = W0 + alpha s A B``, scales its
      ``B`` by ``alpha`` and keeps ``A``; ``pretrained``'s values at the
      adapters are not read (a ``None`` at a ``B`` leaves that adapter alone).

  Returns:
    A pytree with the structure, shapes and dtypes of ``finetuned``.

  Example:
    >>> import jax.numpy as jnp, tpgm_jax
    >>> pre = {"w": jnp.zeros(2), "head": None}
    >>> ft = {"w": jnp.array([1.0, 2.0]), "head": jnp.ones(3)}
    >>> out = tpgm_jax.interpolate(ft, pre, alpha=0.5)
    >>> out["w"].tolist(), out["head"].tolist()
    ([0.5, 1.0], [1.0, 1.0, 1.0])

  References:
    Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022,
    arXiv:2109.01903.
  """
  if jnp.ndim(alpha) != 0:
    raise ValueError(f"alpha must be a scalar, got shape {jnp.shape(alpha)}")
  _tree.check_number("alpha", alpha, minimum=None)
  anchor = _lora.anchor_tree(finetuned, pretrained, mask, lora, "pretrained")

  def mix(w0, w):
    ct = _projection.compute_dtype(jnp.result_type(w))
    return ((1 - alpha) * w0.astype(ct) + alpha * w.astype(ct)).astype(jnp.result_type(w))

  return _tree.map_constrained(mix, anchor, finetuned)
