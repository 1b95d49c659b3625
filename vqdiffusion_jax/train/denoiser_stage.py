"""The denoiser stage of a run: conditioning, model, state, batches, samples.

The condition follows ``config.denoiser`` (``build.conditioned_denoiser``):
class labels (the token cache's ``label``, a ``data.caption_dropout`` share
of them replaced by the null class), nothing, or text. Text follows
``config.text.kind``: "trainable" fits a word vocabulary on the cached
captions once (saved as ``text_tokenizer.json`` beside the checkpoints) and
trains a small text encoder jointly with the denoiser; "clip" loads a frozen
CLIP text tower from ``config.text.clip_path``. The token cache then holds
the CLIP features of every caption (``frozen_text_encoder``), so the step
reads them from the batch and never runs CLIP; with a cache whose features
another encoder made, the step runs the tower on the caption ids, its params
a frozen input. A "paella" denoiser trains with Paella's objective
(``denoiser_step.make_paella_step``) and samples with its renoising sampler.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from vqdiffusion_jax import build, config_schema, hosts, outputs, sampling
from vqdiffusion_jax.convert import checkpoints
from vqdiffusion_jax.convert import clip as clip_convert
from vqdiffusion_jax.data import loader, token_cache
from vqdiffusion_jax.diffusion import samplers
from vqdiffusion_jax.models.text_encoder import WordTokenizer
from vqdiffusion_jax.train import budget, denoiser_step, runner
from vqdiffusion_jax.train import mesh as mesh_lib
from vqdiffusion_jax.train import state as state_lib


def fit_vocabulary(config: Any, directory: str | os.PathLike, cache) -> WordTokenizer:
  """The caption vocabulary: read back, or fitted once (by process 0) and saved."""
  path = epath.Path(directory) / build.VOCABULARY_FILE
  with hosts.process_zero_first("vqdiffusion_jax_vocabulary"):
    if path.exists():
      return WordTokenizer.load(path)
    captions = [c for i in range(len(cache)) for c in cache[i]["captions"]]
    vocabulary = WordTokenizer.fit(captions, int(config.text.max_vocab))
    path.parent.mkdir(parents=True, exist_ok=True)
    vocabulary.save(path)
  return vocabulary


def check_labels(metadata: dict, num_classes: int, data_name: str) -> None:
  """Raises unless a token cache's labels are all classes of a ``num_classes`` model.

  Args:
    metadata: the cache's metadata (``label_range``: [min, max] or None).
    num_classes: ``denoiser.model.num_classes``.
    data_name: the dataset, for the message.
  """
  label_range = metadata.get("label_range")
  if label_range is None:
    raise ValueError(f"denoiser.model.conditioning is 'class' but the token cache of "
                     f"{data_name!r} holds no labels; train on a labelled dataset such as "
                     "class_image_folders")
  if label_range[0] < 0 or label_range[1] >= num_classes:
    raise ValueError(f"the labels of {data_name!r} span {label_range[0]}..{label_range[1]}, "
                     f"outside 0..{num_classes - 1}: set denoiser.model.num_classes to at "
                     f"least {label_range[1] + 1}")


@dataclasses.dataclass(frozen=True)
class FrozenText:
  """A frozen text encoder as the token cache uses it: who it is, and captions -> features."""

  identity: dict
  encode: Callable[[list[str]], np.ndarray]


def clip_identity(config: Any, params: Any, length: int, width: int) -> dict:
  """The metadata that names the CLIP tower whose features a token cache holds."""
  return token_cache.text_encoder_identity("clip", config.text.clip_path, params,
                                           length=int(length), width=int(width))


def frozen_text_encoder(config: Any) -> FrozenText | None:
  """The run's frozen text encoder for caching features (the step's), or None.

  The features are ``build.clip_features`` of the tokenized captions, the
  same function the step would run.
  """
  if not config_schema.reads_text(config) or config.text.kind != "clip":
    return None
  module, params, hf_tokenizer = clip_convert.load_clip_text(config.text.clip_path)
  tokenize = build.clip_tokenize(module, hf_tokenizer)
  features = jax.jit(build.clip_features(module))
  return FrozenText(
      identity=clip_identity(config, params, module.max_positions, module.hidden_size),
      encode=lambda texts: np.asarray(features(params, jnp.asarray(tokenize(texts)))))


def features_mismatch(metadata: dict, identity: dict | None) -> str | None:
  """Why a token cache's text features are not those of ``identity`` (None: they are).

  Weights are compared by fingerprint, not by where they were read.

  Args:
    metadata: the cache's metadata.
    identity: the run's text encoder (``clip_identity``), None when it needs no features.
  """
  if identity is None:
    return None
  spec = metadata.get("text_features")
  if not spec:
    return "holds no text features"
  cached = spec.get("encoder") or {}
  if any(cached.get(k) != v for k, v in identity.items() if k != "path"):  # same weights moved
    def name(d):
      return (f"{d.get('kind')} {d.get('path')!r} (weights {str(d.get('fingerprint'))[:12]}, "
              f"length {d.get('length')}, width {d.get('width')})")
    return (f"holds the text features of {name(cached)}, not of this run's "
            f"{name(identity)}")
  return None


def uses_cached_features(config: Any, conditioned: build.Conditioned, cache) -> bool:
  """Whether the cache holds the features of this run's frozen text encoder."""
  if conditioned.frozen_params is None:
    return False
  length, width = conditioned.denoiser.condition_shape()
  identity = clip_identity(config, conditioned.frozen_params, length, width)
  return features_mismatch(cache.metadata, identity) is None


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
                     cache, cached_features: bool | None = None) -> DenoiserTrainer:
  """Builds the denoiser's state, jitted train steps and batch iterator for ``config``.

  ``cached_features``: whether batches carry the cache's text features (the
  step then runs no text encoder); by default when the cache holds those of the
  run's frozen encoder.
  """
  trained_text = config_schema.reads_text(config) and config.text.kind == "trainable"
  vocabulary = fit_vocabulary(config, directory, cache) if trained_text else None
  conditioned = build.conditioned_denoiser(config, vqvae, vocabulary)
  if cached_features is None:
    cached_features = uses_cached_features(config, conditioned, cache)
  denoiser = conditioned.denoiser
  if denoiser.conditioning == "class":
    check_labels(cache.metadata, denoiser.num_classes, config.data.name)
  schedule = build.schedule(config, vqvae.codebook_size)
  optimizer = state_lib.make_optimizer(config.optim, int(config.train.num_steps))
  rules, rng = config.mesh.rules, jax.random.key(int(config.seed))
  importance_sampling = config.diffusion.importance_sampling and not denoiser.resizable
  layout = {"history_timesteps": denoiser.num_timesteps if importance_sampling else None}
  init_fn = functools.partial(denoiser.init, grid=vqvae.grid)
  shardings = state_lib.state_shardings(rng, init_fn, optimizer, mesh, rules, **layout)

  def init_state(params=None):
    state, _ = state_lib.create_state(rng, init_fn, optimizer, mesh, rules, **layout)
    if params is None:
      return state
    params = jax.device_put(denoiser.with_network_params(state.params, params),
                            shardings.params)
    # The EMA gets its own buffers: the step donates the state, each buffer once.
    return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params),
                         opt_state=jax.jit(optimizer.init, out_shardings=shardings.opt_state)(
                             params))

  frozen, frozen_shardings = conditioned.frozen_params, None
  if frozen is not None:
    frozen_shardings = jax.tree.map(lambda _: mesh_lib.replicated(mesh), frozen)
    frozen = jax.device_put(frozen, frozen_shardings)
  train_step = denoiser_step.make_train_step(denoiser, schedule, config, config.diffusion,
                                             optimizer, grid=vqvae.grid)

  def jitted(step, sharding):
    fn = denoiser_step.jit_train_step(step, mesh, shardings, sharding,
                                      frozen_shardings=frozen_shardings)
    return runner.ShardedStep(fn, sharding, () if frozen is None else (frozen,))

  block, blocks = mesh_lib.batch_block(mesh, int(config.train.global_batch), "train.global_batch")

  def batches():
    return token_cache.token_batches(
        cache, batch_size=loader.per_host_batch(int(config.train.global_batch), blocks),
        seed=int(config.seed), process_index=block, process_count=blocks,
        tokenize=None if cached_features else conditioned.tokenize,
        caption_dropout=float(config.data.caption_dropout), text_features=cached_features,
        features_key="text", num_threads=int(config.data.num_workers))

  return DenoiserTrainer(
      conditioned=conditioned, schedule=schedule,
      abstract_state=state_lib.abstract_state(rng, init_fn, optimizer, mesh, rules, **layout),
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


def sample_conditions(conditioned: build.Conditioned, batch: dict,
                      count: int = 8) -> tuple[np.ndarray, list[str]]:
  """The condition inputs of ``count`` samples drawn for a training batch, and their text.

  Returns:
    (text ids of the batch's captions, its class labels, or an empty
    (count, 0) array for an unconditional denoiser; one line per sample
    naming its caption or class, none when unconditional).
  """
  kind = conditioned.denoiser.conditioning
  if kind == "class":
    labels = np.asarray(batch["label"][:count], np.int32)
    return labels, [f"class {label}" for label in labels.tolist()]
  if kind == "none":
    return np.zeros((count, 0), np.int32), []
  captions = [str(c) for c in batch["captions"][:count]]
  return np.asarray(conditioned.tokenize(captions)), captions


def sample_writer(trainer: DenoiserTrainer, vqvae: build.VQVAE, seed: int,
                  guidance_scale: float = 3.0):
  """``on_sample`` for the denoiser: EMA-weight samples for 8 of the batch's conditions.

  Every step of the reverse process (``sampling.program``; Paella's renoising
  sampler for its predictor), with classifier-free guidance when the model
  has a null condition (learnable null text, null class). The captions or
  classes go beside the grid in a ``.txt``.
  """
  conditioned = trainer.conditioned
  scale = guidance_scale if conditioned.denoiser.has_null_condition else 1.0
  sampler = "paella" if conditioned.denoiser.resizable else "vqdiffusion"
  generate = jax.jit(sampling.program(
      conditioned.denoiser, trainer.schedule, vqvae.module,
      samplers.SamplerConfig(sampler, guidance_scale=scale), vqvae.grid))

  def write(step, state, batch, writer):
    inputs, lines = sample_conditions(conditioned, batch)
    _, images = generate(state.ema_params, trainer.frozen, vqvae.variables,
                         [jnp.asarray(inputs)], jax.random.key(seed), None, {})
    path = writer.write_images(step, "samples", np.asarray(images) * 2.0 - 1.0)
    if path is not None and lines:
      outputs.write_text(epath.Path(path).with_suffix(".txt"), "\n".join(lines) + "\n")

  return write
