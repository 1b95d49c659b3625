"""CLIP text tower: parity with transformers' CLIPTextModel, loading, tokenizing."""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from tests.helpers import assert_logically_partitioned
from vqdiffusion_jax import build
from vqdiffusion_jax.convert import clip as clip_convert
from vqdiffusion_jax.convert.common import ConversionError
from vqdiffusion_jax.models import clip_text

CONTEXT = 77
PROMPTS = ["The cat sat, the end.", "a big red dog!"]
LONG_PROMPT = " ".join(["the cat"] * 50)


def _tiny_tokenizer():
  chars = list("!abcdefghijklmnopqrstuvwxyz,.")
  merges = [("t", "h"), ("th", "e</w>"), ("a", "t</w>"), ("c", "at</w>"), ("s", "at</w>")]
  tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  return transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                    model_max_length=CONTEXT)


TOKENIZER = _tiny_tokenizer()
TEXT_CONFIG = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 37, "vocab_size": len(TOKENIZER), "max_position_embeddings": CONTEXT,
    "bos_token_id": TOKENIZER.bos_token_id, "eos_token_id": TOKENIZER.eos_token_id,
    "pad_token_id": TOKENIZER.pad_token_id,
}


@pytest.fixture(scope="module")
def torch_text_model():
  torch.manual_seed(0)
  return transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_CONFIG)).eval()


@pytest.fixture(scope="module")
def safetensors_dir(tmp_path_factory, torch_text_model):
  path = str(tmp_path_factory.mktemp("clip_text"))
  torch_text_model.save_pretrained(path)
  TOKENIZER.save_pretrained(path)
  return path


def _torch_hidden(model, ids):
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(ids, np.int64))).last_hidden_state.numpy()


def _ours_hidden(module, params, ids):
  return np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(ids)))


def _test_ids():
  ids = clip_convert.tokenize(TOKENIZER, PROMPTS, CONTEXT, convention="diffusers")
  random_ids = np.random.default_rng(0).integers(0, len(TOKENIZER), (1, CONTEXT), np.int32)
  return np.concatenate([ids, random_ids])


def test_safetensors_parity(safetensors_dir, torch_text_model):
  module, params, tokenizer = clip_convert.load_clip_text(safetensors_dir)
  assert module.hidden_size == 32 and module.num_layers == 2 and module.num_heads == 4
  assert tokenizer.get_vocab() == TOKENIZER.get_vocab()
  ids = _test_ids()
  expected = _torch_hidden(torch_text_model, ids)
  ours = _ours_hidden(module, params, ids)
  assert ours.shape == (3, CONTEXT, 32) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)

  # Both VQ-Diffusion codes divide each token's final-LayerNorm output by its norm.
  expected_features = torch.from_numpy(expected)
  expected_features = (expected_features / expected_features.norm(dim=-1, keepdim=True)).numpy()
  features = jax.jit(clip_text.vq_diffusion_features, static_argnums=0)(module, params, ids)
  np.testing.assert_allclose(np.asarray(features), expected_features, rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(features), axis=-1), 1.0, atol=1e-6)


def test_legacy_pytorch_bin_with_prefix(tmp_path, torch_text_model):
  # transformers 4.x layout: "text_model."-prefixed keys, a position_ids buffer, a .bin file.
  state = {f"text_model.{k}": v for k, v in torch_text_model.state_dict().items()}
  state["text_model.embeddings.position_ids"] = torch.arange(CONTEXT)[None]
  torch.save(state, tmp_path / "pytorch_model.bin")
  torch_text_model.config.to_json_file(str(tmp_path / "config.json"))
  TOKENIZER.save_pretrained(str(tmp_path))
  module, params, _ = clip_convert.load_clip_text(str(tmp_path))
  ids = _test_ids()
  np.testing.assert_allclose(_ours_hidden(module, params, ids),
                             _torch_hidden(torch_text_model, ids), rtol=0, atol=1e-5)


def test_full_clip_model_ignores_vision_tower(tmp_path):
  torch.manual_seed(1)
  config = transformers.CLIPConfig(
      text_config=TEXT_CONFIG, projection_dim=8,
      vision_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 20, "image_size": 8, "patch_size": 4})
  model = transformers.CLIPModel(config).eval()
  model.save_pretrained(str(tmp_path))
  TOKENIZER.save_pretrained(str(tmp_path))
  keys = load_file(str(tmp_path / "model.safetensors"))
  assert any(k.startswith("vision_model.") for k in keys) and "text_projection.weight" in keys
  module, params, _ = clip_convert.load_clip_text(str(tmp_path))
  ids = _test_ids()
  np.testing.assert_allclose(_ours_hidden(module, params, ids),
                             _torch_hidden(model.text_model, ids), rtol=0, atol=1e-5)


def test_pipeline_layout(tmp_path, safetensors_dir, torch_text_model):
  torch_text_model.save_pretrained(str(tmp_path / "text_encoder"))
  TOKENIZER.save_pretrained(str(tmp_path / "tokenizer"))
  for path in (tmp_path, tmp_path / "text_encoder"):
    module, params, tokenizer = clip_convert.load_clip_text(str(path))
    assert tokenizer.get_vocab() == TOKENIZER.get_vocab()
    assert module.num_layers == 2 and params["layer_1"]["mlp"]["fc1"]["kernel"].shape == (32, 37)


