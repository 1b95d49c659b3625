"""Whole-checkpoint conversion: the CLI, our Orbax directory, load_denoiser."""

import dataclasses
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
import torch

from tests.test_clip_text import TEXT_CONFIG, TOKENIZER
from tests.test_convert_denoiser import (
  SIZE,
  _diffusers_model,
  _inputs,
  _official_checkpoint,
  _ours,
  _reference,
)
from tests.test_diffusers_pipeline import tiny_pipeline
from vqdiffusion_jax.convert import __main__ as cli
from vqdiffusion_jax.convert import checkpoints, converted, denoiser
from vqdiffusion_jax.models import transformer

NULL_TEXT_CONFIG = {"learnable": True, "length": 7}


def _same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  """A tiny random VQDiffusionPipeline, written by its save_pretrained, and its transformer."""
  root = str(tmp_path_factory.mktemp("pipeline") / "vq_diffusion")
  pipe = tiny_pipeline()
  pipe.save_pretrained(root)
  return root, pipe.transformer


@pytest.fixture(scope="module")
def converted_dir(pipeline_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("converted") / "ckpt")
  assert cli.main([pipeline_dir[0], "--out", out]) == 0
  return out


def test_pipeline_converts_every_component(pipeline_dir, converted_dir):
  src, model = pipeline_dir
  stored = converted.read_config(converted_dir)
  assert sorted(stored["components"]) == ["denoiser", "text_encoder", "vqvae"]
  module, params = checkpoints.load_denoiser(converted_dir)
  _, want = checkpoints.load_denoiser(src)
  _same(params, want)
  tokens, t, _ = _inputs(SIZE * SIZE)
  text = np.random.default_rng(1).normal(
      size=(2, TOKENIZER.model_max_length, TEXT_CONFIG["hidden_size"])).astype(np.float32)
  ours = _ours(module.config, params, tokens, t, text)
  assert np.max(np.abs(ours - _reference(model, tokens, t, text))) < 1e-4
  _same(checkpoints.load_vqvae(converted_dir)[1], checkpoints.load_vqvae(src)[1])
  text_module, text_params, tokenizer = checkpoints.load_text_encoder(converted_dir)
  _, want_text, want_tokenizer = checkpoints.load_text_encoder(src)
  _same(text_params, want_text)
  assert text_module.hidden_size == TEXT_CONFIG["hidden_size"]
  assert tokenizer("a cat")["input_ids"] == want_tokenizer("a cat")["input_ids"]


def test_runtime_options_apply_to_a_converted_denoiser(converted_dir):
  plain_module, plain = checkpoints.load_denoiser(converted_dir)
  scanned_module, scanned = checkpoints.load_denoiser(converted_dir, scan_layers=True, remat=True)
  assert scanned_module.config.scan_layers and not plain_module.config.scan_layers
  _same(transformer.unstack_layers(scanned), plain)


def test_existing_output_is_kept_unless_overwrite(pipeline_dir, converted_dir, capsys):
  before = converted.read_config(converted_dir)
  assert cli.main([pipeline_dir[0], "--out", converted_dir]) == 2
  assert "exists" in capsys.readouterr().err
  assert converted.read_config(converted_dir) == before
  assert cli.main([pipeline_dir[0], "--out", converted_dir, "--overwrite"]) == 0
  assert not [p for p in os.listdir(os.path.dirname(converted_dir)) if p.startswith(".")]


def _save_official(checkpoint, path, tensors_only=True):
  """torch.save an official-layout checkpoint, as tensors like the real files."""
  if tensors_only:
    checkpoint = {k: {n: torch.as_tensor(v) for n, v in part.items()}
                  if isinstance(part, dict) else part for k, part in checkpoint.items()}
  torch.save(checkpoint, path)
  return str(path)


