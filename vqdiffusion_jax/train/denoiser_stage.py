"""The denoiser stage of a run: text conditioning, model, state, batches.

Text conditioning follows ``config.text.kind``: "trainable" fits a word
tokenizer on the cached captions and trains a small text encoder jointly
with the denoiser (``TextConditionedDenoiser``); "clip" loads a frozen CLIP
text tower from ``config.text.clip_path`` and passes its params to the step
as a frozen input.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vqdiffusion_jax.data import loader, token_cache
from vqdiffusion_jax.diffusion import samplers
from vqdiffusion_jax.diffusion import schedule as schedules
from vqdiffusion_jax.models import precision
from vqdiffusion_jax.models.conditioned import TextConditionedDenoiser
from vqdiffusion_jax.models.text_encoder import TextEncoder, WordTokenizer, split_words
from vqdiffusion_jax.models.transformer import TransformerConfig, VQDiffusionTransformer
from vqdiffusion_jax.train import budget, denoiser_step, runner
from vqdiffusion_jax.train import mesh as mesh_lib
from vqdiffusion_jax.train import state as state_lib


def word_tokenizer(config: Any, directory: str, cache) -> WordTokenizer:
  """The caption vocabulary, fitted once on the cached captions and saved."""
  path = os.path.join(directory, "text_tokenizer.json")
  if os.path.exists(path):
    return WordTokenizer.load(path)
  if cache is None:
    raise FileNotFoundError(f"no caption vocabulary at {path}; the denoiser stage writes it")
  captions = [c for i in range(len(cache)) for c in cache[i]["captions"]]
  tokenizer = WordTokenizer.fit(captions, int(config.text.max_vocab))
  os.makedirs(directory, exist_ok=True)
  if jax.process_index() == 0:
    tokenizer.save(path)
  return tokenizer


def encode_words(words: WordTokenizer, length: int, texts) -> np.ndarray:
  """Caption ids of the trainable encoder; warns about captions cut to ``length``."""
  texts = list(texts)
  too_long = [t for t in texts if len(split_words(t)) > length - 2]
  if too_long:
    warnings.warn(f"{len(too_long)} prompt(s) longer than the text encoder's {length - 2} words "
                  f"were truncated, e.g. {too_long[0]!r}", stacklevel=2)
  return words.encode(texts, length)[0]


def matmul_dtype(config: Any) -> str:
  """The train config's matmul dtype, "auto" resolved for this machine.

  "float32" in configs saved before the field existed.
  """
  return precision.resolve_matmul_dtype(str(config.train.get("matmul_dtype", "float32")))


def denoiser_config(config: Any, tokenizer, condition: tuple[int, int]) -> TransformerConfig:
  model = config.denoiser.model
  return TransformerConfig(
      codebook_size=tokenizer.module.config.num_embeddings, spatial_size=tokenizer.grid,
      num_layers=int(model.num_layers), embed_dim=int(model.embed_dim),
      num_heads=int(model.num_heads), mlp_ratio=int(model.mlp_ratio),
      condition_length=condition[0], condition_dim=condition[1],
      num_timesteps=int(config.diffusion.num_timesteps),
      learnable_null_text=bool(model.learnable_null_text),
      pooled_text=bool(model.get("pooled_text", False)),  # absent from older saved configs
      dtype=jnp.dtype(config.train.dtype), remat=bool(config.train.remat),
      remat_policy=str(config.train.get("remat_policy", "full")),
      scan_layers=bool(config.train.scan_layers),
      matmul_dtype=matmul_dtype(config), attention=str(model.get("attention", "auto")))


def trained_text_encoder(config: Any, vocab_size: int) -> TextEncoder:
  """The "trainable" text kind's encoder over a ``vocab_size`` word vocabulary."""
  text = config.text
  return TextEncoder(vocab_size=vocab_size, width=int(text.width),
                     num_layers=int(text.num_layers), num_heads=int(text.num_heads),
                     max_length=int(text.length),
                     position_encoding=str(text.get("position_encoding", "learned")),
                     dtype=jnp.dtype(config.train.dtype), matmul_dtype=matmul_dtype(config))


def text_setup(config: Any, directory: str, cache, tokenizer):
  """(model, tokenize, text_encoder_fn, frozen_params, init_inputs) for the text kind."""
  text = config.text
  length = int(text.length)
  if text.kind == "trainable":
    words = word_tokenizer(config, directory, cache)
    encoder = trained_text_encoder(config, words.vocab_size)
    cfg = denoiser_config(config, tokenizer, (length, int(text.width)))
    model = TextConditionedDenoiser(cfg, encoder)
    return model, functools.partial(encode_words, words, length), None, None
  if text.kind == "clip":
    from vqdiffusion_jax.convert import clip as clip_convert  # noqa: PLC0415
    module, params, hf_tokenizer = clip_convert.load_clip_text(text.clip_path)
    cfg = denoiser_config(config, tokenizer, (module.max_positions, module.hidden_size))
    tokenize, encode = clip_convert.conditioning(module, hf_tokenizer)
    return VQDiffusionTransformer(cfg), tokenize, encode, params
  raise ValueError(f"unknown text kind {text.kind!r}; choose 'trainable' or 'clip'")


