"""VQ-Diffusion's transformer denoiser: p_theta(x_0 | x_t, y) over image tokens.

The network of the official ``Text2ImageTransformer`` (microsoft/VQ-Diffusion)
and of diffusers' ``Transformer2DModel`` over discrete inputs, with the
official class-conditional (ImageNet) and unconditional (FFHQ) variants:

  h = tokens[x] + rows[l // grid_w] + cols[l % grid_w]      (K + 1 rows, [MASK] = K)
  per block, by ``config.conditioning``:
    "text":  h += SelfAttn(AdaLN_t(h));  h += CrossAttn(AdaLN_t'(h), text);  h += MLP(LN(h))
    "class": h += SelfAttn(AdaLN_t(h));  h += MLP(AdaLN_class(h))
    "none":  h += SelfAttn(AdaLN_t(h));  h += MLP(LN(h))
  logits = Linear(LN(h)) -> (B, N, K), float32.

``AdaLN_c(x) = LN_noaffine(x) * (1 + scale) + shift`` with ``[scale, shift] =
Linear(SiLU(table[c]))``, every AdaLN with its own learned table; an index at
or past the table's end reads the mean row (the official rule, used for the
class-conditional model's null class 1000). MLP is Linear(D, 4D) -> GELU2 ->
Linear(4D, D), or the official ``conv_mlp`` (3x3 convolutions over the token
grid). Attention has no mask; LayerNorm eps is 1e-5. Position ``l`` reads the
row / column tables of a ``position_grid`` that is the token grid except where
an official config declares a bigger one (ImageNet / FFHQ: 32 x 32 tables for
16 x 16 tokens, so only the first rows are ever used).

The text variant owns the learnable null text embedding of Improved
VQ-Diffusion's classifier-free guidance (``null_text``).

Blocks run as a Python loop (parameters ``block_{i}``) or, with
``scan_layers``, under ``nn.scan`` (parameters ``blocks`` with a leading
``layers`` axis); ``stack_layers`` / ``unstack_layers`` convert between the
two. ``remat`` recomputes each block in the backward pass, all of it
(``remat_policy="full"``) or all but its weight matmuls (``"minimal"``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqdiffusion_jax.models import attention, axes, precision

LN_EPS = 1e-5
CONDITIONINGS = ("text", "class", "none")
MLP_TYPES = ("fc", "conv")
# What a rematerialised block keeps from its forward pass; None keeps nothing.
REMAT_POLICIES = {
    "full": None,
    # Products with a weight (no batch dimensions) are kept; attention scores,
    # norms and activations are recomputed.
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Sizes and options of the denoiser.

  Attributes:
    codebook_size: K; the token table has K + 1 rows ([MASK] = K), the head K.
    spatial_size: the token grid (h, w); N = h * w.
    num_layers: number of blocks.
    embed_dim: model width D.
    num_heads: attention heads (D divisible by it).
    mlp_ratio: MLP hidden width / D.
    condition_dim: text feature width ("text").
    condition_length: text length L ("text"), the null embedding's length.
    num_timesteps: T, rows of the timestep tables.
    conditioning: "text" (cross-attention), "class" (class AdaLN) or "none".
    num_classes: labels of a "class" model (0..num_classes - 1); label
      num_classes is the null class used by guidance.
    learnable_null_class: the class tables have a learned null row (row
      num_classes); without it the null label reads their mean row.
    mlp_type: "fc" (Linear) or "conv" (official conv_mlp, 3x3 convolutions).
    position_grid: (rows, cols) of the position tables when they differ from
      ``spatial_size``; None: the token grid.
    learnable_null_text: whether the "text" model has the null text parameter.
    pooled_text: also modulate every AdaLN by a per-block projection of the
      mean text feature ("text" only; the pooled conditioning of DiT-style
      models, absent from the official VQ-Diffusion). It gives each position
      a direct product of its features with the whole caption, which a small
      model trained briefly otherwise learns only slowly through attention.
    dtype: compute dtype (parameters are float32).
    matmul_dtype: "float32", or "bfloat16" for every matmul of the blocks and
      head on bfloat16-rounded operands with float32 products and activations
      (``precision.mixed_dot_general``).
    weight_grads: with bfloat16 matmuls, how the weight cotangents of
      narrowing matmuls are ordered (``precision.WEIGHT_GRAD_ORDERS``).
    remat: recompute each block in the backward pass.
    remat_policy: with ``remat``, what is recomputed: "full" (everything) or
      "minimal" (all but the products with a weight, which are kept).
    scan_layers: run the blocks under ``nn.scan`` over stacked parameters.
    attention: how attention runs (``attention.IMPLEMENTATIONS``): "auto"
      goes through ``jax.nn.dot_product_attention`` on GPU (cuDNN), one head
      at a time on CPU for long sequences (32 x 32 tokens), all heads at once
      otherwise.
  """

  codebook_size: int
  spatial_size: tuple[int, int] = (32, 32)
  num_layers: int = 19
  embed_dim: int = 1024
  num_heads: int = 16
  mlp_ratio: int = 4
  condition_dim: int = 512
  condition_length: int = 77
  num_timesteps: int = 100
  conditioning: str = "text"
  num_classes: int = 1000
  learnable_null_class: bool = False
  mlp_type: str = "fc"
  position_grid: tuple[int, int] | None = None
  learnable_null_text: bool = True
  pooled_text: bool = False
  dtype: Any = jnp.float32
  matmul_dtype: str = "float32"
  weight_grads: str = "cotangent_first"
  remat: bool = False
  remat_policy: str = "full"
  scan_layers: bool = False
  attention: str = "auto"

  def __post_init__(self):
    precision.dot_general_for(self.matmul_dtype, self.weight_grads)  # validates the names
    if self.attention not in attention.IMPLEMENTATIONS:
      raise ValueError(f"attention {self.attention!r} not in {attention.IMPLEMENTATIONS}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy {self.remat_policy!r} not in {tuple(REMAT_POLICIES)}")
    if self.conditioning not in CONDITIONINGS:
      raise ValueError(f"conditioning {self.conditioning!r} not in {CONDITIONINGS}")
    if self.mlp_type not in MLP_TYPES:
      raise ValueError(f"mlp_type {self.mlp_type!r} not in {MLP_TYPES}")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim {self.embed_dim} not divisible by {self.num_heads} heads")
    if self.pooled_text and self.conditioning != "text":
      raise ValueError(f"pooled_text needs text conditioning, not {self.conditioning!r}")
    grid = self.grid
    if grid[0] * grid[1] < self.num_tokens:
      raise ValueError(f"position grid {grid} smaller than {self.num_tokens} tokens")

  @property
  def num_tokens(self) -> int:
    return self.spatial_size[0] * self.spatial_size[1]

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def grid(self) -> tuple[int, int]:
    return tuple(self.position_grid or self.spatial_size)

  @property
  def class_rows(self) -> int:
    """Rows of the class tables: one per label, plus the learned null row if any."""
    return self.num_classes + int(self.learnable_null_class)

  @property
  def has_null_text(self) -> bool:
    return self.conditioning == "text" and self.learnable_null_text


