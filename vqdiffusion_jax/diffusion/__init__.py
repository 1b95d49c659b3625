"""Discrete (mask-and-replace) diffusion over image tokens, in log space.

Modules:
  schedule: noise schedules as log tables (official ``alpha1``, cosine,
    uniform-only) and the transition parameters they imply.
  discrete: the forward process, posteriors, p_theta from x0 logits, forward
    sampling and the official training loss.
  guidance: truncation, classifier-free guidance and purity on x0 log-probs.
  importance: the importance sampler of training timesteps.
  samplers: every sampler (reverse process with exact or official skip
    steps, fewer tokens, the official purity prior, Paella renoising), each
    one compiled loop, with guidance, truncation, inpainting and editing.
"""

from vqdiffusion_jax.diffusion import discrete, guidance, importance, samplers, schedule
from vqdiffusion_jax.diffusion.discrete import (
    LOG_PROB_MIN,
    LOG_ZERO,
    apply_transition,
    log_onehot,
    loss_terms,
    multinomial_kl,
    p_prev,
    q_posterior,
    q_posterior_tokens,
    q_sample,
    q_xt_given_x0,
    q_xt_given_xtm1,
    sample_categorical,
    training_losses,
    vb_loss,
    x0_log_probs,
)
from vqdiffusion_jax.diffusion.guidance import guide, purity, truncate
from vqdiffusion_jax.diffusion.importance import (
    LossHistory,
    sample_timesteps,
    timestep_probs,
    update_history,
)
from vqdiffusion_jax.diffusion.samplers import SamplerConfig, conditioned_log_x0, sample
from vqdiffusion_jax.diffusion.schedule import Schedule, Transition

__all__ = [
    "LOG_PROB_MIN", "LOG_ZERO", "LossHistory", "SamplerConfig", "Schedule", "Transition",
    "apply_transition", "conditioned_log_x0", "discrete", "guidance", "guide", "importance",
    "log_onehot", "loss_terms", "multinomial_kl", "p_prev", "purity",
    "q_posterior", "q_posterior_tokens", "q_sample", "q_xt_given_x0",
    "q_xt_given_xtm1", "sample", "sample_categorical", "samplers", "sample_timesteps", "schedule",
    "timestep_probs", "training_losses", "truncate", "update_history",
    "vb_loss", "x0_log_probs",
]
