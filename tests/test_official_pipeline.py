"""An official checkpoint, its codec files and a CLIP directory -> one sampling directory.

The official ``.pth`` comes from the PyTorch statement of the official model
(``official_vqdiffusion``) with a real taming Gumbel codec in its
``content_codec`` (``official_taming``), saved as the official solver saves
it; the codec's YAML and remap, and a Hugging Face CLIP directory, are
written beside it as a user has them.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from torch.nn import functional

from tests import official_taming as taming
from tests import official_vqdiffusion as official
from tests import user_files
from tests.test_clip_text import TOKENIZER
from tests.test_convert_codecs import (
  GUMBEL_DD,
  GUMBEL_TARGET,
  N_EMBED,
  USED,
  _model_yaml,
  _perturb,
  _remap,
  _write,
)
from tests.test_convert_denoiser import official_log_probs
from vqdiffusion_jax.convert import __main__ as cli
from vqdiffusion_jax.convert import checkpoints
from vqdiffusion_jax.models import transformer
from vqdiffusion_jax.pipeline import Pipeline

GRID, T, TEXT_LEN, TEXT_DIM = (4, 4), 10, 77, 512
PRESET = "tiny_coco_learnable"
OUR_CONFIG = transformer.TransformerConfig(
    codebook_size=USED, spatial_size=GRID, num_layers=1, embed_dim=32, num_heads=2,
    num_timesteps=T, condition_dim=TEXT_DIM, condition_length=TEXT_LEN)
PROMPTS = ["the cat sat", "a dog"]


def _official_model(codec):
  """A tiny text model with learnable null text, its content codec the taming one."""
  torch.manual_seed(0)
  config = official.text_config(n_layer=1, n_embd=32, n_head=2, num_embed=USED,
                                spatial_size=GRID, diffusion_step=T, learnable_cf=True,
                                clip={"num_embed": 64, "width": 16, "layers": 1, "heads": 2})
  model = official.build_model(config)
  model.content_codec = codec
  with torch.no_grad():
    for p in model.transformer.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("official_pipeline")
  remap = _remap(1)
  codec = taming.TamingCodec(_perturb(taming.GumbelVQ(GUMBEL_DD, N_EMBED, embed_dim=8), 0),
                             list(GRID), quantize_number=USED, full_to_quantize=remap)
  model = _official_model(codec)
  ema = official.EMA(model, decay=0.9)
  optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
  checkpoint = str(root / "coco_learnable.pth")
  official.save_checkpoint(checkpoint, model, ema, optimizer)
  clip = user_files.clip_dir(root / "clip", hidden_size=TEXT_DIM, num_heads=8,
                             intermediate_size=64, seed=1)
  return {"checkpoint": checkpoint, "model": model, "codec": codec, "root": root,
          "config": _write(root / "taming_f8.yaml", _model_yaml(GUMBEL_TARGET, GUMBEL_DD, 8)),
          "remap": _write(root / "remap.pt", remap), "clip": clip}


@pytest.fixture
def tiny_preset(monkeypatch):
  fields = {name: getattr(OUR_CONFIG, name) for name in OUR_CONFIG.__dataclass_fields__}
  monkeypatch.setitem(transformer.PRESETS, PRESET, fields)


def _convert(files, out, *extra):
  return cli.main([files["checkpoint"], "--preset", PRESET, "--out", str(out),
                   "--vqvae-config", files["config"], "--vqvae-remap", files["remap"],
                   "--clip", files["clip"], *extra])


@pytest.fixture(scope="module")
def sampling_dir(files, tmp_path_factory):
  out = tmp_path_factory.mktemp("converted") / "coco"
  fields = {name: getattr(OUR_CONFIG, name) for name in OUR_CONFIG.__dataclass_fields__}
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(transformer.PRESETS, PRESET, fields)
    assert _convert(files, out) == 0
  return str(out)


def test_one_directory_samples_with_the_official_codec_and_weights(files, sampling_dir):
  pipe = Pipeline.from_pretrained(sampling_dir)
  assert pipe.vqvae.config.vocabulary_size == USED and pipe.image_size == 16
  tokens = np.asarray(pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, seed=0,
                           output_type="tokens"))
  assert tokens.shape == (2, *GRID) and tokens.max() < USED
  np.testing.assert_array_equal(tokens, pipe(PROMPTS, num_inference_steps=3,
                                             guidance_scale=3.0, seed=0, output_type="tokens"))
  # The image of those tokens is the official codec's decode of them.
  images = np.asarray(pipe.vqvae.apply(pipe.vqvae_variables, jnp.asarray(tokens),
                                       method="decode"))
  reference = files["codec"].decode(torch.from_numpy(tokens.reshape(2, -1).astype(np.int64)))
  reference = reference.permute(0, 2, 3, 1).numpy() / 255
  np.testing.assert_allclose((np.clip(images, -1, 1) + 1) / 2, reference, atol=1e-4)
  pictures = pipe(PROMPTS, num_inference_steps=3, seed=0)
  assert [p.size for p in pictures] == [(16, 16)] * 2


def test_the_directory_predicts_as_the_official_ema_model(files, sampling_dir):
  pipe = Pipeline.from_pretrained(sampling_dir, precision="float32")
  ids = pipe.tokenize(PROMPTS)
  assert (ids[:, -1] == 0).all()  # the official tokenizer pads with 0
  features = np.asarray(pipe.denoiser.encode_text(pipe.params, pipe.text_params, ids))
  rng = np.random.default_rng(3)
  x_t = rng.integers(0, USED + 1, size=(2, GRID[0] * GRID[1]))
  t = np.array([2, T - 1])
  ours = jax.nn.log_softmax(pipe.denoiser.logits(pipe.params, jnp.asarray(x_t),
                                                  jnp.asarray(t), jnp.asarray(features)), -1)
  diffusion = official.EMA(files["model"]).ema_model  # same weights as the saved EMA entry
  diffusion.load_state_dict(torch.load(files["checkpoint"], weights_only=True)["ema"])
  expected = official_log_probs(diffusion, x_t, t, features)
  assert np.max(np.abs(np.asarray(ours) - expected)) < 1e-4
  null = np.asarray(pipe.denoiser.null_condition(pipe.params, 1))[0]
  np.testing.assert_allclose(null, diffusion.empty_text_embed.detach().numpy(), atol=1e-6)


def test_a_codec_of_another_size_is_named(files, tmp_path, tiny_preset, capsys):
  short = _write(tmp_path / "remap_short.pt", torch.arange(N_EMBED) % (USED - 1))
  assert cli.main([files["checkpoint"], "--preset", PRESET, "--out", str(tmp_path / "out"),
                   "--vqvae-config", files["config"], "--vqvae-remap", short]) == 2
  error = capsys.readouterr().err
  assert f"has {USED - 1} codes" in error and f"predicts {USED}" in error
  assert not os.path.exists(tmp_path / "out")


def test_missing_or_misplaced_parts_are_clear(files, tmp_path, tiny_preset, capsys):
  out = str(tmp_path / "out")
  assert cli.main([files["checkpoint"], "--preset", PRESET, "--out", out, "--vqvae-config",
                   files["config"], "--vqvae-remap", files["remap"], "--clip",
                   str(tmp_path / "no_clip")]) == 2
  assert str(tmp_path / "no_clip") in capsys.readouterr().err and not os.path.exists(out)
  assert cli.main([files["checkpoint"], "--preset", PRESET, "--out", out]) == 0
  assert "has no vqvae and no text_encoder yet" in capsys.readouterr().out
  assert checkpoints.missing_for_sampling(out) == ["vqvae", "text_encoder"]
  with pytest.raises(KeyError, match="no vqvae"):
    Pipeline.from_pretrained(out)


def test_a_clip_of_the_wrong_width_is_named(files, tmp_path, tiny_preset, capsys):
  wide = transformers.CLIPTextConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=8, vocab_size=len(TOKENIZER),
                                     max_position_embeddings=TEXT_LEN)
  transformers.CLIPTextModel(wide).save_pretrained(tmp_path / "clip16")
  TOKENIZER.save_pretrained(tmp_path / "clip16")
  assert cli.main([files["checkpoint"], "--preset", PRESET, "--out", str(tmp_path / "out"),
                   "--clip", str(tmp_path / "clip16")]) == 2
  assert "width 16" in capsys.readouterr().err


def test_gumbel_tokens_of_the_converted_codec_are_the_official_mode(files, sampling_dir,
                                                                    monkeypatch):
  pipe = Pipeline.from_pretrained(sampling_dir)
  monkeypatch.setattr(functional, "gumbel_softmax", lambda logits, tau=1.0, hard=False, dim=-1:
                      functional.one_hot(logits.argmax(dim), logits.shape[dim])
                      .movedim(-1, dim).float())
  images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 255
  expected = files["codec"].get_tokens(images)["token"].numpy()
  ours = pipe.encode_image((images / 255).permute(0, 2, 3, 1).numpy()[0])
  np.testing.assert_array_equal(np.asarray(ours).reshape(-1), expected[0])
