"""Operations on the network's x0 log-probabilities used when sampling.

All take and return class-last ``(..., K + 1)`` log-probabilities with [MASK]
last, as produced by ``discrete.x0_log_probs``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vqdiffusion_jax.diffusion.discrete import LOG_PROB_MIN


def truncate(log_probs: jax.Array, rate: float | jax.Array) -> jax.Array:
  """Keeps, per position, the most likely classes covering mass ``rate``.

  A class survives when the probability mass of the classes ranked above it
  is below ``rate`` (the most likely class always survives); the others get
  log-probability -70, without renormalising, as in the official sampler.
  Classes tied with the last survivor survive too.

  Args:
    log_probs: (..., C) log-probabilities.
    rate: truncation rate r (0.86 in the paper).

  Returns:
    (..., C) truncated log-probabilities.
  """
  ranked = -jnp.sort(-log_probs, axis=-1)
  mass_above = jnp.cumsum(jnp.exp(ranked), axis=-1)[..., :-1]
  num_kept = 1 + jnp.sum(mass_above < rate, axis=-1, keepdims=True)
  threshold = jnp.take_along_axis(ranked, num_kept - 1, axis=-1)
  return jnp.where(log_probs >= threshold, log_probs, LOG_PROB_MIN)


def guide(log_p_cond: jax.Array, log_p_uncond: jax.Array,
          scale: float | jax.Array) -> jax.Array:
  """Discrete classifier-free guidance on x0 log-probs (Improved VQ-Diffusion).

  ``log p = log p_u + scale * (log p_c - log p_u)`` over the K codebook
  classes, renormalised and clamped to [-70, 0]; [MASK] gets -70. scale = 1
  returns the conditional distribution (the paper writes the scale as s + 1).

  Args:
    log_p_cond: (..., K + 1) conditional x0 log-probs.
    log_p_uncond: (..., K + 1) log-probs given the null text embedding.
    scale: guidance scale.

  Returns:
    (..., K + 1) guided log-probs.
  """
  cond, uncond = log_p_cond[..., :-1], log_p_uncond[..., :-1]
  guided = uncond + scale * (cond - uncond)
  guided = jnp.clip(guided - jax.nn.logsumexp(guided, axis=-1, keepdims=True),
                    LOG_PROB_MIN, 0.0)
  return jnp.concatenate([guided, jnp.full_like(guided[..., :1], LOG_PROB_MIN)], axis=-1)


def purity(log_x0: jax.Array) -> jax.Array:
  """Purity of each position: its largest codebook probability, (...,)."""
  return jnp.exp(jnp.max(log_x0[..., :-1], axis=-1))
