"""Loading diffusers ``VQModel`` and taming-transformers VQGAN checkpoints into ``VQGAN``.

Two source layouts map onto the same Flax tree (``vqdiffusion_jax.models.vqgan``):

- diffusers (``load_diffusers_vqvae``): a directory with ``config.json`` and
  ``diffusion_pytorch_model.safetensors`` (or ``.bin``); keys such as
  ``encoder.down_blocks.{i}.resnets.{j}.conv1``, ``...attentions.{j}.to_q`` (Linear),
  ``...downsamplers.0.conv``, ``decoder.up_blocks.{k}``, ``encoder.conv_norm_out``,
  ``quantize.embedding.weight``. Checkpoints saved before diffusers renamed its attention
  layers (``query`` / ``key`` / ``value`` / ``proj_attn``) are accepted too.
- taming-transformers and VQ-Diffusion's PatchVQGAN (``from_taming``): keys such as
  ``encoder.down.{i}.block.{j}.nin_shortcut``, ``encoder.down.{i}.attn.{j}.{norm,q,k,v,
  proj_out}`` (1x1 convs), ``encoder.mid.{block_1,attn_1,block_2}``, ``encoder.norm_out``,
  ``decoder.up.{level}`` where the decoder's ``up`` list is indexed by resolution level
  (``up.0`` is the full-resolution level, run last), and ``quantize.embedding.weight``
  (taming) or the EMA buffer ``quantize.embedding`` (VQ-Diffusion). Loss / discriminator
  keys (``loss.*``) and the EMA statistics buffers are ignored on purpose.

The loaded module uses the plain quantizer (codebook in ``params``), so ``{"params":
params}`` is all it needs; ``quantizer.ema_stats_from_codebook`` starts EMA training from it.
Every conversion goes through ``common.assemble`` against the module's ``eval_shape`` tree.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqdiffusion_jax.convert import common
from vqdiffusion_jax.convert.common import ConversionError
from vqdiffusion_jax.models.vqgan import VQGAN, VQGANConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

_DOWN_TYPES = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
_UP_TYPES = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}
# Fields of diffusers' VQModel config that do not change the encoder / quantizer / decoder.
_IGNORED_FIELDS = ("sample_size", "scaling_factor", "force_upcast", "lookup_from_codebook")
_REQUIRED_VALUES = {"act_fn": ("silu", "swish"), "norm_type": ("group",)}
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v",
                         "proj_attn": "to_out.0"}
_DEPRECATED_ATTENTION_KEY = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")


def load_diffusers_vqvae(path: str | os.PathLike, *, dtype: Any = jnp.float32
                 ) -> tuple[VQGAN, dict[str, Any]]:
  """Loads a diffusers ``VQModel`` directory.

  Args:
    path: directory with ``config.json`` and the weights file.
    dtype: compute dtype of the returned module (parameters stay float32).

  Returns:
    ``(module, params)``: a plain-quantizer ``VQGAN`` and its float32 parameter tree.

  Raises:
    FileNotFoundError: the directory, its config or its weights file is missing.
    ConversionError: unsupported config fields / values, or weights that do not match.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"VQModel directory not found: {path}")
  config_file = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"no {CONFIG_NAME} in the VQModel directory {path}")
  with open(config_file) as f:
    config = config_from_diffusers(json.load(f))
  weights = common.read_weights_in(path, WEIGHTS_NAMES, "the VQModel directory")
  state_dict = _rename_deprecated_attention(weights)
  module = VQGAN(config, dtype=dtype)
  abstract = _abstract_params(module)
  params = common.assemble(abstract, _rules(abstract, _diffusers_key), state_dict,
                           what=f"diffusers VQModel checkpoint {path}")
  return module, params


