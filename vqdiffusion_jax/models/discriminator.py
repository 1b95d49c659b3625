"""PatchGAN discriminator and the adversarial losses of VQGAN training.

The discriminator is pix2pix's ``NLayerDiscriminator`` as taming-transformers
uses it: a 4x4 conv with stride 2 and LeakyReLU(0.2); ``num_layers - 1``
blocks of 4x4 conv with stride 2, norm and LeakyReLU, channels doubling up to
8x the base width; one 4x4 conv with stride 1, norm and LeakyReLU; a last 4x4
conv with stride 1 to one channel. Every conv pads by 1, so each stride-1 conv
shrinks the map by one pixel: 32x32 inputs give 2x2 logits with the default
three layers, 256x256 inputs 30x30. Convs followed by a norm have no bias.

The norm is taming's BatchNorm by default (running statistics in the mutable
``batch_stats`` collection, updated only when ``train=True``), or GroupNorm,
or none. Initialisation follows taming's ``weights_init``: conv kernels
normal(0, 0.02), BatchNorm scale normal(1, 0.02) and bias 0, conv biases left
at PyTorch's default. One difference from torch's BatchNorm: the running
variance averages the biased batch variance (torch the unbiased one), which
differs by a factor n / (n - 1) with n = batch x height x width.

The losses are pure functions of the discriminator's logits; the adaptive
weight is a pure function of two gradient trees that the trainer computes
with respect to the decoder's last layer.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqdiffusion_jax.models import axes

NORMS = ("batch", "group", "none")
KERNEL_SIZE = 4
LEAKY_SLOPE = 0.2

_CONV_AXES = (*axes.CONV_KERNEL, axes.CONV_IN, axes.CONV_OUT)


def _torch_default_bias_init(fan_in: int):
  """PyTorch's Conv2d bias init, uniform(+-1/sqrt(fan_in)); taming leaves biases at it."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound)