# Official sizes (microsoft/VQ-Diffusion configs/*.yaml and
# OUTPUT/pretrained_model/config_*.yaml); the time steps (100), the text
# features (77 x 512) and the MLP ratio (4) are the config defaults.
_TEXT = {"codebook_size": 2887, "spatial_size": (32, 32), "num_layers": 19, "embed_dim": 1024,
         "num_heads": 16}
# ITHQ, trained with activation checkpointing.
_ITHQ = {"codebook_size": 4096, "spatial_size": (32, 32), "num_layers": 36, "embed_dim": 1408,
         "num_heads": 16, "remat": True}
# ImageNet / FFHQ: 16 x 16 tokens read 32 x 32 position tables; conv MLP.
_IMAGENET = {"codebook_size": 974, "spatial_size": (16, 16), "num_layers": 24, "embed_dim": 512,
             "num_heads": 16, "conditioning": "class", "num_classes": 1000, "mlp_type": "conv",
             "position_grid": (32, 32)}
_FFHQ = {"codebook_size": 1024, "spatial_size": (16, 16), "num_layers": 20, "embed_dim": 512,
         "num_heads": 16, "conditioning": "none", "mlp_type": "conv", "position_grid": (32, 32)}
_NO_NULL_TEXT = {"learnable_null_text": False}