def config_from_diffusers(config: Mapping[str, Any]) -> VQGANConfig:
  """Our ``VQGANConfig`` (plain quantizer) from a diffusers ``VQModel`` config dict.

  Args:
    config: the parsed ``config.json``; ``sample_size``, ``scaling_factor``,
      ``force_upcast`` and ``lookup_from_codebook`` do not affect the VQ-VAE and are
      ignored, as are bookkeeping keys starting with ``_``.

  Returns:
    The equivalent ``VQGANConfig`` with ``ema=False``, ``beta=0.25``, ``legacy=True``.

  Raises:
    ConversionError: naming every unknown field and unsupported value.
  """
  known = {"in_channels", "out_channels", "down_block_types", "up_block_types",
           "block_out_channels", "layers_per_block", "latent_channels", "num_vq_embeddings",
           "norm_num_groups", "vq_embed_dim", "mid_block_add_attention",
           *_IGNORED_FIELDS, *_REQUIRED_VALUES}
  problems = [f"unknown field {key!r}" for key in sorted(config)
              if key not in known and not key.startswith("_")]
  if config.get("_class_name", "VQModel") != "VQModel":
    problems.append(f"_class_name={config['_class_name']!r} (expected 'VQModel')")
  for key, allowed in _REQUIRED_VALUES.items():
    if config.get(key, allowed[0]) not in allowed:
      problems.append(f"{key}={config[key]!r} (supported: {list(allowed)})")
  channels = tuple(config.get("block_out_channels", (64,)))
  down = tuple(config.get("down_block_types", ("DownEncoderBlock2D",)))
  up = tuple(config.get("up_block_types", ("UpDecoderBlock2D",)))
  for name, types, table in (("down_block_types", down, _DOWN_TYPES),
                             ("up_block_types", up, _UP_TYPES)):
    unsupported = [t for t in types if t not in table]
    if unsupported:
      problems.append(f"{name} contains {unsupported} (supported: {list(table)})")
    if len(types) != len(channels):
      problems.append(f"{name} has {len(types)} entries for {len(channels)} block_out_channels")
  if problems:
    raise ConversionError("unsupported diffusers VQModel config: " + "; ".join(problems))
  latent_channels = int(config.get("latent_channels", 3))
  vq_embed_dim = config.get("vq_embed_dim")
  return VQGANConfig(
      in_channels=int(config.get("in_channels", 3)),
      out_channels=int(config.get("out_channels", 3)),
      block_out_channels=tuple(int(c) for c in channels),
      layers_per_block=int(config.get("layers_per_block", 1)),
      latent_channels=latent_channels,
      num_embeddings=int(config.get("num_vq_embeddings", 256)),
      embed_dim=int(latent_channels if vq_embed_dim is None else vq_embed_dim),
      norm_num_groups=int(config.get("norm_num_groups", 32)),
      encoder_attention_levels=tuple(i for i, t in enumerate(down) if _DOWN_TYPES[t]),
      decoder_attention_levels=tuple(len(up) - 1 - k for k, t in enumerate(up) if _UP_TYPES[t]),
      mid_block_attention=bool(config.get("mid_block_add_attention", True)),
      beta=0.25, ema=False, legacy=True)


def from_taming(state_dict: Mapping[str, Any], config: VQGANConfig, *,
                dtype: Any = jnp.float32) -> tuple[VQGAN, dict[str, Any]]:
  """Converts a taming-transformers / VQ-Diffusion PatchVQGAN state dict.

  Args:
    state_dict: tensors or arrays by taming key (a Lightning checkpoint's ``state_dict``,
      or the dict holding it under ``"state_dict"`` / ``"model"``).
    config: the sizes (``config_from_taming`` builds them from a taming ``ddconfig``); the
      module gets the plain quantizer whatever ``config.ema`` says.
    dtype: compute dtype of the returned module.

  Returns:
    ``(module, params)`` as ``load_diffusers_vqvae``.

  Raises:
    ConversionError: missing, unused or mis-shaped keys.
  """
  for wrapper in ("state_dict", "model"):
    if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
      state_dict = state_dict[wrapper]
  source = common.to_numpy(state_dict)
  module = VQGAN(dataclasses.replace(config, ema=False), dtype=dtype)
  abstract = _abstract_params(module)
  codebook_key = ("quantize.embedding.weight" if "quantize.embedding.weight" in source
                  else "quantize.embedding")
  rules = _rules(abstract, lambda path, ndim: _taming_key(path, ndim, config, codebook_key))
  params = common.assemble(abstract, rules, source, what="taming VQGAN checkpoint",
                           ignore=_ignored_taming_key)
  return module, params


