"""diffusers ``VQDiffusionPipeline`` directories: conversion, loading, parity, real sizes.

The fixtures are written by ``VQDiffusionPipeline.save_pretrained`` itself, converted by the
``python -m vqdiffusion_jax.convert`` command, and compared with the diffusers pipeline's own
steps (``_encode_prompt``, its guidance and ``truncate``, ``VQDiffusionScheduler.q_posterior``)
on the same weights. The last tests use the sizes of microsoft/vq-diffusion-ithq.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers import Transformer2DModel, VQDiffusionScheduler, VQModel
from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
  LearnedClassifierFreeSamplingEmbeddings,
  VQDiffusionPipeline,
)

from tests.test_clip_text import LONG_PROMPT, TEXT_CONFIG, TOKENIZER
from tests.test_convert_denoiser import SIZE, K, T, _diffusers_model
from tests.test_vqgan import TINY as TINY_VQMODEL
from vqdiffusion_jax import Pipeline
from vqdiffusion_jax.convert import __main__ as cli
from vqdiffusion_jax.convert import checkpoints, clip, converted, denoiser, vqvae
from vqdiffusion_jax.diffusion import discrete, guidance, samplers
from vqdiffusion_jax.models import clip_text, transformer, vqgan

TOLERANCE = 1e-4
TEXT_WIDTH = TEXT_CONFIG["hidden_size"]
CONTEXT = TOKENIZER.model_max_length
# Off the scheduler's defaults, so that a schedule not read from scheduler/ fails the parity.
SCHEDULER = {"alpha_cum_start": 0.9999, "gamma_cum_end": 0.9998}
PROMPTS = ["the cat sat, the end.", "a big red dog!", LONG_PROMPT]
GUIDANCE, TRUNCATION = 3.0, 0.86

# microsoft/vq-diffusion-ithq: transformer/config.json (the fields
# scripts/convert_vq_diffusion_to_diffusers.py sets from configs/ithq.yaml: n_embd 1408 over
# n_head 16, n_layer 36, num_embed 4096 + [MASK], 32 x 32 tokens, condition_dim 512,
# diffusion_step 100).
ITHQ_TRANSFORMER = {
    "num_attention_heads": 16, "attention_head_dim": 88, "num_layers": 36,
    "num_vector_embeds": 4097, "sample_size": 32, "cross_attention_dim": 512,
    "num_embeds_ada_norm": 100, "norm_type": "ada_norm", "activation_fn": "geglu-approximate",
    "attention_bias": True, "dropout": 0.0, "norm_num_groups": 32,
}
# learned_classifier_free_sampling_embeddings/config.json: CLIP's width, the tokenizer's length.
ITHQ_NULL_TEXT = {"learnable": True, "hidden_size": 512, "length": 77}
# text_encoder/: openai/clip-vit-base-patch32's text tower (transformers' CLIPTextConfig defaults).
ITHQ_CLIP = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
             "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
             "hidden_act": "quick_gelu"}
# vqvae/config.json: the ITHQ VQ-VAE (ch 128, ch_mult 1 2 2 4, attention at 32 x 32, z 256,
# 4096 codes of 128 dims), an f8 grid: 256 x 256 images <-> 32 x 32 tokens.
ITHQ_VQMODEL = {
    "block_out_channels": (128, 256, 256, 512), "layers_per_block": 2, "latent_channels": 256,
    "num_vq_embeddings": 4096, "vq_embed_dim": 128, "norm_num_groups": 32,
    "down_block_types": ("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
    "up_block_types": ("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
}


def tiny_pipeline(seed: int = 0) -> VQDiffusionPipeline:
  """A tiny random diffusers pipeline: K = 31 codes on 4 x 4 tokens, T = 10, CLIP of width 32."""
  model = _diffusers_model(seed, cross_attention_dim=TEXT_WIDTH)
  torch.manual_seed(seed + 1)
  null_text = LearnedClassifierFreeSamplingEmbeddings(True, hidden_size=TEXT_WIDTH,
                                                      length=CONTEXT)
  with torch.no_grad():
    null_text.embeddings.normal_()
  codec = VQModel(**{**TINY_VQMODEL, "num_vq_embeddings": K}).eval()
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_CONFIG)).eval()
  scheduler = VQDiffusionScheduler(num_vec_classes=K + 1, num_train_timesteps=T, **SCHEDULER)
  return VQDiffusionPipeline(
      vqvae=codec, text_encoder=text_encoder, tokenizer=TOKENIZER, transformer=model,
      scheduler=scheduler, learned_classifier_free_sampling_embeddings=null_text)


def convert_cli(src: str, out: str, *extra: str) -> subprocess.CompletedProcess:
  """``python -m vqdiffusion_jax.convert SRC --out OUT`` in a fresh interpreter."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "vqdiffusion_jax.convert", src, "--out", out,
                         *extra], capture_output=True, text=True, env=env, check=False,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
  """(directory written by save_pretrained, the diffusers pipeline)."""
  pipe = tiny_pipeline()
  root = str(tmp_path_factory.mktemp("vq_diffusion") / "pipeline")
  pipe.save_pretrained(root)
  return root, pipe


