"""Loads a Hugging Face CLIP checkpoint into ``CLIPTextTransformer``; tokenizes.

A checkpoint directory holds ``config.json`` (a ``CLIPTextModel`` config, or a
full ``CLIPModel`` config with ``text_config``), weights in
``model.safetensors`` or ``pytorch_model.bin``, and the tokenizer files
(``tokenizer.json`` or ``vocab.json`` + ``merges.txt``). A diffusers pipeline
directory (``text_encoder/`` + ``tokenizer/``) works too. Text weights are
keyed with or without a ``text_model.`` prefix (transformers 4.x and full
``CLIPModel`` checkpoints have it, transformers 5.x ``CLIPTextModel`` does
not); the vision tower and the projections of a full ``CLIPModel`` are
ignored, any other leftover key is an error.

Tokenizer conventions (``tokenize``): ``"official"`` is microsoft/VQ-Diffusion's
``clip.tokenize`` (pad with id 0; a too-long prompt is cut to 77 tokens with
<|endoftext|> kept in the last slot), ``"diffusers"`` is
``VQDiffusionPipeline._encode_prompt`` (pad with the tokenizer's pad token;
a too-long prompt is cut to its first 77 tokens).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vqdiffusion_jax import extras
from vqdiffusion_jax.convert import common
from vqdiffusion_jax.models.clip_text import CLIPTextTransformer

TEXT_PREFIX = "text_model."
_IGNORED_KEYS = ("logit_scale", "text_projection.weight", "visual_projection.weight")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def load_clip_text(path: str, *, dtype=jnp.float32, tokenizer_path: str | None = None):
  """Builds the text tower, its converted weights and the tokenizer.

  Args:
    path: a Hugging Face CLIP (text) checkpoint directory, or a diffusers
      pipeline directory with ``text_encoder/`` and ``tokenizer/``.
    dtype: compute dtype of the module (parameters stay float32).
    tokenizer_path: where the tokenizer files are; by default ``path``, or
      the sibling ``tokenizer/`` directory when ``path`` has none.

  Returns:
    ``(module, params, tokenizer)``: a ``CLIPTextTransformer``, its float32
    params (plain arrays), and a ``transformers.CLIPTokenizer``.

  Raises:
    FileNotFoundError: a missing directory, config, weights or tokenizer,
      naming the path.
    ConversionError: weights that do not match the config, naming the keys.
  """
  path = _checkpoint_dir(path)
  module = CLIPTextTransformer(dtype=dtype, **text_config(path))
  params = convert_weights(module, load_state_dict(path), what=f"CLIP checkpoint {path}")
  return module, params, load_tokenizer(tokenizer_path or _tokenizer_dir(path))


def text_config(path: str) -> dict:
  """``CLIPTextTransformer`` fields from a checkpoint directory's ``config.json``.

  Args:
    path: the checkpoint directory (``CLIPTextModel`` or ``CLIPModel`` config;
      fields left out take transformers' ``CLIPTextConfig`` defaults).

  Returns:
    A dict of ``CLIPTextTransformer`` keyword arguments.
  """
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"no config.json in the CLIP checkpoint directory {path}")
  transformers = extras.require("transformers", f"reading the CLIP config {config_file}")
  config = transformers.CLIPTextConfig.from_pretrained(path)
  return {
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "num_layers": config.num_hidden_layers,
      "num_heads": config.num_attention_heads,
      "intermediate_size": config.intermediate_size,
      "max_positions": config.max_position_embeddings,
      "layer_norm_eps": config.layer_norm_eps,
      "activation": config.hidden_act,
  }


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """The checkpoint's tensors as NumPy, from safetensors or ``pytorch_model.bin``.

  Args:
    path: the checkpoint directory.

  Returns:
    ``{key: array}`` with floating tensors as float32.
  """
  return common.read_weights_in(path, ("model.safetensors", "pytorch_model.bin"),
                                "the CLIP checkpoint directory")


def convert_weights(module: CLIPTextTransformer, state_dict: dict[str, np.ndarray], *,
                    what: str = "CLIP checkpoint"):
  """Converts a CLIP text state dict into ``module``'s params, checked key by key.

  Args:
    module: the target ``CLIPTextTransformer``.
    state_dict: PyTorch keys to arrays (``text_model.``-prefixed or not).
    what: the checkpoint's name in error messages.

  Returns:
    The params tree as float32 ``jax.Array``s.
  """
  prefix = TEXT_PREFIX if any(k.startswith(TEXT_PREFIX) for k in state_dict) else ""
  dummy_ids = jax.ShapeDtypeStruct((1, module.max_positions), jnp.int32)
  abstract = jax.eval_shape(module.init, jax.random.key(0), dummy_ids)["params"]
  rules = text_rules(module, prefix)
  params = common.assemble(abstract, rules, state_dict, what=what,
                           ignore=lambda key: _is_ignored(key, prefix))
  return jax.tree.map(jnp.asarray, params)


def text_rules(module: CLIPTextTransformer, prefix: str = "") -> dict:
  """``{flax path: (torch key, transform)}`` for every parameter of ``module``."""
  heads = module.num_heads
  rules = {
      ("token_embedding", "embedding"): (f"{prefix}embeddings.token_embedding.weight", common.same),
      ("position_embedding",): (f"{prefix}embeddings.position_embedding.weight", common.same),
      ("final_norm", "scale"): (f"{prefix}final_layer_norm.weight", common.same),
      ("final_norm", "bias"): (f"{prefix}final_layer_norm.bias", common.same),
  }
  for i in range(module.num_layers):
    torch_layer = f"{prefix}encoder.layers.{i}."
    layer = f"layer_{i}"
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      attn = f"{torch_layer}self_attn.{theirs}."
      rules[(layer, "attention", ours, "kernel")] = (attn + "weight", _heads_in(heads))
      rules[(layer, "attention", ours, "bias")] = (attn + "bias", _split_heads(heads))
    out = f"{torch_layer}self_attn.out_proj."
    rules[(layer, "attention", "out", "kernel")] = (out + "weight", _heads_out(heads))
    rules[(layer, "attention", "out", "bias")] = (out + "bias", common.same)
    for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2")):
      rules[(layer, ours, "scale")] = (f"{torch_layer}{theirs}.weight", common.same)
      rules[(layer, ours, "bias")] = (f"{torch_layer}{theirs}.bias", common.same)
    for fc in ("fc1", "fc2"):
      rules[(layer, "mlp", fc, "kernel")] = (f"{torch_layer}mlp.{fc}.weight", common.linear)
      rules[(layer, "mlp", fc, "bias")] = (f"{torch_layer}mlp.{fc}.bias", common.same)
  return rules


def load_tokenizer(path: str):
  """``transformers.CLIPTokenizer.from_pretrained(path)``, refusing a directory without one.

  (transformers 5 silently builds a 2-token vocabulary from a directory that
  has no tokenizer files.)
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"CLIP tokenizer directory {path} does not exist")
  if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
    raise FileNotFoundError(f"no tokenizer.json or vocab.json + merges.txt in {path}")
  transformers = extras.require("transformers", f"reading the CLIP tokenizer in {path}")
  return transformers.CLIPTokenizer.from_pretrained(path)


