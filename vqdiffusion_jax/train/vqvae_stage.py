"""The VQ-VAE stage of a run: images to tokens, trained with the VQGAN loss.

Its state (``vqvae_step.VQVAEState``) holds the generator and, with an
adversarial term, the PatchGAN discriminator, each with its own Adam
(``state.make_optimizer`` on ``config.vqvae.optim``). The LPIPS network of a
perceptual loss is frozen: read once from the user's weight files and given
to the step as an input. With ``config.vqvae.path`` nothing trains: the
converted or trained VQ-VAE there is the run's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vqdiffusion_jax import build, loading
from vqdiffusion_jax.convert import lpips as lpips_convert
from vqdiffusion_jax.data import loader
from vqdiffusion_jax.models import discriminator as disc_lib
from vqdiffusion_jax.models.vqgan import VQGAN
from vqdiffusion_jax.train import mesh as mesh_lib
from vqdiffusion_jax.train import runner, vqvae_step
from vqdiffusion_jax.train import state as state_lib


def vqvae_layout(config: Any, module: VQGAN, mesh):
  """``(parts, abstract_state, shardings, discriminator)`` of the VQ-VAE's train state.

  ``parts`` maps "generator" (and "discriminator" with a GAN loss) to
  ``(init_fn, optimizer)``; ``discriminator`` is the module or None.
  """
  section = config.vqvae
  make_optimizer = lambda: state_lib.make_optimizer(  # noqa: E731
      section.optim, int(section.train.num_steps))
  size = int(config.data.image_size)
  images = jnp.zeros((1, size, size, 3))
  parts = {"generator": (lambda r: module.init(r, images), make_optimizer())}
  disc = None
  if float(section.loss.disc_weight) > 0:
    disc = disc_lib.NLayerDiscriminator(base_channels=section.loss.disc_channels,
                                        num_layers=section.loss.disc_layers)
    parts["discriminator"] = (lambda r: disc.init(r, images), make_optimizer())
  rng, rules = jax.random.key(int(config.seed)), config.mesh.rules
  shardings = vqvae_step.VQVAEState(**{
      k: state_lib.state_shardings(rng, f, o, mesh, rules) for k, (f, o) in parts.items()})
  abstract = vqvae_step.VQVAEState(**{
      k: state_lib.abstract_state(rng, f, o, mesh, rules) for k, (f, o) in parts.items()})
  return parts, abstract, shardings, disc


def run_vqvae(config: Any, directory: str, mesh, source) -> build.VQVAE:
  """Trains the VQ-VAE on ``source`` (or loads ``config.vqvae.path``); returns it."""
  size = int(config.data.image_size)
  if config.vqvae.path:
    return loading.restore_vqvae(config, directory)
  module = build.vqvae_module(config, training=True)
  section = config.vqvae
  parts, abstract, shardings, disc = vqvae_layout(config, module, mesh)
  rng, rules = jax.random.key(int(config.seed)), config.mesh.rules

  def init_state(params=None):
    del params
    return vqvae_step.VQVAEState(**{
        k: state_lib.create_state(jax.random.fold_in(rng, i), f, o, mesh, rules)[0]
        for i, (k, (f, o)) in enumerate(parts.items())})

  lpips_params = None
  if float(section.loss.perceptual_weight) > 0:
    lpips_params = lpips_convert.load_lpips(section.loss.lpips_vgg_path,
                                            section.loss.lpips_heads_path)
  step = vqvae_step.make_train_step(module, disc, section.loss, parts["generator"][1],
                                    parts.get("discriminator", (None, None))[1])
  replicated = mesh_lib.replicated(mesh)

  def jit_step(fn, sharding):
    jitted = jax.jit(fn, in_shardings=(shardings, sharding, replicated, replicated),
                     out_shardings=(shardings, replicated), donate_argnums=(0,))
    return runner.ShardedStep(jitted, sharding, (lpips_params,))

  block, blocks = mesh_lib.batch_block(mesh, int(section.train.global_batch),
                                       "vqvae.train.global_batch")

  def batches():
    return loader.image_batches(
        source, image_size=size, seed=int(config.seed), caption_dropout=0.0,
        batch_size=loader.per_host_batch(int(section.train.global_batch), blocks),
        process_index=block, process_count=blocks,
        random_flip=bool(config.data.random_flip), random_crop=bool(config.data.random_crop),
        num_threads=int(config.data.num_workers))

  reconstruct = jax.jit(lambda v, x: module.apply(v, x)[0])

  def write_reconstructions(step, state, batch, writer):
    images = jnp.asarray(batch["image"][:8])
    variables = {"params": state.generator.params, **state.generator.extra}
    writer.write_images(step, "reconstructions",
                        np.concatenate([images, reconstruct(variables, images)]))

  final = runner.run_stage(config, runner.Stage(
      directory=directory, num_steps=int(section.train.num_steps),
      abstract_state=abstract, init_state=init_state, batches=batches,
      step_fn=jit_step(step, mesh_lib.batch_sharding(mesh)),
      steps_fn=jit_step(runner.scan_steps(step), mesh_lib.stacked_batch_sharding(mesh)),
      steps_per_call=int(section.train.steps_per_call),
      step_of=lambda s: s.generator.step, on_sample=write_reconstructions))
  variables = {"params": final.generator.params, **final.generator.extra}
  return build.VQVAE(module.clone(matmul_dtype="float32"), jax.device_get(variables), size)
