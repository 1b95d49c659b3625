"""Export to PyTorch: diffusers' VQDiffusionPipeline and the official checkpoint layout."""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers import Transformer2DModel, VQDiffusionPipeline, VQDiffusionScheduler, VQModel
from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
  LearnedClassifierFreeSamplingEmbeddings,
)

from configs import shapes
from tests import official_vqdiffusion as official
from tests.test_clip_text import CONTEXT, TEXT_CONFIG, TOKENIZER
from tests.test_convert_denoiser import official_log_probs
from vqdiffusion_jax import export
from vqdiffusion_jax.convert import checkpoints, converted, denoiser
from vqdiffusion_jax.convert import export as convert_export
from vqdiffusion_jax.diffusion import schedule as schedules
from vqdiffusion_jax.main import train_and_evaluate
from vqdiffusion_jax.models import clip_text, quantizer, transformer
from vqdiffusion_jax.models.conditioned import TextConditionedDenoiser
from vqdiffusion_jax.models.denoiser import Denoiser
from vqdiffusion_jax.models.paella import PaellaPredictor
from vqdiffusion_jax.models.text_encoder import TextEncoder
from vqdiffusion_jax.models.vqgan import VQGAN, VQGANConfig
from vqdiffusion_jax.pipeline import Pipeline

K, SIZE, LAYERS, HEADS, WIDTH, T = 31, 4, 2, 4, 32, 10
TOLERANCE = 1e-4
TEXT = transformer.TransformerConfig(
    codebook_size=K, spatial_size=(SIZE, SIZE), num_layers=LAYERS, embed_dim=WIDTH,
    num_heads=HEADS, condition_dim=TEXT_CONFIG["hidden_size"], condition_length=CONTEXT,
    num_timesteps=T)
VQ = VQGANConfig(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
                 num_embeddings=K, embed_dim=4, norm_num_groups=8, encoder_attention_levels=(1,),
                 decoder_attention_levels=(1,), ema=False)
CLIP = clip_text.CLIPTextTransformer(
    vocab_size=TEXT_CONFIG["vocab_size"], hidden_size=TEXT_CONFIG["hidden_size"],
    num_layers=TEXT_CONFIG["num_hidden_layers"], num_heads=TEXT_CONFIG["num_attention_heads"],
    intermediate_size=TEXT_CONFIG["intermediate_size"], max_positions=CONTEXT)


def _perturbed(params, seed):
  """Params moved off their init (unit LayerNorm scales, zero biases) by random noise."""
  leaves, tree = jax.tree.flatten(nn.meta.unbox(params))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.device_get(jax.tree.unflatten(tree, [
      x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]))


def _denoiser_params(config, seed=0):
  module = transformer.VQDiffusionTransformer(config)
  return _perturbed(module.init(jax.random.key(seed), *transformer.dummy_inputs(config))["params"],
                    seed)


def _vqvae_variables(config, seed=1):
  images = jnp.zeros((1, 8, 8, 3))
  return {k: _perturbed(v, seed) for k, v in
          VQGAN(config).init(jax.random.key(seed), images).items()}


def _clip_params(seed=2):
  return _perturbed(CLIP.init(jax.random.key(seed), jnp.zeros((1, CONTEXT), jnp.int32))["params"],
                    seed)