PRESETS = {
    # By released file:
    "coco": _TEXT | _NO_NULL_TEXT,  # coco_pretrained.pth (config_text.yaml)
    "coco_learnable": _TEXT,  # coco_learnable.pth (learnable null text)
    "cub200": _TEXT | _NO_NULL_TEXT,  # cub_pretrained.pth
    "cc": _TEXT | _NO_NULL_TEXT,  # CC_pretrained.pth
    "cc_learnable": _TEXT,  # cc_learnable.pth
    "ithq": _ITHQ,  # ithq_learnable.pth (configs/ithq.yaml, learnable null text)
    # imagenet_pretrained.pth (config_imagenet.yaml): the null label 1000 reads
    # the mean row of the 1000-row class tables.
    "imagenet": _IMAGENET,
    # imagenet_learnable.pth: class tables of 1001 rows, the null class 1000 learned.
    "imagenet_learnable": _IMAGENET | {"learnable_null_class": True},
    "ffhq": _FFHQ,  # configs/ffhq.yaml, unconditional
    # By size: the text models with a learnable null text.
    "base": _TEXT,
    "large": _ITHQ,
}


def preset(name: str, **overrides) -> TransformerConfig:
  """The official sizes.

  Args:
    name: one of ``PRESETS``: a released file's ("coco", "coco_learnable",
      "cub200", "cc", "cc_learnable", "ithq", "imagenet",
      "imagenet_learnable", "ffhq") or a text size ("base", "large").
    **overrides: fields to change (e.g. ``dtype=jnp.bfloat16``).

  Returns:
    The config.

  Raises:
    ValueError: for an unknown name.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
  return TransformerConfig(**{**PRESETS[name], **overrides})


def _normal(std=0.02):
  return nn.initializers.normal(std)


def _partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


def _layer_norm(affine: bool, name: str, dtype) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=LN_EPS, use_scale=affine, use_bias=affine, use_fast_variance=False,
      dtype=dtype, param_dtype=jnp.float32, name=name,
      scale_init=_partitioned(nn.initializers.ones, (axes.NORM,)),
      bias_init=_partitioned(nn.initializers.zeros, (axes.NORM,)))


def gelu2(x: jax.Array) -> jax.Array:
  """The official GELU approximation ``x * sigmoid(1.702 x)``."""
  return x * jax.nn.sigmoid(1.702 * x)


def lookup_or_mean(table: jax.Array, index: jax.Array) -> jax.Array:
  """Rows of ``table``; an index at or past its end reads the mean row.

  Args:
    table: (R, D).
    index: (B,) integers.

  Returns:
    (B, D).
  """
  rows = table.shape[0]
  inside = table[jnp.clip(index, 0, rows - 1)]
  return jnp.where((index >= rows)[:, None], jnp.mean(table, axis=0), inside)


class AdaLayerNorm(nn.Module):
  """LayerNorm without affine, modulated by a learned table row per sample."""

  num_rows: int
  table_axis: str
  dtype: Any = jnp.float32
  matmul_dtype: str = "float32"
  weight_grads: str = "cotangent_first"

  @nn.compact
  def __call__(self, x: jax.Array, index: jax.Array,
               extra: jax.Array | None = None) -> jax.Array:
    """``extra``: an optional (B, D) vector added to the looked-up row."""
    width = x.shape[-1]
    table = self.param("embedding", _partitioned(_normal(), (self.table_axis, axes.EMBED)),
                       (self.num_rows, width), jnp.float32)
    row = lookup_or_mean(table, jnp.asarray(index, jnp.int32)).astype(self.dtype)
    if extra is not None:
      row = row + extra.astype(self.dtype)
    modulation = nn.Dense(
        2 * width, dtype=self.dtype, param_dtype=jnp.float32, name="modulation",
        dot_general=precision.dot_general_for(self.matmul_dtype, self.weight_grads),
        kernel_init=_partitioned(_normal(), (axes.EMBED, axes.MLP)),
        bias_init=_partitioned(nn.initializers.zeros, (axes.MLP,)))(nn.silu(row))
    scale, shift = jnp.split(modulation[:, None, :], 2, axis=-1)
    normed = _layer_norm(False, "norm", self.dtype)(x)
    return normed * (1 + scale) + shift


class Attention(nn.Module):
  """Multi-head attention without mask; softmax(q k^T / sqrt(d)) in float32."""

  num_heads: int
  head_dim: int
  context_axis: str = axes.EMBED
  dtype: Any = jnp.float32
  matmul_dtype: str = "float32"
  implementation: str = "auto"
  weight_grads: str = "cotangent_first"

  def _project(self, x, name, in_axis):
    return nn.DenseGeneral(
        (self.num_heads, self.head_dim), dtype=self.dtype, param_dtype=jnp.float32, name=name,
        dot_general=precision.dot_general_for(self.matmul_dtype, self.weight_grads),
        kernel_init=_partitioned(_normal(), (in_axis, axes.HEADS, axes.HEAD_DIM)),
        bias_init=_partitioned(nn.initializers.zeros, (axes.HEADS, axes.HEAD_DIM)))(x)

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    query = self._project(x, "query", axes.EMBED)
    key = self._project(context, "key", self.context_axis)
    value = self._project(context, "value", self.context_axis)
    dot_general = precision.dot_general_for(self.matmul_dtype, self.weight_grads)
    mixed = attention.dot_product_attention(query, key, value, dot_general=dot_general,
                                            implementation=self.implementation)
    return nn.DenseGeneral(
        x.shape[-1], axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32, name="out",
        dot_general=dot_general,
        kernel_init=_partitioned(_normal(), (axes.HEADS, axes.HEAD_DIM, axes.EMBED)),
        bias_init=_partitioned(nn.initializers.zeros, (axes.EMBED,)))(mixed)


class Mlp(nn.Module):
  """Linear(D, rD) -> GELU2 -> Linear(rD, D), per token."""

  ratio: int
  dtype: Any = jnp.float32
  matmul_dtype: str = "float32"
  weight_grads: str = "cotangent_first"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    dot_general = precision.dot_general_for(self.matmul_dtype, self.weight_grads)
    hidden = nn.Dense(
        self.ratio * width, dtype=self.dtype, param_dtype=jnp.float32, name="fc1",
        dot_general=dot_general,
        kernel_init=_partitioned(_normal(), (axes.EMBED, axes.MLP)),
        bias_init=_partitioned(nn.initializers.zeros, (axes.MLP,)))(x)
    hidden = gelu2(hidden)
    return nn.Dense(
        width, dtype=self.dtype, param_dtype=jnp.float32, name="fc2", dot_general=dot_general,
        kernel_init=_partitioned(_normal(), (axes.MLP, axes.EMBED)),
        bias_init=_partitioned(nn.initializers.zeros, (axes.EMBED,)))(hidden)


class ConvMlp(nn.Module):
  """The official conv_mlp: 3x3 conv (D -> rD) -> GELU2 -> 3x3 conv over the token grid."""

  ratio: int
  spatial_size: tuple[int, int]
  dtype: Any = jnp.float32

  def _conv(self, features, name, x):
    # torch's default Conv2d init; the official _init_weights leaves convolutions alone.
    kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    return nn.Conv(
        features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
        param_dtype=jnp.float32, name=name,
        kernel_init=_partitioned(kernel_init, (*axes.CONV_KERNEL,
                                               axes.CONV_IN, axes.CONV_OUT)),
        bias_init=_partitioned(nn.initializers.zeros, (axes.CONV_OUT,)))(x)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, width = x.shape
    grid = x.reshape(batch, *self.spatial_size, width)
    hidden = gelu2(self._conv(self.ratio * width, "conv1", grid))
    return self._conv(width, "conv2", hidden).reshape(batch, length, width)


class Block(nn.Module):
  """One transformer block; the variant follows ``config.conditioning``.

  ``scanned`` makes it return ``(h, None)``, the (carry, output) pair of ``nn.scan``.
  """

  config: TransformerConfig
  scanned: bool = False

  @nn.compact
  def __call__(self, h: jax.Array, t: jax.Array, condition: jax.Array | None):
    cfg = self.config
    dtype, matmul_dtype = cfg.dtype, cfg.matmul_dtype
    grads = cfg.weight_grads
    self_attn = Attention(cfg.num_heads, cfg.head_dim, dtype=dtype, matmul_dtype=matmul_dtype,
                          implementation=cfg.attention, weight_grads=grads, name="self_attn")
    pooled = None
    if cfg.pooled_text:
      pooled = nn.Dense(
          h.shape[-1], dtype=dtype, param_dtype=jnp.float32, name="pooled_text",
          dot_general=precision.dot_general_for(matmul_dtype, cfg.weight_grads),
          kernel_init=_partitioned(_normal(), (axes.COND_EMBED, axes.EMBED)),
          bias_init=_partitioned(nn.initializers.zeros, (axes.EMBED,)))(
              jnp.mean(condition.astype(dtype), axis=1))
    normed = AdaLayerNorm(cfg.num_timesteps, axes.TIMESTEP, dtype, matmul_dtype, grads,
                          name="self_attn_norm")(
        h, t, pooled)
    h = h + self_attn(normed, normed)
    if cfg.conditioning == "text":
      normed = AdaLayerNorm(cfg.num_timesteps, axes.TIMESTEP, dtype, matmul_dtype, grads,
                            name="cross_attn_norm")(
          h, t, pooled)
      cross_attn = Attention(cfg.num_heads, cfg.head_dim, axes.COND_EMBED, dtype,
                             matmul_dtype, cfg.attention, grads, name="cross_attn")
      h = h + cross_attn(normed, condition.astype(dtype))
    if cfg.conditioning == "class":
      normed = AdaLayerNorm(cfg.class_rows, axes.VOCAB, dtype, matmul_dtype, grads,
                            name="mlp_norm")(h, condition)
    else:
      normed = _layer_norm(True, "mlp_norm", dtype)(h)
    if cfg.mlp_type == "conv":
      mlp = ConvMlp(cfg.mlp_ratio, cfg.spatial_size, dtype, name="mlp")
    else:
      mlp = Mlp(cfg.mlp_ratio, dtype, matmul_dtype, grads, name="mlp")
    h = h + mlp(normed)
    return (h, None) if self.scanned else h


class TokenEmbedding(nn.Module):
  """Token table (K + 1 rows) plus row and column position tables."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    cfg = self.config
    rows, cols = cfg.grid
    width = cfg.embed_dim
    table = self.param("tokens", _partitioned(_normal(), (axes.VOCAB, axes.EMBED)),
                       (cfg.codebook_size + 1, width), jnp.float32)
    row_table = self.param("rows", _partitioned(_normal(), (axes.POSITION, axes.EMBED)),
                           (rows, width), jnp.float32)
    col_table = self.param("cols", _partitioned(_normal(), (axes.POSITION, axes.EMBED)),
                           (cols, width), jnp.float32)
    positions = (row_table[:, None, :] + col_table[None, :, :]).reshape(rows * cols, width)
    h = table[tokens] + positions[:tokens.shape[1]]
    return h.astype(cfg.dtype)