def test_official_pth_needs_sizes_and_converts_ema_weights(tmp_path):
  raw, ema = _diffusers_model(3), _diffusers_model(4)
  config = denoiser.config_from_diffusers(dict(ema.config), null_text_config=NULL_TEXT_CONFIG)
  checkpoint = _official_checkpoint(raw, ema, torch.randn(7, 24), torch.randn(7, 24))
  path = _save_official(checkpoint, tmp_path / "official.pth")
  with pytest.raises(ValueError, match="preset"):
    checkpoints.load_denoiser(path)
  _, params = checkpoints.load_denoiser(path, config=config)
  _same(params, denoiser.from_official(checkpoint, config))
  tokens, t, text = _inputs(SIZE * SIZE)
  assert np.max(np.abs(_ours(config, params, tokens, t, text)
                       - _reference(ema, tokens, t, text))) < 1e-4


def test_official_pth_with_the_wrong_preset_is_a_clear_error(tmp_path, capsys):
  raw = _diffusers_model(5)
  path = _save_official(_official_checkpoint(raw, raw, torch.randn(7, 24), torch.randn(7, 24)),
                        tmp_path / "official.pth")
  assert cli.main([path, "--out", str(tmp_path / "out"), "--preset", "base"]) == 2
  err = capsys.readouterr().err
  assert "does not match the module" in err and "content_emb.emb.weight" in err
  assert not os.path.exists(tmp_path / "out")


def test_official_pth_without_a_null_text_converts_with_the_flag(tmp_path):
  raw = _diffusers_model(7)
  checkpoint = _official_checkpoint(raw, raw, torch.randn(7, 24), torch.randn(7, 24))
  for part in ("model", "ema"):
    checkpoint[part] = {k: v for k, v in checkpoint[part].items()
                        if not k.endswith("empty_text_embed")}
  path = _save_official(checkpoint, tmp_path / "no_null.pth")
  config = denoiser.config_from_diffusers(dict(raw.config))  # learnable_null_text=False
  want = denoiser.from_official(checkpoint, config)
  out = str(tmp_path / "out")
  # The sizes come from a config here; the flag is what the CLI adds to a preset.
  counts = checkpoints.convert(path, out, config=config, learnable_null_text=False)
  assert counts["denoiser"] == sum(np.size(x) for x in jax.tree.leaves(want))
  module, params = checkpoints.load_denoiser(out)
  assert not module.config.has_null_text
  _same(params, want)


def test_official_pth_with_python_objects_needs_allow_pickle(tmp_path):
  raw = _diffusers_model(6)
  config = denoiser.config_from_diffusers(dict(raw.config), null_text_config=NULL_TEXT_CONFIG)
  checkpoint = _official_checkpoint(raw, raw, torch.randn(7, 24), torch.randn(7, 24))
  path = _save_official(checkpoint, tmp_path / "pickled.pth", tensors_only=False)
  with pytest.raises(ValueError, match="allow_pickle=True"):
    checkpoints.load_denoiser(path, config=config)
  _, params = checkpoints.load_denoiser(path, config=config, allow_pickle=True)
  _same(params, denoiser.from_official(checkpoint, config))


def test_damaged_or_unknown_checkpoints_are_named(converted_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint at"):
    checkpoints.load_denoiser(str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="not a checkpoint we know"):
    checkpoints.load_denoiser(str(tmp_path))
  damaged = str(tmp_path / "damaged")
  shutil.copytree(converted_dir, damaged)
  config_path = pathlib.Path(damaged) / "config.json"
  config = json.loads(config_path.read_text())
  config["components"]["denoiser"]["num_layers"] = 3
  config_path.write_text(json.dumps(config))
  with pytest.raises(ValueError, match="missing block_2"):
    checkpoints.load_denoiser(damaged)
  shutil.rmtree(os.path.join(damaged, "params"))
  with pytest.raises(FileNotFoundError, match="incomplete"):
    checkpoints.load_denoiser(damaged)


def test_stored_config_round_trips():
  config = transformer.preset("large")
  stored = json.loads(json.dumps(checkpoints._config_dict(config)))
  rebuilt = checkpoints._from_dict(transformer.TransformerConfig, stored,
                                        remat=config.remat)
  assert rebuilt == dataclasses.replace(config)
