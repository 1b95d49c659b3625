"""The mask-and-replace discrete diffusion process and its training loss.

Layout: log-probabilities are class-last, ``(B, N, K + 1)``, with [MASK] at
index K; token arrays are ``(B, N)`` ints; timesteps ``t`` are 0-based (0..T-1)
as in the official code, given per sample ``(B,)`` or as a scalar.

Every transition is applied in closed form ("vectorised one-hot transitions"):
no (K + 1)^2 matrix is ever built. Numerical conventions follow the official
``microsoft/VQ-Diffusion`` code, which is what parity means:

* a log one-hot vector is ``log(max(onehot, 1e-30))``, so "zero" is
  ``LOG_ZERO = log(1e-30) ~ -69.08`` rather than -inf;
* model log-probabilities and posteriors are clamped to ``[-70, 0]``, and the
  model's x0 distribution gets a constant ``-70`` entry for [MASK];
* the loss is the variational bound (KL of posteriors, decoder NLL at t = 0)
  plus the auxiliary x0 term, each divided by p(t), summed over the batch and
  divided by B * N.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from vqdiffusion_jax.diffusion import fused
from vqdiffusion_jax.diffusion.logspace import (
  LOG_PROB_MIN,
  LOG_ZERO,
  log1mexp,
  log_onehot,
  multinomial_kl,
  x0_log_probs,
)
from vqdiffusion_jax.diffusion.schedule import Schedule, Transition, cumulative, multistep, step

__all__ = [
    "LOG_PROB_MIN", "LOG_ZERO", "apply_transition", "log_onehot", "loss_terms",
    "multinomial_kl", "p_prev", "q_posterior", "q_posterior_tokens", "q_sample",
    "q_xt_given_x0", "q_xt_given_xtm1", "sample_categorical", "training_losses",
    "vb_loss", "x0_log_probs",
]

def _per_sample(value: jax.Array) -> jax.Array:
  """Broadcasts a per-sample (B,) or scalar parameter over (B, N, C)."""
  return jnp.asarray(value)[..., None, None]


def apply_transition(log_x: jax.Array, transition: Transition) -> jax.Array:
  """log of ``x Q`` for a distribution x over K + 1 classes (row vector).

  Codebook classes: ``a x_j + b (1 - x_mask)``; [MASK]: ``(1 - c) x_mask +
  c``, which is ``x_mask + c (1 - x_mask)``. For the official inputs
  (x_mask = 1e-30) this equals the official ``q_pred`` bit for bit, and it is
  exact for any normalised x.

  Args:
    log_x: (..., N, K + 1) log-probabilities.
    transition: per-sample log parameters of Q, shaped (B,) or scalar.

  Returns:
    (..., N, K + 1) log-probabilities.
  """
  log_a, log_b, log_c, log_1m_c = map(_per_sample, transition)
  log_x_codebook, log_x_mask = log_x[..., :-1], log_x[..., -1:]
  codebook = jnp.logaddexp(log_x_codebook + log_a, log_b + log1mexp(log_x_mask))
  mask = jnp.logaddexp(log_x_mask + log_1m_c, log_c)
  return jnp.concatenate([codebook, mask], axis=-1)


def q_xt_given_x0(schedule: Schedule, log_x0: jax.Array, t: jax.Array) -> jax.Array:
  """q(x_t | x_0): applies Qbar_t = Q_t ... Q_0 (t = -1 is the identity).

  Args:
    schedule: the noise schedule.
    log_x0: (B, N, K + 1) log-probabilities of x_0 (one-hot or not).
    t: (B,) or scalar int in -1..T-1.

  Returns:
    (B, N, K + 1) log q(x_t | x_0).
  """
  return apply_transition(log_x0, cumulative(schedule, t))


def q_xt_given_xtm1(schedule: Schedule, log_x: jax.Array, t: jax.Array) -> jax.Array:
  """q(x_t | x_{t-1}): applies the one-step matrix Q_t (t in 0..T-1)."""
  return apply_transition(log_x, step(schedule, t))


def q_posterior_tokens(schedule: Schedule, log_x0: jax.Array, x_t: jax.Array,
                       t: jax.Array, s: jax.Array | None = None) -> jax.Array:
  """``sum_{x0} q(x_s | x_t, x0) p(x0)`` for tokens x_t, s = t - 1 by default.

  With a one-hot ``log_x0`` this is the true posterior; with the network's
  prediction it is p_theta(x_s | x_t). Computed as the official code does:
  ``p(x0) / q(x_t | x0)`` normalised, carried to step s by Qbar_s, times
  q(x_t | x_s), with the normaliser restored, clamped to [-70, 0].

  Args:
    schedule: the noise schedule.
    log_x0: (B, N, K + 1) log-probabilities of x_0 ([MASK] entry ignored).
    x_t: (B, N) int tokens at step t, [MASK] = K.
    t: (B,) or scalar int, 0..T-1.
    s: earlier step, -1..t-1 (skip-step sampling); None means t - 1.

  Returns:
    (B, N, K + 1) log-probabilities of x_s.
  """
  num_codes = schedule.codebook_size
  t = jnp.asarray(t)
  if s is None:
    s, to_t = t - 1, step(schedule, t)
  else:
    s = jnp.asarray(s)
    to_t = multistep(schedule, t, s)
  cum_t = cumulative(schedule, t)

  is_mask = (x_t == num_codes)[..., None]
  onehot_codebook = log_onehot(x_t, num_codes + 1)[..., :-1]
  log_q_xt_given_x0 = jnp.where(
      is_mask, _per_sample(cum_t.log_c),
      jnp.logaddexp(onehot_codebook + _per_sample(cum_t.log_a), _per_sample(cum_t.log_b)))
  log_q_xt_given_xs = jnp.concatenate([
      jnp.where(is_mask, _per_sample(to_t.log_c),
                jnp.logaddexp(onehot_codebook + _per_sample(to_t.log_a),
                              _per_sample(to_t.log_b))),
      jnp.where(is_mask, 0.0, LOG_ZERO),
  ], axis=-1)

  ratio = log_x0[..., :-1] - log_q_xt_given_x0
  ratio = jnp.concatenate([ratio, jnp.full_like(ratio[..., :1], LOG_ZERO)], axis=-1)
  log_norm = jax.nn.logsumexp(ratio, axis=-1, keepdims=True)
  carried = apply_transition(ratio - log_norm, cumulative(schedule, s))
  return jnp.clip(carried + log_q_xt_given_xs + log_norm, LOG_PROB_MIN, 0.0)


def q_posterior(schedule: Schedule, log_x0: jax.Array, log_xt: jax.Array,
                t: jax.Array, s: jax.Array | None = None) -> jax.Array:
  """``q_posterior_tokens`` for a log one-hot x_t, the official signature.

  Args:
    schedule: the noise schedule.
    log_x0: (B, N, K + 1) log-probabilities of x_0.
    log_xt: (B, N, K + 1) log one-hot of x_t.
    t: (B,) or scalar int, 0..T-1.
    s: earlier step (default t - 1).

  Returns:
    (B, N, K + 1) log-probabilities of x_s.
  """
  return q_posterior_tokens(schedule, log_x0, jnp.argmax(log_xt, axis=-1), t, s)


def p_prev(schedule: Schedule, logits: jax.Array, x_t: jax.Array, t: jax.Array,
           s: jax.Array | None = None) -> jax.Array:
  """p_theta(x_s | x_t) from the network's x0 logits (s = t - 1 by default).

  Args:
    schedule: the noise schedule.
    logits: (B, N, K) network output.
    x_t: (B, N) int tokens at step t.
    t: (B,) or scalar int.
    s: earlier step, -1..t-1; t - s is the skip-step stride.

  Returns:
    (B, N, K + 1) log-probabilities of x_s.
  """
  return q_posterior_tokens(schedule, x0_log_probs(logits), x_t, t, s)


def sample_categorical(rng: jax.Array, log_probs: jax.Array) -> jax.Array:
  """Draws class indices from class-last (unnormalised) log-probabilities.

  By inverting the cumulative distribution with one uniform per position:
  Gumbel-max would draw one per class, which costs more than the rest of
  the draw on CPUs. A class of probability 0 is never drawn.
  """
  positions = jax.typeof(log_probs[..., 0]).sharding
  probs = jnp.exp(log_probs - jnp.max(log_probs, axis=-1, keepdims=True))
  cumulative = jnp.cumsum(probs, axis=-1)
  # In (0, total]: the first class whose cumulative mass reaches it has mass.
  u = 1.0 - jax.random.uniform(rng, log_probs.shape[:-1], out_sharding=positions)
  return jnp.sum(cumulative < (u[..., None] * cumulative[..., -1:]), axis=-1)


def q_sample(schedule: Schedule, rng: jax.Array, x0: jax.Array, t: jax.Array) -> jax.Array:
  """Draws x_t ~ q(x_t | x_0) for tokens x_0, without a (K + 1)-wide array.

  A token becomes [MASK] with probability cbar_t, a uniformly drawn codebook
  token (possibly itself) with probability K bbar_t, and stays otherwise;
  this is the distribution of ``q_xt_given_x0`` on a one-hot x_0.

  Args:
    schedule: the noise schedule.
    rng: a PRNG key.
    x0: (B, N) int codebook tokens.
    t: (B,) or scalar int, 0..T-1.

  Returns:
    (B, N) int tokens x_t.
  """
  num_codes = schedule.codebook_size
  cum = cumulative(schedule, t)
  p_mask = jnp.exp(cum.log_c)[..., None]
  p_replace = num_codes * jnp.exp(cum.log_b)[..., None]
  rng_u, rng_token = jax.random.split(rng)
  # Drawn with x0's sharding: a no-op on Auto meshes, required on Explicit ones.
  like_x0 = jax.typeof(x0).sharding
  u = jax.random.uniform(rng_u, x0.shape, out_sharding=like_x0)
  replacement = jax.random.randint(rng_token, x0.shape, 0, num_codes, dtype=x0.dtype,
                                   out_sharding=like_x0)
  return jnp.where(u < p_mask, jnp.asarray(num_codes, x0.dtype),
                   jnp.where(u < p_mask + p_replace, replacement, x0))


def loss_terms(schedule: Schedule, log_x0_model: jax.Array, x0: jax.Array,
               x_t: jax.Array, t: jax.Array,
               mask_weight: Sequence[float] = (1.0, 1.0)) -> tuple[jax.Array, jax.Array]:
  """Per-sample loss terms, each summed over positions, before 1 / p(t).

  ``vb``: ``KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))``, weighted
  per position by ``mask_weight[0]`` where x_t is [MASK] and
  ``mask_weight[1]`` elsewhere. ``aux``: ``KL(x_0 || p_theta(x~_0 | x_t))``
  over the K codebook classes, weighted alike. At t = 0 both are the decoder
  NLL ``-log p_theta(x_0 | x_1)``, unweighted, as in the official code.

  Args:
    schedule: the noise schedule.
    log_x0_model: (B, N, K + 1) the network's x0 log-probs (``x0_log_probs``).
    x0: (B, N) int clean tokens.
    x_t: (B, N) int noised tokens.
    t: (B,) int steps.
    mask_weight: (masked, unmasked) position weights.

  Returns:
    ``(vb, aux)``, each (B,).
  """
  log_true_x0 = log_onehot(x0, schedule.num_classes)
  log_model = q_posterior_tokens(schedule, log_x0_model, x_t, t)
  log_true = q_posterior_tokens(schedule, log_true_x0, x_t, t)
  weights = jnp.where(x_t == schedule.mask_index, mask_weight[0], mask_weight[1])
  kl = jnp.sum(multinomial_kl(log_true, log_model) * weights, axis=-1)
  kl_x0 = multinomial_kl(log_true_x0[..., :-1], log_x0_model[..., :-1])
  kl_x0 = jnp.sum(kl_x0 * weights, axis=-1)
  decoder_nll = -jnp.sum(jnp.exp(log_true_x0) * log_model, axis=(-2, -1))
  at_start = t == 0
  return jnp.where(at_start, decoder_nll, kl), jnp.where(at_start, decoder_nll, kl_x0)


def vb_loss(schedule: Schedule, log_x0_model: jax.Array, x0: jax.Array,
            x_t: jax.Array, t: jax.Array,
            mask_weight: Sequence[float] = (1.0, 1.0)) -> jax.Array:
  """Per-sample variational-bound term L_t (B,); see ``loss_terms``."""
  return loss_terms(schedule, log_x0_model, x0, x_t, t, mask_weight)[0]


def training_losses(schedule: Schedule, logits: jax.Array, x0: jax.Array,
                    x_t: jax.Array, t: jax.Array, pt: jax.Array, *,
                    aux_weight: float = 0.0, adaptive_aux: bool = True,
                    mask_weight: Sequence[float] = (1.0, 1.0),
                    max_chunk_elements: int = fused.DEFAULT_CHUNK_ELEMENTS
                    ) -> dict[str, jax.Array]:
  """The official training objective for one batch.

  ``loss = sum_b [L_t / p(t) + w(t) * aux_weight * L_aux / p(t)] / (B * N)``
  with ``w(t) = (1 - t / T) + 1`` when ``adaptive_aux`` (else 1), and the
  per-sample terms of ``loss_terms``. Computed by ``fused.position_terms``,
  which holds no (B, N, K) temporary in the forward or backward pass.

  Args:
    schedule: the noise schedule.
    logits: (B, N, K) network output at (x_t, t).
    x0: (B, N) int clean tokens.
    x_t: (B, N) int noised tokens.
    t: (B,) int steps.
    pt: (B,) probability with which each t was drawn.
    aux_weight: lambda of the auxiliary x0 loss (5e-4 in the official
      text-to-image configs; 0 disables it).
    adaptive_aux: scale the auxiliary term by (1 - t/T) + 1.
    mask_weight: (masked, unmasked) position weights.
    max_chunk_elements: positions are processed in slices of at most this
      many (B, chunk, K) elements, bounding the loss's temporaries.

  Returns:
    ``loss`` (scalar to minimise), ``vb`` (B,) per-sample L_t (what the
    importance sampler's history tracks) and ``aux`` (B,) per-sample L_aux.
  """
  kl, nll, kl_x0 = fused.position_terms(schedule, logits, x0, x_t, t,
                                        max_chunk_elements=max_chunk_elements)
  weights = jnp.where(x_t == schedule.mask_index, mask_weight[0], mask_weight[1])
  decoder_nll = jnp.sum(nll, axis=-1)
  at_start = t == 0
  vb = jnp.where(at_start, decoder_nll, jnp.sum(kl * weights, axis=-1))
  aux = jnp.where(at_start, decoder_nll, jnp.sum(kl_x0 * weights, axis=-1))
  total = vb / pt
  if aux_weight:
    scale = (1.0 - t / schedule.num_timesteps) + 1.0 if adaptive_aux else 1.0
    total = total + scale * aux_weight * aux / pt
  batch, length = x0.shape
  return {"loss": jnp.sum(total) / (batch * length), "vb": vb, "aux": aux}