def tokenize(tokenizer, texts: str | Sequence[str], max_length: int = 77, *,
             convention: str = "official") -> np.ndarray:
  """Token ids padded to ``max_length``; too-long prompts are cut with a warning.

  Args:
    tokenizer: a ``transformers.CLIPTokenizer``.
    texts: one prompt or a list of prompts.
    max_length: the context length (77 for CLIP).
    convention: ``"official"`` (pad id 0, <|endoftext|> kept last when cut)
      or ``"diffusers"`` (the tokenizer's pad id, plain cut); see the module
      docstring.

  Returns:
    int32 ``(B, max_length)`` ids, with <|startoftext|> and <|endoftext|>.
  """
  if convention not in ("official", "diffusers"):
    raise ValueError(f"convention must be 'official' or 'diffusers', not {convention!r}")
  texts = [texts] if isinstance(texts, str) else list(texts)
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise ValueError(f"texts[{i}] must be a str, got {text!r}")
  pad_id = 0 if convention == "official" else tokenizer.pad_token_id
  ids = np.full((len(texts), max_length), pad_id, dtype=np.int32)
  encoded = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
  for row, tokens in enumerate(encoded):
    if len(tokens) > max_length:
      warnings.warn(f"prompt {row} has {len(tokens)} tokens; {len(tokens) - max_length} "
                    f"dropped to fit the context of {max_length}: {texts[row][:80]!r}",
                    stacklevel=2)
      end = tokens[-1]
      tokens = tokens[:max_length]
      if convention == "official":
        tokens[-1] = end
    ids[row, :len(tokens)] = tokens
  return ids


def _heads_in(heads: int):
  """torch (H*Dh, D) projection -> Flax DenseGeneral kernel (D, H, Dh)."""
  return lambda w: np.ascontiguousarray(np.asarray(w).T.reshape(w.shape[1], heads, -1))


def _split_heads(heads: int):
  """torch (H*Dh,) bias -> (H, Dh)."""
  return lambda b: np.asarray(b).reshape(heads, -1)


def _heads_out(heads: int):
  """torch (D, H*Dh) output projection -> Flax kernel (H, Dh, D)."""
  return lambda w: np.ascontiguousarray(np.asarray(w).T.reshape(heads, -1, w.shape[0]))


def _is_ignored(key: str, prefix: str) -> bool:
  if key.endswith("position_ids"):  # a buffer older checkpoints saved
    return True
  return bool(prefix) and (key.startswith("vision_model.") or key in _IGNORED_KEYS)


def _checkpoint_dir(path: str) -> str:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"CLIP checkpoint directory {path} does not exist")
  pipeline_encoder = os.path.join(path, "text_encoder")
  if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(pipeline_encoder):
    return pipeline_encoder
  return path


def _tokenizer_dir(path: str) -> str:
  sibling = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer")
  has_own = any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES)
  return path if has_own or not os.path.isdir(sibling) else sibling
