"""The training run: tokenizer, then a token cache, then the denoiser.

``train_and_evaluate(config, workdir)`` runs the stages in order, each in its
own directory under ``workdir`` and each resumable: a stage whose checkpoint
has reached its step count is restored, not retrained, and the token cache is
built once (atomically). Every stage trains with a jitted step whose state is
sharded over the config's mesh, reads batches from a checkpointable grain
iterator whose position is saved with the state, writes metrics from process
0, stops on NaN/Inf naming the step, and on SIGTERM saves and ends the run
(``runner.StopRequestedError``; no later stage runs). With a
``config.time_budget`` the denoiser trains as many steps as the time left
holds (``budget.py``), counted from the call of ``train_and_evaluate``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqdiffusion_jax.convert import lpips as lpips_convert
from vqdiffusion_jax.data import loader, shapes, token_cache
from vqdiffusion_jax.models import discriminator as disc_lib
from vqdiffusion_jax.models import precision
from vqdiffusion_jax.models.vqgan import VQGAN, VQGANConfig
from vqdiffusion_jax.train import budget, tokenizer_step
from vqdiffusion_jax.train import checkpoint as ckpt_lib
from vqdiffusion_jax.train import mesh as mesh_lib
from vqdiffusion_jax.train import report as report_lib
from vqdiffusion_jax.train import state as state_lib
from vqdiffusion_jax.train.denoiser_stage import run_denoiser
from vqdiffusion_jax.train.runner import Stage, run_stage, scan_steps, to_global


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
  """Runs every stage of the experiment, then evaluates it and writes the report.

  Args:
    config: the experiment config (``configs/common.py`` schema).
    workdir: the run's directory (created if needed).

  Returns:
    ``{"tokenizer": ..., "token_cache": ..., "denoiser": ..., "report": ...}``
    paths and the denoiser's final step.

  Raises:
    runner.StopRequestedError: a stage stopped on SIGTERM or preemption (its
      checkpoint saved); the later stages and the report did not run.
  """
  deadline = None
  if budget.enabled(config):
    deadline = time.monotonic() + 60 * float(config.time_budget.minutes)
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  source = train_source(config, workdir)
  tokenizer = run_tokenizer(config, os.path.join(workdir, "tokenizer"), mesh, source)
  cache_dir = build_cache(config, workdir, tokenizer, source)
  denoiser_step = run_denoiser(
      config, os.path.join(workdir, "denoiser"), mesh, cache_dir, tokenizer,
      time_left=None if deadline is None else lambda: deadline - time.monotonic())
  summary = {"tokenizer": os.path.join(workdir, "tokenizer"), "token_cache": cache_dir,
             "denoiser": os.path.join(workdir, "denoiser"), "denoiser_step": denoiser_step}
  if config.get("eval") and config.eval.samplers:
    summary["report"] = report_lib.write_report(config, workdir, summary)
  return summary


def train_source(config: Any, workdir: str):
  """The training split as a random-access source; builds the shapes data if needed.

  With ``data.in_memory`` decoded records are kept (``loader.MemoizedSource``).
  """
  data = config.data
  if data.name == "shapes":
    data_dir = data.data_dir or os.path.join(workdir, "data")
    kwargs = {k: v for k, v in (("num_train", data.num_train), ("num_test", data.num_test)) if v}
    source = shapes.build(data_dir, data.image_size, **kwargs).as_data_source(
        split=data.train_split)
  else:
    source = loader.tfds_source(data.name, data.train_split, data.data_dir)
  return loader.MemoizedSource(source) if data.get("in_memory") else source


def tokenizer_matmul_dtype(config: Any) -> str:
  """``tokenizer.train.matmul_dtype`` with "auto" resolved for this machine.

  The convolutional VQGAN, which takes its precision from ``train.dtype``,
  resolves "auto" to "float32".
  """
  name = str(config.tokenizer.train.get("matmul_dtype", "float32"))
  if name == "auto" and not config.tokenizer.model.get("patch_size", 0):
    return "float32"
  return precision.resolve_matmul_dtype(name)


def tokenizer_module(config: Any) -> VQGAN:
  """The tokenizer as it trains (``tokenizer_matmul_dtype``; inference uses float32)."""
  model = {k: tuple(v) if isinstance(v, list) else v
           for k, v in config.tokenizer.model.to_dict().items()}
  return VQGAN(VQGANConfig(**model), dtype=jnp.dtype(config.train.dtype),
               matmul_dtype=tokenizer_matmul_dtype(config))


def tokenizer_optimizer(optim: Any, num_steps: int) -> optax.GradientTransformation:
  """Adam with linear warmup, then a constant or cosine-decayed rate, optionally clipped."""
  peak, warmup = float(optim.learning_rate), int(optim.warmup_steps)
  decay = optim.get("decay", "constant")
  if decay == "cosine":
    rate = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(num_steps, warmup + 1),
                                              peak * float(optim.get("min_lr_ratio", 0.0)))
  elif decay == "constant":
    rate = optax.linear_schedule(0.0, peak, warmup) if warmup else peak
    if warmup:
      rate = optax.join_schedules([rate, optax.constant_schedule(peak)], [warmup])
  else:
    raise ValueError(f"unknown tokenizer decay {decay!r}; choose 'constant' or 'cosine'")
  adam = optax.adam(rate, b1=optim.b1, b2=optim.b2)
  clip = float(optim.clip_norm)
  return optax.chain(optax.clip_by_global_norm(clip), adam) if clip > 0 else adam


def tokenizer_layout(config: Any, module: VQGAN, mesh):
  """``(parts, abstract_state, shardings, discriminator)`` of the tokenizer's train state.

  ``parts`` maps "generator" (and "discriminator" with a GAN loss) to
  ``(init_fn, optimizer)``; ``discriminator`` is the module or None.
  """
  loss_config = config.tokenizer.loss
  optim, num_steps = config.tokenizer.optim, int(config.tokenizer.train.num_steps)
  make_opt = lambda: tokenizer_optimizer(optim, num_steps)  # noqa: E731
  size = int(config.data.image_size)
  images = jnp.zeros((1, size, size, 3))
  parts = {"generator": (lambda r: module.init(r, images), make_opt())}
  disc = None
  if float(loss_config.disc_weight) > 0:
    disc = disc_lib.NLayerDiscriminator(base_channels=loss_config.disc_channels,
                                        num_layers=loss_config.disc_layers)
    parts["discriminator"] = (lambda r: disc.init(r, images), make_opt())
  rng, rules = jax.random.key(int(config.seed)), config.mesh.rules
  shardings = tokenizer_step.TokenizerState(**{
      k: state_lib.state_shardings(rng, f, o, mesh, rules) for k, (f, o) in parts.items()})
  abstract = tokenizer_step.TokenizerState(**{
      k: state_lib.abstract_state(rng, f, o, mesh, rules) for k, (f, o) in parts.items()})
  return parts, abstract, shardings, disc


def load_tokenizer(config: Any, directory: str, mesh) -> Tokenizer:
  """The trained tokenizer of a run (its newest verified checkpoint), or the configured one."""
  size = int(config.data.image_size)
  if config.tokenizer.path:
    from vqdiffusion_jax.convert import load_vqvae  # noqa: PLC0415
    module, params = load_vqvae(config.tokenizer.path)
    return Tokenizer(module, {"params": params}, size)
  module = tokenizer_module(config).clone(matmul_dtype="float32")
  _, abstract, _, _ = tokenizer_layout(config, module, mesh)
  with ckpt_lib.Checkpointer.for_workdir(directory, read_only=True) as checkpointer:
    _, state, _ = checkpointer.restore(abstract)
  variables = {"params": state.generator.params, **state.generator.extra}
  return Tokenizer(module, jax.device_get(variables), size)


def run_tokenizer(config: Any, directory: str, mesh, source) -> Tokenizer:
  """Trains the VQ tokenizer (or loads ``config.tokenizer.path``)."""
  size = int(config.data.image_size)
  if config.tokenizer.path:
    return load_tokenizer(config, directory, mesh)
  module = tokenizer_module(config)
  loss_config = config.tokenizer.loss
  parts, abstract, shardings, disc = tokenizer_layout(config, module, mesh)
  rng, rules = jax.random.key(int(config.seed)), config.mesh.rules

  def init_state(params=None):
    del params
    return tokenizer_step.TokenizerState(**{
        k: state_lib.create_state(jax.random.fold_in(rng, i), f, o, mesh, rules)[0]
        for i, (k, (f, o)) in enumerate(parts.items())})

  lpips_params = None
  if float(loss_config.perceptual_weight) > 0:
    lpips_params = lpips_convert.load_lpips(loss_config.lpips_vgg_path,
                                            loss_config.lpips_heads_path)
  step = tokenizer_step.make_train_step(module, disc, loss_config,
                                        parts["generator"][1], parts.get("discriminator",
                                                                         (None, None))[1])
  state_shardings = shardings
  batch_sharding = mesh_lib.batch_sharding(mesh)
  replicated = mesh_lib.replicated(mesh)
  stacked_sharding = mesh_lib.stacked_batch_sharding(mesh)

  def jit_step(fn, sharding):
    jitted = jax.jit(fn, in_shardings=(state_shardings, sharding, replicated, replicated),
                     out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    return lambda s, b, r: jitted(s, to_global(b, sharding), r, lpips_params)

  tokenizer_batch = int(config.tokenizer.train.global_batch)

  def batches():
    return loader.image_batches(
        source, image_size=size, seed=int(config.seed), caption_dropout=0.0,
        batch_size=loader.per_host_batch(tokenizer_batch, jax.process_count()),
        process_index=jax.process_index(), process_count=jax.process_count(),
        random_flip=bool(config.data.random_flip), random_crop=bool(config.data.random_crop),
        num_threads=int(config.data.get("num_workers", 0)))

  reconstruct = jax.jit(lambda v, x: module.apply(v, x)[0])

  def write_reconstructions(step, state, batch, writer):
    images = jnp.asarray(batch["image"][:8])
    variables = {"params": state.generator.params, **state.generator.extra}
    writer.write_images(step, "reconstructions",
                        np.concatenate([images, reconstruct(variables, images)]))

  final = run_stage(config, Stage(
      directory=directory, num_steps=int(config.tokenizer.train.num_steps),
      abstract_state=abstract, init_state=init_state, batches=batches,
      step_fn=jit_step(step, batch_sharding),
      steps_fn=jit_step(scan_steps(step), stacked_sharding),
      steps_per_call=int(config.tokenizer.train.get("steps_per_call", 1)),
      step_of=lambda s: s.generator.step, on_sample=write_reconstructions))
  variables = {"params": final.generator.params, **final.generator.extra}
  return Tokenizer(module.clone(matmul_dtype="float32"), jax.device_get(variables), size)


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