@pytest.fixture(scope="module")
def converted_dir(diffusers_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("converted") / "ckpt")
  result = convert_cli(diffusers_dir[0], out)
  assert result.returncode == 0, result.stderr
  assert f"wrote {out}" in result.stdout
  return out


@pytest.fixture(scope="module")
def ours(converted_dir):
  return Pipeline.from_pretrained(converted_dir, precision="float32")  # parity: exact


def _encode(pipe: VQDiffusionPipeline, prompts) -> np.ndarray:
  """diffusers' [null; text] features, (2B, L, D)."""
  with torch.no_grad():
    return pipe._encode_prompt(prompts, 1, True).numpy()


def _our_features(pipeline: Pipeline, prompts):
  ids = pipeline.tokenize(prompts)
  features = pipeline.denoiser.encode_text(pipeline.params, pipeline.text_params, ids)
  return features, pipeline.denoiser.null_condition(pipeline.params, len(prompts))


def _their_log_x0(pipe, embeds, x_t, t):
  """diffusers' __call__ up to the scheduler: [uncond; cond] pass, guidance, truncate, clamp."""
  with torch.no_grad():
    out = pipe.transformer(torch.from_numpy(np.concatenate([x_t, x_t])),
                           encoder_hidden_states=torch.from_numpy(embeds),
                           timestep=torch.tensor(t)).sample
    uncond, cond = out.chunk(2)
    out = uncond + GUIDANCE * (cond - uncond)
    out = out - torch.logsumexp(out, dim=1, keepdim=True)
    return pipe.truncate(out, TRUNCATION).clamp(-70)


def _our_log_x0(pipeline, features, null, x_t, t):
  """The Pipeline's sampler input: ``conditioned_log_x0`` (guidance) then ``truncate``."""
  log_x0_fn = samplers.conditioned_log_x0(
      lambda x, s, c: pipeline.denoiser.logits(pipeline.params, x, s, c), [features], null,
      GUIDANCE)
  batch = x_t.shape[0]
  return guidance.truncate(log_x0_fn(jnp.asarray(x_t), jnp.full((batch,), t)), TRUNCATION)


def _noised_tokens(batch, seed=0):
  rng = np.random.default_rng(seed)
  x_t = rng.integers(0, K, size=(batch, SIZE * SIZE))
  x_t[:, ::3] = K  # [MASK]
  return x_t


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_save_pretrained_dir_converts_and_both_dirs_sample(diffusers_dir, converted_dir, ours):
  src, _ = diffusers_dir
  assert _read_json(os.path.join(src, "model_index.json"))["_class_name"] == "VQDiffusionPipeline"
  stored = converted.read_config(converted_dir)
  assert sorted(stored["components"]) == ["denoiser", "text_encoder", "vqvae"]
  assert stored["pipeline"]["tokenizer_convention"] == "diffusers"
  assert stored["pipeline"]["schedule"]["att_1"] == SCHEDULER["alpha_cum_start"]
  assert stored["pipeline"]["schedule"]["num_timesteps"] == T
  direct = Pipeline.from_pretrained(src, precision="float32")
  jax.tree.map(np.testing.assert_array_equal, direct.params, ours.params)
  assert direct.image_size == ours.image_size == SIZE * 2
  options = {"num_inference_steps": 4, "guidance_scale": GUIDANCE,
             "truncation_rate": TRUNCATION, "seed": 3}
  tokens = ours(PROMPTS[:2], output_type="tokens", **options)
  np.testing.assert_array_equal(tokens, direct(PROMPTS[:2], output_type="tokens", **options))
  assert all(t.shape == (SIZE, SIZE) and t.min() >= 0 and t.max() < K for t in tokens)
  images = direct(PROMPTS[:2], output_type="np", **options)
  assert images[0].shape == (SIZE * 2, SIZE * 2, 3) and 0 <= images[0].min() <= 1