def _same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _pipeline(config, params, schedule=None, denoiser_network=None):
  """A Pipeline of a denoiser alone (what the official layout holds)."""
  return Pipeline(denoiser=Denoiser(denoiser_network or transformer.VQDiffusionTransformer(config)),
                  params=params, vqvae=None, vqvae_variables=None, tokenize=None,
                  schedule=schedule or schedules.mask_and_replace(config.num_timesteps,
                                                                  config.codebook_size))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A converted directory (denoiser with a learned null text, VQ-VAE, CLIP) and its params."""
  path = str(tmp_path_factory.mktemp("source") / "converted")
  parts = {"denoiser": _denoiser_params(TEXT), "vqvae": _vqvae_variables(VQ)["params"],
           "text_encoder": _clip_params()}
  configs = {"denoiser": checkpoints._config_dict(TEXT), "vqvae": checkpoints._config_dict(VQ),
             "text_encoder": checkpoints._config_dict(CLIP)}
  converted.save(path, {name: (configs[name], parts[name]) for name in parts}, source="random",
                 tokenizer=TOKENIZER)
  return path, parts


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("exported") / "pipeline")
  assert export.main([source[0], "--to", "diffusers", "--out", out]) == 0
  return out


@pytest.fixture(scope="module")
def torch_pipeline(exported):
  return VQDiffusionPipeline.from_pretrained(exported)


def test_diffusers_directory_loads_with_every_key(exported, torch_pipeline):
  pipe = torch_pipeline
  assert pipe.scheduler.config.num_vec_classes == K + 1
  for cls, sub in ((Transformer2DModel, "transformer"), (VQModel, "vqvae"),
                   (LearnedClassifierFreeSamplingEmbeddings,
                    denoiser.PIPELINE_NULL_TEXT)):
    _, info = cls.from_pretrained(exported, subfolder=sub, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  _, info = transformers.CLIPTextModel.from_pretrained(
      os.path.join(exported, "text_encoder"), output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  schedule = schedules.mask_and_replace(T, K)
  np.testing.assert_allclose(pipe.scheduler.log_cumprod_at.numpy()[:T],
                             np.asarray(schedule.log_cumprod_at)[:T], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(pipe.scheduler.log_cumprod_ct.numpy()[:T],
                             np.asarray(schedule.log_cumprod_ct)[:T], rtol=1e-6, atol=1e-6)


def test_diffusers_round_trip_is_exact(source, exported):
  _, parts = source
  module, params = checkpoints.load_denoiser(exported)
  assert module.config == TEXT
  _same(params, parts["denoiser"])
  _same(checkpoints.load_vqvae(exported)[1], parts["vqvae"])
  _same(checkpoints.load_text_encoder(exported)[1], parts["text_encoder"])


def _torch_log_probs(model, tokens, t, text):
  """diffusers' Transformer2DModel log p(x_0), class-last; one timestep per call."""
  rows = []
  with torch.no_grad():
    for b in range(tokens.shape[0]):
      out = model(torch.from_numpy(tokens[b:b + 1]), timestep=torch.tensor(int(t[b])),
                  encoder_hidden_states=torch.from_numpy(text[b:b + 1])).sample
      rows.append(out.numpy().transpose(0, 2, 1))
  return np.concatenate(rows)


def _max_diff(a, b):
  diff = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
  print(f"max abs diff {diff:.2e}")
  return diff


def test_diffusers_pipeline_matches_ours(source, torch_pipeline):
  _, parts = source
  pipe = torch_pipeline
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, K + 1, size=(2, SIZE * SIZE))
  tokens[:, ::3] = K
  t = np.array([2, T - 1])
  text = rng.normal(size=(2, CONTEXT, TEXT.condition_dim)).astype(np.float32)
  logits = transformer.VQDiffusionTransformer(TEXT).apply(
      {"params": parts["denoiser"]}, tokens, t, text)
  assert _max_diff(jax.nn.log_softmax(logits, -1),
                   _torch_log_probs(pipe.transformer, tokens, t, text)) <= TOLERANCE
  np.testing.assert_array_equal(
      pipe.learned_classifier_free_sampling_embeddings.embeddings.detach().numpy(),
      parts["denoiser"]["null_text"])

  grid = rng.integers(0, K, size=(2, SIZE, SIZE))
  ours = VQGAN(VQ).apply({"params": parts["vqvae"]}, jnp.asarray(grid), method="decode")
  with torch.no_grad():
    codes = pipe.vqvae.quantize.get_codebook_entry(torch.from_numpy(grid.reshape(-1)),
                                                   (2, SIZE, SIZE, VQ.embed_dim))
    theirs = pipe.vqvae.decode(codes, force_not_quantize=True).sample.numpy()
  assert _max_diff(ours, theirs.transpose(0, 2, 3, 1)) <= TOLERANCE

  ids = rng.integers(0, TEXT_CONFIG["vocab_size"], size=(2, CONTEXT))
  ours = clip_text.vq_diffusion_features(CLIP, parts["text_encoder"], jnp.asarray(ids))
  with torch.no_grad():
    hidden = pipe.text_encoder(torch.from_numpy(ids)).last_hidden_state
    theirs = (hidden / hidden.norm(dim=-1, keepdim=True)).numpy()  # the pipeline's _encode_prompt
  assert _max_diff(ours, theirs) <= TOLERANCE


