"""Per-image reconstruction metrics (PSNR, SSIM) and the halves of the Inception Score.

``psnr`` and ``ssim`` compare two batches of NHWC images in ``[0, max_value]``
and return one value per image; both are pure ``jax.numpy`` and jit-able.
``ssim`` follows Wang et al. 2004 as scikit-image computes it with
``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``: local
statistics under an 11 x 11 Gaussian window (sigma 1.5, normalised to sum 1),
kept only where the window fits inside the image (a "valid" filter), and the
SSIM map averaged over pixels and channels.

``inception_quality_diversity`` splits the Inception Score of a classifier's
class probabilities ``p(y|x)`` into two factors. Writing ``H`` for entropy
and ``p(y) = mean_x p(y|x)`` for the marginal,

  quality   = exp(-mean_x H(p(y|x)))   in (0, 1]; 1 when every image is
              classified with certainty,
  diversity = exp(H(p(y)))            in [1, C]; the effective number of
              classes the images fall into,

and ``IS = exp(H(p(y)) - mean_x H(p(y|x))) = quality * diversity``. We use
these two factors as the Quality Score (QS) and Diversity Score (DS) that the
Improved VQ-Diffusion paper reports; the paper gives no formula, so this is
our definition, not a reproduction of its numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import xlogy

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def psnr(a: jax.Array, b: jax.Array, max_value: float = 1.0) -> jax.Array:
  """Peak signal-to-noise ratio of each image pair, in dB.

  Args:
    a: ``(B, H, W, C)`` images.
    b: ``(B, H, W, C)`` images to compare with.
    max_value: the largest possible pixel value (1 for [0, 1] images).

  Returns:
    float32 ``(B,)``: ``10 log10(max_value^2 / MSE)``; ``inf`` for identical images.
  """
  a, b = _pair(a, b)
  mse = jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
  return 10.0 * jnp.log10(max_value**2 / mse)


def ssim(a: jax.Array, b: jax.Array, max_value: float = 1.0) -> jax.Array:
  """Structural similarity of each image pair (Gaussian window 11, sigma 1.5).

  Args:
    a: ``(B, H, W, C)`` images, ``H, W >= 11``.
    b: ``(B, H, W, C)`` images to compare with.
    max_value: the data range ``L`` (1 for [0, 1] images); ``C1 = (0.01 L)^2``,
      ``C2 = (0.03 L)^2``.

  Returns:
    float32 ``(B,)``: the mean of the SSIM map over the valid region and channels;
    1 for identical images.
  """
  a, b = _pair(a, b)
  if min(a.shape[1:3]) < SSIM_WINDOW:
    raise ValueError(f"ssim needs images of at least {SSIM_WINDOW} x {SSIM_WINDOW} pixels, "
                     f"got {a.shape[1]} x {a.shape[2]}")
  taps = gaussian_taps(SSIM_WINDOW, SSIM_SIGMA)
  mu_a, mu_b = _gaussian_filter(a, taps), _gaussian_filter(b, taps)
  var_a = _gaussian_filter(a * a, taps) - mu_a * mu_a
  var_b = _gaussian_filter(b * b, taps) - mu_b * mu_b
  cov = _gaussian_filter(a * b, taps) - mu_a * mu_b
  c1 = (SSIM_K1 * max_value) ** 2
  c2 = (SSIM_K2 * max_value) ** 2
  numerator = (2.0 * mu_a * mu_b + c1) * (2.0 * cov + c2)
  denominator = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
  return jnp.mean(numerator / denominator, axis=(1, 2, 3))


def inception_quality_diversity(probs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The quality and diversity factors of the Inception Score (see the module docstring).

  Args:
    probs: ``(B, C)`` class probabilities ``p(y|x)``, rows summing to 1 (e.g. the
      softmax of the FID Inception's logits).

  Returns:
    ``(quality, diversity)`` as float32 scalars: ``exp(-mean_x H(p(y|x)))`` and
    ``exp(H(mean_x p(y|x)))``; their product is the Inception Score.
  """
  probs = jnp.asarray(probs, jnp.float32)
  if probs.ndim != 2:
    raise ValueError(f"probs must be (B, C), got shape {probs.shape}")
  mean_entropy = jnp.mean(_entropy(probs))
  marginal_entropy = _entropy(jnp.mean(probs, axis=0))
  return jnp.exp(-mean_entropy), jnp.exp(marginal_entropy)


def gaussian_taps(size: int, sigma: float) -> np.ndarray:
  """A normalised 1-D Gaussian window of odd ``size``, centred (float32)."""
  offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  taps = np.exp(-(offsets**2) / (2.0 * sigma**2))
  return (taps / taps.sum()).astype(np.float32)


def _entropy(probs: jax.Array) -> jax.Array:
  """Shannon entropy (nats) over the last axis, with ``0 log 0 = 0``."""
  return -jnp.sum(xlogy(probs, probs), axis=-1)


def _gaussian_filter(x: jax.Array, taps: np.ndarray) -> jax.Array:
  """Separable "valid" filtering of (B, H, W, C) over H then W: (B, H-k+1, W-k+1, C)."""
  for axis in (1, 2):
    out_len = x.shape[axis] - len(taps) + 1
    x = sum(float(w) * jax.lax.slice_in_dim(x, k, k + out_len, axis=axis)
            for k, w in enumerate(taps))
  return x


def _pair(a, b) -> tuple[jax.Array, jax.Array]:
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  if a.shape != b.shape or a.ndim != 4:
    raise ValueError(f"expected two (B, H, W, C) batches of one shape, got {a.shape} and "
                     f"{b.shape}")
  return a, b
