"""Building blocks shared by the model families: norms, the classifier head, image checks.

Normalisation is GroupNorm or :class:`Affine` (a BatchNorm in inference mode,
statistics folded in): no model keeps mutable batch statistics. Every model
ends in :func:`classify`, an ``nn.Dense`` named ``head``: fresh, zero or CLIP's
zero-shot classifier (:func:`zero_shot_kernel`).
"""

from __future__ import annotations

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NORMS = ("group", "affine")


def check_images(x: jax.Array) -> None:
  if x.ndim != 4:
    raise ValueError(f"expected a NHWC batch of images (4 dims), got shape {x.shape}")


def block_names(count: int, prefix: str = "block") -> list[str]:
  """``block1`` .. ``blockN``, zero-padded so that sorting keeps depth order."""
  digits = len(str(count))
  return [f"{prefix}{i:0{digits}d}" for i in range(1, count + 1)]


def group_norm(channels: int, max_groups: int, name: str) -> nn.GroupNorm:
  # The largest group count <= max_groups that divides the channels.
  return nn.GroupNorm(num_groups=math.gcd(max_groups, channels), name=name)


class Affine(nn.Module):
  """Per-channel ``x * scale + bias`` over the last axis; parameters ``scale`` and ``bias``.

  A pre-trained BatchNorm in inference mode, ``(x - mean) / sqrt(var + eps) * gamma + beta``,
  is exactly this with ``scale = gamma / sqrt(var + eps)`` and ``bias = beta - mean * scale``
  (``experiments.models.convert`` folds the running statistics in). No batch statistics are
  computed or kept, in training as in evaluation. Initialised to the identity.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
    return x * scale + bias


def make_norm(kind: str, channels: int, max_groups: int, name: str) -> nn.Module:
  if kind == "group":
    return group_norm(channels, max_groups, name)
  if kind == "affine":
    return Affine(name=name)
  raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def zero_shot_kernel(
  path: str, num_classes: int, embedding_dim: int, logit_scale: float = 100.0
) -> np.ndarray:
  """CLIP's zero-shot classifier as a Dense kernel: ``logit_scale * normalise(E).T``.

  ``E`` is the ``(num_classes, embedding_dim)`` array of class text embeddings in
  the ``.npy`` file ``path`` (row ``i``: class ``i`` of the data set, usually the
  normalised mean over prompt templates of CLIP's text embeddings). Each row is
  L2-normalised, so with L2-normalised image features ``f`` the head computes
  ``logit_scale * f @ normalise(E).T``, CLIP's zero-shot logits (Radford et al.
  2021; the head the WiSE-FT and TPGM ImageNet recipes fine-tune).

  Args:
    path: a ``.npy`` file holding one float array.
    num_classes: rows expected (the model's ``num_classes``).
    embedding_dim: columns expected (the dimension of the image features).
    logit_scale: CLIP's temperature ``exp(logit_scale parameter)``; 100 for the
      OpenAI models.

  Returns:
    A float32 ``(embedding_dim, num_classes)`` array.

  Raises:
    ValueError: unreadable file, wrong shape or dtype, a zero or non-finite row,
      or a non-positive ``logit_scale`` (the message names the file and the
      expected shape).
  """
  where = f"zero_shot_head={os.fspath(path)!r}"
  if not (math.isfinite(logit_scale) and logit_scale > 0):
    raise ValueError(f"{where}: logit_scale must be a positive number, got {logit_scale}")
  expected = (num_classes, embedding_dim)
  try:
    emb = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(
      f"{where}: cannot read the class text embeddings, a .npy array of shape "
      f"(num_classes, embedding dim) = {expected}: {e}"
    ) from e
  if not isinstance(emb, np.ndarray):
    raise ValueError(f"{where}: expected a .npy file holding one array of shape {expected}")
  if emb.shape != expected:
    raise ValueError(
      f"{where}: the class text embeddings have shape {emb.shape}; the model "
      f"needs (num_classes, embedding dim) = {expected}"
    )
  if not np.issubdtype(emb.dtype, np.floating):
    raise ValueError(f"{where}: the class text embeddings must be floats, got {emb.dtype}")
  emb = emb.astype(np.float64)
  norms = np.linalg.norm(emb, axis=1, keepdims=True)
  bad = np.flatnonzero(~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0))
  if bad.size:
    raise ValueError(
      f"{where}: the text embeddings of class(es) {bad[:10].tolist()} are zero or not finite"
    )
  return (logit_scale * emb / norms).T.astype(np.float32)


class Classifier(nn.Module):
  """Base of the image classifiers: ``num_classes`` and the options of the ``head``.

  Attributes:
    num_classes: number of logits.
    head_zero_init: initialise the head kernel to zeros (common for fine-tuning).
    zero_shot_head: a ``.npy`` file of class text embeddings: the head is CLIP's
      zero-shot classifier on L2-normalised features (:func:`zero_shot_kernel`).
    logit_scale: the zero-shot head's temperature.
  """

  num_classes: int
  head_zero_init: bool = False
  zero_shot_head: str = ""
  logit_scale: float = 100.0


def classify(module: Classifier, x: jax.Array) -> jax.Array:
  """The ``head`` Dense of ``module`` on the features ``x``: fresh, zero or zero-shot."""
  if module.zero_shot_head:
    if module.head_zero_init:
      raise ValueError("head_zero_init and zero_shot_head exclude each other")
    path, scale = module.zero_shot_head, module.logit_scale

    def kernel_init(key, shape, dtype=jnp.float32):
      return jnp.asarray(zero_shot_kernel(path, shape[1], shape[0], scale), dtype)

    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  elif module.head_zero_init:
    kernel_init = nn.initializers.zeros
  else:
    kernel_init = nn.linear.default_kernel_init
  return nn.Dense(module.num_classes, kernel_init=kernel_init, name="head")(x)


class ConvNorm(nn.Module):
  """Conv (no bias) -> norm (GroupNorm or :class:`Affine`) -> optional ReLU; ``conv``, ``norm``."""

  features: int
  kernel_size: int = 3
  strides: int = 1
  norm_groups: int = 32
  relu: bool = True
  norm: str = "group"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, s = self.kernel_size, self.strides
    x = nn.Conv(
      self.features, (k, k), (s, s), padding=[(k // 2, k // 2)] * 2, use_bias=False, name="conv"
    )(x)
    x = make_norm(self.norm, self.features, self.norm_groups, "norm")(x)
    return nn.relu(x) if self.relu else x
