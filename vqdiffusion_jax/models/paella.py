"""Paella's convolutional token predictor: a U-Net of modulated ConvNeXt-style blocks.

Paella (Rampas et al., 2022) replaces the transformer denoiser with a fully
convolutional network and no attention, so one set of parameters predicts
tokens at any latent size ``(h, w)`` divisible by the U-Net's downsampling
factor; that is what makes outpainting cheap. The layout here:

  tokens (B, h, w) -> embedding -> LayerNorm
  -> down levels: [LayerNorm -> 2x2 stride-2 conv] (from the second level on), residual blocks
  -> up levels, deepest first: residual blocks (the first one of every level above the
     deepest takes the down path's output of that level as a skip), then
     [LayerNorm -> 2x2 stride-2 transposed conv] (down to the first level)
  -> LayerNorm -> 1x1 conv to K logits (float32).

A residual block is: depthwise conv (kernel ``k``, one filter per channel) ->
LayerNorm over channels modulated by the conditioning vector, ``norm(x) * (1 +
gamma(c)) + beta(c)`` -> channelwise MLP (C [+ skip] -> 4C, GELU, 4C -> C) ->
learned per-channel scale -> residual. The skip is concatenated to the MLP's
input, as in the paper's code; its later version feeds it to the depthwise
conv instead.

Conditioning, one vector ``c`` per sample: the text features ``(B, L, D)`` are
averaged over L and projected (Paella used one pooled CLIP vector), the
timestep ``t`` is embedded as sinusoids of ``t / T`` followed by a two-layer
MLP, and ``c = silu(text + time)``. Every block maps ``c`` to its own
``(gamma, beta)``; those maps start at zero, and the per-channel scales start
at ``layer_scale_init``, so a fresh network is close to embedding -> head.

All LayerNorms are without learned affine (as in Paella; the modulation and
the following linear layers absorb it) and compute in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqdiffusion_jax.models import axes

_NORM_EPS = 1e-6


def _partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


def layer_norm(x: jax.Array) -> jax.Array:
  """LayerNorm over the last axis without affine, in float32.

  Args:
    x: any array, channels last.

  Returns:
    The normalised array, float32.
  """
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + _NORM_EPS)


def timestep_embedding(t: jax.Array, num_timesteps: int, dim: int,
                       max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features of the noise level ``t / T``.

  The level in [0, 1) is stretched to [0, max_period) so that the fastest
  frequency turns many times across the schedule and the slowest under once.

  Args:
    t: (B,) integer timesteps in [0, num_timesteps).
    num_timesteps: T.
    dim: feature width (even).
    max_period: the stretch of the level and the longest wavelength.

  Returns:
    (B, dim) float32: sines then cosines.
  """
  half = dim // 2
  level = t.astype(jnp.float32) / num_timesteps * max_period
  frequencies = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = level[:, None] * frequencies[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def _dense(features: int, names: tuple[str, str], dtype, name: str | None = None,
           kernel_init=None) -> nn.Dense:
  kernel_init = kernel_init or nn.initializers.lecun_normal()
  return nn.Dense(
      features, dtype=dtype, param_dtype=jnp.float32, name=name,
      kernel_init=_partitioned(kernel_init, names),
      bias_init=_partitioned(nn.initializers.zeros_init(), (names[1],)))


def _conv_init():
  return _partitioned(nn.initializers.lecun_normal(),
                      (*axes.CONV_KERNEL, axes.CONV_IN, axes.CONV_OUT))


def _conv_bias_init():
  return _partitioned(nn.initializers.zeros_init(), (axes.CONV_OUT,))


class PaellaBlock(nn.Module):
  """Depthwise conv -> modulated LayerNorm -> channelwise MLP -> scale -> residual.

  Attributes:
    channels: C, the block's width.
    kernel_size: the depthwise kernel's height and width (odd).
    mlp_ratio: hidden width of the channelwise MLP over C.
    layer_scale_init: initial value of the learned per-channel output scale.
    dtype: compute dtype; the norm runs in float32.
  """

  channels: int
  kernel_size: int = 3
  mlp_ratio: int = 4
  layer_scale_init: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, condition: jax.Array,
               skip: jax.Array | None = None) -> jax.Array:
    """Applies the block.

    Args:
      x: (B, h, w, C) activations.
      condition: (B, C_cond) conditioning vector.
      skip: optional (B, h, w, C_skip) features concatenated to the MLP input.

    Returns:
      (B, h, w, C) activations in the compute dtype.
    """
    c = self.channels
    h = nn.Conv(
        c, (self.kernel_size, self.kernel_size), padding="SAME", feature_group_count=c,
        dtype=self.dtype, param_dtype=jnp.float32, kernel_init=_conv_init(),
        bias_init=_conv_bias_init(), name="depthwise")(x)
    modulation = _dense(2 * c, (axes.EMBED, axes.MLP), self.dtype, name="modulation",
                        kernel_init=nn.initializers.zeros_init())(condition)
    gamma, beta = jnp.split(modulation.astype(jnp.float32)[:, None, None, :], 2, axis=-1)
    h = (layer_norm(h) * (1.0 + gamma) + beta).astype(self.dtype)
    if skip is not None:
      h = jnp.concatenate([h, skip.astype(self.dtype)], axis=-1)
    h = _dense(self.mlp_ratio * c, (axes.EMBED, axes.MLP), self.dtype, name="mlp_in")(h)
    h = nn.gelu(h)
    h = _dense(c, (axes.MLP, axes.EMBED), self.dtype, name="mlp_out")(h)
    scale = self.param(
        "layer_scale",
        _partitioned(nn.initializers.constant(self.layer_scale_init), (axes.EMBED,)),
        (c,), jnp.float32)
    out = x.astype(self.dtype) + h * scale.astype(self.dtype)
    return out


