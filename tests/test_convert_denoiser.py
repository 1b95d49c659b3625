"""Denoiser conversion: parity with diffusers' Transformer2DModel, official key layout."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import Transformer2DModel
from diffusers.models.embeddings import ImagePositionalEmbeddings
from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
    LearnedClassifierFreeSamplingEmbeddings,
)

from vqdiffusion_jax.convert import common, denoiser
from vqdiffusion_jax.models import transformer

K, SIZE, LAYERS, HEADS, HEAD_DIM, TEXT_LEN, TEXT_DIM, T = 31, 4, 2, 4, 16, 7, 24, 10
WIDTH = HEADS * HEAD_DIM
TOLERANCE = 1e-4

# diffusers name -> official name (the inverse of scripts/convert_vq_diffusion_to_diffusers.py).
TO_OFFICIAL = (
    ("latent_image_embedding.", "content_emb."), ("transformer_blocks.", "blocks."),
    (".norm1.", ".ln1."), (".norm2.", ".ln1_1."), (".norm3.", ".ln2."),
    (".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
    (".to_out.0.", ".proj."), (".ff.net.0.proj.", ".mlp.0."), (".ff.net.2.", ".mlp.2."),
)
HEAD_TO_OFFICIAL = {"norm_out.": "to_logits.0.", "out.": "to_logits.1."}


def _diffusers_model(seed, cross_attention_dim=TEXT_DIM, grid=None):
  torch.manual_seed(seed)
  model = Transformer2DModel(
      num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=LAYERS,
      num_vector_embeds=K + 1, sample_size=SIZE, cross_attention_dim=cross_attention_dim,
      num_embeds_ada_norm=T, norm_type="ada_norm", activation_fn="geglu-approximate",
      attention_bias=True)
  if grid is not None:
    model.latent_image_embedding = ImagePositionalEmbeddings(
        num_embed=K + 1, height=grid[0], width=grid[1], embed_dim=WIDTH)
  with torch.no_grad():
    for p in model.parameters():  # move LayerNorm affines and biases off their init
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _null_text(seed):
  torch.manual_seed(seed)
  module = LearnedClassifierFreeSamplingEmbeddings(True, hidden_size=TEXT_DIM, length=TEXT_LEN)
  with torch.no_grad():
    module.embeddings.normal_()
  return module


def _inputs(num_tokens, seed=0, text=True):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, K + 1, size=(2, num_tokens))
  tokens[:, ::3] = K  # [MASK]
  t = np.array([3, T - 1])
  features = rng.normal(size=(2, TEXT_LEN, TEXT_DIM)).astype(np.float32) if text else None
  return tokens, t, features


def _reference(model, tokens, t, text):
  """diffusers log p(x_0), class-last; AdaLayerNorm takes one timestep per call."""
  rows = []
  with torch.no_grad():
    for b in range(tokens.shape[0]):
      context = None if text is None else torch.from_numpy(text[b:b + 1])
      out = model(torch.from_numpy(tokens[b:b + 1]), encoder_hidden_states=context,
                  timestep=torch.tensor(int(t[b]))).sample
      rows.append(out.numpy().transpose(0, 2, 1))
  return np.concatenate(rows)


@functools.lru_cache
def _log_probs_fn(config):
  module = transformer.VQDiffusionTransformer(config)
  return jax.jit(lambda p, *a: jax.nn.log_softmax(module.apply({"params": p}, *a), axis=-1))


def _ours(config, params, tokens, t, text):
  out = _log_probs_fn(config)(params, jnp.asarray(tokens), jnp.asarray(t), text)
  assert out.shape == (tokens.shape[0], tokens.shape[1], K) and out.dtype == jnp.float32
  return np.asarray(out)


def _assert_close(ours, reference):
  diff = np.max(np.abs(ours - reference))
  print(f"max abs diff of log-probs: {diff:.2e}")
  assert diff < TOLERANCE, f"max abs diff {diff}"


def _assert_same_params(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _official(state_dict, prefix="transformer.transformer.", self_attn="attn1"):
  out = {}
  for key, value in state_dict.items():
    head = next((h for h in HEAD_TO_OFFICIAL if key.startswith(h)), None)
    if head:
      key = HEAD_TO_OFFICIAL[head] + key[len(head):]
    else:
      for old, new in TO_OFFICIAL:
        key = key.replace(old, new)
    out[prefix + key.replace(".attn1.", f".{self_attn}.")] = value
  return out


def test_load_diffusers_pipeline_directory_matches_diffusers(tmp_path):
  model, null = _diffusers_model(0), _null_text(1)
  model.save_pretrained(tmp_path / "transformer")
  null.save_pretrained(tmp_path / denoiser.PIPELINE_NULL_TEXT)
  config, params = denoiser.load_diffusers_pipeline(str(tmp_path))
  assert config.spatial_size == (SIZE, SIZE) and config.codebook_size == K
  assert config.condition_length == TEXT_LEN and config.has_null_text
  tokens, t, text = _inputs(SIZE * SIZE)
  _assert_close(_ours(config, params, tokens, t, text), _reference(model, tokens, t, text))
  null_text = transformer.VQDiffusionTransformer(config).apply(
      {"params": params}, 3, method="null_text")
  assert null_text.shape == (3, TEXT_LEN, TEXT_DIM)
  np.testing.assert_array_equal(null_text[2], null.embeddings.detach().numpy())


@pytest.mark.parametrize("grid, text", [((3, 5), True), ((SIZE, SIZE), False)],
                         ids=["non_square_text", "unconditional"])
def test_from_diffusers_matches_diffusers(grid, text):
  model = _diffusers_model(2, cross_attention_dim=TEXT_DIM if text else None, grid=grid)
  config = denoiser.config_from_diffusers(dict(model.config), spatial_size=grid)
  assert config.conditioning == ("text" if text else "none")
  params = denoiser.from_diffusers(model.state_dict(), config)
  tokens, t, features = _inputs(grid[0] * grid[1], seed=1, text=text)
  _assert_close(_ours(config, params, tokens, t, features),
                _reference(model, tokens, t, features))
  if not text:  # the official unconditional block names its attention "attn"
    official = denoiser.from_official(_official(model.state_dict(), self_attn="attn"), config)
    _assert_same_params(official, params)


def _official_checkpoint(raw, ema, raw_null, ema_null):
  junk = np.ones((2, 3), np.float32)
  model = _official(raw.state_dict()) | {
      "transformer.empty_text_embed": raw_null, "content_codec.decoder.conv.weight": junk,
      "transformer.condition_emb.transformer.token_embedding.weight": junk,
      "transformer.log_cumprod_at": junk, "transformer.Lt_history": junk}
  ema_state = _official(ema.state_dict(), prefix="transformer.") | {
      "empty_text_embed": ema_null, "condition_emb.transformer.token_embedding.weight": junk,
      "log_cumprod_at": junk, "Lt_count": junk}
  return {"model": model, "ema": ema_state, "epoch": 3}


def test_from_official_takes_ema_weights():
  raw, ema = _diffusers_model(3), _diffusers_model(4)
  raw_null = torch.randn(TEXT_LEN, TEXT_DIM, dtype=torch.float64)
  ema_null = torch.randn(TEXT_LEN, TEXT_DIM, dtype=torch.float64)
  checkpoint = _official_checkpoint(raw, ema, raw_null, ema_null)
  config = denoiser.config_from_diffusers(
      dict(ema.config), null_text_config={"learnable": True, "length": TEXT_LEN})
  params = denoiser.from_official(checkpoint, config)
  tokens, t, text = _inputs(SIZE * SIZE, seed=2)
  _assert_close(_ours(config, params, tokens, t, text), _reference(ema, tokens, t, text))
  np.testing.assert_allclose(params["null_text"], ema_null.numpy(), rtol=1e-7)
  raw_params = denoiser.from_official(checkpoint, config, use_ema=False)
  _assert_same_params(raw_params, denoiser.from_diffusers(
      raw.state_dict(), config, {"embeddings": raw_null}))
  # A bare DALLE-level state dict and a scanned config read the same weights.
  scanned_config = dataclasses.replace(config, scan_layers=True)
  scanned = denoiser.from_official(checkpoint["model"], scanned_config)
  _assert_same_params(transformer.unstack_layers(scanned), raw_params)


def _expect_error(state, config, key):
  with pytest.raises(common.ConversionError, match=key.replace(".", r"\.")):
    denoiser.from_official(state, config)


def test_from_official_names_bad_keys():
  model = _diffusers_model(5)
  config = denoiser.config_from_diffusers(dict(model.config))
  state = _official(model.state_dict())
  denoiser.from_official(state, config)
  missing = "transformer.transformer.blocks.1.attn2.key.weight"
  _expect_error({k: v for k, v in state.items() if k != missing}, config, missing)
  extra = "transformer.transformer.blocks.0.attn1.extra"
  _expect_error(state | {extra: torch.zeros(3)}, config, extra)
  stray = "transformer.unknown_buffer"
  _expect_error(state | {stray: torch.zeros(3)}, config, stray)
  wrong = "transformer.transformer.to_logits.1.bias"
  _expect_error(state | {wrong: torch.zeros(K + 1)}, config, wrong)
  needs_null = dataclasses.replace(config, learnable_null_text=True)
  _expect_error(state, needs_null, "transformer.empty_text_embed")


CLASS_CONFIG = transformer.TransformerConfig(
    codebook_size=K, spatial_size=(SIZE, SIZE), num_layers=LAYERS, embed_dim=WIDTH,
    num_heads=HEADS, num_timesteps=T, conditioning="class", num_classes=6, mlp_type="conv",
    position_grid=(8, 8))


def _official_class_state(config, rng):
  """Torch-shaped random tensors under the official Condition2ImageTransformer names."""
  d, hidden = config.embed_dim, config.mlp_ratio * config.embed_dim
  shapes = {"content_emb.emb.weight": (K + 1, d), "content_emb.height_emb.weight": (8, d),
            "content_emb.width_emb.weight": (8, d), "to_logits.0.weight": (d,),
            "to_logits.0.bias": (d,), "to_logits.1.weight": (K, d), "to_logits.1.bias": (K,)}
  for i in range(config.num_layers):
    block = f"blocks.{i}"
    for norm, rows in (("ln1", config.num_timesteps), ("ln2", config.num_classes)):
      shapes |= {f"{block}.{norm}.emb.weight": (rows, d),
                 f"{block}.{norm}.linear.weight": (2 * d, d),
                 f"{block}.{norm}.linear.bias": (2 * d,)}
    for proj in ("query", "key", "value", "proj"):
      shapes |= {f"{block}.attn.{proj}.weight": (d, d), f"{block}.attn.{proj}.bias": (d,)}
    shapes |= {f"{block}.mlp.conv1.weight": (hidden, d, 3, 3),
               f"{block}.mlp.conv1.bias": (hidden,),
               f"{block}.mlp.conv2.weight": (d, hidden, 3, 3), f"{block}.mlp.conv2.bias": (d,)}
  return {f"transformer.transformer.{k}": rng.normal(size=s).astype(np.float32)
          for k, s in shapes.items()}


def test_from_official_class_conditional_conv_mlp_matches_torch():
  rng = np.random.default_rng(6)
  state = _official_class_state(CLASS_CONFIG, rng)
  params = denoiser.from_official(state, CLASS_CONFIG)
  block = "transformer.transformer.blocks.1"
  np.testing.assert_array_equal(params["block_1"]["mlp_norm"]["embedding"],
                                state[f"{block}.ln2.emb.weight"])
  # The official conv_mlp: 'b (h w) c -> b c h w', conv3x3, GELU2, conv3x3, back.
  x = rng.normal(size=(2, SIZE * SIZE, WIDTH)).astype(np.float32)
  w1, b1, w2, b2 = (torch.from_numpy(state[f"{block}.mlp.{n}"])
                    for n in ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"))
  grid = torch.from_numpy(x).reshape(2, SIZE, SIZE, WIDTH).permute(0, 3, 1, 2)
  hidden = torch.nn.functional.conv2d(grid, w1, b1, padding=1)
  hidden = hidden * torch.sigmoid(1.702 * hidden)
  expected = torch.nn.functional.conv2d(hidden, w2, b2, padding=1)
  expected = expected.permute(0, 2, 3, 1).reshape(2, SIZE * SIZE, WIDTH).numpy()
  mlp = transformer.ConvMlp(4, (SIZE, SIZE))
  ours = jax.jit(mlp.apply)({"params": params["block_1"]["mlp"]}, x)
  np.testing.assert_allclose(ours, expected, atol=TOLERANCE * np.abs(expected).max())