def test_existing_output_needs_overwrite(source, exported, capsys):
  before = sorted(os.listdir(exported))
  assert export.main([source[0], "--to", "diffusers", "--out", exported]) == 2
  assert "exists" in capsys.readouterr().err
  assert sorted(os.listdir(exported)) == before
  assert export.main([source[0], "--to", "diffusers", "--out", exported, "--overwrite"]) == 0
  assert not [p for p in os.listdir(os.path.dirname(exported)) if p.startswith(".")]


SCHEDULE_BUFFERS = ("log_at", "log_bt", "log_ct", "log_cumprod_at", "log_cumprod_bt",
                    "log_cumprod_ct", "log_1_min_ct", "log_1_min_cumprod_ct")


def _official_diffusion(config):
  """The official DiffusionTransformer of ``config``'s sizes (official_vqdiffusion)."""
  sizes = {"n_layer": config.num_layers, "n_embd": config.embed_dim, "n_head": config.num_heads,
           "num_embed": config.codebook_size, "spatial_size": config.spatial_size,
           "diffusion_step": config.num_timesteps}
  if config.conditioning == "text":
    model_config = official.text_config(**sizes, learnable_cf=config.has_null_text,
                                        clip={"num_embed": 64, "width": 16, "layers": 1,
                                              "heads": 2})
  else:
    model_config = official.class_config(**sizes, emb_spatial_size=config.grid,
                                         class_number=config.class_rows)
  return official.build_model(model_config).transformer.eval()


OFFICIAL_TEXT = transformer.TransformerConfig(
    codebook_size=K, spatial_size=(SIZE, SIZE), num_layers=LAYERS, embed_dim=WIDTH,
    num_heads=HEADS, condition_dim=512, condition_length=77, num_timesteps=T)
OFFICIAL_CLASS = transformer.TransformerConfig(
    codebook_size=K, spatial_size=(SIZE, SIZE), num_layers=LAYERS, embed_dim=WIDTH,
    num_heads=HEADS, num_timesteps=T, conditioning="class", num_classes=5, mlp_type="conv",
    position_grid=(2 * SIZE, 2 * SIZE), learnable_null_class=True)


@pytest.mark.parametrize("config", [OFFICIAL_TEXT, OFFICIAL_CLASS], ids=["text", "class"])
def test_official_checkpoint_has_the_official_keys_and_round_trips(config, tmp_path):
  params = _denoiser_params(config, seed=3)
  schedule = schedules.mask_and_replace(T, K)
  path = export.export(_pipeline(config, params, schedule), tmp_path / "model.pth", to="official")
  checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  assert sorted(checkpoint) == ["ema", "model"]
  ema = checkpoint["ema"]
  assert set(checkpoint["model"]) == {f"transformer.{k}" for k in ema}
  # The official module takes it whole: only its frozen CLIP (condition_emb) is left out.
  diffusion = _official_diffusion(config)
  wanted = diffusion.state_dict()
  assert {k: tuple(v.shape) for k, v in ema.items()} == {
      k: tuple(v.shape) for k, v in wanted.items() if not k.startswith("condition_emb.")}
  assert all(ema[k].dtype == wanted[k].dtype for k in ema)
  missing, unexpected = diffusion.load_state_dict(ema, strict=False)
  assert not unexpected and all(k.startswith("condition_emb.") for k in missing)
  tokens, t = np.random.default_rng(2).integers(0, K + 1, size=(2, SIZE * SIZE)), np.array([1, 7])
  if config.conditioning == "text":
    condition = np.random.default_rng(3).normal(size=(2, 77, 512)).astype(np.float32)
  else:
    condition = np.array([3, config.num_classes])  # a label and the null class
  ours = jax.nn.log_softmax(transformer.VQDiffusionTransformer(config).apply(
      {"params": params}, jnp.asarray(tokens), jnp.asarray(t), jnp.asarray(condition)), -1)
  assert _max_diff(ours, official_log_probs(diffusion, tokens, t, condition)) < TOLERANCE
  for name in SCHEDULE_BUFFERS:
    assert ema[name].dtype == torch.float32
  np.testing.assert_array_equal(ema["log_1_min_cumprod_ct"], schedule.log_1m_cumprod_ct)
  np.testing.assert_array_equal(ema["log_cumprod_at"], schedule.log_cumprod_at)
  assert ema["log_at"].shape == (T,) and ema["log_cumprod_bt"].shape == (T + 1,)
  assert not ema["Lt_history"].any() and not ema["Lt_count"].any()
  if config.conditioning == "text":
    n = SIZE * SIZE
    np.testing.assert_array_equal(ema["transformer.blocks.1.attn2.mask"],
                                  np.tril(np.ones((n, n))).reshape(1, 1, n, n))
    assert ema["empty_text_embed"].dtype == torch.float64  # the official Parameter's dtype
    assert ema["empty_text_embed"].shape == (77, 512)
  assert ema["transformer.content_emb.height_emb.weight"].shape == (config.grid[0], WIDTH)
  _, back = checkpoints.load_denoiser(path, config=config)
  _same(back, params)
  _, raw = checkpoints.load_denoiser(path, config=config, use_ema=False)
  _same(raw, params)


