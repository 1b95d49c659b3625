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
``train``. The evaluation that follows is ``report.write_report``. The
workdir may be a URL (``gs://``); the token cache, array_record files read
as local files, then needs a local ``data.cache_dir``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from vqdiffusion_jax import build, config_schema, extras, hosts, loading, outputs
from vqdiffusion_jax.data import loader, sources, token_cache
from vqdiffusion_jax.train import budget, denoiser_stage
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
  mesh = check_run(config, workdir)
  deadline = None
  if budget.enabled(config):
    deadline = time.monotonic() + 60 * float(config.time_budget.minutes)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  source = sources.split_source(config.data, config.data.train_split, workdir)
  if config.data.in_memory:
    source = loader.MemoizedSource(source)
  vqvae_dir = os.fspath(epath.Path(workdir) / loading.VQVAE_STAGE)
  vqvae = run_vqvae(config, vqvae_dir, mesh, source)
  cache_dir = build_cache(config, workdir, vqvae, source)
  denoiser_dir = os.fspath(epath.Path(workdir) / loading.DENOISER_STAGE)
  denoiser_step = run_denoiser(
      config, denoiser_dir, mesh, cache_dir, vqvae,
      time_left=None if deadline is None else lambda: deadline - time.monotonic())
  return {"vqvae": vqvae_dir, "token_cache": cache_dir, "denoiser": denoiser_dir,
          "denoiser_step": denoiser_step}


def check_run(config: Any, workdir: str) -> jax.sharding.Mesh:
  """What can be checked before any stage runs; returns the training mesh.

  The files the config needs, the mesh against this machine's devices, each
  trained stage's global batch against the mesh's batch shards, and the
  optional packages that reading CLIP or LPIPS weights takes.

  Raises:
    ValueError: naming the config key, its value and what would do.
    extras.MissingExtraError: a package of the ``torch`` extra the config needs.
  """
  config_schema.check_user_paths(config)
  if outputs.is_url(workdir) and not config.data.cache_dir:
    raise ValueError(f"data.cache_dir is empty and the workdir {workdir} is a URL: set "
                     "data.cache_dir to a local directory for the token cache (its "
                     "array_record files are written and read as local files)")
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  batches = {"train.global_batch": config.train.global_batch}
  if not config.vqvae.path:
    batches["vqvae.train.global_batch"] = config.vqvae.train.global_batch
  for key, value in batches.items():
    mesh_lib.batch_block(mesh, int(value), key)
  if config_schema.reads_text(config) and config.text.kind == "clip":
    extras.require("transformers", f"the CLIP tokenizer of text.clip_path={config.text.clip_path}")
  loss = config.vqvae.loss
  if not config.vqvae.path and float(loss.perceptual_weight) > 0:
    extras.require("torch", f"the LPIPS weights of vqvae.loss.lpips_vgg_path={loss.lpips_vgg_path}")
  return mesh


def build_cache(config: Any, workdir: str, vqvae: build.VQVAE, source) -> str:
  """Encodes the training split to tokens once, every process its share; returns the cache.

  With a frozen text encoder (``text.kind`` "clip") the cache also holds the
  features of every caption, made by that encoder; a cache in the workdir made
  with another encoder (or none) is rebuilt, one at ``data.cache_dir`` is
  refused.
  """
  cache_dir = config.data.cache_dir or os.path.join(workdir, loading.TOKEN_CACHE)
  text = denoiser_stage.frozen_text_encoder(config)
  identity = None if text is None else text.identity
  try:
    metadata = token_cache.TokenCacheSource(cache_dir).metadata
  except (FileNotFoundError, ValueError):
    metadata = None
  if metadata is not None:
    problem = denoiser_stage.features_mismatch(metadata, identity)
    if problem is None:
      return cache_dir
    if config.data.cache_dir:
      raise ValueError(f"token cache {cache_dir} (data.cache_dir) {problem}; delete it, or set "
                       "data.cache_dir to another directory, to build one for this run")
    logging.warning("Rebuilding the token cache %s: it %s.", cache_dir, problem)
  variables = jax.tree.map(hosts.to_host, vqvae.variables)
  encode = jax.jit(lambda v, x: vqvae.module.apply(v, x, method="encode"))
  token_cache.build_token_cache(
      source, lambda images: np.asarray(encode(variables, jnp.asarray(images))),
      cache_dir, codebook_size=vqvae.codebook_size, image_size=int(config.data.image_size),
      batch_size=64, description=f"{config.data.name} {config.data.train_split}",
      encode_text=None if text is None else text.encode, text_encoder=identity,
      overwrite=True)
  return cache_dir
