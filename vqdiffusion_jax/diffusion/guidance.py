"""Operations on the network's x0 log-probabilities used when sampling.

All take and return class-last ``(..., K + 1)`` log-probabilities with [MASK]
last, as produced by ``discrete.x0_log_probs``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from vqdiffusion_jax.diffusion.discrete import LOG_PROB_MIN


def _ordered_keys(x: jax.Array) -> jax.Array:
  """int32 keys in the order of the float32 values ``x`` (an increasing map)."""
  bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def truncate(log_probs: jax.Array, rate: float | jax.Array) -> jax.Array:
  """Keeps, per position, the most likely classes covering mass ``rate``.

  A class survives when the probability mass of the classes ranked above it
  is below ``rate`` (the most likely class always survives); the others get
  log-probability -70, without renormalising, as in the official sampler.
  Classes tied with the last survivor survive too.

  The official code sorts every position's classes. Here the last survivor
  is found by bisection instead, over the 2^32 float32 values in their
  order: 32 masked sums per position, several times faster than a sort on
  CPUs and exactly the same classes.

  Args:
    log_probs: (..., C) log-probabilities.
    rate: truncation rate r (0.86 in the paper).

  Returns:
    (..., C) truncated log-probabilities.
  """
  probs = jnp.exp(log_probs)
  keys = _ordered_keys(log_probs)
  top = jnp.max(keys, axis=-1)

  def narrow(_, bounds):
    # Invariant: the mass above ``low`` is at least ``rate``, above ``high`` below it.
    low, high = bounds
    mid = (low >> 1) + (high >> 1) + (low & high & 1)  # floor((low + high) / 2), no overflow
    above = jnp.sum(jnp.where(keys > mid[..., None], probs, 0.0), axis=-1)
    enough = above >= rate
    return jnp.where(enough, mid, low), jnp.where(enough, high, mid)

  low, _ = lax.fori_loop(0, 32, narrow, (jnp.min(keys, axis=-1) - 1, top))
  keep = (keys > low[..., None]) | (keys == top[..., None])
  return jnp.where(keep, log_probs, LOG_PROB_MIN)


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
