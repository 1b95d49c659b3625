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

The loaded module uses the plain (or Gumbel) quantizer (codebook in ``params``), so ``{"params":
params}`` is all it needs; ``quantizer.ema_stats_from_codebook`` starts EMA training from it.
Every conversion goes through ``common.assemble`` against the module's ``eval_shape`` tree.

``load_official_codec`` reads microsoft/VQ-Diffusion's image codecs: a taming checkpoint
(plain, inside a Net2NetTransformer under ``first_stage_model.``, or inside an official
model ``.pth`` under ``content_codec.``), its YAML config (``VQModel`` or ``GumbelVQ``,
whose quantizer is a ``quantize.proj`` 1x1 conv to K logits plus a ``quantize.embed``
table) and the official token remap file; the remap travels in ``params["remap"]``. ITHQ's
codec is a ``PatchVQGAN`` (``config_from_patch_vqgan``): its ``config.yaml`` gives encoder and
decoder configs separately, and ``ithq_vqvae.pth`` holds ``{"model": state_dict}`` with the
codebook in the EMA buffer ``quantize.embedding``.
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
import yaml

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
                full_to_compact: np.ndarray | None = None, dtype: Any = jnp.float32,
                what: str = "taming VQGAN checkpoint") -> tuple[VQGAN, dict[str, Any]]:
  """Converts a taming-transformers / VQ-Diffusion PatchVQGAN state dict.

  Args:
    state_dict: tensors or arrays by taming key (a Lightning checkpoint's ``state_dict``,
      or the dict holding it under ``"state_dict"`` / ``"model"``).
    config: the sizes (``config_from_taming`` builds them from a taming ``ddconfig``); the
      module gets the plain quantizer whatever ``config.ema`` says, or the Gumbel one
      (keys ``quantize.proj.*``, ``quantize.embed.weight``) when ``config.gumbel``.
    full_to_compact: with ``config.used_codes > 0``, the code remap (K,) integer array
      (``read_code_remap``); stored in ``params["remap"]``.
    dtype: compute dtype of the returned module.
    what: the checkpoint's name in error messages.

  Returns:
    ``(module, params)`` as ``load_diffusers_vqvae``.

  Raises:
    ConversionError: missing, unused or mis-shaped keys; a remap missing or not fitting.
  """
  for wrapper in ("state_dict", "model"):
    if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
      state_dict = state_dict[wrapper]
  source = common.to_numpy(state_dict)
  module = VQGAN(dataclasses.replace(config, ema=False), dtype=dtype)
  abstract = {k: v for k, v in _abstract_params(module).items() if k != "remap"}
  codebook_key = ("quantize.embed.weight" if config.gumbel
                  else "quantize.embedding.weight" if "quantize.embedding.weight" in source
                  else "quantize.embedding")
  params = common.assemble(abstract, taming_rules(abstract, config, codebook_key), source,
                           what=what, ignore=_ignored_taming_key)
  if (full_to_compact is None) != (not config.used_codes):
    raise ConversionError(f"{what}: config.used_codes={config.used_codes} needs a code remap "
                          "exactly when it is > 0")
  if full_to_compact is not None:
    params["remap"] = _remap_params(full_to_compact, config, what)
  return module, params


def _remap_params(full_to_compact: np.ndarray, config: VQGANConfig,
                  what: str) -> dict[str, np.ndarray]:
  full_to_compact = np.asarray(full_to_compact)
  compact_to_full = compact_to_full_table(full_to_compact)
  if full_to_compact.shape != (config.num_embeddings,) or (
      compact_to_full.size != config.used_codes):
    raise ConversionError(f"{what}: a code remap of shape {full_to_compact.shape} onto "
                          f"{compact_to_full.size} codes does not fit num_embeddings="
                          f"{config.num_embeddings}, used_codes={config.used_codes}")
  return {"full_to_compact": full_to_compact.astype(np.int32),
          "compact_to_full": compact_to_full}


