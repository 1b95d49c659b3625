"""The training run: the VQ-VAE, then a token cache, then the denoiser.

``train(config, workdir)`` runs the stages in order, each in its own
directory under ``workdir`` (the layout in ``loading``) and each resumable: a
stage whose checkpoint has reached its step count is restored, not
retrained, and the token cache is built once (atomically). Every stage
trains with a jitted step whose state is sharded over the config's mesh,
reads batches from a checkpointable grain iterator whose position is saved
with the state, writes metrics from process 0, stops on NaN/Inf naming the
step, and on SIGTERM saves and ends the run (``runner.StopRequestedError``;
no later stage runs). With a ``config.time_budget`` the denoiser trains as
many steps as the time left holds (``budget.py``), counted from the call of
``train``. The evaluation that follows is ``report.write_report``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vqdiffusion_jax import build, hosts, loading
from vqdiffusion_jax.data import loader, sources, token_cache
from vqdiffusion_jax.train import budget
from vqdiffusion_jax.train import mesh as mesh_lib
from vqdiffusion_jax.train.denoiser_stage import run_denoiser
from vqdiffusion_jax.train.vqvae_stage import run_vqvae


def train(config: Any, workdir: str) -> dict:
  """Runs every training stage of the experiment.

  Args:
    config: the experiment config (``config_schema``).
    workdir: the run's directory (created if needed).

  Returns:
    ``{"vqvae": ..., "token_cache": ..., "denoiser": ..., "denoiser_step": ...}``:
    the stages' directories and the denoiser's final step.

  Raises:
    runner.StopRequestedError: a stage stopped on SIGTERM or preemption (its
      checkpoint saved); the later stages did not run.
  """
  deadline = None
  if budget.enabled(config):
    deadline = time.monotonic() + 60 * float(config.time_budget.minutes)
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  source = sources.split_source(config.data, config.data.train_split, workdir)
  if config.data.in_memory:
    source = loader.MemoizedSource(source)
  vqvae_dir = os.path.join(workdir, loading.VQVAE_STAGE)
  vqvae = run_vqvae(config, vqvae_dir, mesh, source)
  cache_dir = build_cache(config, workdir, vqvae, source)
  denoiser_dir = os.path.join(workdir, loading.DENOISER_STAGE)
  denoiser_step = run_denoiser(
      config, denoiser_dir, mesh, cache_dir, vqvae,
      time_left=None if deadline is None else lambda: deadline - time.monotonic())
  return {"vqvae": vqvae_dir, "token_cache": cache_dir, "denoiser": denoiser_dir,
          "denoiser_step": denoiser_step}


def build_cache(config: Any, workdir: str, vqvae: build.VQVAE, source) -> str:
  """Encodes the training split to tokens once (on process 0); returns the cache directory."""
  cache_dir = config.data.cache_dir or os.path.join(workdir, loading.TOKEN_CACHE)
  with hosts.process_zero_first("vqdiffusion_jax_token_cache"):
    try:
      token_cache.TokenCacheSource(cache_dir)
      return cache_dir
    except (FileNotFoundError, ValueError):
      pass
    encode = jax.jit(lambda v, x: vqvae.module.apply(v, x, method="encode"))
    token_cache.build_token_cache(
        source, lambda images: np.asarray(encode(vqvae.variables, jnp.asarray(images))),
        cache_dir, codebook_size=vqvae.codebook_size, image_size=int(config.data.image_size),
        batch_size=64, description=f"{config.data.name} {config.data.train_split}",
        overwrite=True)
  return cache_dir
