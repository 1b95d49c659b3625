"""PyTorch denoiser checkpoints -> ``VQDiffusionTransformer`` params.

Two layouts are read:

* diffusers: a ``Transformer2DModel`` over discrete inputs (``num_vector_embeds``
  = K + 1, ``norm_type="ada_norm"``, ``activation_fn="geglu-approximate"``),
  keys ``latent_image_embedding.*``, ``transformer_blocks.{i}.{norm1, attn1,
  norm2, attn2, norm3, ff}.*``, ``norm_out.*``, ``out.*``; the null text
  embedding is the ``embeddings`` tensor of the pipeline's
  ``LearnedClassifierFreeSamplingEmbeddings``. ``load_diffusers`` reads a
  ``save_pretrained`` directory.
* official (microsoft/VQ-Diffusion ``.pth``): ``{"model": ..., "ema": ...}``
  or a bare state dict. Denoiser keys are
  ``transformer.transformer.{content_emb, blocks.{i}, to_logits}.*`` and
  ``transformer.empty_text_embed``; the EMA entry holds the
  ``DiffusionTransformer`` alone, so its keys lack the leading
  ``transformer.``. Block modules: ``ln1`` (AdaLN before self-attention),
  ``attn1`` / ``ln1_1`` / ``attn2`` (text) or ``attn`` (class, none), ``ln2``
  (LayerNorm, or the class AdaLN), ``mlp.{0,2}`` or ``mlp.{conv1,conv2}``.
  The CLIP encoder (``transformer.condition_emb.*``), the VQ codec
  (``content_codec.*``) and the diffusion buffers (``transformer.log_at`` ...)
  are not part of the denoiser and are ignored by name.

Both produce plain (``block_{i}``) params and stack them when the config
scans its layers; every key and shape is checked by ``common.assemble``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Mapping

import numpy as np

from vqdiffusion_jax.convert import common
from vqdiffusion_jax.models import transformer

# Buffers of the official DiffusionTransformer (schedule tables, loss history).
OFFICIAL_BUFFERS = (
    "log_at", "log_bt", "log_ct", "log_cumprod_at", "log_cumprod_bt", "log_cumprod_ct",
    "log_1_min_ct", "log_1_min_cumprod_ct", "Lt_history", "Lt_count",
)
# The causal mask buffer every official CrossAttention registers (unused by its forward).
CROSS_ATTENTION_MASK = ".attn2.mask"
NULL_TEXT_KEY = "embeddings"  # LearnedClassifierFreeSamplingEmbeddings
PIPELINE_NULL_TEXT = "learned_classifier_free_sampling_embeddings"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Source key names of one checkpoint layout."""

  embedding: str
  token_table: str
  row_table: str
  col_table: str
  block: str  # format string with {i}
  self_attn_norm: str
  self_attn: str
  cross_attn_norm: str
  cross_attn: str
  mlp_norm: str
  ada_table: str
  ada_linear: str
  query: str
  key: str
  value: str
  out: str
  fc1: str
  fc2: str
  head_norm: str
  head: str


DIFFUSERS = _Layout(
    embedding="latent_image_embedding", token_table="emb", row_table="height_emb",
    col_table="width_emb", block="transformer_blocks.{i}", self_attn_norm="norm1",
    self_attn="attn1", cross_attn_norm="norm2", cross_attn="attn2", mlp_norm="norm3",
    ada_table="emb", ada_linear="linear", query="to_q", key="to_k", value="to_v",
    out="to_out.0", fc1="ff.net.0.proj", fc2="ff.net.2", head_norm="norm_out", head="out")

OFFICIAL = _Layout(
    embedding="content_emb", token_table="emb", row_table="height_emb", col_table="width_emb",
    block="blocks.{i}", self_attn_norm="ln1", self_attn="attn1", cross_attn_norm="ln1_1",
    cross_attn="attn2", mlp_norm="ln2", ada_table="emb", ada_linear="linear", query="query",
    key="key", value="value", out="proj", fc1="mlp.0", fc2="mlp.2", head_norm="to_logits.0",
    head="to_logits.1")


def _heads_in(config):
  """torch Linear (H*d, in) -> DenseGeneral kernel (in, H, d)."""
  return lambda w: common.linear(w).reshape(-1, config.num_heads, config.head_dim)