def compact_to_full_table(full_to_compact: np.ndarray) -> np.ndarray:
  """For each compact index, the first full code index that maps onto it.

  Args:
    full_to_compact: integer array (K,) whose values cover ``0..max`` without a gap.

  Returns:
    int32 array (max + 1,), as the official codecs build ``quantize_to_full``.

  Raises:
    ConversionError: negative values or a compact index that nothing maps onto.
  """
  values, first = np.unique(np.asarray(full_to_compact), return_index=True)
  missing = sorted(set(range(int(values[-1]) + 1)) - set(values.tolist())) if values.size else []
  if values.size == 0 or values[0] < 0 or missing:
    raise ConversionError(f"a code remap must map onto 0..max without a gap; it has values "
                          f"from {values[:1].tolist()} and misses {missing[:8]}")
  return first.astype(np.int32)


def config_from_taming(ddconfig: Mapping[str, Any], *, n_embed: int, embed_dim: int,
                       norm_num_groups: int = 32, gumbel: bool = False,
                       used_codes: int = 0) -> VQGANConfig:
  """``VQGANConfig`` from a taming ``ddconfig`` (or VQ-Diffusion encoder params).

  Args:
    ddconfig: ``ch``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions`` (sizes, or
      ``[h, w]`` pairs as VQ-Diffusion writes them), ``resolution`` (a size or a pair),
      ``z_channels``, ``in_channels``, ``out_ch`` (others checked below;
      ``activate_output`` is accepted and, as in both official encoders, has no effect).
    n_embed: codebook size.
    embed_dim: codebook vector width.
    norm_num_groups: taming hard-codes 32.
    gumbel: a ``GumbelVQ`` (Gumbel quantizer) rather than a ``VQModel``.
    used_codes: the compact vocabulary size of a code remap (0: none).

  Raises:
    ConversionError: for options the architecture does not have (``double_z``,
      ``scale_by_2``, resampling without conv, non-zero dropout, ``tanh_out``, ...), and
      for a Gumbel model whose ``z_channels`` differs from ``embed_dim`` (taming's ``proj``
      reads ``z_channels`` from the ``embed_dim``-wide ``quant_conv`` output).
  """
  unsupported = {"double_z": False, "scale_by_2": None, "resamp_with_conv": True,
                 "dropout": 0.0, "give_pre_end": False, "tanh_out": False}
  problems = [f"{key}={ddconfig[key]!r}" for key, fine in unsupported.items()
              if key in ddconfig and ddconfig[key] != fine]
  if gumbel and int(ddconfig["z_channels"]) != int(embed_dim):
    problems.append(f"a Gumbel quantizer with z_channels={ddconfig['z_channels']} != "
                    f"embed_dim={embed_dim}")
  if problems:
    raise ConversionError("unsupported taming VQGAN options: " + ", ".join(problems))
  return VQGANConfig(
      in_channels=int(ddconfig.get("in_channels", 3)),
      out_channels=int(ddconfig.get("out_ch", 3)),
      block_out_channels=tuple(int(ddconfig["ch"]) * int(m) for m in ddconfig["ch_mult"]),
      layers_per_block=int(ddconfig["num_res_blocks"]),
      latent_channels=int(ddconfig["z_channels"]),
      num_embeddings=int(n_embed), embed_dim=int(embed_dim), norm_num_groups=norm_num_groups,
      encoder_attention_levels=_attention_levels(ddconfig, decoder=False),
      decoder_attention_levels=_attention_levels(ddconfig, decoder=True),
      mid_block_attention=True, ema=False, gumbel=gumbel, used_codes=int(used_codes))