@pytest.mark.parametrize("prompts", [PROMPTS[:2], PROMPTS[2:]], ids=["batch", "too_long"])
def test_text_features_match_encode_prompt(diffusers_dir, ours, prompts):
  _, pipe = diffusers_dir
  if LONG_PROMPT in prompts:
    with pytest.warns(UserWarning, match="dropped"):
      features, null = _our_features(ours, prompts)
  else:
    features, null = _our_features(ours, prompts)
  theirs = _encode(pipe, prompts)  # diffusers cuts a too-long prompt only when it is alone
  batch = len(prompts)
  text_diff, null_diff = _max_diff(features, theirs[batch:]), _max_diff(null, theirs[:batch])
  print(f"text features: {text_diff:.2e}, null text: {null_diff:.2e}")
  assert text_diff < TOLERANCE and null_diff < TOLERANCE


@pytest.mark.parametrize("t", [0, 4, T - 1])
def test_guided_truncated_log_x0_match(diffusers_dir, ours, t):
  _, pipe = diffusers_dir
  prompts = PROMPTS[:2]
  features, null = _our_features(ours, prompts)
  x_t = _noised_tokens(len(prompts), seed=t)
  theirs = _their_log_x0(pipe, _encode(pipe, prompts), x_t, t).numpy().transpose(0, 2, 1)
  got = np.asarray(_our_log_x0(ours, features, null, x_t, t))
  assert np.all(got[..., -1] == discrete.LOG_PROB_MIN)  # [MASK] is never x_0
  assert np.array_equal(got[..., :-1] <= -70, theirs <= -70)  # the same classes truncated
  diff = _max_diff(got[..., :-1], theirs)
  print(f"t={t}: guided, truncated log p(x_0): {diff:.2e}")
  assert diff < TOLERANCE


@pytest.mark.parametrize("t", [1, 5, T - 1])
def test_posterior_matches_scheduler(diffusers_dir, ours, t):
  _, pipe = diffusers_dir
  prompts = PROMPTS[:2]
  features, null = _our_features(ours, prompts)
  x_t = _noised_tokens(len(prompts), seed=10 + t)
  theirs_x0 = _their_log_x0(pipe, _encode(pipe, prompts), x_t, t)
  with torch.no_grad():
    theirs = pipe.scheduler.q_posterior(theirs_x0, torch.from_numpy(x_t), t)
  theirs = theirs.clamp(-70, 0).numpy().transpose(0, 2, 1)
  batch = jnp.full((len(prompts),), t)
  got = discrete.q_posterior_tokens(ours.schedule, _our_log_x0(ours, features, null, x_t, t),
                                    jnp.asarray(x_t), batch, batch - 1)
  diff = _max_diff(got, theirs)
  print(f"t={t}: log p(x_(t-1) | x_t): {diff:.2e}")
  assert diff < TOLERANCE


def _edited_copy(src, tmp_path, name, edit):
  copy = str(tmp_path / name)
  shutil.copytree(src, copy)
  path = os.path.join(copy, edit[0])
  values = _read_json(path)
  values.update(edit[1])
  with open(path, "w") as f:
    json.dump(values, f)
  return copy