def test_missing_files_are_named(tmp_path, safetensors_dir):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    clip_convert.load_clip_text(missing)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="no config.json.*empty"):
    clip_convert.load_clip_text(str(empty))
  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  shutil.copy(os.path.join(safetensors_dir, "config.json"), no_weights)
  with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin.*no_weights"):
    clip_convert.load_clip_text(str(no_weights))
  no_tokenizer = tmp_path / "no_tokenizer"
  no_tokenizer.mkdir()
  for name in ("config.json", "model.safetensors"):
    shutil.copy(os.path.join(safetensors_dir, name), no_tokenizer)
  with pytest.raises(FileNotFoundError, match="tokenizer.*no_tokenizer"):
    clip_convert.load_clip_text(str(no_tokenizer))


def test_mismatched_checkpoint_names_the_keys(tmp_path, safetensors_dir):
  arrays = load_file(os.path.join(safetensors_dir, "model.safetensors"))
  arrays["final_layer_norm.gamma"] = arrays.pop("final_layer_norm.weight")
  save_file(arrays, str(tmp_path / "model.safetensors"))
  with open(os.path.join(safetensors_dir, "config.json")) as f:
    config = json.load(f)
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConversionError, match="final_layer_norm.gamma") as error:
    clip_convert.load_clip_text(str(tmp_path))
  assert "final_layer_norm.weight" in str(error.value) and str(tmp_path) in str(error.value)

  arrays["final_layer_norm.weight"] = arrays.pop("final_layer_norm.gamma")
  save_file(arrays, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
  with pytest.raises(ConversionError, match=r"encoder.layers.0.mlp.fc1.weight.*\(32, 37\)"):
    clip_convert.load_clip_text(str(tmp_path))


def test_tokenize_pads_and_truncates_with_a_warning():
  expected = TOKENIZER(PROMPTS, padding="max_length", max_length=CONTEXT)["input_ids"]
  diffusers_ids = clip_convert.tokenize(TOKENIZER, PROMPTS, convention="diffusers")
  assert diffusers_ids.shape == (2, CONTEXT) and diffusers_ids.dtype == np.int32
  np.testing.assert_array_equal(diffusers_ids, expected)
  official_ids = clip_convert.tokenize(TOKENIZER, PROMPTS)
  for row, tokens in enumerate(TOKENIZER(PROMPTS)["input_ids"]):
    np.testing.assert_array_equal(official_ids[row, :len(tokens)], tokens)
    assert (official_ids[row, len(tokens):] == 0).all() and len(tokens) < CONTEXT

  full = TOKENIZER(LONG_PROMPT)["input_ids"]
  assert len(full) > CONTEXT
  with pytest.warns(UserWarning, match=f"{len(full) - CONTEXT} dropped"):
    official_long = clip_convert.tokenize(TOKENIZER, [LONG_PROMPT, "cat"])
  np.testing.assert_array_equal(official_long[0, :-1], full[:CONTEXT - 1])
  assert official_long[0, -1] == TOKENIZER.eos_token_id
  with pytest.warns(UserWarning, match=f"{len(full) - CONTEXT} dropped"):
    diffusers_long = clip_convert.tokenize(TOKENIZER, LONG_PROMPT, convention="diffusers")
  np.testing.assert_array_equal(diffusers_long[0], full[:CONTEXT])
  with pytest.raises(ValueError, match="texts\\[1\\] must be a str, got None"):
    clip_convert.tokenize(TOKENIZER, ["cat", None])


def test_logical_axes_and_bf16_compute(safetensors_dir):
  module, params, _ = clip_convert.load_clip_text(safetensors_dir)
  bf16 = module.clone(dtype=jnp.bfloat16)
  ids = _test_ids()
  variables = jax.jit(bf16.init)(jax.random.key(0), ids)
  assert_logically_partitioned(variables["params"])
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(nn.unbox(variables["params"]))}
  assert dtypes == {np.dtype(np.float32)}
  low = _ours_hidden(bf16, params, ids)
  assert low.dtype == np.float32
  full = _ours_hidden(module, params, ids)
  assert 0 < np.abs(low - full).max() < 0.1


def test_a_clip_of_another_width_than_the_config_states_is_named(safetensors_dir):
  module, _, _ = clip_convert.load_clip_text(safetensors_dir)
  text = ml_collections.ConfigDict({"clip_path": safetensors_dir, "width": 512})
  with pytest.raises(ValueError, match=r"32 wide, the config's text.width is 512.*"
                                       r"--config.text.width=32"):
    build.check_clip_width(text, module)
  for width in (0, 32):  # 0: the CLIP decides
    text.width = width
    build.check_clip_width(text, module)
  with pytest.raises(ValueError, match=r"--config.text.clip_path=DIR"):
    build.required_clip_path(ml_collections.ConfigDict({"clip_path": ""}))
