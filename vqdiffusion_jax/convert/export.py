"""Our params -> PyTorch state dicts and configs: the import rules run backwards.

Every exporter takes the rule table its importer reads with (``{our param path:
(torch key, transform)}`` from ``denoiser._rules``, ``vqvae._rules`` and
``clip.text_rules``) and writes each parameter under its torch key through the
inverse of its transform. Each inverse is checked where it is applied: the
forward transform of the exported tensor must give our array back exactly, so
the two directions cannot drift apart.

* ``denoiser_to_diffusers``: a ``Transformer2DModel`` state dict and config,
  and the learned null text of ``LearnedClassifierFreeSamplingEmbeddings``.
* ``denoiser_to_official``: the state dict of microsoft/VQ-Diffusion's
  ``DiffusionTransformer`` without its condition embedding: the
  ``transformer.*`` network, ``empty_text_embed`` (float64, as the official
  parameter), the schedule buffers (``log_at`` ... from our schedule's tables,
  ``Lt_history`` / ``Lt_count`` zeroed) and each text block's causal ``mask``
  buffer of its cross-attention.
* ``vqvae_to_diffusers``: a ``VQModel`` state dict and config.
* ``clip_to_transformers``: a ``CLIPTextModel`` state dict and config fields.
* ``scheduler_config``: the ``VQDiffusionScheduler`` config of a schedule.

What a format cannot hold is an ``ExportError`` naming it. Arrays are NumPy;
nothing here needs torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import numpy as np

from vqdiffusion_jax.convert import clip, common, denoiser, vqvae
from vqdiffusion_jax.diffusion import schedule as schedules
from vqdiffusion_jax.models import clip_text, quantizer, transformer
from vqdiffusion_jax.models.vqgan import VQGAN, VQGANConfig

# Official buffer name -> our Schedule field.
OFFICIAL_SCHEDULE_BUFFERS = {
    "log_at": "log_at", "log_bt": "log_bt", "log_ct": "log_ct",
    "log_cumprod_at": "log_cumprod_at", "log_cumprod_bt": "log_cumprod_bt",
    "log_cumprod_ct": "log_cumprod_ct", "log_1_min_ct": "log_1m_ct",
    "log_1_min_cumprod_ct": "log_1m_cumprod_ct",
}
# The loss history buffers (zeros in a fresh module).
OFFICIAL_LOSS_BUFFERS = tuple(name for name in denoiser.OFFICIAL_BUFFERS
                              if name not in OFFICIAL_SCHEDULE_BUFFERS)
OFFICIAL_NULL_TEXT = "empty_text_embed"
OFFICIAL_NULL_TEXT_SHAPE = (77, 512)  # fixed by the official DiffusionTransformer
OFFICIAL_NETWORK = "transformer."  # the Text2ImageTransformer inside the DiffusionTransformer
DIFFUSERS_FF_MULT = 4


class ExportError(common.ConversionError):
  """A model, or a part of it, has no counterpart in the PyTorch format asked for."""


def _transpose(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x).T)


# Inverses of the importers' transforms, by the name of the function that makes them
# (leading underscores dropped).
_INVERSES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "same": np.asarray,
    "linear": _transpose,  # (in, out) -> (out, in)
    "conv": lambda x: np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1))),  # HWIO -> OIHW
    "heads_in": lambda x: _transpose(x.reshape(x.shape[0], -1)),  # (in, H, d) -> (H*d, in)
    "heads_bias": lambda x: x.reshape(-1),  # (H, d) -> (H*d,)
    "split_heads": lambda x: x.reshape(-1),
    "heads_out": lambda x: _transpose(x.reshape(-1, x.shape[-1])),  # (H, d, D) -> (D, H*d)
}


def _inverse(transform: Callable) -> Callable[[np.ndarray], np.ndarray]:
  name = transform.__qualname__.split(".")[0].lstrip("_")
  if name not in _INVERSES:
    raise ExportError(f"no inverse for the conversion transform {transform.__qualname__!r}")
  return _INVERSES[name]


def _flat(params: Any) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(nn.meta.unbox(params)))


def invert(rules: Mapping[tuple[str, ...], common.Rule], params: Any, *,
           what: str) -> dict[str, np.ndarray]:
  """Torch state dict of ``params`` by an importer's ``rules``, every inverse checked.

  Args:
    rules: ``{our param path: (torch key, forward transform)}``.
    params: our params tree (boxed or not; arrays of any float dtype).
    what: the model's name in error messages.

  Returns:
    ``{torch key: float32 array}``.

  Raises:
    ExportError: params without a rule, rules without a param, or an inverse
      whose forward transform does not give the param back.
  """
  flat = _flat(params)
  problems = []
  no_rule = sorted("/".join(p) for p in flat if p not in rules)
  if no_rule:
    problems.append(f"parameters with no PyTorch counterpart: {no_rule}")
  absent = sorted("/".join(p) for p in rules if p not in flat)
  if absent:
    problems.append(f"parameters missing from the params: {absent}")
  keys = [key for key, _ in rules.values()]
  if len(set(keys)) != len(keys):
    problems.append("two parameters map to one torch key")
  if problems:
    raise ExportError(f"{what} cannot be exported:\n  " + "\n  ".join(problems))
  out = {}
  for path, (key, forward) in rules.items():
    ours = np.asarray(jax.device_get(flat[path]), np.float32)
    theirs = np.ascontiguousarray(_inverse(forward)(ours))
    if not np.array_equal(forward(theirs), ours):
      raise ExportError(f"{what}: {key} does not convert back to {'/'.join(path)}")
    out[key] = theirs
  return out


def _refuse(problems: list[str], target: str, what: str) -> None:
  if problems:
    raise ExportError(f"{what} cannot be exported as {target}: " + "; ".join(problems))


def _plain_params(params: Any) -> dict:
  """Denoiser params with one ``block_{i}`` subtree per layer."""
  params = flax.core.unfreeze(nn.meta.unbox(params))
  return transformer.unstack_layers(params) if "blocks" in params else params


# Denoiser.


def diffusers_problems(config: transformer.TransformerConfig) -> list[str]:
  """What of ``config`` a diffusers ``Transformer2DModel`` cannot express (empty: all fits)."""
  problems = []
  if config.conditioning == "class":
    problems.append("class conditioning (Transformer2DModel's ada_norm blocks take no class "
                    "label)")
  if config.mlp_type != "fc":
    problems.append(f"mlp_type={config.mlp_type!r} (diffusers' feed-forward works per token)")
  if config.mlp_ratio != DIFFUSERS_FF_MULT:
    problems.append(f"mlp_ratio={config.mlp_ratio} (diffusers' feed-forward is "
                    f"{DIFFUSERS_FF_MULT}x wide)")
  if config.spatial_size[0] != config.spatial_size[1]:
    problems.append(f"the non-square token grid {tuple(config.spatial_size)} (one sample_size)")
  if tuple(config.grid) != tuple(config.spatial_size):
    problems.append(f"position tables {tuple(config.grid)} larger than the token grid")
  if config.pooled_text:
    problems.append("pooled_text (our per-block pooled-text modulation)")
  return problems


def official_problems(config: transformer.TransformerConfig) -> list[str]:
  """What of ``config`` the official ``DiffusionTransformer`` cannot hold (empty: all fits)."""
  problems = []
  if config.pooled_text:
    problems.append("pooled_text (our per-block pooled-text modulation)")
  shape = (config.condition_length, config.condition_dim)
  if config.has_null_text and shape != OFFICIAL_NULL_TEXT_SHAPE:
    problems.append(f"a learnable null text of shape {shape} (the official empty_text_embed is "
                    f"{OFFICIAL_NULL_TEXT_SHAPE}, CLIP ViT-B/32's)")
  return problems


def transformer2d_config(config: transformer.TransformerConfig) -> dict[str, Any]:
  """The diffusers ``Transformer2DModel`` config of a denoiser config."""
  return {
      "num_attention_heads": config.num_heads, "attention_head_dim": config.head_dim,
      "num_layers": config.num_layers, "num_vector_embeds": config.codebook_size + 1,
      "sample_size": config.spatial_size[0],
      "cross_attention_dim": config.condition_dim if config.conditioning == "text" else None,
      "num_embeds_ada_norm": config.num_timesteps, "norm_type": "ada_norm",
      "activation_fn": "geglu-approximate", "attention_bias": True, "dropout": 0.0,
      "norm_elementwise_affine": True, "norm_eps": transformer.LN_EPS,
  }


def null_text_config(config: transformer.TransformerConfig) -> dict[str, Any]:
  """``LearnedClassifierFreeSamplingEmbeddings`` arguments of a denoiser config."""
  if not config.has_null_text:
    return {"learnable": False}
  return {"learnable": True, "hidden_size": config.condition_dim,
          "length": config.condition_length}


def denoiser_to_diffusers(params: Any, config: transformer.TransformerConfig):
  """A denoiser as diffusers holds it.

  Args:
    params: the denoiser's params (plain or stacked blocks).
    config: its config.

  Returns:
    ``(state_dict, transformer_config, null_text)``: the ``Transformer2DModel``
    state dict and config, and the learned null text (L, D) or None.

  Raises:
    ExportError: naming what diffusers cannot express (``diffusers_problems``).
  """
  _refuse(diffusers_problems(config), "a diffusers Transformer2DModel", "the denoiser")
  rules = denoiser._rules(config, denoiser.DIFFUSERS, null_text_key=denoiser.NULL_TEXT_KEY)
  state = invert(rules, _plain_params(params), what="the denoiser")
  return state, transformer2d_config(config), state.pop(denoiser.NULL_TEXT_KEY, None)


def official_buffers(config: transformer.TransformerConfig,
                     schedule: schedules.Schedule) -> dict[str, np.ndarray]:
  """The buffers the official ``DiffusionTransformer`` registers, from our schedule.

  Args:
    config: the denoiser's config (the text blocks' cross-attention holds a
      causal ``mask`` over the N image tokens, shape (1, 1, N, N)).
    schedule: the noise schedule; its tables become ``log_at`` ...

  Returns:
    ``{DiffusionTransformer key: float32 array}``.
  """
  expected = (config.num_timesteps, config.codebook_size)
  if (schedule.num_timesteps, schedule.codebook_size) != expected:
    raise ExportError(f"the schedule has T={schedule.num_timesteps}, K={schedule.codebook_size}"
                      f" but the denoiser T={expected[0]}, K={expected[1]}")
  buffers = {name: np.asarray(getattr(schedule, field), np.float32)
             for name, field in OFFICIAL_SCHEDULE_BUFFERS.items()}
  for name in OFFICIAL_LOSS_BUFFERS:
    buffers[name] = np.zeros(config.num_timesteps, np.float32)
  if config.conditioning == "text":
    n = config.num_tokens
    mask = np.tril(np.ones((n, n), np.float32)).reshape(1, 1, n, n)
    for i in range(config.num_layers):
      block = OFFICIAL_NETWORK + denoiser.OFFICIAL.block.format(i=i)
      buffers[f"{block}.{denoiser.OFFICIAL.cross_attn}.{denoiser.OFFICIAL_MASK}"] = mask
  return buffers


def denoiser_to_official(params: Any, config: transformer.TransformerConfig,
                         schedule: schedules.Schedule) -> dict[str, np.ndarray]:
  """The official ``DiffusionTransformer`` state dict of a denoiser, buffers included.

  Its keys lack the DALLE model's leading ``transformer.`` (they are those of
  the official EMA entry); the CLIP text embedding (``condition_emb``) is not
  part of it.

  Raises:
    ExportError: naming what the official module cannot hold (``official_problems``).
  """
  _refuse(official_problems(config), "an official VQ-Diffusion checkpoint", "the denoiser")
  rules = denoiser._rules(config, denoiser.OFFICIAL, OFFICIAL_NETWORK,
                          null_text_key=OFFICIAL_NULL_TEXT)
  state = invert(rules, _plain_params(params), what="the denoiser")
  if OFFICIAL_NULL_TEXT in state:
    state[OFFICIAL_NULL_TEXT] = state[OFFICIAL_NULL_TEXT].astype(np.float64)
  return state | official_buffers(config, schedule)


# Noise schedule.


def _same_tables(a: schedules.Schedule, b: schedules.Schedule) -> bool:
  fields = [f.name for f in dataclasses.fields(a) if f.name != "codebook_size"]
  return all(np.allclose(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)), rtol=1e-5,
                         atol=1e-6) for f in fields)


def _linear_ends(schedule: schedules.Schedule) -> dict[str, float]:
  """abar and cbar at the first and last step, the parameters of the linear schedule."""
  last = schedule.num_timesteps - 1
  at, ct = np.exp(np.asarray(schedule.log_cumprod_at)), np.exp(np.asarray(schedule.log_cumprod_ct))
  return {"att_1": float(at[0]), "att_T": float(at[last]), "ctt_1": float(ct[0]),
          "ctt_T": float(ct[last])}


def scheduler_config(schedule: schedules.Schedule) -> dict[str, Any]:
  """The ``VQDiffusionScheduler`` config with the same tables as ``schedule``.

  diffusers' scheduler is the official linear (``alpha1``) schedule, set by
  the cumulative keep and mask probabilities at the first and last step: the
  official defaults when they fit, else the ends read off the tables (to six
  digits when those fit).

  Raises:
    ExportError: the schedule is not of that family (e.g. cosine, uniform).
  """
  steps, size = schedule.num_timesteps, schedule.codebook_size
  defaults = {"att_1": 0.99999, "att_T": 0.000009, "ctt_1": 0.000009, "ctt_T": 0.99999}
  read = _linear_ends(schedule)
  # Ends read off float32 tables carry rounding; the 6-digit values are what a config names.
  rounded = {name: float(f"{value:.6g}") for name, value in read.items()}
  for ends in (defaults, rounded, read):
    try:
      rebuilt = schedules.mask_and_replace(steps, size, **ends)
    except ValueError:  # the ends of a schedule of another family
      continue
    if _same_tables(schedule, rebuilt):
      return {"num_vec_classes": size + 1, "num_train_timesteps": steps,
              "alpha_cum_start": ends["att_1"], "alpha_cum_end": ends["att_T"],
              "gamma_cum_start": ends["ctt_1"], "gamma_cum_end": ends["ctt_T"]}
  raise ExportError("the noise schedule is not the linear mask-and-replace schedule that "
                    "diffusers' VQDiffusionScheduler implements")


# VQ-VAE.


def vqmodel_config(config: VQGANConfig, sample_size: int | None = None) -> dict[str, Any]:
  """The diffusers ``VQModel`` config of a VQ-VAE config."""
  levels = len(config.block_out_channels)
  down = ["AttnDownEncoderBlock2D" if i in config.encoder_attention_levels
          else "DownEncoderBlock2D" for i in range(levels)]
  up = ["AttnUpDecoderBlock2D" if levels - 1 - k in config.decoder_attention_levels
        else "UpDecoderBlock2D" for k in range(levels)]
  out = {"in_channels": config.in_channels, "out_channels": config.out_channels,
         "down_block_types": down, "up_block_types": up,
         "block_out_channels": list(config.block_out_channels),
         "layers_per_block": config.layers_per_block, "act_fn": "silu",
         "latent_channels": config.latent_channels, "num_vq_embeddings": config.num_embeddings,
         "norm_num_groups": config.norm_num_groups, "vq_embed_dim": config.embed_dim,
         "norm_type": "group", "mid_block_add_attention": config.mid_block_attention}
  return out | ({} if sample_size is None else {"sample_size": sample_size})


def vqvae_to_diffusers(config: VQGANConfig, variables: Mapping[str, Any], *,
                       sample_size: int | None = None):
  """A VQ-VAE as a diffusers ``VQModel``.

  Args:
    config: the VQ-VAE's config.
    variables: its variables: ``params``, and ``vq_stats`` for an EMA codebook.
    sample_size: the image size to record in the config.

  Returns:
    ``(state_dict, vqmodel_config)``.

  Raises:
    ExportError: the patch VQ-VAE, or a GroupNorm epsilon other than diffusers' 1e-6.
  """
  problems = []
  if config.patch_size:
    problems.append(f"the patch VQ-VAE (patch_size={config.patch_size}) has no VQModel "
                    "counterpart")
  if config.norm_eps != 1e-6:
    problems.append(f"norm_eps={config.norm_eps} (VQModel's GroupNorms use 1e-6)")
  _refuse(problems, "a diffusers VQModel", "the VQ-VAE")
  params = flax.core.unfreeze(nn.meta.unbox(variables["params"]))
  if config.ema:
    codebook = nn.meta.unbox(variables[quantizer.STATS])["quantize"]["codebook"]
    params["quantize"] = {"codebook": codebook}
  abstract = vqvae._abstract_params(VQGAN(dataclasses.replace(config, ema=False)))
  rules = vqvae._rules(abstract, vqvae._diffusers_key)
  return invert(rules, params, what="the VQ-VAE"), vqmodel_config(config, sample_size)


# CLIP text tower.


def clip_to_transformers(module: clip_text.CLIPTextTransformer, params: Any):
  """The CLIP text tower as a transformers ``CLIPTextModel``.

  Returns:
    ``(state_dict, config_fields)``: keys as ``CLIPTextModel.state_dict()``
    (transformers 5, no ``text_model.`` prefix) and ``CLIPTextConfig`` fields.
  """
  state = invert(clip.text_rules(module), params, what="the CLIP text encoder")
  fields = {"vocab_size": module.vocab_size, "hidden_size": module.hidden_size,
            "num_hidden_layers": module.num_layers, "num_attention_heads": module.num_heads,
            "intermediate_size": module.intermediate_size,
            "max_position_embeddings": module.max_positions,
            "layer_norm_eps": module.layer_norm_eps, "hidden_act": module.activation}
  return state, fields