@pytest.mark.parametrize("edit, message", [
    (("scheduler/scheduler_config.json", {"num_train_timesteps": T + 1}), "num_train_timesteps"),
    (("scheduler/scheduler_config.json", {"num_vec_classes": K}), "num_vec_classes"),
    (("scheduler/scheduler_config.json", {"_class_name": "DDPMScheduler"}), "DDPMScheduler"),
    (("model_index.json", {"_class_name": "StableDiffusionPipeline"}), "not a diffusers"),
])
def test_inconsistent_pipeline_dirs_are_clear_errors(diffusers_dir, tmp_path, edit, message):
  bad = _edited_copy(diffusers_dir[0], tmp_path, "bad", edit)
  with pytest.raises(ValueError, match=message) as error:
    Pipeline.from_pretrained(bad)
  assert edit[0].split("/")[0] in str(error.value)
  with pytest.raises(ValueError, match=message):
    checkpoints.convert(bad, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_missing_scheduler_is_named(diffusers_dir, tmp_path):
  bad = str(tmp_path / "no_scheduler")
  shutil.copytree(diffusers_dir[0], bad, ignore=shutil.ignore_patterns("scheduler_config.json"))
  with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
    Pipeline.from_pretrained(bad)


# Real sizes.

def _runtime_free(config: transformer.TransformerConfig) -> dict:
  return {k: v for k, v in vars(config).items() if k not in checkpoints.RUNTIME_FIELDS}


def test_ithq_transformer_config_is_the_large_preset():
  ours = denoiser.config_from_diffusers(ITHQ_TRANSFORMER, null_text_config=ITHQ_NULL_TEXT)
  assert _runtime_free(ours) == _runtime_free(transformer.preset("large"))
  assert (ours.embed_dim, ours.head_dim, ours.condition_length) == (1408, 88, 77)


def _meta_shapes(build) -> dict[str, tuple[int, ...]]:
  """Shapes of a torch module's state dict, built on the meta device (nothing allocated)."""
  with torch.device("meta"):
    module = build()
  return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _check_rules_on_shapes(abstract, rules, shapes, what, ignore=lambda key: False):
  """Every rule on zero-stride stand-ins of the source shapes: targets, keys and shapes agree."""
  flat = {tuple(k.key for k in path): leaf.shape for path, leaf in
          jax.tree_util.tree_flatten_with_path(nn.unbox(abstract))[0]}
  problems = sorted(set(flat) ^ set(rules))
  used = set()
  for path, want in flat.items():
    key, transform = rules[path]
    if key not in shapes:
      problems.append(f"{'/'.join(path)}: no {key}")
      continue
    used.add(key)
    stand_in = np.broadcast_to(np.zeros((), np.bool_), shapes[key])
    got = transform(stand_in).shape
    if tuple(got) != tuple(want):
      problems.append(f"{key} {shapes[key]} -> {got}, module {tuple(want)}")
  problems += [f"unused {k}" for k in shapes if k not in used and not ignore(k)]
  assert not problems, f"{what}: {problems}"
  return len(flat)


def test_every_rule_fits_the_full_ithq_shapes():
  config = denoiser.config_from_diffusers(ITHQ_TRANSFORMER, null_text_config=ITHQ_NULL_TEXT)
  shapes = _meta_shapes(lambda: Transformer2DModel(**ITHQ_TRANSFORMER))
  shapes[denoiser.NULL_TEXT_KEY] = _meta_shapes(
      lambda: LearnedClassifierFreeSamplingEmbeddings(**ITHQ_NULL_TEXT))["embeddings"]
  abstract = transformer.abstract_params(config)
  count = _check_rules_on_shapes(
      abstract, denoiser._rules(config, denoiser.DIFFUSERS, null_text_key=denoiser.NULL_TEXT_KEY),
      shapes, "ITHQ transformer")
  assert count == len(shapes)

  codec = vqgan.VQGAN(vqvae.config_from_diffusers(ITHQ_VQMODEL))
  assert codec.config.downsampling_factor == 8 and codec.config.num_embeddings == 4096
  abstract = vqvae._abstract_params(codec)
  _check_rules_on_shapes(abstract, vqvae._rules(abstract, vqvae._diffusers_key),
                         _meta_shapes(lambda: VQModel(**ITHQ_VQMODEL)), "ITHQ VQModel")

  text = transformers.CLIPTextConfig(**ITHQ_CLIP)
  module = clip_text.CLIPTextTransformer(
      vocab_size=text.vocab_size, hidden_size=text.hidden_size,
      num_layers=text.num_hidden_layers, num_heads=text.num_attention_heads,
      intermediate_size=text.intermediate_size, max_positions=text.max_position_embeddings,
      layer_norm_eps=text.layer_norm_eps, activation=text.hidden_act)
  abstract = jax.eval_shape(module.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 77), jnp.int32))["params"]
  _check_rules_on_shapes(abstract, clip.text_rules(module),
                         _meta_shapes(lambda: transformers.CLIPTextModel(text)), "CLIP text",
                         ignore=lambda key: key.endswith("position_ids"))


