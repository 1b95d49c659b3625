"""The training run: tokenizer, then a token cache, then the denoiser.

``train_and_evaluate(config, workdir)`` runs the stages in order, each in its
own directory under ``workdir`` and each resumable: a stage whose checkpoint
has reached its step count is restored, not retrained, and the token cache is
built once (atomically). Every stage trains with a jitted step whose state is
sharded over the config's mesh, reads batches from a checkpointable grain
iterator whose position is saved with the state, writes metrics from process
0, stops on NaN/Inf naming the step, and saves and exits cleanly on SIGTERM.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqdiffusion_jax.data import pipeline, shapes, token_cache
from vqdiffusion_jax.models import discriminator as disc_lib
from vqdiffusion_jax.models import lpips as lpips_lib
from vqdiffusion_jax.models.vqgan import VQGAN, VQGANConfig
from vqdiffusion_jax.train import mesh as mesh_lib
from vqdiffusion_jax.train import state as state_lib
from vqdiffusion_jax.train import tokenizer_step
from vqdiffusion_jax.train.denoiser_stage import run_denoiser
from vqdiffusion_jax.train.runner import Stage, run_stage, to_global


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A trained (or loaded) VQ tokenizer: its module, variables and image size."""

  module: VQGAN
  variables: dict
  image_size: int

  @property
  def grid(self) -> tuple[int, int]:
    side = self.image_size // self.module.config.downsampling_factor
    return side, side


def train_and_evaluate(config: Any, workdir: str) -> dict:
  """Runs every stage of the experiment; returns a summary of where things are.

  Args:
    config: the experiment config (``configs/common.py`` schema).
    workdir: the run's directory (created if needed).

  Returns:
    ``{"tokenizer": ..., "token_cache": ..., "denoiser": ...}`` paths and
    final steps.
  """
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  source = train_source(config, workdir)
  tokenizer = run_tokenizer(config, os.path.join(workdir, "tokenizer"), mesh, source)
  cache_dir = build_cache(config, workdir, tokenizer, source)
  denoiser_step = run_denoiser(config, os.path.join(workdir, "denoiser"), mesh, cache_dir,
                               tokenizer)
  return {"tokenizer": os.path.join(workdir, "tokenizer"), "token_cache": cache_dir,
          "denoiser": os.path.join(workdir, "denoiser"), "denoiser_step": denoiser_step}


def train_source(config: Any, workdir: str):
  """The training split as a random-access source; builds the shapes data if needed."""
  data = config.data
  if data.name == "shapes":
    data_dir = data.data_dir or os.path.join(workdir, "data")
    kwargs = {k: v for k, v in (("num_train", data.num_train), ("num_test", data.num_test)) if v}
    return shapes.build(data_dir, data.image_size, **kwargs).as_data_source(
        split=data.train_split)
  return pipeline.tfds_source(data.name, data.train_split, data.data_dir)


def tokenizer_module(config: Any) -> VQGAN:
  model = {k: tuple(v) if isinstance(v, list) else v
           for k, v in config.tokenizer.model.to_dict().items()}
  return VQGAN(VQGANConfig(**model), dtype=jnp.dtype(config.train.dtype))


def run_tokenizer(config: Any, directory: str, mesh, source) -> Tokenizer:
  """Trains the VQ tokenizer (or loads ``config.tokenizer.path``)."""
  size = int(config.data.image_size)
  if config.tokenizer.path:
    from vqdiffusion_jax.convert import load_vqvae  # noqa: PLC0415
    module, params = load_vqvae(config.tokenizer.path)
    return Tokenizer(module, {"params": params}, size)
  module = tokenizer_module(config)
  loss_config = config.tokenizer.loss
  use_gan = float(loss_config.disc_weight) > 0
  optim = config.tokenizer.optim
  make_opt = lambda: optax.adam(optim.learning_rate, b1=optim.b1, b2=optim.b2)  # noqa: E731
  images = jnp.zeros((1, size, size, 3))
  rules = config.mesh.rules
  parts = {"generator": (lambda r: module.init(r, images), make_opt())}
  if use_gan:
    disc = disc_lib.NLayerDiscriminator(base_channels=loss_config.disc_channels,
                                        num_layers=loss_config.disc_layers)
    parts["discriminator"] = (lambda r: disc.init(r, images), make_opt())
  rng = jax.random.key(int(config.seed))
  shardings = {k: state_lib.state_shardings(rng, f, o, mesh, rules) for k, (f, o) in parts.items()}
  abstract = tokenizer_step.TokenizerState(**{
      k: state_lib.abstract_state(rng, f, o, mesh, rules) for k, (f, o) in parts.items()})

  def init_state(params=None):
    del params
    return tokenizer_step.TokenizerState(**{
        k: state_lib.create_state(jax.random.fold_in(rng, i), f, o, mesh, rules)[0]
        for i, (k, (f, o)) in enumerate(parts.items())})

  lpips_params = None
  if float(loss_config.perceptual_weight) > 0:
    lpips_params = lpips_lib.load_lpips(loss_config.lpips_vgg_path, loss_config.lpips_heads_path)
  step = tokenizer_step.make_train_step(module, disc if use_gan else None, loss_config,
                                        parts["generator"][1], parts.get("discriminator",
                                                                         (None, None))[1])
  state_shardings = tokenizer_step.TokenizerState(**shardings)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  replicated = mesh_lib.replicated(mesh)
  jitted = jax.jit(step, in_shardings=(state_shardings, batch_sharding, replicated, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  tokenizer_batch = int(config.tokenizer.train.global_batch)

  def batches():
    return pipeline.image_batches(
        source, image_size=size, seed=int(config.seed), caption_dropout=0.0,
        batch_size=pipeline.per_host_batch(tokenizer_batch, jax.process_count()),
        process_index=jax.process_index(), process_count=jax.process_count(),
        random_flip=bool(config.data.random_flip), random_crop=bool(config.data.random_crop))

  reconstruct = jax.jit(lambda v, x: module.apply(v, x)[0])

  def write_reconstructions(step, state, batch, writer):
    images = jnp.asarray(batch["image"][:8])
    variables = {"params": state.generator.params, **state.generator.extra}
    writer.write_images(step, "reconstructions",
                        np.concatenate([images, reconstruct(variables, images)]))

  final = run_stage(config, Stage(
      directory=directory, num_steps=int(config.tokenizer.train.num_steps),
      abstract_state=abstract, init_state=init_state, batches=batches,
      step_fn=lambda s, b, r: jitted(s, to_global(b, batch_sharding), r, lpips_params),
      step_of=lambda s: s.generator.step, on_sample=write_reconstructions))
  variables = {"params": final.generator.params, **final.generator.extra}
  return Tokenizer(module, jax.device_get(variables), size)


def build_cache(config: Any, workdir: str, tokenizer: Tokenizer, source) -> str:
  """Encodes the training split to tokens once; returns the cache directory."""
  cache_dir = config.data.cache_dir or os.path.join(workdir, "token_cache")
  try:
    token_cache.TokenCacheSource(cache_dir)
    return cache_dir
  except (FileNotFoundError, ValueError):
    pass
  encode = jax.jit(lambda v, x: tokenizer.module.apply(v, x, method="encode"))
  token_cache.build_token_cache(
      source, lambda images: np.asarray(encode(tokenizer.variables, jnp.asarray(images))),
      cache_dir, codebook_size=tokenizer.module.config.num_embeddings,
      image_size=int(config.data.image_size), batch_size=64,
      description=f"{config.data.name} {config.data.train_split}", overwrite=True)
  return cache_dir