def _heads_bias(config):
  return lambda b: np.asarray(b).reshape(config.num_heads, config.head_dim)


def _heads_out(config):
  """torch Linear (D, H*d) -> DenseGeneral kernel (H, d, D)."""
  return lambda w: common.linear(w).reshape(config.num_heads, config.head_dim, -1)


def _ada_rules(ours, theirs, layout):
  return {
      (*ours, "embedding"): (f"{theirs}.{layout.ada_table}.weight", common.same),
      (*ours, "modulation", "kernel"): (f"{theirs}.{layout.ada_linear}.weight", common.linear),
      (*ours, "modulation", "bias"): (f"{theirs}.{layout.ada_linear}.bias", common.same),
  }


def _attention_rules(ours, theirs, layout, config):
  rules = {}
  for name, key in (("query", layout.query), ("key", layout.key), ("value", layout.value)):
    rules[(*ours, name, "kernel")] = (f"{theirs}.{key}.weight", _heads_in(config))
    rules[(*ours, name, "bias")] = (f"{theirs}.{key}.bias", _heads_bias(config))
  rules[(*ours, "out", "kernel")] = (f"{theirs}.{layout.out}.weight", _heads_out(config))
  rules[(*ours, "out", "bias")] = (f"{theirs}.{layout.out}.bias", common.same)
  return rules


def _affine_rules(ours, theirs):
  return {(*ours, "scale"): (f"{theirs}.weight", common.same),
          (*ours, "bias"): (f"{theirs}.bias", common.same)}


def _mlp_rules(ours, theirs, layout, config):
  if config.mlp_type == "conv":
    pairs = (("conv1", "mlp.conv1", common.conv), ("conv2", "mlp.conv2", common.conv))
  else:
    pairs = (("fc1", layout.fc1, common.linear), ("fc2", layout.fc2, common.linear))
  rules = {}
  for name, key, transform in pairs:
    rules[(*ours, name, "kernel")] = (f"{theirs}.{key}.weight", transform)
    rules[(*ours, name, "bias")] = (f"{theirs}.{key}.bias", common.same)
  return rules


def _block_rules(i, layout, config, prefix):
  ours, theirs = (f"block_{i}",), prefix + layout.block.format(i=i)
  self_attn = layout.self_attn
  if layout is OFFICIAL and config.conditioning != "text":
    self_attn = "attn"  # the official "self" / "selfcondition" blocks
  rules = _ada_rules((*ours, "self_attn_norm"), f"{theirs}.{layout.self_attn_norm}", layout)
  rules |= _attention_rules((*ours, "self_attn"), f"{theirs}.{self_attn}", layout, config)
  if config.conditioning == "text":
    rules |= _ada_rules((*ours, "cross_attn_norm"), f"{theirs}.{layout.cross_attn_norm}",
                        layout)
    rules |= _attention_rules((*ours, "cross_attn"), f"{theirs}.{layout.cross_attn}", layout,
                              config)
  if config.conditioning == "class":
    rules |= _ada_rules((*ours, "mlp_norm"), f"{theirs}.{layout.mlp_norm}", layout)
  else:
    rules |= _affine_rules((*ours, "mlp_norm"), f"{theirs}.{layout.mlp_norm}")
  return rules | _mlp_rules((*ours, "mlp"), theirs, layout, config)


def _rules(config, layout, prefix="", null_text_key=None):
  """{our param path: (source key, transform)} for a whole plain-layout model."""
  embedding = prefix + layout.embedding
  rules = {
      ("token_embed", "tokens"): (f"{embedding}.{layout.token_table}.weight", common.same),
      ("token_embed", "rows"): (f"{embedding}.{layout.row_table}.weight", common.same),
      ("token_embed", "cols"): (f"{embedding}.{layout.col_table}.weight", common.same),
      ("head", "kernel"): (f"{prefix}{layout.head}.weight", common.linear),
      ("head", "bias"): (f"{prefix}{layout.head}.bias", common.same),
  }
  rules |= _affine_rules(("head_norm",), prefix + layout.head_norm)
  for i in range(config.num_layers):
    rules |= _block_rules(i, layout, config, prefix)
  if config.has_null_text:
    rules[("null_text",)] = (null_text_key, common.same)
  return rules