def _real_width_pipeline(tokenizer) -> VQDiffusionPipeline:
  """ITHQ's widths and grids at reduced depth: 2 blocks of 16 x 88, 1 CLIP layer, small VQ-VAE."""
  torch.manual_seed(0)
  model = Transformer2DModel(**{**ITHQ_TRANSFORMER, "num_layers": 2}).eval()
  null_text = LearnedClassifierFreeSamplingEmbeddings(**ITHQ_NULL_TEXT)
  with torch.no_grad():
    null_text.embeddings.normal_()
  text_config = transformers.CLIPTextConfig(**{**ITHQ_CLIP, "num_hidden_layers": 1})
  codec = VQModel(**{**ITHQ_VQMODEL, "block_out_channels": (32, 32, 32, 64),
                     "layers_per_block": 1}).eval()
  return VQDiffusionPipeline(
      vqvae=codec, text_encoder=transformers.CLIPTextModel(text_config).eval(),
      tokenizer=tokenizer, transformer=model,
      scheduler=VQDiffusionScheduler(num_vec_classes=ITHQ_TRANSFORMER["num_vector_embeds"]),
      learned_classifier_free_sampling_embeddings=null_text)


def test_real_geometry_pipeline_converts_and_samples(tmp_path):
  start = time.perf_counter()
  # The ITHQ tokenizer pads with "!" (id 0), as scripts/convert_vq_diffusion_to_diffusers.py sets.
  TOKENIZER.save_pretrained(str(tmp_path / "tok"))
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "tok"), pad_token="!")
  assert tokenizer.pad_token_id == 0
  pipe = _real_width_pipeline(tokenizer)
  src, out = str(tmp_path / "ithq_like"), str(tmp_path / "converted")
  pipe.save_pretrained(src)
  assert cli.main([src, "--out", out]) == 0  # in this process: the fixture above runs python -m
  ours = Pipeline.from_pretrained(out, precision="float32")
  config = ours.denoiser.network.config
  assert (config.codebook_size, config.spatial_size, config.embed_dim, config.num_heads,
          config.num_timesteps) == (4096, (32, 32), 1408, 16, 100)
  assert ours.image_size == 256 and ours.latent_grid == (32, 32)
  # The real-width model's conditional log p(x_0) against diffusers' (guidance: the tiny tests).
  prompts = ["a teddy bear playing in the pool"]
  features, _ = _our_features(ours, prompts)
  embeds = _encode(pipe, prompts)[1:]
  np.testing.assert_allclose(np.asarray(features), embeds, atol=TOLERANCE)
  x_t = np.random.default_rng(0).integers(0, 4096, size=(1, 1024))
  x_t[:, ::2] = 4096  # [MASK]
  t = 60
  with torch.no_grad():
    theirs = pipe.transformer(torch.from_numpy(x_t), encoder_hidden_states=torch.from_numpy(embeds),
                              timestep=torch.tensor(t)).sample.numpy().transpose(0, 2, 1)
  got = ours.denoiser.logits(ours.params, jnp.asarray(x_t), jnp.full((1,), t), features)
  diff = _max_diff(jax.nn.log_softmax(got, axis=-1), theirs)
  print(f"real width, t={t}: log p(x_0): {diff:.2e}")
  assert diff < TOLERANCE
  images = ours(prompts, num_inference_steps=2, guidance_scale=GUIDANCE,
                truncation_rate=TRUNCATION, output_type="np", seed=0)
  assert images[0].shape == (256, 256, 3) and np.isfinite(images[0]).all()
  print(f"real geometry test: {time.perf_counter() - start:.1f} s")
