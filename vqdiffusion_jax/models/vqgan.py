"""The VQ-VAE: a VQGAN / VQ-VAE encoder, vector quantizer and decoder (images <-> tokens).

The layout is the taming-transformers / LDM one that diffusers' ``VQModel`` also uses:

    encoder: conv_in -> down_blocks (per level: ResNet blocks [+ attention], stride-2 conv
             except at the last level) -> mid_block (ResNet, attention, ResNet)
             -> GroupNorm -> SiLU -> conv_out
    quant_conv (1x1) -> quantize -> post_quant_conv (1x1)
    decoder: conv_in -> mid_block -> up_blocks (lowest resolution first; per level:
             layers_per_block + 1 ResNet blocks [+ attention], nearest x2 + conv except at
             the last) -> GroupNorm -> SiLU -> conv_out

ResNet blocks are GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> conv3x3 plus the input
(through a 1x1 conv when the width changes). Attention is single-head over all positions,
with a GroupNorm in front and a residual connection. The stride-2 downsampling conv pads
only the bottom and right by one (taming's asymmetric padding). Every GroupNorm has eps 1e-6.

Images are NHWC in [-1, 1]; tokens are int32 ``(B, H / f, W / f)`` with ``f =
2 ** (levels - 1)``. Parameters are float32; ``dtype`` is the compute dtype, while GroupNorm
statistics, attention softmax, quantizer distances and the output images are float32.

Converted official codecs may quantize with taming's Gumbel quantizer (``gumbel``) and speak
a compact token vocabulary of the codes they use (``used_codes``); both are off by default
(``models/quantizer.py`` describes them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqdiffusion_jax.models import axes, precision
from vqdiffusion_jax.models.quantizer import CodeRemap, GumbelQuantizer, VectorQuantizer

Array = jax.Array

_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
  """Sizes of the VQ-VAE.

  Attributes:
    in_channels: image channels read by the encoder.
    out_channels: image channels written by the decoder.
    block_out_channels: width of each resolution level, full resolution first; the
      downsampling factor is ``2 ** (len(block_out_channels) - 1)``.
    layers_per_block: ResNet blocks per encoder level (the decoder has one more).
    latent_channels: width of the encoder output / decoder input (taming's ``z_channels``).
    num_embeddings: codebook size K.
    embed_dim: codebook vector width (``vq_embed_dim`` / taming's ``embed_dim``).
    norm_num_groups: GroupNorm groups everywhere.
    norm_eps: GroupNorm epsilon everywhere.
    encoder_attention_levels: resolution levels (0 = full resolution) whose encoder
      blocks get an attention layer after every ResNet block.
    decoder_attention_levels: the same for the decoder, indexed by the same levels.
    mid_block_attention: attention between the two mid-block ResNet blocks.
    beta: commitment weight of the quantizer.
    ema: EMA-learned codebook (``"vq_stats"`` collection) instead of a parameter.
    ema_decay: EMA decay.
    ema_eps: Laplace smoothing of the EMA cluster sizes.
    dead_code_threshold: EMA cluster size under which a code is restarted (0: never).
    legacy: plain-mode ``beta`` placement as diffusers' ``legacy=True``.
    patch_size: 0 for the convolutional VQGAN above; p > 0 for the patch VQ-VAE:
      the encoder embeds non-overlapping p x p patches (a stride-p convolution)
      and refines them with ``layers_per_block`` position-wise residual MLPs of
      width ``block_out_channels[-1]``; the decoder mirrors it with 3 x 3
      residual convolutions over the token grid and writes each p x p patch
      back (depth to space). Far cheaper per image than the convolutional
      model, so it trains in minutes on a CPU (the embedded default uses it).
    gumbel: taming's Gumbel quantizer (``quantizer.GumbelQuantizer``: logits over the
      codes, the most likely one) instead of the nearest code; inference only, needs
      ``ema=False``.
    used_codes: K' > 0 gives the model a compact token vocabulary of K' entries
      (``quantizer.CodeRemap``, stored in ``params["remap"]``): ``encode`` returns compact
      tokens and ``decode`` takes them. 0: tokens index the K codes directly.
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (64, 128, 256, 512)
  layers_per_block: int = 2
  latent_channels: int = 256
  num_embeddings: int = 4096
  embed_dim: int = 128
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  encoder_attention_levels: tuple[int, ...] = ()
  decoder_attention_levels: tuple[int, ...] = ()
  mid_block_attention: bool = True
  beta: float = 0.25
  ema: bool = True
  ema_decay: float = 0.99
  ema_eps: float = 1e-5
  dead_code_threshold: float = 1.0
  legacy: bool = True
  patch_size: int = 0
  gumbel: bool = False
  used_codes: int = 0

  def __post_init__(self):
    if not self.block_out_channels:
      raise ValueError("VQGANConfig.block_out_channels must name at least one level")
    if self.patch_size < 0:
      raise ValueError(f"VQGANConfig.patch_size must be >= 0, got {self.patch_size}")
    for channels in self.block_out_channels if not self.patch_size else ():
      if channels % self.norm_num_groups:
        raise ValueError(f"VQGANConfig.block_out_channels {self.block_out_channels} must all "
                         f"be divisible by norm_num_groups={self.norm_num_groups}")
    levels = range(len(self.block_out_channels))
    for name in ("encoder_attention_levels", "decoder_attention_levels"):
      if any(level not in levels for level in getattr(self, name)):
        raise ValueError(f"VQGANConfig.{name}={getattr(self, name)} names levels outside "
                         f"0..{len(self.block_out_channels) - 1}")
    if self.layers_per_block < 1:
      raise ValueError(f"VQGANConfig.layers_per_block must be >= 1, got {self.layers_per_block}")
    if not 0 <= self.used_codes <= self.num_embeddings:
      raise ValueError(f"VQGANConfig.used_codes must be in 0..num_embeddings="
                       f"{self.num_embeddings}, got {self.used_codes}")
    if self.gumbel and self.ema:
      raise ValueError("VQGANConfig.gumbel needs ema=False: the Gumbel quantizer's codebook is "
                       "a parameter")

  @property
  def downsampling_factor(self) -> int:
    """Image size / token grid size."""
    return self.patch_size or 2 ** (len(self.block_out_channels) - 1)

  @property
  def vocabulary_size(self) -> int:
    """How many distinct tokens ``encode`` returns and ``decode`` takes."""
    return self.used_codes or self.num_embeddings


def _conv(features: int, kernel: int, name: str, dtype: Any, stride: int = 1,
          padding: Any = None, matmul_dtype: str = "float32") -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride),
      padding=((pad, pad), (pad, pad)) if padding is None else padding,
      dtype=dtype, param_dtype=jnp.float32, name=name,
      conv_general_dilated=precision.conv_for(matmul_dtype),
      kernel_init=nn.with_logical_partitioning(
          _KERNEL_INIT, (*axes.CONV_KERNEL, axes.CONV_IN, axes.CONV_OUT)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.CONV_OUT,)))


