"""Importance sampling of training timesteps, as in the official trainer.

The trainer keeps, per step t, a moving average of the squared loss ``L_t^2``
(``0.1 * new + 0.9 * old``) and a count of how often t was drawn. Until every
t has been drawn more than 10 times, t is uniform; afterwards ``p(t) ∝
sqrt(E[L_t^2]) + 1e-4``, with ``p(0)`` copied from ``p(1)`` (the decoder term
is on another scale). The history is plain state: it lives in the train state
and is checkpointed with it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

MIN_COUNT = 10
HISTORY_DECAY = 0.9


@struct.dataclass
class LossHistory:
  """Per-timestep loss statistics.

  Attributes:
    lt2: (T,) moving average of the squared per-sample loss L_t^2.
    count: (T,) int32, how many samples have been drawn at each t.
  """

  lt2: jax.Array
  count: jax.Array

  @classmethod
  def create(cls, num_timesteps: int) -> LossHistory:
    return cls(lt2=jnp.zeros((num_timesteps,), jnp.float32),
               count=jnp.zeros((num_timesteps,), jnp.int32))


def timestep_probs(history: LossHistory) -> jax.Array:
  """(T,) probabilities of drawing each t, uniform until the history is warm."""
  num_timesteps = history.lt2.shape[0]
  weights = jnp.sqrt(history.lt2 + 1e-10) + 1e-4
  weights = weights.at[0].set(weights[1])
  importance = weights / jnp.sum(weights)
  warm = jnp.all(history.count > MIN_COUNT)
  return jnp.where(warm, importance, jnp.full_like(importance, 1.0 / num_timesteps))


def sample_timesteps(rng: jax.Array, history: LossHistory,
                     batch_size: int) -> tuple[jax.Array, jax.Array]:
  """Draws ``batch_size`` steps with replacement.

  Returns:
    ``(t, pt)``: (B,) int32 steps and the (B,) probability of each.
  """
  probs = timestep_probs(history)
  t = jax.random.categorical(rng, jnp.log(probs), shape=(batch_size,))
  return t.astype(jnp.int32), probs[t]


def update_history(history: LossHistory, t: jax.Array, vb: jax.Array) -> LossHistory:
  """Folds one batch's per-sample losses into the history.

  As in the official code each drawn t moves ``lt2[t]`` once, from its value
  before the batch; where a batch draws the same t several times the last
  sample in the batch wins (the official scatter leaves that unspecified),
  while ``count`` counts every draw.

  Args:
    history: the current statistics.
    t: (B,) int steps of the batch.
    vb: (B,) per-sample loss L_t (``training_losses(...)["vb"]``).

  Returns:
    The updated history.
  """
  num_timesteps = history.lt2.shape[0]
  lt2 = jax.lax.stop_gradient(vb.astype(jnp.float32)) ** 2
  drawn = t[:, None] == jnp.arange(num_timesteps)[None, :]
  position = jnp.arange(t.shape[0])[:, None]
  last = jnp.max(jnp.where(drawn, position, -1), axis=0)
  # Select-and-sum rather than a gather, so a batch-sharded t works on any mesh.
  lt2_last = jnp.sum(jnp.where(position == last[None, :], lt2[:, None], 0.0), axis=0)
  updated = (1.0 - HISTORY_DECAY) * lt2_last + HISTORY_DECAY * history.lt2
  return LossHistory(lt2=jnp.where(last >= 0, updated, history.lt2),
                     count=history.count + jnp.sum(drawn, axis=0, dtype=jnp.int32))