def config_from_taming(ddconfig: Mapping[str, Any], *, n_embed: int, embed_dim: int,
                       norm_num_groups: int = 32) -> VQGANConfig:
  """``VQGANConfig`` from a taming ``ddconfig`` (or VQ-Diffusion encoder params).

  Args:
    ddconfig: ``ch``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions``,
      ``resolution``, ``z_channels``, ``in_channels``, ``out_ch`` (others checked below).
    n_embed: codebook size.
    embed_dim: codebook vector width.
    norm_num_groups: taming hard-codes 32.

  Raises:
    ConversionError: for options the architecture does not have (``double_z``,
      ``scale_by_2``, resampling without conv, non-zero dropout, ``tanh_out``, ...).
  """
  unsupported = {"double_z": False, "scale_by_2": None, "resamp_with_conv": True,
                 "dropout": 0.0, "give_pre_end": False, "tanh_out": False,
                 "activate_output": False}
  problems = [f"{key}={ddconfig[key]!r}" for key, fine in unsupported.items()
              if key in ddconfig and ddconfig[key] != fine]
  if problems:
    raise ConversionError("unsupported taming VQGAN options: " + ", ".join(problems))
  resolution = ddconfig["resolution"]
  size = list(resolution) if isinstance(resolution, (list, tuple)) else [resolution] * 2
  attn = [list(r) if isinstance(r, (list, tuple)) else [r, r]
          for r in ddconfig["attn_resolutions"]]
  levels = len(ddconfig["ch_mult"])
  attention_levels = tuple(i for i in range(levels) if [s // 2**i for s in size] in attn)
  return VQGANConfig(
      in_channels=int(ddconfig.get("in_channels", 3)),
      out_channels=int(ddconfig.get("out_ch", 3)),
      block_out_channels=tuple(int(ddconfig["ch"]) * int(m) for m in ddconfig["ch_mult"]),
      layers_per_block=int(ddconfig["num_res_blocks"]),
      latent_channels=int(ddconfig["z_channels"]),
      num_embeddings=int(n_embed), embed_dim=int(embed_dim), norm_num_groups=norm_num_groups,
      encoder_attention_levels=attention_levels, decoder_attention_levels=attention_levels,
      mid_block_attention=True, ema=False)


def _abstract_params(module: VQGAN):
  cfg = module.config
  size = cfg.downsampling_factor
  images = jax.ShapeDtypeStruct((1, size, size, cfg.in_channels), jnp.float32)
  return jax.eval_shape(module.init, jax.random.key(0), images)["params"]


KeyFn = Callable[[tuple[str, ...], int], common.Rule]


def _rules(abstract_params, key_fn: KeyFn) -> dict[tuple[str, ...], common.Rule]:
  """A rule for every parameter of the target tree, from a path -> source key function."""
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params))[0]
  return {tuple(k.key for k in path): key_fn(tuple(k.key for k in path), len(leaf.shape))
          for path, leaf in flat}


def _leaf(name: str, ndim: int, dense: Callable[[np.ndarray], np.ndarray]) -> common.Rule:
  if name == "kernel":
    return "weight", common.conv if ndim == 4 else dense
  return {"scale": "weight", "bias": "bias", "codebook": "embedding.weight"}[name], common.same


def _diffusers_key(path: tuple[str, ...], ndim: int) -> common.Rule:
  rename = {"downsample": "downsamplers.0", "upsample": "upsamplers.0", "to_out": "to_out.0",
            "norm_out": "conv_norm_out"}
  parts = []
  for part in path[:-1]:
    stem, _, index = part.rpartition("_")
    if index.isdigit() and stem in ("down_blocks", "up_blocks", "resnets", "attentions"):
      part = f"{stem}.{index}"
    parts.append(rename.get(part, part))
  leaf, transform = _leaf(path[-1], ndim, common.linear)
  return ".".join([*parts, leaf]), transform


def _taming_key(path: tuple[str, ...], ndim: int, config: VQGANConfig,
                codebook_key: str) -> common.Rule:
  if path == ("quantize", "codebook"):
    return codebook_key, common.same
  rename = {"mid_block": "mid", "downsample": "downsample", "upsample": "upsample",
            "conv_shortcut": "nin_shortcut", "group_norm": "norm", "to_q": "q", "to_k": "k",
            "to_v": "v", "to_out": "proj_out"}
  last_level = len(config.block_out_channels) - 1
  parts = []
  for part, parent in zip(path[:-1], (None, *path[:-2]), strict=True):
    stem, _, index = part.rpartition("_")
    if parent == "mid_block":
      part = {"resnets_0": "block_1", "attentions_0": "attn_1", "resnets_1": "block_2"}[part]
    elif stem == "down_blocks":
      part = f"down.{index}"
    elif stem == "up_blocks":
      part = f"up.{last_level - int(index)}"
    elif stem in ("resnets", "attentions") and index.isdigit():
      part = f"{'block' if stem == 'resnets' else 'attn'}.{index}"
    parts.append(rename.get(part, part))
  leaf, transform = _leaf(path[-1], ndim, _pointwise_conv_as_dense)
  return ".".join([*parts, leaf]), transform


def _pointwise_conv_as_dense(weight: np.ndarray) -> np.ndarray:
  """taming's 1x1 attention conv (O, I, 1, 1) -> Dense kernel (I, O)."""
  weight = np.asarray(weight)
  return np.ascontiguousarray(weight.reshape(weight.shape[0], -1).T)


def _ignored_taming_key(key: str) -> bool:
  return key.startswith("loss.") or key in ("quantize.cluster_size", "quantize.embedding_avg")


def _rename_deprecated_attention(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  rename = lambda m: f"{m.group(1)}{_DEPRECATED_ATTENTION[m.group(2)]}."
  return {_DEPRECATED_ATTENTION_KEY.sub(rename, key): value for key, value in state_dict.items()}
