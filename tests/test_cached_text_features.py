"""Frozen CLIP features cached with the tokens: same loss as CLIP in the step, encoder checks."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from configs import shapes
from tests import user_files
from tests.two_process_worker import run_two_processes
from vqdiffusion_jax import build
from vqdiffusion_jax.data import sources, token_cache
from vqdiffusion_jax.train import denoiser_stage, loop
from vqdiffusion_jax.train import mesh as mesh_lib


def _clip_config(clip_dir, **data):
  config = shapes.get_config("runlocal")
  with config.unlocked():
    config.text.kind, config.text.clip_path = "clip", str(clip_dir)
    config.data.update(data)
  return config


def _vqvae(config):
  module = build.vqvae_module(config)
  variables = module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return build.VQVAE(module, jax.device_get(variables), 32)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
  """A tiny CLIP, a runlocal shapes config using it, a random VQ-VAE and the train split."""
  root = tmp_path_factory.mktemp("clip_run")
  config = _clip_config(user_files.clip_dir(root / "clip", vision=True, seed=3),
                        caption_dropout=0.5)
  source = sources.split_source(config.data, config.data.train_split, str(root))
  return config, _vqvae(config), source, root


def _first_step(config, vqvae, cache, directory, cached):
  trainer = denoiser_stage.denoiser_trainer(config, directory, mesh_lib.make_mesh(
      config.mesh.to_dict()), vqvae, cache, cached_features=cached)
  batch = next(trainer.batches())
  _, metrics = trainer.step_fn(trainer.init_state(), batch, jax.random.key(5))
  return batch, jax.device_get(metrics)


def test_cached_features_give_the_loss_of_clip_run_in_the_step(clip_run):
  config, vqvae, source, root = clip_run
  cache_dir = loop.build_cache(config, str(root / "run"), vqvae, source)
  cache = token_cache.TokenCacheSource(cache_dir)
  spec = cache.metadata["text_features"]
  assert spec["shape"] == [77, 32] and spec["encoder"]["kind"] == "clip"
  assert spec["encoder"]["path"] == config.text.clip_path
  text = denoiser_stage.frozen_text_encoder(config)
  exact_dir = root / "float32_cache"
  token_cache.build_token_cache(
      source, lambda x: np.asarray(vqvae.module.apply(vqvae.variables, x, method="encode")),
      exact_dir, codebook_size=vqvae.codebook_size, image_size=32, batch_size=64,
      encode_text=text.encode, text_encoder=text.identity, feature_dtype="float32")
  exact = token_cache.TokenCacheSource(exact_dir)
  conditioned = build.conditioned_denoiser(config, vqvae)
  assert denoiser_stage.uses_cached_features(config, conditioned, cache)
  directory = str(root / "denoiser")
  ids_batch, in_step = _first_step(config, vqvae, cache, directory, cached=False)
  assert "text_ids" in ids_batch and "text" not in ids_batch
  for features in (exact, cache):
    batch, cached = _first_step(config, vqvae, features, directory, cached=None)
    assert "text" in batch and "text_ids" not in batch
    np.testing.assert_array_equal(batch["captions"], ids_batch["captions"])
    np.testing.assert_array_equal(batch["drop_text"], ids_batch["drop_text"])
    assert 0 < batch["drop_text"].sum() < len(batch["drop_text"])  # both kinds of row
    rtol = 1e-5 if features is exact else 2e-3
    for key in ("loss", "vb", "grad_norm"):
      np.testing.assert_allclose(cached[key], in_step[key], rtol=rtol, err_msg=key)


def _other_clip_dir(clip_dir, out):
  """The same tiny CLIP with one weight changed."""
  model = transformers.CLIPModel.from_pretrained(clip_dir)
  with __import__("torch").no_grad():
    model.text_model.final_layer_norm.weight.mul_(1.5)
  model.save_pretrained(str(out))
  transformers.CLIPTokenizer.from_pretrained(clip_dir).save_pretrained(str(out))
  return str(out)


def test_a_cache_of_another_text_encoder_is_rebuilt_or_refused(clip_run):
  config, vqvae, source, root = clip_run
  workdir = root / "switch"
  trainable = shapes.get_config("runlocal")
  cache_dir = loop.build_cache(trainable, str(workdir), vqvae, source)
  assert token_cache.TokenCacheSource(cache_dir).metadata["text_features"] is None
  with pytest.raises(ValueError, match=r"data.cache_dir\) holds no text features; delete it"):
    loop.build_cache(_clip_config(config.text.clip_path, cache_dir=cache_dir), str(workdir),
                     vqvae, source)
  assert loop.build_cache(config, str(workdir), vqvae, source) == cache_dir
  first = token_cache.TokenCacheSource(cache_dir).metadata["text_features"]["encoder"]
  assert first == denoiser_stage.frozen_text_encoder(config).identity
  other = _clip_config(_other_clip_dir(config.text.clip_path, root / "other_clip"))
  with pytest.raises(ValueError, match=r"holds the text features of clip .*clip' \(weights "
                                       r"[0-9a-f]{12}, length 77, width 32\), not of this"):
    loop.build_cache(_clip_config(other.text.clip_path, cache_dir=cache_dir), str(workdir),
                     vqvae, source)
  loop.build_cache(other, str(workdir), vqvae, source)
  second = token_cache.TokenCacheSource(cache_dir).metadata["text_features"]["encoder"]
  assert second["path"] == other.text.clip_path
  assert second["fingerprint"] != first["fingerprint"]
  assert loop.build_cache(trainable, str(workdir), vqvae, source) == cache_dir  # kept
  moved = shutil.copytree(other.text.clip_path, root / "moved_clip")
  loop.build_cache(_clip_config(moved), str(workdir), vqvae, source)  # the same weights: kept
  assert token_cache.TokenCacheSource(cache_dir).metadata["text_features"]["encoder"] == second


def test_two_processes_build_the_cache_one_process_builds(clip_run, tmp_path):
  config, vqvae, source, root = clip_run
  one = token_cache.TokenCacheSource(loop.build_cache(config, str(tmp_path / "one"), vqvae,
                                                      source))
  run_two_processes("cache", tmp_path / "two", data=root, clip=config.text.clip_path)
  two = token_cache.TokenCacheSource(tmp_path / "two" / "token_cache")
  assert two.metadata["shard_records"] == [32, 32]
  assert sorted(os.listdir(tmp_path / "two")) == ["token_cache"]
  differ = {"files", "shard_records"}
  assert ({k: v for k, v in two.metadata.items() if k not in differ}
          == {k: v for k, v in one.metadata.items() if k not in differ})
  for i in range(len(one)):
    a, b = one[i], two[i]
    assert a["captions"] == b["captions"]
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["text_features"], b["text_features"])