def _assemble(config, rules, source, what, ignore=lambda key: False):
  plain = dataclasses.replace(config, scan_layers=False, remat=False)
  params = common.assemble(transformer.abstract_params(plain), rules, source, what=what,
                           ignore=ignore)
  if config.scan_layers:
    params = transformer.stack_layers(params, config.num_layers)
  return params


def from_diffusers(state_dict: Mapping[str, object], config: transformer.TransformerConfig,
                   null_text: Mapping[str, object] | None = None):
  """Params from a diffusers ``Transformer2DModel`` (+ the learned null text).

  Args:
    state_dict: the transformer's state dict (torch tensors or arrays).
    config: our config; ``config_from_diffusers`` builds it from config.json.
    null_text: the state dict of ``LearnedClassifierFreeSamplingEmbeddings``
      (key ``embeddings``); required when ``config.has_null_text``.

  Returns:
    The params tree (NumPy float32), stacked if ``config.scan_layers``.

  Raises:
    ConversionError: on missing, unused or mis-shaped keys.
  """
  source = common.to_numpy(state_dict)
  if NULL_TEXT_KEY in source:
    raise common.ConversionError(f"transformer state dict has a stray {NULL_TEXT_KEY!r} key")
  if null_text is not None:
    source |= {NULL_TEXT_KEY: common.to_numpy(null_text)[NULL_TEXT_KEY]}
  rules = _rules(config, DIFFUSERS, null_text_key=NULL_TEXT_KEY)
  return _assemble(config, rules, source, "diffusers Transformer2DModel")


def config_from_diffusers(config_dict: Mapping[str, object], *,
                          null_text_config: Mapping[str, object] | None = None,
                          **overrides) -> transformer.TransformerConfig:
  """Our config from a diffusers transformer ``config.json`` dict.

  Args:
    config_dict: the ``Transformer2DModel`` config (discrete inputs).
    null_text_config: the ``LearnedClassifierFreeSamplingEmbeddings`` config;
      its ``learnable`` and ``length`` set ``learnable_null_text`` and
      ``condition_length``. None: no learnable null text.
    **overrides: any other ``TransformerConfig`` fields (dtype, scan_layers, ...).

  Returns:
    The config.

  Raises:
    ValueError: for a diffusers config this network does not implement.
  """
  expected = {"norm_type": "ada_norm", "activation_fn": "geglu-approximate",
              "attention_bias": True, "only_cross_attention": False,
              "double_self_attention": False, "norm_elementwise_affine": True,
              "norm_eps": 1e-5}
  wrong = {k: config_dict.get(k) for k, v in expected.items() if config_dict.get(k, v) != v}
  if wrong or config_dict.get("num_vector_embeds") is None:
    raise ValueError(f"not a VQ-Diffusion transformer config: {wrong or 'no num_vector_embeds'}")
  size = config_dict["sample_size"]
  cross_dim = config_dict.get("cross_attention_dim")
  learnable = bool(null_text_config and null_text_config.get("learnable"))
  fields = {
      "codebook_size": config_dict["num_vector_embeds"] - 1,
      "spatial_size": (size, size),
      "num_layers": config_dict["num_layers"],
      "embed_dim": config_dict["num_attention_heads"] * config_dict["attention_head_dim"],
      "num_heads": config_dict["num_attention_heads"],
      "num_timesteps": config_dict["num_embeds_ada_norm"],
      "conditioning": "text" if cross_dim is not None else "none",
      "condition_dim": cross_dim or 512,
      "learnable_null_text": learnable,
  }
  if learnable:
    fields["condition_length"] = null_text_config["length"]
  return transformer.TransformerConfig(**(fields | overrides))


def _read_json(directory):
  with open(os.path.join(directory, "config.json")) as f:
    return json.load(f)


def load_diffusers(transformer_dir: str, null_text_dir: str | None = None, **overrides):
  """Config and params from ``save_pretrained`` directories.

  Args:
    transformer_dir: the ``Transformer2DModel`` directory (a pipeline's
      ``transformer/``): config.json + safetensors or .bin weights.
    null_text_dir: the ``LearnedClassifierFreeSamplingEmbeddings`` directory
      (a pipeline's ``learned_classifier_free_sampling_embeddings/``), if any.
    **overrides: ``TransformerConfig`` fields to set (dtype, scan_layers, ...).

  Returns:
    (config, params).
  """
  null_config = _read_json(null_text_dir) if null_text_dir else None
  config = config_from_diffusers(_read_json(transformer_dir), null_text_config=null_config,
                                 **overrides)
  null_text = _read_diffusers(null_text_dir) if config.has_null_text else None
  return config, from_diffusers(_read_diffusers(transformer_dir), config, null_text)


