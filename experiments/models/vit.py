"""Vision Transformers (timm / CLIP layout): ``embed``, ``encoder/block1`` .. ``blockN``,
``encoder/norm``, ``head``."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models.layers import Classifier, block_names, check_images, classify


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's GELU approximation ``x * sigmoid(1.702 x)``."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.gelu, "quick_gelu": quick_gelu}


class Mlp(nn.Module):
  """Transformer MLP: ``fc2(act(fc1(x)))``; ``act`` is a key of ``ACTIVATIONS``."""

  hidden_dim: int
  act: str = "gelu"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.act not in ACTIVATIONS:
      raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {self.act!r}")
    init = nn.initializers.xavier_uniform()
    y = ACTIVATIONS[self.act](nn.Dense(self.hidden_dim, kernel_init=init, name="fc1")(x))
    return nn.Dense(x.shape[-1], kernel_init=init, name="fc2")(y)


class SelfAttention(nn.Module):
  """Multi-head self-attention: a fused ``qkv`` Dense (kernel ``(d, 3d)``), an ``out`` Dense."""

  num_heads: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, tokens, dim = x.shape
    if dim % self.num_heads:
      raise ValueError(f"hidden size {dim} is not divisible by num_heads={self.num_heads}")
    init = nn.initializers.xavier_uniform()
    qkv = nn.Dense(3 * dim, kernel_init=init, name="qkv")(x)
    q, k, v = jnp.split(qkv.reshape(batch, tokens, 3 * self.num_heads, -1), 3, axis=2)
    y = jax.nn.dot_product_attention(q, k, v).reshape(batch, tokens, dim)
    return nn.Dense(dim, kernel_init=init, name="out")(y)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def norm(name):
      return nn.LayerNorm(epsilon=self.norm_eps, name=name)

    x = x + SelfAttention(self.num_heads, name="attn")(norm("norm1")(x))
    return x + Mlp(self.mlp_dim, self.act, name="mlp")(norm("norm2")(x))


class Encoder(nn.Module):
  """``depth`` EncoderBlocks (``block1`` ..) and a final LayerNorm ``norm``."""

  depth: int
  num_heads: int
  mlp_dim: int
  act: str = "gelu"
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for name in block_names(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.act, self.norm_eps, name=name)(x)
    return nn.LayerNorm(epsilon=self.norm_eps, name="norm")(x)


class PatchEmbed(nn.Module):
  """Patch embedding ``patch`` (a strided conv), optional class token ``cls``, learned ``pos``,
  optional LayerNorm ``norm`` of the tokens (CLIP's "pre-LayerNorm").

  The number of position embeddings is fixed by the image size seen at init.
  """

  patch_size: int
  hidden_size: int
  cls_token: bool
  patch_bias: bool = True
  norm: bool = False
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f"image size {x.shape[1:3]} is not divisible by patch_size={p}")
    x = nn.Conv(
      self.hidden_size, (p, p), (p, p), padding="VALID", use_bias=self.patch_bias, name="patch"
    )(x)
    x = x.reshape(x.shape[0], -1, self.hidden_size)
    if self.cls_token:
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden_size))
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.hidden_size)), x], 1)
    pos = self.param("pos", nn.initializers.normal(stddev=0.02), (1, *x.shape[1:]))
    x = x + pos
    return nn.LayerNorm(epsilon=self.norm_eps, name="norm")(x) if self.norm else x


class ViT(Classifier):
  """Vision Transformer: ``embed`` -> ``encoder`` -> class token or mean pool -> ``head``.

  Attributes:
    num_classes: number of logits.
    patch_size: side of the square patches.
    hidden_size: token width.
    depth: number of transformer blocks.
    num_heads: attention heads (must divide ``hidden_size``).
    mlp_dim: hidden width of the MLPs.
    pool: ``"cls"`` (a learned class token) or ``"gap"`` (mean over patch tokens).
    act: MLP activation, ``"gelu"`` (tanh approximation) or ``"quick_gelu"`` (CLIP).
    norm_eps: epsilon of every LayerNorm (1e-5 in CLIP).
    patch_bias: the patch embedding has a bias (CLIP's has none).
    pre_norm: a LayerNorm ``embed/norm`` on the tokens before the encoder (CLIP).
    proj_dim: if set, a bias-free Dense ``proj`` maps the pooled features to
      this dimension before the head (CLIP's projection to the joint space).
    head_zero_init, zero_shot_head, logit_scale: the head (:class:`Classifier`).
  """

  patch_size: int = 16
  hidden_size: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  pool: str = "cls"
  act: str = "gelu"
  norm_eps: float = 1e-6
  patch_bias: bool = True
  pre_norm: bool = False
  proj_dim: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    check_images(x)
    if self.pool not in ("cls", "gap"):
      raise ValueError(f"pool must be 'cls' or 'gap', got {self.pool!r}")
    x = PatchEmbed(
      self.patch_size,
      self.hidden_size,
      self.pool == "cls",
      self.patch_bias,
      self.pre_norm,
      self.norm_eps,
      name="embed",
    )(x)
    x = Encoder(self.depth, self.num_heads, self.mlp_dim, self.act, self.norm_eps, name="encoder")(
      x
    )
    x = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
    if self.proj_dim:
      x = nn.Dense(self.proj_dim, use_bias=False, name="proj")(x)
    return classify(self, x)