def _normal_around_one(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class NLayerDiscriminator(nn.Module):
  """PatchGAN discriminator returning one logit per overlapping patch.

  Attributes:
    base_channels: width of the first conv (taming's ``ndf``).
    num_layers: number of stride-2 convs (taming's ``n_layers``).
    norm: "batch" (taming), "group" or "none".
    norm_groups: groups of GroupNorm; must divide every norm layer's width.
    dtype: compute dtype; norm statistics and the final logits are float32.
  """
  base_channels: int = 64
  num_layers: int = 3
  norm: str = "batch"
  norm_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Patch logits.

    Args:
      images: (B, H, W, C) images (C = 3 for RGB).
      train: BatchNorm normalises with batch statistics and updates its
        running averages (pass ``mutable=["batch_stats"]``); otherwise it
        uses the running averages.

    Returns:
      (B, H', W', 1) float32 logits, H' = H / 2^num_layers - 2 for H
      divisible by 2^num_layers.
    """
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
    x = self._conv(images.astype(self.dtype), self.base_channels, 2, True, "conv0")
    x = nn.leaky_relu(x, LEAKY_SLOPE)
    for layer, width in enumerate(self.widths()[1:], start=1):
      stride = 2 if layer < self.num_layers else 1
      x = self._conv(x, width, stride, self.norm == "none", f"conv{layer}")
      x = nn.leaky_relu(self._normalize(x, train, f"norm{layer}"), LEAKY_SLOPE)
    logits = self._conv(x.astype(jnp.float32), 1, 1, True, f"conv{self.num_layers + 1}",
                        dtype=jnp.float32)
    return logits

  def widths(self) -> list[int]:
    """Output widths of the convs before the last: base * min(2^i, 8), i = 0..num_layers."""
    return [self.base_channels * min(2 ** i, 8) for i in range(self.num_layers + 1)]

  def _conv(self, x, width, stride, use_bias, name, dtype=None):
    fan_in = x.shape[-1] * KERNEL_SIZE * KERNEL_SIZE
    return nn.Conv(
        width, (KERNEL_SIZE, KERNEL_SIZE), strides=(stride, stride),
        padding=((1, 1), (1, 1)), use_bias=use_bias, dtype=dtype or self.dtype,
        param_dtype=jnp.float32, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), _CONV_AXES),
        bias_init=nn.with_logical_partitioning(_torch_default_bias_init(fan_in),
                                               (axes.CONV_OUT,)),
    )(x)

  def _normalize(self, x, train, name):
    if self.norm == "batch":
      # Flax's momentum is the kept fraction: torch's momentum 0.1 is 0.9 here.
      return nn.BatchNorm(
          use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
          param_dtype=jnp.float32, name=name,
          scale_init=nn.with_logical_partitioning(_normal_around_one, (axes.NORM,)),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.NORM,)),
      )(x)
    if self.norm == "group":
      return nn.GroupNorm(
          num_groups=self.norm_groups, epsilon=1e-5, dtype=self.dtype,
          param_dtype=jnp.float32, name=name,
          scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axes.NORM,)),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.NORM,)),
      )(x)
    return x


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """Discriminator hinge loss, ``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``.

  Args:
    logits_real: discriminator logits on real images, any shape.
    logits_fake: logits on reconstructions, any shape.

  Returns:
    The float32 scalar loss.
  """
  real, fake = logits_real.astype(jnp.float32), logits_fake.astype(jnp.float32)
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """Non-saturating GAN loss, ``0.5 * (mean(softplus(-real)) + mean(softplus(fake)))``.

  Args:
    logits_real: discriminator logits on real images, any shape.
    logits_fake: logits on reconstructions, any shape.

  Returns:
    The float32 scalar loss.
  """
  real, fake = logits_real.astype(jnp.float32), logits_fake.astype(jnp.float32)
  return 0.5 * (jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake)))


def discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array,
                       kind: str = "hinge") -> jax.Array:
  """The discriminator loss named by ``kind``: "hinge" (VQGAN default) or "vanilla".

  Args:
    logits_real: logits on real images.
    logits_fake: logits on reconstructions.
    kind: "hinge" or "vanilla".

  Returns:
    The float32 scalar loss.
  """
  losses = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
  if kind not in losses:
    raise ValueError(f"discriminator loss must be one of {sorted(losses)}, got {kind!r}")
  return losses[kind](logits_real, logits_fake)


def generator_loss(logits_fake: jax.Array) -> jax.Array:
  """The generator's adversarial loss, ``-mean(logits_fake)``.

  Args:
    logits_fake: discriminator logits on reconstructions.

  Returns:
    The float32 scalar loss.
  """
  return -jnp.mean(logits_fake.astype(jnp.float32))


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32)))
                      for leaf in jax.tree.leaves(tree)))


def adaptive_weight(rec_grads, gan_grads, disc_weight: float | jax.Array = 1.0) -> jax.Array:
  """VQGAN's balance of the adversarial term against the reconstruction term.

  ``clip(||rec_grads|| / (||gan_grads|| + 1e-4), 0, 1e4) * disc_weight``,
  without a gradient. taming takes both gradients with respect to the
  decoder's last conv weight only.

  Args:
    rec_grads: gradient tree of the reconstruction (L1 + perceptual) loss
      with respect to the decoder's last layer.
    gan_grads: gradient tree of ``generator_loss`` with respect to the same.
    disc_weight: the configured discriminator weight.

  Returns:
    The float32 scalar weight.
  """
  ratio = _global_norm(rec_grads) / (_global_norm(gan_grads) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4) * disc_weight)


def adopt_weight(weight: float | jax.Array, step: int | jax.Array, start: int | jax.Array,
                 value: float = 0.0) -> jax.Array:
  """``value`` before step ``start``, ``weight`` from it on (the disc_start switch).

  Args:
    weight: the weight once the discriminator is on.
    step: the global step (may be traced).
    start: the first step with the discriminator on.
    value: the weight before that.

  Returns:
    The float32 scalar weight.
  """
  return jnp.where(jnp.asarray(step) < start, jnp.asarray(value, jnp.float32),
                   jnp.asarray(weight, jnp.float32))