def make_init_fn(model, cfg: TransformerConfig):
  """``rng -> variables`` of the denoiser (and its trainable text encoder, if any)."""
  tokens = jnp.zeros((1, cfg.num_tokens), jnp.int32)
  t = jnp.zeros((1,), jnp.int32)
  if isinstance(model, TextConditionedDenoiser):
    ids = jnp.zeros((1, cfg.condition_length), jnp.int32)
    return lambda r: model.init(r, tokens, t, ids, method="from_ids")
  text = jnp.zeros((1, cfg.condition_length, cfg.condition_dim))
  return lambda r: model.init(r, tokens, t, text)


def _load_init_params(path: str, model):
  """Converted / PyTorch denoiser weights for ``checkpoint.init_from``."""
  from vqdiffusion_jax.convert import load_denoiser  # noqa: PLC0415
  _, params = load_denoiser(path, scan_layers=model.config.scan_layers)
  return params


@dataclasses.dataclass(frozen=True)
class DenoiserSetup:
  """Everything a run or a pipeline needs to build, restore and call the denoiser."""

  model: Any
  tokenize: Any
  text_encoder_fn: Any
  frozen: Any
  schedule: schedules.Schedule
  optimizer: Any
  init_fn: Any
  history_timesteps: int | None
  abstract_state: Any
  shardings: Any


def denoiser_setup(config: Any, directory: str, mesh, tokenizer, cache=None) -> DenoiserSetup:
  """Builds the model, text conditioning, schedule and state layout of a run.

  ``cache`` fits the word tokenizer of a trainable text encoder the first
  time; afterwards (and for pipelines) the saved one in ``directory`` is read.
  """
  model, tokenize, text_encoder_fn, frozen = text_setup(config, directory, cache, tokenizer)
  cfg = model.config
  schedule = schedules.make(config.diffusion.schedule, cfg.num_timesteps, cfg.codebook_size)
  optimizer = state_lib.make_optimizer(config.optim, int(config.train.num_steps))
  rules, rng = config.mesh.rules, jax.random.key(int(config.seed))
  history = cfg.num_timesteps if config.diffusion.importance_sampling else None
  init_fn = make_init_fn(model, cfg)
  kwargs = {"history_timesteps": history}
  return DenoiserSetup(
      model=model, tokenize=tokenize, text_encoder_fn=text_encoder_fn, frozen=frozen,
      schedule=schedule, optimizer=optimizer, init_fn=init_fn, history_timesteps=history,
      abstract_state=state_lib.abstract_state(rng, init_fn, optimizer, mesh, rules, **kwargs),
      shardings=state_lib.state_shardings(rng, init_fn, optimizer, mesh, rules, **kwargs))


def run_denoiser(config: Any, directory: str, mesh, cache_dir: str, tokenizer,
                 time_left: Callable[[], float] | None = None) -> int:
  """Trains the denoiser on the token cache; returns the final step.

  With ``time_left`` (seconds left of the run's budget) and a
  ``config.time_budget``, the step count comes from ``budget.plan_steps``.
  """
  cache = token_cache.TokenCacheSource(cache_dir)
  if config.data.get("in_memory"):
    cache = loader.MemoizedSource(cache)
  if time_left is not None and budget.enabled(config):
    plan = budget.plan_steps(
        config, directory, time_left,
        lambda: seconds_per_step(denoiser_trainer(config, directory, mesh, tokenizer, cache)))
    if plan is not None:
      config = budget.with_num_steps(config, plan["num_steps"])
  trainer = denoiser_trainer(config, directory, mesh, tokenizer, cache)
  init_from = config.checkpoint.init_from
  write_samples = sample_writer(trainer.setup.model, trainer.setup.schedule,
                                trainer.setup.tokenize, trainer.setup.text_encoder_fn,
                                trainer.frozen, tokenizer, int(config.seed))
  final = runner.run_stage(config, runner.Stage(
      directory=directory, num_steps=int(config.train.num_steps),
      abstract_state=trainer.setup.abstract_state, init_state=trainer.init_state,
      step_fn=trainer.step_fn, batches=trainer.batches, step_of=lambda s: s.step,
      init_from=(lambda: _load_init_params(init_from, trainer.setup.model)) if init_from else None,
      resume_from=config.checkpoint.resume_from, on_sample=write_samples,
      steps_fn=trainer.steps_fn, steps_per_call=trainer.steps_per_call))
  return int(np.asarray(jax.device_get(final.step)))


