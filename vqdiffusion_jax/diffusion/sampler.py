"""The basic VQ-Diffusion reverse process, one compiled ``lax`` loop.

From all-[MASK] tokens, each step draws ``x_{t-1} ~ p_theta(x_{t-1} | x_t)``
(every step, no guidance); the last step draws x_0. Training uses it for
periodic sample grids; the full set of samplers (skip steps, truncation,
guidance, purity, fewer tokens) builds on it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from vqdiffusion_jax.diffusion import discrete
from vqdiffusion_jax.diffusion.schedule import Schedule

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def sample(denoise: DenoiseFn, schedule: Schedule, rng: jax.Array, batch_size: int,
           num_tokens: int) -> jax.Array:
  """Draws token sequences by the full reverse process.

  Args:
    denoise: ``(x_t (B, N) int, t (B,) int) -> (B, N, K)`` x0 logits, with
      the condition closed over.
    schedule: the noise schedule.
    rng: a PRNG key; the result is a deterministic function of it.
    batch_size: B.
    num_tokens: N.

  Returns:
    (B, N) int32 codebook tokens in [0, K).
  """
  num_steps = schedule.num_timesteps

  def step(i, carry):
    x_t, key = carry
    t = jnp.full((batch_size,), num_steps - 1 - i, jnp.int32)
    key, draw = jax.random.split(key)
    log_p = discrete.p_prev(schedule, denoise(x_t, t), x_t, t)
    return discrete.sample_categorical(draw, log_p).astype(jnp.int32), key

  x_t = jnp.full((batch_size, num_tokens), schedule.mask_index, jnp.int32)
  tokens, _ = jax.lax.fori_loop(0, num_steps, step, (x_t, rng))
  return jnp.minimum(tokens, schedule.codebook_size - 1)
