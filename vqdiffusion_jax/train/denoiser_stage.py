"""The denoiser stage of a run: text conditioning, model, state, batches, samples.

Text conditioning follows ``config.text.kind`` (``build.conditioned_denoiser``):
"trainable" fits a word vocabulary on the cached captions once (saved as
``text_tokenizer.json`` beside the checkpoints) and trains a small text
encoder jointly with the denoiser; "clip" loads a frozen CLIP text tower from
``config.text.clip_path`` and passes its params to the step as a frozen input.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vqdiffusion_jax import build, hosts, sampling
from vqdiffusion_jax.convert import checkpoints
from vqdiffusion_jax.data import loader, token_cache
from vqdiffusion_jax.diffusion import samplers
from vqdiffusion_jax.models.text_encoder import WordTokenizer
from vqdiffusion_jax.train import budget, denoiser_step, runner
from vqdiffusion_jax.train import mesh as mesh_lib
from vqdiffusion_jax.train import state as state_lib


def fit_vocabulary(config: Any, directory: str, cache) -> WordTokenizer:
  """The caption vocabulary: read back, or fitted once (by process 0) and saved."""
  path = os.path.join(directory, build.VOCABULARY_FILE)
  with hosts.process_zero_first("vqdiffusion_jax_vocabulary"):
    if os.path.exists(path):
      return WordTokenizer.load(path)
    captions = [c for i in range(len(cache)) for c in cache[i]["captions"]]
    vocabulary = WordTokenizer.fit(captions, int(config.text.max_vocab))
    os.makedirs(directory, exist_ok=True)
    vocabulary.save(path)
  return vocabulary


@dataclasses.dataclass(frozen=True)
class DenoiserTrainer:
  """What the step loop runs: the model, its state layout and builder, jitted steps, batches."""

  conditioned: build.Conditioned
  schedule: Any
  abstract_state: Any
  frozen: Any
  init_state: Callable[..., Any]
  step_fn: Callable[..., Any]
  steps_fn: Callable[..., Any]
  batches: Callable[[], Any]
  steps_per_call: int


def denoiser_trainer(config: Any, directory: str, mesh, vqvae: build.VQVAE,
                     cache) -> DenoiserTrainer:
  """Builds the denoiser's state, jitted train steps and batch iterator for ``config``."""
  vocabulary = (fit_vocabulary(config, directory, cache) if config.text.kind == "trainable"
                else None)
  conditioned = build.conditioned_denoiser(config, vqvae, vocabulary)
  denoiser = conditioned.denoiser
  schedule = build.schedule(config, vqvae.codebook_size)
  optimizer = state_lib.make_optimizer(config.optim, int(config.train.num_steps))
  rules, rng = config.mesh.rules, jax.random.key(int(config.seed))
  layout = {"history_timesteps": (denoiser.num_timesteps
                                  if config.diffusion.importance_sampling else None)}
  shardings = state_lib.state_shardings(rng, denoiser.init, optimizer, mesh, rules, **layout)

  def init_state(params=None):
    state, _ = state_lib.create_state(rng, denoiser.init, optimizer, mesh, rules, **layout)
    if params is None:
      return state
    params = jax.device_put(denoiser.with_network_params(state.params, params),
                            shardings.params)
    return state.replace(params=params, ema_params=params,
                         opt_state=jax.jit(optimizer.init, out_shardings=shardings.opt_state)(
                             params))

  frozen, frozen_shardings = conditioned.frozen_params, None
  if frozen is not None:
    frozen_shardings = jax.tree.map(lambda _: mesh_lib.replicated(mesh), frozen)
    frozen = jax.device_put(frozen, frozen_shardings)
  train_step = denoiser_step.make_train_step(denoiser, schedule, config, config.diffusion,
                                             optimizer)

  def jitted(step, sharding):
    fn = denoiser_step.jit_train_step(step, mesh, shardings, sharding,
                                      frozen_shardings=frozen_shardings)
    extra = () if frozen is None else (frozen,)
    return lambda s, b, r: fn(s, runner.to_global(b, sharding), r, *extra)

  block, blocks = mesh_lib.batch_block(mesh, int(config.train.global_batch), "train.global_batch")

  def batches():
    return token_cache.token_batches(
        cache, batch_size=loader.per_host_batch(int(config.train.global_batch), blocks),
        seed=int(config.seed), process_index=block, process_count=blocks,
        tokenize=conditioned.tokenize,
        caption_dropout=float(config.data.caption_dropout), text_features=False,
        num_threads=int(config.data.num_workers))

  return DenoiserTrainer(
      conditioned=conditioned, schedule=schedule,
      abstract_state=state_lib.abstract_state(rng, denoiser.init, optimizer, mesh, rules,
                                              **layout),
      frozen=frozen, init_state=init_state,
      step_fn=jitted(train_step, mesh_lib.batch_sharding(mesh)),
      steps_fn=jitted(runner.scan_steps(train_step), mesh_lib.stacked_batch_sharding(mesh)),
      batches=batches, steps_per_call=int(config.train.steps_per_call))


