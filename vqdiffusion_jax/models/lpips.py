"""LPIPS perceptual distance (Zhang et al. 2018) with the VGG16 backbone.

The version used by taming-transformers / LDM to train the VQ-VAE:
inputs in [-1, 1] are shifted and scaled to the statistics the LPIPS paper
uses, run through the torchvision VGG16 conv stack, and compared at five
depths (after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3). At each depth the
features are unit-normalised over channels, their squared difference is
weighted per channel by a learned 1x1 head without bias (``lin0`` .. ``lin4``;
the heads' dropout is inactive at evaluation, and LPIPS is only ever
evaluated), averaged over space, and the five terms are summed.

Images are NHWC. The pooled stack needs at least 16 x 16 pixels.

The weights are never trained here. Nothing can be downloaded at run time, so
``convert.lpips.load_lpips`` reads two files the user supplies: the
torchvision VGG16 state dict and the LPIPS heads (the ``vgg.pth`` of LPIPS
v0.1 / taming). The trainer
passes the resulting params to its step as a separate, frozen input, not as
part of the trainable state, and differentiates only with respect to images.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqdiffusion_jax.models import axes

# Per-channel input statistics of the LPIPS ScalingLayer, for images in [-1, 1].
INPUT_SHIFT = (-0.030, -0.088, -0.188)
INPUT_SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10

# Output channels of each VGG16 conv, one tuple per stage; a 2x2 max-pool
# separates stages, and LPIPS compares the last ReLU of every stage.
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

_CONV_AXES = (*axes.CONV_KERNEL, axes.CONV_IN, axes.CONV_OUT)


def _nonnegative_head_init(key, shape, dtype=jnp.float32):
  """Random heads with LPIPS's sign: trained LPIPS heads are non-negative."""
  return jax.random.uniform(key, shape, dtype, 0.0, 2.0 / shape[-2])


class VGG16Features(nn.Module):
  """The torchvision ``vgg16().features`` stack up to relu5_3.

  Attributes:
    dtype: compute dtype of the convolutions.
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> list[jax.Array]:
    """Returns the five stage outputs (relu1_2 .. relu5_3), each (B, h, w, C)."""
    features = []
    x = images.astype(self.dtype)
    for stage, widths in enumerate(VGG16_STAGES):
      if stage:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for index, width in enumerate(widths):
        x = nn.Conv(
            width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
            param_dtype=jnp.float32, name=vgg_conv_name(stage, index),
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.variance_scaling(2.0, "fan_out", "normal"), _CONV_AXES),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes.CONV_OUT,)),
        )(x)
        x = nn.relu(x)
      features.append(x)
    return features


class LPIPS(nn.Module):
  """LPIPS distance between two batches of images.

  Attributes:
    dtype: compute dtype of the VGG16 stack; the normalisation, differences
      and heads are computed in float32.
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-image perceptual distance.

    Args:
      images: (B, H, W, 3) images in [-1, 1], H and W at least 16.
      targets: (B, H, W, 3) images to compare with.

    Returns:
      (B,) float32 distances (taming's (B, 1, 1, 1) without the unit axes).
    """
    batch = images.shape[0]
    both = _scale_inputs(jnp.concatenate([images, targets], axis=0))
    distance = jnp.zeros((batch,), jnp.float32)
    for level, features in enumerate(VGG16Features(self.dtype, name="vgg")(both)):
      features = _unit_normalize(features.astype(jnp.float32))
      squared_diff = jnp.square(features[:batch] - features[batch:])
      weighted = nn.Conv(
          1, (1, 1), use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
          name=f"lin{level}",
          kernel_init=nn.with_logical_partitioning(_nonnegative_head_init, _CONV_AXES),
      )(squared_diff)
      distance = distance + jnp.mean(weighted, axis=(1, 2, 3))
    return distance


def _scale_inputs(images: jax.Array) -> jax.Array:
  shift = jnp.asarray(INPUT_SHIFT, images.dtype)
  scale = jnp.asarray(INPUT_SCALE, images.dtype)
  return (images - shift) / scale


def _unit_normalize(features: jax.Array) -> jax.Array:
  """x / (||x||_channels + 1e-10), with a zero (not NaN) gradient at x = 0."""
  sum_sq = jnp.sum(jnp.square(features), axis=-1, keepdims=True)
  positive = sum_sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sum_sq, 1.0)), 0.0)
  return features / (norm + NORM_EPS)


def vgg_conv_name(stage: int, index: int) -> str:
  """Our name of a VGG16 conv: ``conv{stage + 1}_{index + 1}`` (conv1_1 .. conv5_3)."""
  return f"conv{stage + 1}_{index + 1}"


def init_random(rng: jax.Array) -> dict:
  """Random LPIPS params (for tests and smoke runs without weight files).

  Args:
    rng: a PRNG key.

  Returns:
    The params tree, unboxed, shaped like the output of ``load_lpips``.
  """
  dummy = jnp.zeros((1, 16, 16, 3), jnp.float32)
  variables = jax.jit(LPIPS().init)(rng, dummy, dummy)
  return nn.unbox(variables["params"])


def abstract_params() -> dict:
  """The params tree as shapes (``jax.eval_shape`` of the init), boxes included."""
  dummy = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  return jax.eval_shape(LPIPS().init, jax.random.key(0), dummy, dummy)["params"]