class VQDiffusionTransformer(nn.Module):
  """The denoiser: tokens x_t, timesteps t and a condition -> x_0 logits.

  ``apply(variables, tokens, t, condition)`` with tokens (B, N) in [0, K]
  ([MASK] = K), t (B,) in [0, T), and condition: text features (B, L,
  condition_dim) for "text", class labels (B,) for "class", None for "none".
  Returns (B, N, K) float32 logits. ``method="null_text"`` gives the null
  text embedding.
  """

  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.token_embed = TokenEmbedding(cfg)
    policy = REMAT_POLICIES[cfg.remat_policy]
    if cfg.scan_layers:
      block = nn.remat(Block, prevent_cse=False, policy=policy) if cfg.remat else Block
      self.blocks = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: axes.LAYERS})(cfg, scanned=True)
    else:
      block = nn.remat(Block, policy=policy) if cfg.remat else Block
      self.blocks = [block(cfg, name=f"block_{i}") for i in range(cfg.num_layers)]
    self.head_norm = _layer_norm(True, "head_norm", jnp.float32)
    self.head = nn.Dense(
        cfg.codebook_size, dtype=jnp.float32, param_dtype=jnp.float32,
        dot_general=precision.dot_general_for(cfg.matmul_dtype, cfg.weight_grads),
        kernel_init=_partitioned(_normal(), (axes.EMBED, axes.VOCAB)),
        bias_init=_partitioned(nn.initializers.zeros, (axes.VOCAB,)))
    if cfg.has_null_text:
      self.null_text_embedding = self.param(
          "null_text", _partitioned(_normal(1.0), (axes.POSITION, axes.COND_EMBED)),
          (cfg.condition_length, cfg.condition_dim), jnp.float32)

  def __call__(self, tokens: jax.Array, t: jax.Array,
               condition: jax.Array | None = None) -> jax.Array:
    """Logits of p(x_0 | x_t, condition).

    Args:
      tokens: (B, N) int tokens x_t, [MASK] = K.
      t: (B,) int timesteps (0-based).
      condition: (B, L, condition_dim) text features, (B,) int class labels,
        or None, by ``config.conditioning``.

    Returns:
      (B, N, K) float32 logits.
    """
    cfg = self.config
    if (condition is None) != (cfg.conditioning == "none"):
      given = "None" if condition is None else f"shape {jnp.shape(condition)}"
      raise ValueError(f"conditioning {cfg.conditioning!r} but the condition is {given}")
    t = jnp.asarray(t, jnp.int32)
    h = self.token_embed(tokens)
    if cfg.scan_layers:
      h, _ = self.blocks(h, t, condition)
    else:
      for block in self.blocks:
        h = block(h, t, condition)
    return self.head(self.head_norm(h.astype(jnp.float32)))

  def null_text(self, batch_size: int) -> jax.Array:
    """The learnable null text embedding, (batch_size, L, condition_dim) float32."""
    if not self.config.has_null_text:
      raise ValueError("this config has no learnable null text embedding")
    return jnp.broadcast_to(self.null_text_embedding,
                            (batch_size, *self.null_text_embedding.shape))


