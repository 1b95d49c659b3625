"""The sampling program: a condition in, tokens and images out, as one function to jit.

``program(...)`` returns the whole request (encode the condition, run a sampler's
loop with guidance, decode the tokens) as a pure function of the params,
ids and key. ``Pipeline`` compiles one per sampler setting and batch shape;
the trainer's sample writer compiles one to draw from the EMA weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from vqdiffusion_jax.diffusion import samplers
from vqdiffusion_jax.diffusion.schedule import Schedule
from vqdiffusion_jax.models.denoiser import Denoiser
from vqdiffusion_jax.models.vqgan import VQGAN


def program(denoiser: Denoiser, schedule: Schedule, vqvae: VQGAN, config: samplers.SamplerConfig,
            grid: tuple[int, int], *, mix: bool = False, regions: bool = False,
            same_noise: bool = False) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """The sampling request as one pure function.

  Args:
    denoiser: the denoiser (and its text side).
    schedule: its noise schedule.
    vqvae: the VQ-VAE module that decodes the tokens.
    config: the sampler and its settings.
    grid: (h, w) of the token grid to sample.
    mix: condition on ``(1 - w) * text(ids[0]) + w * text(ids[1])`` with the
      per-image weights ``w``.
    regions: one image whose positions weigh the prompts' x0 distributions
      by ``weights`` (P, N).
    same_noise: every image from the same key (only the condition differs).

  Returns:
    ``run(params, text_params, vqvae_variables, ids, rng, weights, extra) ->
    (tokens (B, h * w), images (B, H, W, 3) in [0, 1])``: ``ids`` a list of
    (B, L) text ids (one per prompt of a region request, two to mix, else
    one), or one (B,) array of class labels or empty (B, 0) array for an
    unconditional network (``Denoiser.encode_condition``); ``weights`` the
    mix or region weights (or None) and ``extra`` the sampler's keyword
    inputs (known or initial tokens).
  """
  num_tokens = grid[0] * grid[1]
  guided = config.guidance_scale != 1.0

  def draw(params, features, rng, weights, extra):
    batch = features[0].shape[0]
    null = denoiser.null_condition(params, batch) if guided else None
    log_x0 = samplers.conditioned_log_x0(
        lambda x, t, c: denoiser.logits(params, x, t, c, grid), features, null,
        config.guidance_scale, region_weights=weights)
    return samplers.sample(log_x0, schedule, rng, (batch, num_tokens), config, **extra)

  def run(params, text_params, vqvae_variables, ids, rng, weights, extra):
    features = [denoiser.encode_condition(params, text_params, i) for i in ids]
    if mix:
      w = weights[:, None, None]
      features = [(1.0 - w) * features[0] + w * features[1]]
    if same_noise:
      one = lambda f: draw(params, [f[None]], rng, None, {})[0]  # noqa: E731
      tokens = jax.vmap(one)(features[0])
    else:
      tokens = draw(params, features, rng, weights if regions else None, extra)
    return tokens, decode(vqvae, vqvae_variables, tokens, grid)

  return run


def decode(vqvae: VQGAN, variables: Any, tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """(B, h * w) tokens -> (B, H, W, 3) images in [0, 1]."""
  images = vqvae.apply(variables, tokens.reshape(-1, *grid), method="decode")
  return jnp.clip((images + 1.0) / 2.0, 0.0, 1.0)
