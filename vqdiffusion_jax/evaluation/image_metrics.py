"""Per-image reconstruction metrics (PSNR, SSIM), the Inception Score and its two halves.

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

``inception_score`` is the Inception Score as torch-fidelity (and
torchmetrics, whose default it follows) computes it: float64 softmax of the
logits, the images shuffled by ``np.random.RandomState(2020).permutation``,
cut into 10 splits at ``i * N // 10``, per split
``exp(mean_x KL(p(y|x) || p_split(y)))``, and the mean and (population)
standard deviation over the splits. For the paper figures the logits are the
FID Inception's ``fc`` without its bias (``inception.unbiased_logits``,
torch-fidelity's ``logits_unbiased``, as in the original TensorFlow code).
``InceptionScoreAccumulator`` gives the same numbers, and the quality and
diversity factors over all images, from logits that arrive batch by batch:
per split it keeps only the image count, the summed probabilities and the
summed negative entropies, since
``mean_x KL(p(y|x) || p(y)) = H(p(y)) - mean_x H(p(y|x))``.
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
IS_SPLITS = 10
IS_SHUFFLE_SEED = 2020


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


def log_softmax(logits: np.ndarray) -> np.ndarray:
  """The float64 log-softmax over the last axis."""
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def split_assignment(num_images: int, splits: int = IS_SPLITS,
                     shuffle_seed: int | None = IS_SHUFFLE_SEED) -> np.ndarray:
  """The Inception Score split of each image index (torch-fidelity's shuffle and cuts).

  Args:
    num_images: N, at least ``splits``.
    splits: the number of splits.
    shuffle_seed: the seed of ``np.random.RandomState(seed).permutation(N)``;
      None keeps the images in order (consecutive splits).

  Returns:
    int ``(N,)``: image ``j`` falls into split ``assignment[j]``.
  """
  if splits < 1 or num_images < splits:
    raise ValueError(f"the Inception Score needs at least as many images as splits, got "
                     f"{num_images} images and {splits} splits")
  positions = np.arange(num_images)
  cuts = np.array([i * num_images // splits for i in range(splits + 1)])
  position_split = np.searchsorted(cuts, positions, side="right") - 1
  order = positions if shuffle_seed is None else (
      np.random.RandomState(shuffle_seed).permutation(num_images))
  assignment = np.empty(num_images, np.int64)
  assignment[order] = position_split
  return assignment


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS,
                    shuffle_seed: int | None = IS_SHUFFLE_SEED) -> tuple[float, float]:
  """The Inception Score of all images' logits at once (see the module docstring).

  Args:
    logits: ``(N, C)`` class logits.
    splits: the number of splits.
    shuffle_seed: the shuffle's seed; None keeps the order.

  Returns:
    ``(mean, std)`` of the per-split scores.
  """
  log_probs = log_softmax(logits)
  assignment = split_assignment(len(log_probs), splits, shuffle_seed)
  scores = []
  for split in range(splits):
    chunk = log_probs[assignment == split]
    probs = np.exp(chunk)
    marginal = probs.mean(axis=0)
    log_marginal = np.log(np.where(marginal > 0, marginal, 1.0))  # 0 log 0 = 0
    scores.append(np.exp(np.mean(np.sum(probs * (chunk - log_marginal), axis=1))))
  return float(np.mean(scores)), float(np.std(scores))


class InceptionScoreAccumulator:
  """The Inception Score and its quality / diversity factors, from logits batch by batch.

  Args:
    num_images: the number of images that will arrive (fixes the splits).
    splits: the number of splits.
    shuffle_seed: the shuffle's seed; None keeps the order.
  """

  def __init__(self, num_images: int, splits: int = IS_SPLITS,
               shuffle_seed: int | None = IS_SHUFFLE_SEED):
    self.assignment = split_assignment(num_images, splits, shuffle_seed)
    self.splits = splits
    self.counts = np.zeros(splits, np.int64)
    self.neg_entropy_sums = np.zeros(splits, np.float64)
    self.prob_sums: np.ndarray | None = None

  def update(self, logits: np.ndarray, start: int) -> None:
    """Adds the ``(B, C)`` logits of images ``start .. start + B - 1``."""
    log_probs = log_softmax(logits)
    if log_probs.ndim != 2 or start < 0 or start + len(log_probs) > len(self.assignment):
      raise ValueError(f"logits of shape {log_probs.shape} at image {start} do not fit "
                       f"{len(self.assignment)} images")
    probs = np.exp(log_probs)
    if self.prob_sums is None:
      self.prob_sums = np.zeros((self.splits, probs.shape[1]), np.float64)
    split = self.assignment[start:start + len(probs)]
    np.add.at(self.counts, split, 1)
    np.add.at(self.neg_entropy_sums, split, np.sum(probs * log_probs, axis=1))
    np.add.at(self.prob_sums, split, probs)

  def result(self) -> dict[str, float]:
    """``inception_score`` (mean over splits), ``inception_score_std``,
    ``quality_score`` and ``diversity_score`` (over all images)."""
    if self.counts.sum() != len(self.assignment):
      raise ValueError(f"the Inception Score expects {len(self.assignment)} images, got "
                       f"{self.counts.sum()}")
    scores = np.exp(self.neg_entropy_sums / self.counts
                    + _float64_entropy(self.prob_sums / self.counts[:, None]))
    total = self.counts.sum()
    return {"inception_score": float(np.mean(scores)),
            "inception_score_std": float(np.std(scores)),
            "quality_score": float(np.exp(self.neg_entropy_sums.sum() / total)),
            "diversity_score": float(np.exp(_float64_entropy(self.prob_sums.sum(0) / total)))}


def _float64_entropy(probs: np.ndarray) -> np.ndarray:
  """Shannon entropy (nats) over the last axis in float64, with ``0 log 0 = 0``."""
  probs = np.asarray(probs, np.float64)
  logs = np.log(np.where(probs > 0, probs, 1.0))
  return -np.sum(probs * logs, axis=-1)


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