def dummy_inputs(config: TransformerConfig, batch_size: int = 1):
  """Inputs of the right shapes and dtypes (for init and eval_shape).

  Args:
    config: the model config.
    batch_size: B.

  Returns:
    (tokens, t, condition) as ``VQDiffusionTransformer.__call__`` takes them.
  """
  tokens = jnp.zeros((batch_size, config.num_tokens), jnp.int32)
  t = jnp.zeros((batch_size,), jnp.int32)
  if config.conditioning == "text":
    condition = jnp.zeros((batch_size, config.condition_length, config.condition_dim))
  elif config.conditioning == "class":
    condition = jnp.zeros((batch_size,), jnp.int32)
  else:
    condition = None
  return tokens, t, condition


def abstract_params(config: TransformerConfig):
  """The parameter tree as ShapeDtypeStructs (boxed with logical axes), nothing allocated."""
  module = VQDiffusionTransformer(config)
  return jax.eval_shape(module.init, jax.random.key(0), *dummy_inputs(config))["params"]


def count_params(config: TransformerConfig) -> int:
  """Number of parameters of a config, from ``jax.eval_shape`` (no allocation).

  Args:
    config: the model config.

  Returns:
    The total number of parameter elements.
  """
  leaves = jax.tree.leaves(nn.meta.unbox(abstract_params(config)))
  return int(sum(np.prod(leaf.shape) for leaf in leaves))


def stack_layers(params, num_layers: int):
  """Plain params (``block_0`` ... ``block_{n-1}``) -> scanned params (``blocks``).

  Args:
    params: a params tree of a ``scan_layers=False`` model (boxes are removed).
    num_layers: the number of blocks.

  Returns:
    The same tree with the blocks stacked along a new leading axis.
  """
  params = dict(flax.core.unfreeze(nn.meta.unbox(params)))
  blocks = [params.pop(f"block_{i}") for i in range(num_layers)]
  params["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return params


def unstack_layers(params):
  """Scanned params (``blocks``) -> plain params (``block_0`` ...), the inverse of stack_layers.

  Args:
    params: a params tree of a ``scan_layers=True`` model (boxes are removed).

  Returns:
    The same tree with one ``block_{i}`` subtree per layer.
  """
  params = dict(flax.core.unfreeze(nn.meta.unbox(params)))
  stacked = params.pop("blocks")
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(num_layers):
    params[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params