def _trained_text_pipeline():
  config = transformer.TransformerConfig(
      codebook_size=K, spatial_size=(SIZE, SIZE), num_layers=1, embed_dim=WIDTH,
      num_heads=HEADS, condition_dim=16, condition_length=8, num_timesteps=T)
  network = TextConditionedDenoiser(config, TextEncoder(vocab_size=20, width=16, num_layers=1,
                                                        num_heads=2, max_length=8))
  den = Denoiser(network)
  params = _perturbed(den.init(jax.random.key(4))["params"], 4)
  return _pipeline(config, params, denoiser_network=network), params


def test_our_trained_text_encoder_is_a_clear_error(tmp_path):
  pipeline, params = _trained_text_pipeline()
  for to in export.TARGETS:
    with pytest.raises(convert_export.ExportError, match="word-level text encoder"):
      export.export(pipeline, tmp_path / to, to=to)
    assert not os.path.exists(tmp_path / to)
  out = export.export(pipeline, tmp_path / "denoiser", to="diffusers", denoiser_only=True)
  assert sorted(os.listdir(out)) == [denoiser.PIPELINE_NULL_TEXT, "transformer"]
  _, back = denoiser.load_diffusers_pipeline(out)
  _same(back, params["denoiser"])


def test_parts_without_a_pytorch_counterpart_are_named(source):
  pipeline = Pipeline.from_pretrained(source[0])
  class_pipeline = _pipeline(OFFICIAL_CLASS, _denoiser_params(OFFICIAL_CLASS))
  with pytest.raises(convert_export.ExportError, match="class conditioning.*mlp_type='conv'"):
    export.diffusers_modules(class_pipeline, denoiser_only=True)
  with pytest.raises(convert_export.ExportError, match="patch VQ-VAE"):
    convert_export.vqvae_to_diffusers(VQGANConfig(patch_size=4), pipeline.vqvae_variables)
  paella = PaellaPredictor(codebook_size=K, num_timesteps=T, condition_dim=8, condition_length=4)
  with pytest.raises(convert_export.ExportError, match="Paella"):
    export.official_checkpoint(_pipeline(TEXT, None, denoiser_network=paella))
  with pytest.raises(convert_export.ExportError, match="VQDiffusionScheduler"):
    convert_export.scheduler_config(schedules.cosine(T, K))
  pooled = dataclasses.replace(TEXT, pooled_text=True)
  with pytest.raises(convert_export.ExportError, match="pooled_text"):
    convert_export.denoiser_to_official(pipeline.params, pooled, pipeline.schedule)
  with pytest.raises(convert_export.ExportError, match=r"empty_text_embed is \(77, 512\)"):
    convert_export.denoiser_to_official(pipeline.params, TEXT, pipeline.schedule)