@dataclasses.dataclass(frozen=True)
class DenoiserTrainer:
  """What the step loop runs: state builder, jitted steps, batches."""

  setup: DenoiserSetup
  frozen: Any
  init_state: Callable[..., Any]
  step_fn: Callable[..., Any]
  steps_fn: Callable[..., Any]
  batches: Callable[[], Any]
  steps_per_call: int


def denoiser_trainer(config: Any, directory: str, mesh, tokenizer, cache) -> DenoiserTrainer:
  """Builds the denoiser's state, jitted train steps and batch iterator for ``config``."""
  setup = denoiser_setup(config, directory, mesh, tokenizer, cache)
  model, optimizer, shardings = setup.model, setup.optimizer, setup.shardings

  def init_state(params=None):
    state, _ = state_lib.create_state(jax.random.key(int(config.seed)), setup.init_fn,
                                      optimizer, mesh, config.mesh.rules,
                                      history_timesteps=setup.history_timesteps)
    if params is None:
      return state
    if isinstance(model, TextConditionedDenoiser):
      params = {**jax.device_get(state.params), "denoiser": params}
    params = jax.device_put(params, shardings.params)
    return state.replace(params=params, ema_params=params,
                         opt_state=jax.jit(optimizer.init, out_shardings=shardings.opt_state)(
                             params))

  batch_sharding = mesh_lib.batch_sharding(mesh)
  frozen, frozen_shardings = setup.frozen, None
  if frozen is not None:
    frozen_shardings = jax.tree.map(lambda _: mesh_lib.replicated(mesh), frozen)
    frozen = jax.device_put(frozen, frozen_shardings)
  train_step = denoiser_step.make_train_step(model, setup.schedule, config, config.diffusion,
                                             optimizer, text_encoder_fn=setup.text_encoder_fn)
  step_fn = _global_step_fn(
      denoiser_step.jit_train_step(train_step, mesh, shardings, batch_sharding,
                                   frozen_shardings=frozen_shardings), batch_sharding, frozen)
  stacked_sharding = mesh_lib.stacked_batch_sharding(mesh)
  steps_fn = _global_step_fn(
      denoiser_step.jit_train_step(runner.scan_steps(train_step), mesh, shardings,
                                   stacked_sharding, frozen_shardings=frozen_shardings),
      stacked_sharding, frozen)

  def batches():
    return token_cache.token_batches(
        cache, batch_size=_per_host(config), seed=int(config.seed),
        process_index=jax.process_index(), process_count=jax.process_count(),
        tokenize=setup.tokenize, caption_dropout=float(config.data.caption_dropout),
        text_features=False, num_threads=int(config.data.get("num_workers", 0)))

  return DenoiserTrainer(setup=setup, frozen=frozen, init_state=init_state, step_fn=step_fn,
                         steps_fn=steps_fn, batches=batches,
                         steps_per_call=int(config.train.get("steps_per_call", 1)))


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


def _global_step_fn(jitted, sharding, frozen):
  """``(state, host batch, rng) -> jitted(...)`` with the batch made global (and frozen params)."""
  extra = () if frozen is None else (frozen,)
  return lambda s, b, r: jitted(s, runner.to_global(b, sharding), r, *extra)


def sample_writer(model, schedule, tokenize, text_encoder_fn, frozen, tokenizer, seed: int,
                  guidance_scale: float = 3.0):
  """``on_sample`` for the denoiser: EMA-weight samples for 8 of the batch's captions.

  Every step of the reverse process, with classifier-free guidance when the
  model has a learnable null text.
  """
  cfg = model.config
  scale = guidance_scale if cfg.has_null_text else 1.0
  config = samplers.SamplerConfig("vqdiffusion", guidance_scale=scale)

  @jax.jit
  def generate(ema_params, ids, rng):
    if isinstance(model, TextConditionedDenoiser):
      text = model.apply({"params": ema_params}, ids, method="encode_text")
    else:
      text = text_encoder_fn(frozen, ids)
    null = (model.apply({"params": ema_params}, ids.shape[0], method="null_text")
            if scale != 1.0 else None)
    log_x0 = samplers.conditioned_log_x0(
        lambda x, t, c: model.apply({"params": ema_params}, x, t, c), [text], null, scale)
    tokens = samplers.sample(log_x0, schedule, rng, (ids.shape[0], cfg.num_tokens), config)
    return tokenizer.module.apply(tokenizer.variables, tokens.reshape(-1, *cfg.spatial_size),
                                  method="decode")

  def write(step, state, batch, writer):
    captions = [str(c) for c in batch["captions"][:8]]
    images = generate(state.ema_params, jnp.asarray(tokenize(captions)),
                      jax.random.key(seed))
    path = writer.write_images(step, "samples", np.asarray(images))
    if path is not None:
      with open(path.replace(".png", ".txt"), "w") as f:
        f.write("\n".join(captions) + "\n")

  return write


def _per_host(config: Any) -> int:
  return loader.per_host_batch(int(config.train.global_batch), jax.process_count())
