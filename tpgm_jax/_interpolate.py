"""WiSE-FT: weight-space interpolation between pre-trained and fine-tuned models."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tpgm_jax import _projection, _tree

PyTree = Any


def interpolate(pretrained: PyTree, finetuned: PyTree, alpha: float | jax.Array,
                mask: _tree.Mask = None) -> PyTree:
  """WiSE-FT: ``(1 - alpha) * pretrained + alpha * finetuned`` per tensor.

  ``alpha = 0`` gives the pre-trained model, ``alpha = 1`` the fine-tuned one
  (WiSE-FT reports ``alpha = 0.5`` as a good default). Pure, jit-able
  (``alpha`` may be traced) and sharding-preserving (element-wise only).

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
    pretrained: the pre-trained parameters; same structure as ``finetuned``,
      a leaf may be ``None`` / ``optax.MaskedNode()`` (no pre-trained value).
    finetuned: the fine-tuned parameters.
    alpha: the mixing coefficient, a float or a scalar array.
    mask: which tensors are interpolated: ``None`` (every floating-point
      tensor with a pre-trained value), a callable on the parameter path, or
      a pytree of static bools. The others are taken from ``finetuned``.

  Returns:
    A pytree with the structure, shapes and dtypes of ``finetuned``.

  Example:
    >>> import jax.numpy as jnp, tpgm_jax
    >>> pre = {"w": jnp.zeros(2), "head": None}
    >>> ft = {"w": jnp.array([1.0, 2.0]), "head": jnp.ones(3)}
    >>> out = tpgm_jax.interpolate(pre, ft, 0.5)
    >>> out["w"].tolist(), out["head"].tolist()
    ([0.5, 1.0], [1.0, 1.0, 1.0])

  References:
    Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022,
    arXiv:2109.01903.
  """
  if jnp.ndim(alpha) != 0:
    raise ValueError(f"alpha must be a scalar, got shape {jnp.shape(alpha)}")
  out = []
  for _, w, w0 in _projection._constrained(finetuned, pretrained, mask, "pretrained"):
    if w0 is None:
      out.append(w)
    else:
      ct = _projection.compute_dtype(jnp.result_type(w))
      mixed = (1 - alpha) * w0.astype(ct) + alpha * w.astype(ct)
      out.append(mixed.astype(jnp.result_type(w)))
  return jax.tree.unflatten(jax.tree.structure(finetuned), out)