OTHER_ENDS = {"att_1": 0.999, "att_T": 1e-3, "ctt_1": 1e-4, "ctt_T": 0.99}


@pytest.mark.parametrize("ends", [{}, OTHER_ENDS], ids=["official", "other_ends"])
def test_a_linear_schedule_becomes_the_same_vq_diffusion_scheduler(ends):
  ours = schedules.mask_and_replace(T, K, **ends)
  theirs = VQDiffusionScheduler(**convert_export.scheduler_config(ours))
  for name in ("log_at", "log_bt", "log_ct"):
    np.testing.assert_allclose(getattr(theirs, name).numpy(), getattr(ours, name), rtol=1e-5)
  for name in ("log_cumprod_at", "log_cumprod_bt", "log_cumprod_ct"):
    np.testing.assert_allclose(getattr(theirs, name).numpy()[:T], getattr(ours, name)[:T],
                               rtol=1e-5)


def test_an_ema_codebook_is_exported_from_its_statistics():
  ema = dataclasses.replace(VQ, ema=True)
  variables = _vqvae_variables(ema, seed=5)
  state, config = convert_export.vqvae_to_diffusers(ema, variables)
  np.testing.assert_array_equal(state["quantize.embedding.weight"],
                                variables[quantizer.STATS]["quantize"]["codebook"])
  assert config["num_vq_embeddings"] == K and config["vq_embed_dim"] == VQ.embed_dim


def test_invert_names_parameters_and_transforms_it_cannot_export():
  params = {"dense": {"kernel": np.ones((2, 3)), "extra": np.ones(2)}}
  rules = {("dense", "kernel"): ("dense.weight", convert_export.common.linear)}
  with pytest.raises(convert_export.ExportError, match=r"counterpart: \['dense/extra'\]"):
    convert_export.invert(rules, params, what="toy")
  del params["dense"]["extra"]
  np.testing.assert_array_equal(convert_export.invert(rules, params, what="toy")["dense.weight"],
                                np.ones((3, 2)))
  doubled = {("dense", "kernel"): ("dense.weight", lambda w: 2 * w)}
  with pytest.raises(convert_export.ExportError, match="no inverse"):
    convert_export.invert(doubled, params, what="toy")


def test_pooled_text_modulation_is_named_as_what_diffusers_lacks(tiny_workdir, tmp_path, capsys):
  out = str(tmp_path / "denoiser")
  assert export.main([tiny_workdir, "--to", "diffusers", "--out", out, "--denoiser-only"]) == 2
  assert "pooled_text" in capsys.readouterr().err and not os.path.exists(out)


def test_a_training_workdir_exports_its_denoiser(tmp_path, capsys):
  """A run that trains its own text encoder: the transformer alone goes out."""
  config = shapes.get_config("runlocal")
  with config.unlocked():
    config.denoiser.model.pooled_text = False  # diffusers' transformer has no such modulation
    config.train.num_steps = config.vqvae.train.num_steps = 1
    config.eval.samplers = ()
  workdir = str(tmp_path / "run")
  train_and_evaluate(config, workdir)
  out = str(tmp_path / "denoiser")
  assert export.main([workdir, "--to", "diffusers", "--out", out]) == 2
  assert "word-level text encoder" in capsys.readouterr().err and not os.path.exists(out)
  assert export.main([workdir, "--to", "diffusers", "--out", out, "--denoiser-only"]) == 0
  pipe = Pipeline.from_pretrained(workdir, precision="float32")
  config, params = pipe.denoiser.network.config, pipe.params["denoiser"]
  model = Transformer2DModel.from_pretrained(os.path.join(out, "transformer")).eval()
  rng = np.random.default_rng(5)
  tokens = rng.integers(0, config.codebook_size + 1, size=(2, config.num_tokens))
  t = np.array([0, config.num_timesteps - 1])
  text = rng.normal(size=(2, config.condition_length, config.condition_dim)).astype(np.float32)
  ours = jax.nn.log_softmax(transformer.VQDiffusionTransformer(config).apply(
      {"params": params}, jnp.asarray(tokens), jnp.asarray(t), jnp.asarray(text)), -1)
  assert _max_diff(ours, _torch_log_probs(model, tokens, t, text)) < TOLERANCE
