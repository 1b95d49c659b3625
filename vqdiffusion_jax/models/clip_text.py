"""The CLIP text transformer, as Hugging Face ``CLIPTextModel`` computes it.

VQ-Diffusion conditions on the frozen CLIP text tower: 77 BPE tokens through
token + learned position embeddings, pre-LN transformer layers with causal
self-attention, and a final LayerNorm. Its features are the per-token final
LayerNorm outputs (not projected), each divided by its L2 norm
(``vq_diffusion_features``), at all 77 positions with no padding mask; the
official ``CLIPTextEmbedding(normalize=True)`` and diffusers'
``VQDiffusionPipeline._encode_prompt`` both compute exactly this.

Weights come from a Hugging Face checkpoint via
``vqdiffusion_jax.convert.clip.load_clip_text``.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqdiffusion_jax.models import attention, axes, precision


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's sigmoid approximation of GELU: ``x * sigmoid(1.702 x)``."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def l2_normalize(features: jax.Array) -> jax.Array:
  """Divides each feature vector (last axis) by its L2 norm, in float32.

  Args:
    features: ``(..., D)``.

  Returns:
    float32 ``(..., D)`` with unit-norm rows (a zero row stays zero).
  """
  features = features.astype(jnp.float32)
  norm = jnp.linalg.norm(features, axis=-1, keepdims=True)
  return features / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)


def layer_norm(eps: float, dtype, name: str | None = None) -> nn.LayerNorm:
  """A LayerNorm with float32, logically partitioned scale and bias."""
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axes.NORM,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.NORM,)))


def dense(features: int, kernel_axes: tuple[str, str], dtype, name: str,
          matmul_dtype: str = "float32") -> nn.Dense:
  """A biased Dense layer with float32, logically partitioned parameters."""
  return nn.Dense(
      features, dtype=dtype, param_dtype=jnp.float32, name=name,
      dot_general=precision.dot_general_for(matmul_dtype),
      kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), kernel_axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (kernel_axes[1],)))


class MultiHeadAttention(nn.Module):
  """Self-attention with per-head projections; logits and softmax in float32.

  Parameters: ``query`` / ``key`` / ``value`` kernels ``(D, H, Dh)`` with
  biases ``(H, Dh)``, ``out`` kernel ``(H, Dh, D)`` with bias ``(D,)``.
  ``rotary`` rotates queries and keys by their positions (``attention.rotary``).
  """

  num_heads: int
  dtype: jnp.dtype = jnp.float32
  matmul_dtype: str = "float32"
  rotary: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Attends over the length axis.

    Args:
      x: ``(B, L, D)``.
      mask: boolean, broadcastable to ``(B, H, L, L)``; True where a query
        may attend to a key. None attends everywhere.

    Returns:
      ``(B, L, D)`` in ``dtype``.
    """
    width = x.shape[-1]
    head_dim = width // self.num_heads
    q, k, v = (self._project_in(x, head_dim, name) for name in ("query", "key", "value"))
    if self.rotary:
      q, k = attention.rotary(q), attention.rotary(k)
    dot_general = precision.dot_general_for(self.matmul_dtype)
    heads = attention.dot_product_attention(q, k, v, mask, dot_general)
    return nn.DenseGeneral(
        width, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32, name="out",
        dot_general=dot_general,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.xavier_uniform(),
            (axes.HEADS, axes.HEAD_DIM, axes.EMBED)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.EMBED,)))(heads)

  def _project_in(self, x: jax.Array, head_dim: int, name: str) -> jax.Array:
    return nn.DenseGeneral(
        (self.num_heads, head_dim), dtype=self.dtype, param_dtype=jnp.float32, name=name,
        dot_general=precision.dot_general_for(self.matmul_dtype),
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.xavier_uniform(),
            (axes.EMBED, axes.HEADS, axes.HEAD_DIM)),
        bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros, (axes.HEADS, axes.HEAD_DIM)))(x)


