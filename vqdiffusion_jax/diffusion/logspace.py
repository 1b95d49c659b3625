"""Log-space conventions shared by the diffusion modules.

They follow the official ``microsoft/VQ-Diffusion`` code: "zero" in a log
one-hot vector is ``log(1e-30)``, network and posterior log-probabilities are
clamped to ``[-70, 0]``, and the network's x0 distribution carries a constant
-70 entry for [MASK].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

LOG_ZERO = float(np.log(np.float32(1e-30)))
LOG_PROB_MIN = -70.0


def log1mexp(x: jax.Array) -> jax.Array:
  """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012)."""
  x = jnp.minimum(x, 0.0)
  return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def log_onehot(x: jax.Array, num_classes: int) -> jax.Array:
  """``log(max(onehot(x), 1e-30))`` in float32, class-last."""
  hit = x[..., None] == jnp.arange(num_classes, dtype=x.dtype)
  return jnp.where(hit, 0.0, LOG_ZERO).astype(jnp.float32)


def x0_log_probs(logits: jax.Array) -> jax.Array:
  """Network logits (B, N, K) -> official x0 log-probs (B, N, K + 1).

  Log-softmax in float32, a constant -70 entry for [MASK], clamped to
  [-70, 0].
  """
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  log_p = jnp.concatenate([log_p, jnp.full_like(log_p[..., :1], LOG_PROB_MIN)], axis=-1)
  return jnp.clip(log_p, LOG_PROB_MIN, 0.0)


def multinomial_kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """KL(p || q) over the last axis, as the official ``multinomial_kl``."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