def run_denoiser(config: Any, directory: str, mesh, cache_dir: str, vqvae: build.VQVAE,
                 time_left: Callable[[], float] | None = None) -> int:
  """Trains the denoiser on the token cache; returns the final step.

  With ``time_left`` (seconds left of the run's budget) and a
  ``config.time_budget``, the step count comes from ``budget.plan_steps``.
  """
  cache = token_cache.TokenCacheSource(cache_dir)
  if config.data.in_memory:
    cache = loader.MemoizedSource(cache)
  if time_left is not None and budget.enabled(config):
    plan = budget.plan_steps(
        config, directory, time_left,
        lambda: seconds_per_step(denoiser_trainer(config, directory, mesh, vqvae, cache)))
    if plan is not None:
      config = budget.with_num_steps(config, plan["num_steps"])
  trainer = denoiser_trainer(config, directory, mesh, vqvae, cache)
  init_from = config.checkpoint.init_from
  network = trainer.conditioned.denoiser.network
  final = runner.run_stage(config, runner.Stage(
      directory=directory, num_steps=int(config.train.num_steps),
      abstract_state=trainer.abstract_state, init_state=trainer.init_state,
      step_fn=trainer.step_fn, batches=trainer.batches, step_of=lambda s: s.step,
      init_from=(lambda: checkpoints.load_denoiser(
          init_from, scan_layers=network.config.scan_layers)[1]) if init_from else None,
      resume_from=config.checkpoint.resume_from,
      on_sample=sample_writer(trainer, vqvae, int(config.seed)),
      steps_fn=trainer.steps_fn, steps_per_call=trainer.steps_per_call))
  return int(np.asarray(jax.device_get(final.step)))


def seconds_per_step(trainer: DenoiserTrainer, calls: int = 4) -> float:
  """The train step's wall time as the loop sees it (batches included), after a warm-up call.

  The median over ``calls`` calls of ``trainer.steps_per_call`` steps each, on a
  fresh state that is then dropped.
  """
  state, iterator = trainer.init_state(), trainer.batches()
  rng = jax.random.key(0)
  per_call = max(1, trainer.steps_per_call)
  times = []
  for _ in range(calls + 1):
    start = time.perf_counter()
    batches = [next(iterator) for _ in range(per_call)]
    state, metrics = runner.call_steps(trainer.step_fn, trainer.steps_fn, state, batches, rng)
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - start) / per_call)
  return float(np.median(times[1:]))


def sample_writer(trainer: DenoiserTrainer, vqvae: build.VQVAE, seed: int,
                  guidance_scale: float = 3.0):
  """``on_sample`` for the denoiser: EMA-weight samples for 8 of the batch's captions.

  Every step of the reverse process (``sampling.program``), with
  classifier-free guidance when the model has a learnable null text.
  """
  conditioned = trainer.conditioned
  scale = guidance_scale if conditioned.denoiser.has_null_condition else 1.0
  generate = jax.jit(sampling.program(
      conditioned.denoiser, trainer.schedule, vqvae.module,
      samplers.SamplerConfig("vqdiffusion", guidance_scale=scale), vqvae.grid))

  def write(step, state, batch, writer):
    captions = [str(c) for c in batch["captions"][:8]]
    _, images = generate(state.ema_params, trainer.frozen, vqvae.variables,
                         [jnp.asarray(conditioned.tokenize(captions))], jax.random.key(seed),
                         None, {})
    path = writer.write_images(step, "samples", np.asarray(images) * 2.0 - 1.0)
    if path is not None:
      with open(path.replace(".png", ".txt"), "w") as f:
        f.write("\n".join(captions) + "\n")

  return write