def load_diffusers_pipeline(pipeline_dir: str, **overrides):
  """Config and params from a ``VQDiffusionPipeline.save_pretrained`` directory.

  Args:
    pipeline_dir: holds ``transformer/`` and, when the model has a learned
      null text, ``learned_classifier_free_sampling_embeddings/``.
    **overrides: ``TransformerConfig`` fields to set.

  Returns:
    (config, params).
  """
  null_text_dir = os.path.join(pipeline_dir, PIPELINE_NULL_TEXT)
  if not os.path.exists(os.path.join(null_text_dir, "config.json")):
    null_text_dir = None
  return load_diffusers(os.path.join(pipeline_dir, "transformer"), null_text_dir, **overrides)


def _select_official(checkpoint: Mapping[str, object], use_ema: bool) -> dict:
  """The model-level state dict of an official checkpoint, EMA weights laid over."""
  if "model" not in checkpoint:
    return dict(checkpoint)
  state = dict(checkpoint["model"])
  if use_ema and "ema" in checkpoint:
    # The EMA copy is of model.transformer (the DiffusionTransformer) alone.
    state |= {f"transformer.{k}": v for k, v in checkpoint["ema"].items()}
  elif use_ema:
    warnings.warn("official checkpoint has no 'ema' entry; converting the raw weights",
                  stacklevel=3)
  return state


def _official_prefix(source: Mapping[str, object]) -> str:
  """Where the Text2ImageTransformer sits: under DALLE, DiffusionTransformer or at the top."""
  for prefix in ("transformer.transformer.", "transformer.", ""):
    if f"{prefix}{OFFICIAL.embedding}.{OFFICIAL.token_table}.weight" in source:
      return prefix
  raise common.ConversionError("no content_emb.emb.weight under any known prefix: "
                               "not an official VQ-Diffusion checkpoint")


def official_ignore(parent: str) -> Callable[[str], bool]:
  """Keys of an official checkpoint outside the denoiser, by name.

  Args:
    parent: the DiffusionTransformer's prefix ("transformer." in a full model).

  Returns:
    A predicate: the CLIP text encoder, the VQ codec, the diffusion buffers,
    the cross-attention masks.
  """
  buffers = {parent + name for name in OFFICIAL_BUFFERS}
  return lambda key: (key.startswith(f"{parent}condition_emb.") or key in buffers
                      or key.startswith("content_codec.") or key.endswith(CROSS_ATTENTION_MASK))


def from_official(checkpoint: Mapping[str, object], config: transformer.TransformerConfig, *,
                  use_ema: bool = True):
  """Params from an official microsoft/VQ-Diffusion checkpoint.

  Args:
    checkpoint: the loaded ``.pth`` (a dict with ``model`` and usually
      ``ema``) or a bare state dict (of the DALLE model, the
      DiffusionTransformer, or the Text2ImageTransformer).
    config: our config matching the checkpoint's yaml (e.g. ``preset("base")``;
      ``learnable_null_text=False`` for checkpoints trained without
      ``learnable_cf``).
    use_ema: take the EMA weights when the checkpoint has them (what the
      official inference does).

  Returns:
    The params tree (NumPy float32), stacked if ``config.scan_layers``.

  Raises:
    ConversionError: on missing, unused or mis-shaped keys.
  """
  state = _select_official(checkpoint, use_ema)
  source = common.to_numpy(state)
  prefix = _official_prefix(source)
  parent = prefix[:-len("transformer.")] if prefix else ""
  rules = _rules(config, OFFICIAL, prefix, null_text_key=f"{parent}empty_text_embed")
  return _assemble(config, rules, source, "official VQ-Diffusion checkpoint",
                   ignore=official_ignore(parent))


def _read_diffusers(directory: str) -> dict[str, np.ndarray]:
  return common.read_weights_in(directory, DIFFUSERS_WEIGHTS, "the diffusers model directory")