class FeedForward(nn.Module):
  """``Linear(D, F) -> activation -> Linear(F, D)``."""

  intermediate_size: int
  activation: str = "quick_gelu"
  dtype: jnp.dtype = jnp.float32
  matmul_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    hidden = dense(self.intermediate_size, (axes.EMBED, axes.MLP), self.dtype, "fc1",
                   self.matmul_dtype)(x)
    hidden = ACTIVATIONS[self.activation](hidden)
    return dense(width, (axes.MLP, axes.EMBED), self.dtype, "fc2", self.matmul_dtype)(hidden)


class EncoderLayer(nn.Module):
  """Pre-LN transformer layer: ``x += Attn(LN(x)); x += MLP(LN(x))``."""

  num_heads: int
  intermediate_size: int
  layer_norm_eps: float = 1e-5
  activation: str = "quick_gelu"
  dtype: jnp.dtype = jnp.float32
  matmul_dtype: str = "float32"
  rotary: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Args: x ``(B, L, D)``; mask as for ``MultiHeadAttention``. Returns ``(B, L, D)``."""
    normed = layer_norm(self.layer_norm_eps, self.dtype, "norm1")(x)
    x = x + MultiHeadAttention(self.num_heads, self.dtype, self.matmul_dtype, self.rotary,
                               name="attention")(normed, mask)
    normed = layer_norm(self.layer_norm_eps, self.dtype, "norm2")(x)
    x = x + FeedForward(self.intermediate_size, self.activation, self.dtype, self.matmul_dtype,
                        name="mlp")(normed)
    return x


class CLIPTextTransformer(nn.Module):
  """CLIP's text tower up to the final LayerNorm (no pooling, no projection).

  Defaults are CLIP ViT-B/32's text tower (the one VQ-Diffusion uses).
  """

  vocab_size: int = 49408
  hidden_size: int = 512
  num_layers: int = 12
  num_heads: int = 8
  intermediate_size: int = 2048
  max_positions: int = 77
  layer_norm_eps: float = 1e-5
  activation: str = "quick_gelu"
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                       f"num_heads {self.num_heads}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {self.activation!r}; known: {sorted(ACTIVATIONS)}")
    self.token_embedding = nn.Embed(
        self.vocab_size, self.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (axes.VOCAB, axes.EMBED)))
    self.position_embedding = self.param(
        "position_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.01), (axes.POSITION, axes.EMBED)),
        (self.max_positions, self.hidden_size), jnp.float32)
    self.layers = [
        EncoderLayer(self.num_heads, self.intermediate_size, self.layer_norm_eps,
                     self.activation, self.dtype, name=f"layer_{i}")
        for i in range(self.num_layers)]
    self.final_norm = layer_norm(self.layer_norm_eps, jnp.float32)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """Encodes token ids.

    Args:
      ids: int ``(B, L)``, ``L <= max_positions``.

    Returns:
      float32 ``(B, L, D)``: final-LayerNorm hidden states, equal to
      ``CLIPTextModel(ids).last_hidden_state`` (causal mask, no padding mask).
    """
    length = ids.shape[-1]
    if length > self.max_positions:
      raise ValueError(f"{length} tokens but the model has {self.max_positions} positions")
    x = self.token_embedding(ids) + self.position_embedding[:length].astype(self.dtype)
    causal = nn.make_causal_mask(ids, dtype=jnp.bool_)
    for layer in self.layers:
      x = layer(x, causal)
    return self.final_norm(x)


def vq_diffusion_features(module: CLIPTextTransformer, params, ids: jax.Array) -> jax.Array:
  """VQ-Diffusion's text conditioning: per-token CLIP features of unit L2 norm.

  Args:
    module: the text tower.
    params: its parameters (``variables["params"]``).
    ids: int ``(B, 77)`` token ids, padded as the tokenizer convention says.

  Returns:
    float32 ``(B, 77, D)``, each position's final-LayerNorm output divided by
    its L2 norm; padded positions included, as in the official code.
  """
  return l2_normalize(module.apply({"params": params}, ids))