def _dense(features: int, name: str, dtype: Any) -> nn.Dense:
  return nn.Dense(
      features, dtype=dtype, param_dtype=jnp.float32, name=name,
      kernel_init=nn.with_logical_partitioning(_KERNEL_INIT, (axes.CONV_IN, axes.CONV_OUT)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.CONV_OUT,)))


class GroupNorm(nn.Module):
  """GroupNorm over NHWC with float32 statistics (biased variance, like torch)."""
  num_groups: int
  eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             (axes.NORM,)),
                       (channels,), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           (axes.NORM,)),
                      (channels,), jnp.float32)
    grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, -1)
    reduce_axes = (*range(1, grouped.ndim - 2), grouped.ndim - 1)
    mean = jnp.mean(grouped, axis=reduce_axes, keepdims=True)
    var = jnp.mean(jnp.square(grouped - mean), axis=reduce_axes, keepdims=True)
    normed = ((grouped - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    return (normed * scale + bias).astype(self.dtype)


class ResnetBlock(nn.Module):
  """Pre-norm residual block: (GroupNorm, SiLU, conv3x3) twice, 1x1 shortcut on width change."""
  out_channels: int
  num_groups: int
  eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    norm = lambda name: GroupNorm(self.num_groups, self.eps, self.dtype, name=name)
    h = nn.silu(norm("norm1")(x))
    h = _conv(self.out_channels, 3, "conv1", self.dtype)(h)
    h = nn.silu(norm("norm2")(h))
    h = _conv(self.out_channels, 3, "conv2", self.dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
    return x.astype(self.dtype) + h


class AttentionBlock(nn.Module):
  """Single-head self-attention over all positions, GroupNorm in front, residual."""
  num_groups: int
  eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    batch, height, width, channels = x.shape
    h = GroupNorm(self.num_groups, self.eps, self.dtype, name="group_norm")(x)
    h = h.reshape(batch, height * width, channels)
    query = _dense(channels, "to_q", self.dtype)(h)
    key = _dense(channels, "to_k", self.dtype)(h)
    value = _dense(channels, "to_v", self.dtype)(h)
    scores = jnp.einsum("bqc,bkc->bqk", query, key).astype(jnp.float32) * channels**-0.5
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    h = jnp.einsum("bqk,bkc->bqc", weights, value)
    h = _dense(channels, "to_out", self.dtype)(h)
    return x.astype(self.dtype) + h.reshape(x.shape)


class Downsample(nn.Module):
  """Stride-2 conv3x3 after zero padding of one row at the bottom and one column at the right."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(x.shape[-1], 3, "conv", self.dtype, stride=2, padding="VALID")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 upsampling followed by a conv3x3."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, "conv", self.dtype)(x)


class ResolutionBlock(nn.Module):
  """One resolution level: ResNet blocks (each optionally followed by attention), then a resampler.

  Attributes:
    out_channels: width of the level.
    num_layers: ResNet blocks.
    attention: attention after every ResNet block.
    resample: ``"down"``, ``"up"`` or ``None``.
  """
  out_channels: int
  num_layers: int
  attention: bool
  resample: str | None
  num_groups: int
  eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(self.num_layers):
      x = ResnetBlock(self.out_channels, self.num_groups, self.eps, self.dtype,
                      name=f"resnets_{i}")(x)
      if self.attention:
        x = AttentionBlock(self.num_groups, self.eps, self.dtype, name=f"attentions_{i}")(x)
    if self.resample == "down":
      x = Downsample(self.dtype, name="downsample")(x)
    elif self.resample == "up":
      x = Upsample(self.dtype, name="upsample")(x)
    return x


class MidBlock(nn.Module):
  """ResNet block, optional attention, ResNet block, at the lowest resolution."""
  attention: bool
  num_groups: int
  eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    x = ResnetBlock(channels, self.num_groups, self.eps, self.dtype, name="resnets_0")(x)
    if self.attention:
      x = AttentionBlock(self.num_groups, self.eps, self.dtype, name="attentions_0")(x)
    return ResnetBlock(channels, self.num_groups, self.eps, self.dtype, name="resnets_1")(x)


class Encoder(nn.Module):
  """Images (B, H, W, in_channels) -> latents (B, H/f, W/f, latent_channels)."""
  config: VQGANConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: Array) -> Array:
    cfg = self.config
    x = _conv(cfg.block_out_channels[0], 3, "conv_in", self.dtype)(images.astype(self.dtype))
    last = len(cfg.block_out_channels) - 1
    for level, channels in enumerate(cfg.block_out_channels):
      x = ResolutionBlock(channels, cfg.layers_per_block,
                          level in cfg.encoder_attention_levels,
                          "down" if level < last else None, cfg.norm_num_groups, cfg.norm_eps,
                          self.dtype, name=f"down_blocks_{level}")(x)
    x = MidBlock(cfg.mid_block_attention, cfg.norm_num_groups, cfg.norm_eps, self.dtype,
                 name="mid_block")(x)
    x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, self.dtype, name="norm_out")(x))
    return _conv(cfg.latent_channels, 3, "conv_out", self.dtype)(x)


class Decoder(nn.Module):
  """Latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels), float32."""
  config: VQGANConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, latents: Array) -> Array:
    cfg = self.config
    x = _conv(cfg.block_out_channels[-1], 3, "conv_in", self.dtype)(latents.astype(self.dtype))
    x = MidBlock(cfg.mid_block_attention, cfg.norm_num_groups, cfg.norm_eps, self.dtype,
                 name="mid_block")(x)
    last = len(cfg.block_out_channels) - 1
    for index in range(last + 1):
      level = last - index
      x = ResolutionBlock(cfg.block_out_channels[level], cfg.layers_per_block + 1,
                          level in cfg.decoder_attention_levels,
                          "up" if level > 0 else None, cfg.norm_num_groups, cfg.norm_eps,
                          self.dtype, name=f"up_blocks_{index}")(x)
    x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, self.dtype, name="norm_out")(x))
    x = _conv(cfg.out_channels, 3, "conv_out", self.dtype)(x)
    return x.astype(jnp.float32)


def _layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
  return nn.LayerNorm(dtype=dtype, param_dtype=jnp.float32, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                              (axes.NORM,)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             (axes.NORM,)))


class PatchResidual(nn.Module):
  """``x + W2 gelu(W1 LayerNorm(x))``, W1 a k x k convolution over the grid."""
  width: int
  kernel: int
  dtype: Any = jnp.float32
  matmul_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = _layer_norm("norm", self.dtype)(x)
    h = _conv(self.width, self.kernel, "conv1", self.dtype, matmul_dtype=self.matmul_dtype)(h)
    return x + _conv(self.width, 1, "conv2", self.dtype, matmul_dtype=self.matmul_dtype)(
        nn.gelu(h))


class PatchEncoder(nn.Module):
  """Images (B, H, W, C) -> (B, H/p, W/p, latent_channels), one vector per p x p patch."""
  config: VQGANConfig
  dtype: Any = jnp.float32
  matmul_dtype: str = "float32"

  @nn.compact
  def __call__(self, images: Array) -> Array:
    cfg, mm = self.config, self.matmul_dtype
    width, p = cfg.block_out_channels[-1], cfg.patch_size
    x = _conv(width, p, "patch_embed", self.dtype, stride=p, padding="VALID", matmul_dtype=mm)(
        images.astype(self.dtype))
    for index in range(cfg.layers_per_block):
      x = PatchResidual(width, 1, self.dtype, mm, name=f"blocks_{index}")(x)
    return _conv(cfg.latent_channels, 1, "conv_out", self.dtype, matmul_dtype=mm)(
        _layer_norm("norm_out", self.dtype)(x))


class PatchDecoder(nn.Module):
  """(B, h, w, latent_channels) -> images (B, h*p, w*p, out_channels), float32."""
  config: VQGANConfig
  dtype: Any = jnp.float32
  matmul_dtype: str = "float32"

  @nn.compact
  def __call__(self, latents: Array) -> Array:
    cfg, mm = self.config, self.matmul_dtype
    width, p = cfg.block_out_channels[-1], cfg.patch_size
    x = _conv(width, 1, "conv_in", self.dtype, matmul_dtype=mm)(latents.astype(self.dtype))
    for index in range(cfg.layers_per_block):
      x = PatchResidual(width, 3, self.dtype, mm, name=f"blocks_{index}")(x)
    x = _conv(p * p * cfg.out_channels, 1, "patch_out", self.dtype, matmul_dtype=mm)(
        _layer_norm("norm_out", self.dtype)(x))
    batch, h, w, _ = x.shape
    x = x.reshape(batch, h, w, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, h * p, w * p, cfg.out_channels).astype(jnp.float32)


class VQGAN(nn.Module):
  """Encoder, quantizer and decoder of the VQ-VAE (see the module docstring).

  Call with ``module.apply(variables, images, method="encode")`` etc. In EMA mode the
  variables are ``{"params": ..., "vq_stats": ...}``; training calls also pass
  ``mutable=["vq_stats"]`` and ``rngs={"vq_restart": key}``.

  Attributes:
    config: the sizes.
    dtype: compute dtype (float32, or bfloat16 on TPU / GPU).
    matmul_dtype: "bfloat16" runs the patch VQ-VAE's convolutions as matmuls on
      bfloat16 operands with float32 results (``precision.matmul_conv``); the
      convolutional VQGAN supports only "float32" (use ``dtype`` there).
  """
  config: VQGANConfig
  dtype: Any = jnp.float32
  matmul_dtype: str = "float32"

  def setup(self):
    cfg, mm = self.config, self.matmul_dtype
    precision.dot_general_for(mm)  # Rejects an unknown name.
    if mm != "float32" and not cfg.patch_size:
      raise ValueError(f"matmul_dtype={mm!r} needs the patch VQ-VAE (patch_size > 0); the "
                       "convolutional VQGAN takes its precision from dtype")
    if cfg.patch_size:
      self.encoder = PatchEncoder(cfg, self.dtype, mm)
      self.decoder = PatchDecoder(cfg, self.dtype, mm)
    else:
      self.encoder, self.decoder = Encoder(cfg, self.dtype), Decoder(cfg, self.dtype)
    self.quant_conv = _conv(cfg.embed_dim, 1, "quant_conv", self.dtype, matmul_dtype=mm)
    if cfg.gumbel:
      self.quantize = GumbelQuantizer(cfg.num_embeddings, cfg.embed_dim, dtype=self.dtype)
    else:
      self.quantize = VectorQuantizer(
          cfg.num_embeddings, cfg.embed_dim, beta=cfg.beta, ema=cfg.ema, decay=cfg.ema_decay,
          eps=cfg.ema_eps, dead_code_threshold=cfg.dead_code_threshold, legacy=cfg.legacy,
          dtype=self.dtype)
    if cfg.used_codes:
      self.remap = CodeRemap(cfg.num_embeddings, cfg.used_codes)
    self.post_quant_conv = _conv(cfg.latent_channels, 1, "post_quant_conv", self.dtype,
                                 matmul_dtype=mm)

  def encode_latents(self, images: Array) -> Array:
    """Images (B, H, W, C) in [-1, 1] -> unquantized codebook-space vectors, float32.

    Returns:
      ``quant_conv(encoder(images))``, shape (B, H/f, W/f, embed_dim).
    """
    self._check_images(images)
    return self.quant_conv(self.encoder(images)).astype(jnp.float32)

  def encode(self, images: Array) -> Array:
    """Images (B, H, W, C) in [-1, 1] -> int32 tokens (B, H/f, W/f), compact when remapped."""
    return self._to_tokens(self.quantize.tokens(self.encode_latents(images)))

  def decode_latents(self, quantized: Array) -> Array:
    """Codebook-space vectors (B, h, w, embed_dim) -> images (B, h*f, w*f, C), float32."""
    return self.decoder(self.post_quant_conv(quantized.astype(self.dtype)))

  def decode(self, tokens: Array) -> Array:
    """Int tokens (B, h, w), compact when remapped -> images (B, h*f, w*f, C), float32."""
    if tokens.ndim != 3 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"VQGAN.decode expects integer tokens of shape (batch, height, width), "
                       f"got {tokens.dtype} {tokens.shape}")
    codes = self.remap.to_full(tokens) if self.config.used_codes else tokens
    return self.decode_latents(self.quantize.lookup(codes))

  def __call__(self, images: Array, train: bool = False) -> tuple[Array, dict[str, Array]]:
    """Reconstructs images through the quantizer.

    Args:
      images: (B, H, W, C) in [-1, 1].
      train: update the EMA codebook statistics (EMA mode).

    Returns:
      ``(reconstruction, aux)``: float32 images shaped like ``images`` (with
      ``out_channels``) and the quantizer's aux dict (``loss``, ``commitment_loss``,
      ``tokens`` as ``encode`` returns them, ``perplexity`` and ``usage`` over the K codes).
    """
    quantized, aux = self.quantize(self.encode_latents(images), train=train)
    return self.decode_latents(quantized), {**aux, "tokens": self._to_tokens(aux["tokens"])}

  def _to_tokens(self, codes: Array) -> Array:
    return self.remap.to_compact(codes) if self.config.used_codes else codes

  def _check_images(self, images: Array) -> None:
    cfg = self.config
    factor = cfg.downsampling_factor
    if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
      raise ValueError(f"VQGAN expects NHWC images with {cfg.in_channels} channels, "
                       f"got shape {images.shape}")
    if images.shape[1] % factor or images.shape[2] % factor:
      raise ValueError(f"VQGAN image height and width must be divisible by the downsampling "
                       f"factor {factor}, got {images.shape[1]}x{images.shape[2]}")