def _attention_levels(ddconfig: Mapping[str, Any], *, decoder: bool) -> tuple[int, ...]:
  """The levels whose ``[h, w]`` the encoder (halving from ``resolution``) or the decoder
  (doubling from ``resolution // 2 ** (levels - 1)``) finds in ``attn_resolutions``."""
  resolution = ddconfig["resolution"]
  size = list(resolution) if isinstance(resolution, (list, tuple)) else [resolution] * 2
  attn = [list(r) if isinstance(r, (list, tuple)) else [r, r]
          for r in ddconfig["attn_resolutions"]]
  levels = len(ddconfig["ch_mult"])
  lowest = [s // 2 ** (levels - 1) for s in size]
  sizes = ([[s * 2 ** (levels - 1 - i) for s in lowest] for i in range(levels)] if decoder
           else [[s // 2**i for s in size] for i in range(levels)])
  return tuple(i for i in range(levels) if [int(s) for s in sizes[i]] in attn)


def config_from_patch_vqgan(params: Mapping[str, Any], *, used_codes: int = 0) -> VQGANConfig:
  """``VQGANConfig`` from the params of VQ-Diffusion's ``PatchVQGAN`` (the ITHQ codec).

  ``PatchVQGAN`` builds its encoder and decoder from separate configs
  (``patch_vqgan.Encoder`` / ``patch_vqgan.Decoder``, taming's layers with ``[h, w]``
  resolutions) and quantizes with ``EMAVectorQuantizer``: the nearest code in squared L2
  distance among the rows of its ``embedding`` buffer, looked up as they are. That is our
  plain quantizer with the buffer as the codebook.

  Args:
    params: ``model.params`` of the official ``config.yaml``: ``encoder_config``,
      ``decoder_config`` (each ``{"target", "params"}``), ``n_embed``, ``embed_dim``,
      ``quantizer_type`` and ``quantizer_dis_type``.
    used_codes: the compact vocabulary size of a code remap (0: none).

  Raises:
    ConversionError: a missing field, other encoder / decoder classes, a quantizer other
      than ``EMAVQ`` with the ``euclidean`` distance, or encoder and decoder sizes that
      one ``VQGANConfig`` cannot hold (``ch``, ``ch_mult``, ``num_res_blocks``,
      ``z_channels`` must agree).
  """
  missing = [k for k in ("encoder_config", "decoder_config", "n_embed", "embed_dim")
             if k not in params]
  if missing:
    raise ConversionError(f"the PatchVQGAN params lack {missing}")
  problems = []
  for field, cls in (("encoder_config", "Encoder"), ("decoder_config", "Decoder")):
    section = params[field] if isinstance(params[field], Mapping) else {}
    target = str(section.get("target", ""))
    if target.rpartition(".")[2] != cls or not isinstance(section.get("params"), Mapping):
      problems.append(f"{field} must be a patch_vqgan.{cls} with params, got {target!r}")
  quantizer = (params.get("quantizer_type", "VQ"), params.get("quantizer_dis_type", "euclidean"))
  if quantizer != ("EMAVQ", "euclidean"):
    problems.append(f"quantizer_type={quantizer[0]!r} with quantizer_dis_type={quantizer[1]!r} "
                    "(supported: 'EMAVQ' with 'euclidean')")
  if problems:
    raise ConversionError("unsupported PatchVQGAN config: " + "; ".join(problems))
  sizes = {"n_embed": int(params["n_embed"]), "embed_dim": int(params["embed_dim"]),
           "used_codes": used_codes}
  encoder = config_from_taming(params["encoder_config"]["params"], **sizes)
  decoder = config_from_taming({"in_channels": encoder.in_channels,
                                **params["decoder_config"]["params"]}, **sizes)
  shared = ("block_out_channels", "layers_per_block", "latent_channels")
  differ = [f"{name} {getattr(encoder, name)} vs {getattr(decoder, name)}" for name in shared
            if getattr(encoder, name) != getattr(decoder, name)]
  if differ:
    raise ConversionError("the PatchVQGAN encoder and decoder differ in " + ", ".join(differ))
  return dataclasses.replace(encoder, out_channels=decoder.out_channels,
                             decoder_attention_levels=decoder.decoder_attention_levels)


def load_official_codec(checkpoint: str | os.PathLike, config_yaml: str | os.PathLike,
                        remap: str | os.PathLike | None = None, *, dtype: Any = jnp.float32,
                        allow_pickle: bool = False) -> tuple[VQGAN, dict[str, Any]]:
  """Loads an image codec of microsoft/VQ-Diffusion (its VQGAN and token remap).

  The official ``TamingGumbelVQVAE`` (COCO, CUB-200, Conceptual Captions: GumbelVQ f8,
  8,192 codes, remap ``taming_vqvae_2887.pt``), ``TamingVQVAE`` (ImageNet: VQModel f16,
  16,384 codes, remap ``taming_vqvae_974.pt``), ``TamingFFHQVQVAE`` (FFHQ: the
  ``first_stage_model`` of a taming Net2NetTransformer, 1,024 codes, no remap) and
  ``PatchVQVAE`` (ITHQ: a ``PatchVQGAN`` f8 with an EMA codebook, 4,096 codes, no remap).
  The returned module's ``encode`` takes images in [-1, 1] (each official codec divides
  its [0, 255] input by 255 and maps it by ``2x - 1``) and gives remapped tokens;
  ``decode`` takes them and returns unclamped images (the official clamps to [-1, 1]
  before mapping back to [0, 255]). A GumbelVQ's tokens are the most likely codes, where
  the official samples them with Gumbel noise.

  Args:
    checkpoint: a PyTorch file holding the codec: a taming Lightning checkpoint
      (``{"state_dict": ...}``, ``loss.*`` keys ignored), a Net2NetTransformer one (keys
      under ``first_stage_model.``), ITHQ's ``ithq_vqvae.pth`` (``{"model": ...}``; the EMA
      statistics ``quantize.cluster_size`` / ``quantize.embedding_avg`` are not needed), or
      an official VQ-Diffusion model ``.pth`` (``{"model": ...}`` with
      ``content_codec.enc.*`` / ``content_codec.dec.*``).
    config_yaml: the codec's config: taming's (``model.target`` a ``GumbelVQ``,
      ``VQModel`` or ``Net2NetTransformer``; ``ddconfig``, ``n_embed``, ``embed_dim`` under
      its params) or ITHQ's ``config.yaml`` (``model.target`` a ``PatchVQGAN``;
      ``config_from_patch_vqgan``).
    remap: the official ``full_to_quantize`` file (``torch.save`` of K integers), or None.
    dtype: compute dtype of the module (parameters stay float32).
    allow_pickle: unpickle Python objects besides tensors in ``checkpoint`` (trusted files).

  Returns:
    ``(module, params)``: a ``VQGAN`` and its parameters (``{"params": params}`` are its
    variables); with a remap, ``params["remap"]`` holds the int32 tables.

  Raises:
    FileNotFoundError: a file is missing.
    ConversionError: naming the file: an unknown config, a checkpoint without the codec,
      a code count other than ``n_embed``, a remap that does not fit, key mismatches.
  """
  checkpoint, config_yaml = os.fspath(checkpoint), os.fspath(config_yaml)
  config = read_codec_config(config_yaml)
  full_to_compact = (None if remap is None
                     else read_code_remap(remap, config.num_embeddings))
  state = codec_state_dict(
      common.load_torch_checkpoint(checkpoint, "codec checkpoint", allow_pickle), checkpoint)
  for table in _codebook_keys(config):
    if table in state and np.shape(state[table])[0] != config.num_embeddings:
      raise ConversionError(f"{checkpoint}: {table} holds {np.shape(state[table])[0]} codes "
                            f"but {config_yaml} says n_embed={config.num_embeddings}")
  used = 0 if full_to_compact is None else int(full_to_compact.max()) + 1
  return from_taming(state, dataclasses.replace(config, used_codes=used),
                     full_to_compact=full_to_compact, dtype=dtype,
                     what=f"codec checkpoint {checkpoint}")


def _codebook_keys(config: VQGANConfig) -> tuple[str, ...]:
  return (("quantize.embed.weight",) if config.gumbel
          else ("quantize.embedding.weight", "quantize.embedding"))


def read_codec_config(path: str | os.PathLike) -> VQGANConfig:
  """The ``VQGANConfig`` (no remap) of an official codec config YAML.

  Args:
    path: a taming config (``read_taming_config``) or ITHQ's ``PatchVQGAN`` one
      (``config_from_patch_vqgan``).

  Raises:
    FileNotFoundError: no such file.
    ConversionError: naming the file, for an unknown target or unsupported options.
  """
  path = os.fspath(path)
  model = _model_section(path)
  try:
    if str(model.get("target", "")).rpartition(".")[2] == "PatchVQGAN":
      return config_from_patch_vqgan(model.get("params") or {})
    ddconfig, n_embed, embed_dim, gumbel = read_taming_config(path)
    return config_from_taming(ddconfig, n_embed=n_embed, embed_dim=embed_dim, gumbel=gumbel)
  except ConversionError as error:
    if path in str(error):
      raise
    raise ConversionError(f"{path}: {error}") from None


def _model_section(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"codec config not found: {path}")
  with open(path) as f:
    model = (yaml.safe_load(f) or {}).get("model", {})
  if str(model.get("target", "")).endswith(".Net2NetTransformer"):
    model = model.get("params", {}).get("first_stage_config", {})
  return model


def read_taming_config(path: str | os.PathLike) -> tuple[dict[str, Any], int, int, bool]:
  """``(ddconfig, n_embed, embed_dim, gumbel)`` of a taming model config YAML.

  Raises:
    FileNotFoundError: no such file.
    ConversionError: naming the file, when ``model.target`` is not a ``VQModel``,
      ``GumbelVQ`` or ``Net2NetTransformer`` (whose ``first_stage_config`` is read), or a
      field is missing.
  """
  path = os.fspath(path)
  model = _model_section(path)
  target = str(model.get("target", ""))
  kind = target.rpartition(".")[2]
  if kind not in ("VQModel", "GumbelVQ"):
    raise ConversionError(f"{path}: model.target {target!r} is not a taming VQModel, GumbelVQ "
                          "or Net2NetTransformer, nor VQ-Diffusion's PatchVQGAN")
  params = model.get("params", {})
  missing = [k for k in ("ddconfig", "n_embed", "embed_dim") if k not in params]
  if missing:
    raise ConversionError(f"{path}: the {kind} params lack {missing}")
  return (dict(params["ddconfig"]), int(params["n_embed"]), int(params["embed_dim"]),
          kind == "GumbelVQ")


def read_code_remap(path: str | os.PathLike, num_embeddings: int) -> np.ndarray:
  """The official ``full_to_quantize`` remap file: K code indices -> compact indices.

  Args:
    path: a ``torch.save``d 1-D integer tensor (``help_folder/statistics/*.pt``).
    num_embeddings: the codec's K.

  Returns:
    int32 array (K,) whose values cover ``0..K'-1``.

  Raises:
    FileNotFoundError: no such file.
    ConversionError: naming the file: not a 1-D integer tensor of K entries, or values
      that leave a compact index unused.
  """
  path = os.fspath(path)
  loaded = common.torch_load(path, "code remap file")
  table = loaded.numpy() if hasattr(loaded, "numpy") else np.asarray(loaded)
  if table.ndim != 1 or not np.issubdtype(table.dtype, np.integer):
    raise ConversionError(f"code remap {path}: expected a 1-D integer tensor, got "
                          f"{table.dtype} {table.shape}")
  if table.shape[0] != num_embeddings:
    raise ConversionError(f"code remap {path} has {table.shape[0]} entries but the codec has "
                          f"n_embed={num_embeddings} codes")
  try:
    compact_to_full_table(table)
  except ConversionError as error:
    raise ConversionError(f"code remap {path}: {error}") from None
  return table.astype(np.int32)


_DALLE_CODEC_PREFIXES = {"content_codec.enc.encoder.": "encoder.",
                         "content_codec.enc.quant_conv.": "quant_conv.",
                         "content_codec.enc.quantize.": "quantize.",
                         "content_codec.dec.decoder.": "decoder.",
                         "content_codec.dec.post_quant_conv.": "post_quant_conv."}
_DALLE_SHARED_QUANTIZER = "content_codec.dec.quantize."


def codec_state_dict(loaded: Mapping[str, Any], where: str) -> dict[str, Any]:
  """The taming ``VQModel`` keys of the codec inside a loaded checkpoint.

  Args:
    loaded: what ``torch.load`` returned: a state dict, or one under ``"state_dict"``
      (Lightning) or ``"model"`` (VQ-Diffusion). Keys under ``first_stage_model.`` (a
      Net2NetTransformer) or ``content_codec.`` (a VQ-Diffusion model, whose decoder
      shares the encoder's quantizer) are taken and renamed; everything else is left out.
    where: the file, for error messages.

  Raises:
    ConversionError: no codec keys, or the decoder's quantizer differs from the encoder's.
  """
  for wrapper in ("state_dict", "model"):
    if isinstance(loaded.get(wrapper), Mapping):
      loaded = loaded[wrapper]
      break
  if any(key.startswith("content_codec.") for key in loaded):
    state = _from_dalle(loaded, where)
  elif any(key.startswith("first_stage_model.") for key in loaded):
    prefix = "first_stage_model."
    state = {k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)}
  else:
    state = dict(loaded)
  if not any(key.startswith("encoder.") for key in state):
    raise ConversionError(f"{where} holds no image codec: expected taming keys such as "
                          "encoder.conv_in.weight, under first_stage_model. or as "
                          "content_codec.enc.encoder.*")
  return state


def _from_dalle(loaded: Mapping[str, Any], where: str) -> dict[str, Any]:
  state = {}
  for key, value in loaded.items():
    if not key.startswith("content_codec.") or key.startswith(_DALLE_SHARED_QUANTIZER):
      continue
    prefix = next((p for p in _DALLE_CODEC_PREFIXES if key.startswith(p)), None)
    state[key if prefix is None else _DALLE_CODEC_PREFIXES[prefix] + key[len(prefix):]] = value
  for key, value in loaded.items():
    if key.startswith(_DALLE_SHARED_QUANTIZER):
      twin = "quantize." + key[len(_DALLE_SHARED_QUANTIZER):]
      if twin not in state or not np.array_equal(common.to_numpy({key: value})[key],
                                                 common.to_numpy({twin: state[twin]})[twin]):
        raise ConversionError(f"{where}: {key} differs from the encoder's quantizer "
                              "(the official codec shares one)")
  return state


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


def taming_rules(abstract_params, config: VQGANConfig,
                 codebook_key: str = "quantize.embedding.weight"
                 ) -> dict[tuple[str, ...], common.Rule]:
  """The taming key and layout change of every parameter of ``abstract_params``.

  Args:
    abstract_params: our module's parameter tree (shapes suffice), without ``remap``.
    config: its config.
    codebook_key: where a nearest-code codebook sits (``quantize.embedding.weight``, or
      VQ-Diffusion's EMA buffer ``quantize.embedding``); a Gumbel model's table is
      ``quantize.embed.weight`` whatever this says.

  Returns:
    ``{param path: (taming key, transform)}`` for ``common.assemble``.
  """
  if config.gumbel:
    codebook_key = "quantize.embed.weight"
  return _rules(abstract_params, lambda path, ndim: _taming_key(path, ndim, config,
                                                                codebook_key))


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
