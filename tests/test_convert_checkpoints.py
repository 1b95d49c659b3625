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
  OFFICIAL_FAMILIES,
  SIZE,
  _inputs,
  _ours,
  _reference,
  official_conditions,
  official_log_probs,
  trained_official,
)
from tests.test_diffusers_pipeline import tiny_pipeline
from vqdiffusion_jax.convert import __main__ as cli
from vqdiffusion_jax.convert import checkpoints, converted, denoiser
from vqdiffusion_jax.models import transformer


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


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
  """Official .pth files as the official solver writes them, with their statements."""
  root = tmp_path_factory.mktemp("official")
  return {family: (str(root / f"{family}.pth"),
                   *trained_official(family, str(root / f"{family}.pth"), seed=10 + i))
          for i, family in enumerate(("class_learnable", "text"))}


def _tiny_preset(monkeypatch, name, family, **changes):
  """A preset of the tiny official family's sizes, for the CLI."""
  config = dataclasses.replace(OFFICIAL_FAMILIES[family][1], **changes)
  fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
  monkeypatch.setitem(transformer.PRESETS, name, fields)
  return config


def test_official_pth_converts_through_the_cli(official_files, tmp_path, monkeypatch, capsys):
  path, model, ema = official_files["class_learnable"]
  with pytest.raises(ValueError, match="preset"):
    checkpoints.load_denoiser(path)
  config = _tiny_preset(monkeypatch, "tiny_imagenet_learnable", "class_learnable")
  out, raw_out = str(tmp_path / "ema"), str(tmp_path / "raw")
  assert cli.main([path, "--out", out, "--preset", "tiny_imagenet_learnable"]) == 0
  assert cli.main([path, "--out", raw_out, "--preset", "tiny_imagenet_learnable",
                   "--raw-weights"]) == 0
  assert f"wrote {out}" in capsys.readouterr().out
  tokens, t, _ = _inputs(SIZE * SIZE, seed=5)
  for directory, diffusion in ((out, ema.ema_model), (raw_out, model.transformer)):
    module, params = checkpoints.load_denoiser(directory)
    assert module.config == config
    for labels in official_conditions("class_learnable"):
      ours = _ours(config, params, tokens, t, labels)
      assert np.max(np.abs(ours - official_log_probs(diffusion, tokens, t, labels))) < 1e-4


def test_official_pth_with_the_wrong_preset_is_a_clear_error(official_files, tmp_path, capsys):
  path = official_files["text"][0]
  assert cli.main([path, "--out", str(tmp_path / "out"), "--preset", "coco"]) == 2
  err = capsys.readouterr().err
  assert "does not match the module" in err and path in err
  assert "transformer.transformer.content_emb.emb.weight" in err and "(2888, 1024)" in err
  assert not os.path.exists(tmp_path / "out")


def test_official_pth_without_a_null_text_converts_with_the_flag(official_files, tmp_path,
                                                                 monkeypatch):
  path, model, _ = official_files["text"]
  with_null = _tiny_preset(monkeypatch, "tiny_text", "text", learnable_null_text=True)
  out = str(tmp_path / "out")
  assert cli.main([path, "--out", out, "--preset", "tiny_text"]) == 2  # no empty_text_embed
  assert cli.main([path, "--out", out, "--preset", "tiny_text", "--no-null-text",
                   "--raw-weights"]) == 0
  module, params = checkpoints.load_denoiser(out)
  assert not module.config.has_null_text and "null_text" not in params
  _same(params, denoiser.from_official(torch.load(path, weights_only=True), module.config,
                                       use_ema=False))
  assert dataclasses.replace(module.config, learnable_null_text=True) == with_null


def test_official_pth_with_python_objects_needs_allow_pickle(official_files, tmp_path):
  path = official_files["text"][0]
  config = OFFICIAL_FAMILIES["text"][1]
  checkpoint = torch.load(path, weights_only=True)
  pickled = str(tmp_path / "pickled.pth")
  torch.save(checkpoint | {"statistics": np.arange(3.0)}, pickled)
  with pytest.raises(ValueError, match="allow_pickle=True"):
    checkpoints.load_denoiser(pickled, config=config)
  _, params = checkpoints.load_denoiser(pickled, config=config, allow_pickle=True)
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