class Downsample(nn.Module):
  """LayerNorm then a 2x2 stride-2 conv: halves h and w, changes the width."""

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, h, w, C_in) -> (B, h / 2, w / 2, features)."""
    return nn.Conv(
        self.features, (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype,
        param_dtype=jnp.float32, kernel_init=_conv_init(), bias_init=_conv_bias_init(),
        name="conv")(layer_norm(x).astype(self.dtype))


class Upsample(nn.Module):
  """LayerNorm then a 2x2 stride-2 transposed conv: doubles h and w, changes the width."""

  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, h, w, C_in) -> (B, 2h, 2w, features)."""
    return nn.ConvTranspose(
        self.features, (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype,
        param_dtype=jnp.float32, kernel_init=_conv_init(), bias_init=_conv_bias_init(),
        name="conv")(layer_norm(x).astype(self.dtype))


class PaellaPredictor(nn.Module):
  """Text- and timestep-conditioned convolutional predictor of x0 token logits.

  ``apply({'params': p}, tokens (B, h, w), t (B,), text (B, L, D)) -> (B, h, w, K)``
  float32 logits; tokens are in [0, K], index K being [MASK] / noise.

  Attributes:
    codebook_size: K; the embedding has K + 1 rows.
    num_timesteps: T.
    condition_dim: D, the text features' width.
    condition_length: L, the text sequence length (for the null embedding).
    channels: width of every level, finest first; h and w must be divisible by
      ``2 ** (len(channels) - 1)``.
    blocks_per_level: residual blocks per level on each of the down and up paths.
    kernel_size: depthwise kernel size (odd).
    mlp_ratio: channelwise MLP hidden width over the level width.
    modulation_dim: C_cond, the conditioning vector's width.
    timestep_dim: width of the sinusoidal timestep features.
    layer_scale_init: initial per-channel scale of every block's output.
    dtype: compute dtype; parameters, norms and logits are float32.
    remat: recompute each block's activations in the backward pass.
  """

  codebook_size: int
  num_timesteps: int
  condition_dim: int
  condition_length: int
  channels: Sequence[int] = (256, 512)
  blocks_per_level: int = 2
  kernel_size: int = 3
  mlp_ratio: int = 4
  modulation_dim: int = 256
  timestep_dim: int = 64
  layer_scale_init: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @property
  def downsampling_factor(self) -> int:
    """How much the deepest level is smaller than the latent, per side."""
    return 2 ** (len(self.channels) - 1)

  def setup(self):
    channels = tuple(self.channels)
    self.token_embedding = nn.Embed(
        self.codebook_size + 1, channels[0], param_dtype=jnp.float32,
        embedding_init=_partitioned(nn.initializers.normal(1.0), (axes.VOCAB, axes.EMBED)))
    self.null_embedding = self.param(
        "null_text",
        _partitioned(nn.initializers.normal(0.02), (axes.POSITION, axes.COND_EMBED)),
        (self.condition_length, self.condition_dim), jnp.float32)
    self.text_projection = _dense(self.modulation_dim, (axes.COND_EMBED, axes.EMBED),
                                  jnp.float32)
    self.time_hidden = _dense(self.modulation_dim, (axes.EMBED, axes.MLP), jnp.float32)
    self.time_out = _dense(self.modulation_dim, (axes.MLP, axes.EMBED), jnp.float32)

    block_class = nn.remat(PaellaBlock) if self.remat else PaellaBlock
    make_blocks = lambda width: [
        block_class(width, self.kernel_size, self.mlp_ratio, self.layer_scale_init, self.dtype)
        for _ in range(self.blocks_per_level)]
    self.down_blocks = [make_blocks(width) for width in channels]
    self.up_blocks = [make_blocks(width) for width in channels]
    self.downsamplers = [Downsample(width, self.dtype) for width in channels[1:]]
    self.upsamplers = [Upsample(width, self.dtype) for width in channels[:-1]]
    self.head = _dense(self.codebook_size, (axes.EMBED, axes.VOCAB), jnp.float32)

  def null_text(self, batch_size: int) -> jax.Array:
    """The learnable null text embedding for classifier-free guidance.

    Args:
      batch_size: B.

    Returns:
      (B, condition_length, condition_dim) float32.
    """
    return jnp.broadcast_to(self.null_embedding[None],
                            (batch_size, self.condition_length, self.condition_dim))

  def condition(self, t: jax.Array, text: jax.Array) -> jax.Array:
    """The conditioning vector every block is modulated by.

    Args:
      t: (B,) integer timesteps in [0, T).
      text: (B, L, D) text features.

    Returns:
      (B, modulation_dim) float32.
    """
    pooled_text = jnp.mean(text.astype(jnp.float32), axis=1)
    time_features = timestep_embedding(t, self.num_timesteps, self.timestep_dim)
    time_embedding = self.time_out(nn.gelu(self.time_hidden(time_features)))
    return nn.silu(self.text_projection(pooled_text) + time_embedding)

  def _check_tokens(self, tokens: jax.Array) -> None:
    if tokens.ndim != 3:
      raise ValueError(f"tokens must be (B, h, w), got shape {tokens.shape}")
    factor = self.downsampling_factor
    height, width = tokens.shape[1:]
    if height % factor or width % factor:
      raise ValueError(
          f"latent size {height}x{width} is not divisible by the downsampling factor "
          f"{factor} of {len(self.channels)} levels")

  def __call__(self, tokens: jax.Array, t: jax.Array, text: jax.Array) -> jax.Array:
    """Predicts x0 logits at every position.

    Args:
      tokens: (B, h, w) integers in [0, K].
      t: (B,) integer timesteps in [0, T).
      text: (B, L, D) text features (or the null embedding).

    Returns:
      (B, h, w, K) float32 logits.

    Raises:
      ValueError: tokens are not 3-D, or h or w is not divisible by the
        downsampling factor.
    """
    self._check_tokens(tokens)
    condition = self.condition(t, text)
    x = layer_norm(self.token_embedding(tokens)).astype(self.dtype)
    skips = []
    for level, blocks in enumerate(self.down_blocks):
      if level > 0:
        x = self.downsamplers[level - 1](x)
      for block in blocks:
        x = block(x, condition)
      skips.append(x)
    deepest = len(self.channels) - 1
    for level in reversed(range(len(self.channels))):
      for index, block in enumerate(self.up_blocks[level]):
        skip = skips[level] if level < deepest and index == 0 else None
        x = block(x, condition, skip)
      if level > 0:
        x = self.upsamplers[level - 1](x)
    return self.head(layer_norm(x))
