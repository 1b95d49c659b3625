"""Whole-model conversion and loading, whatever the source format.

Sources, recognised by what the path holds:

* our converted directory (``converted.py``): ``config.json`` with
  ``"format": "vqdiffusion_jax"``;
* a diffusers ``VQDiffusionPipeline`` directory (``model_index.json`` naming
  that class, with ``transformer/``, ``vqvae/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/`` and
  ``learned_classifier_free_sampling_embeddings/`` subdirectories);
* a diffusers ``Transformer2DModel`` directory (denoiser only);
* an official microsoft/VQ-Diffusion ``.pth`` file (denoiser only; its sizes
  are not stored in it, so a preset or config must be given);
* for the VQ-VAE alone (``load_vqvae``), an official image codec's PyTorch file
  with its taming config YAML and token remap (``vqvae.load_official_codec``).

Besides the networks, a pipeline needs its noise schedule and how its
tokenizer pads (``pipeline_settings``): a diffusers pipeline's come from
``scheduler/scheduler_config.json`` (checked against the transformer) and
diffusers' ``_encode_prompt``; the other sources use the official schedule
over the denoiser's T steps and the official padding. ``convert`` stores
them in the converted directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqdiffusion_jax.convert import clip, converted, denoiser, vqvae
from vqdiffusion_jax.convert.common import ConversionError
from vqdiffusion_jax.diffusion import schedule as schedules
from vqdiffusion_jax.models import clip_text, transformer, vqgan

# Config fields chosen at load time, not properties of the weights.
RUNTIME_FIELDS = ("dtype", "remat", "remat_policy", "scan_layers", "weight_grads")

PIPELINE_CLASS = "VQDiffusionPipeline"
SCHEDULER_CONFIG = os.path.join("scheduler", "scheduler_config.json")
SCHEDULER_CLASS = "VQDiffusionScheduler"
# VQDiffusionScheduler config field -> schedule.mask_and_replace argument, and its default.
SCHEDULER_FIELDS = {"alpha_cum_start": ("att_1", 0.99999), "alpha_cum_end": ("att_T", 0.000009),
                    "gamma_cum_start": ("ctt_1", 0.000009), "gamma_cum_end": ("ctt_T", 0.99999)}


def _config_dict(config: Any) -> dict:
  """A dataclass config (or a linen module's fields) as JSON-ready values."""
  fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name not in RUNTIME_FIELDS + ("parent", "name")}
  return json.loads(json.dumps(fields))


def _from_dict(cls, values: dict, **overrides) -> Any:
  """Rebuilds a dataclass from JSON values (lists back to tuples)."""
  tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
  return cls(**{**tuples, **overrides})


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _source_kind(path: str) -> str:
  if not os.path.exists(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  if os.path.isfile(path):
    return "official"
  if converted.is_converted(path):
    return "converted"
  index = os.path.join(path, "model_index.json")
  if os.path.isfile(index):
    name = _read_json(index).get("_class_name")
    if name != PIPELINE_CLASS:
      raise ValueError(f"{index} describes a {name!r}, not a diffusers {PIPELINE_CLASS}")
    return "diffusers_pipeline"
  config = os.path.join(path, "config.json")
  if os.path.isfile(config) and _read_json(config).get("_class_name") == "Transformer2DModel":
    return "diffusers_transformer"
  raise ValueError(f"{path} is not a checkpoint we know: expected our converted directory, a "
                   "diffusers VQDiffusionPipeline or Transformer2DModel directory, or an "
                   "official VQ-Diffusion .pth file")


def diffusers_schedule(pipeline_dir: str, config: transformer.TransformerConfig) -> dict:
  """A diffusers pipeline's noise schedule, checked against its transformer.

  Args:
    pipeline_dir: a ``VQDiffusionPipeline`` directory.
    config: the transformer's config (K and its T timestep embeddings).

  Returns:
    ``{"name": "mask_and_replace", "num_timesteps": T, **arguments}``, the
    arguments of ``schedule.mask_and_replace`` (see ``make_schedule``).

  Raises:
    FileNotFoundError: no ``scheduler/scheduler_config.json``.
    ValueError: another scheduler, or one whose classes or steps differ from
      the transformer's.
  """
  path = os.path.join(pipeline_dir, SCHEDULER_CONFIG)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {SCHEDULER_CONFIG} in the diffusers pipeline {pipeline_dir}")
  values = _read_json(path)
  if values.get("_class_name") != SCHEDULER_CLASS:
    raise ValueError(f"{path}: scheduler {values.get('_class_name')!r}, expected "
                     f"{SCHEDULER_CLASS}")
  classes = values.get("num_vec_classes")
  if classes != config.codebook_size + 1:
    raise ValueError(f"{path}: num_vec_classes is {classes} but the transformer has "
                     f"{config.codebook_size + 1} vector embeddings (K + [MASK])")
  steps = values.get("num_train_timesteps", 100)
  if steps != config.num_timesteps:
    raise ValueError(f"{path}: num_train_timesteps is {steps} but the transformer embeds "
                     f"{config.num_timesteps} timesteps (num_embeds_ada_norm)")
  arguments = {ours: float(values.get(theirs, default))
               for theirs, (ours, default) in SCHEDULER_FIELDS.items()}
  return {"name": "mask_and_replace", "num_timesteps": steps, **arguments}


def pipeline_settings(path: str | os.PathLike,
                      config: transformer.TransformerConfig) -> dict[str, Any]:
  """How a checkpoint's parts sample together: its schedule and tokenizer padding.

  Args:
    path: any source ``load_denoiser`` reads.
    config: its denoiser's config.

  Returns:
    ``{"schedule": ..., "tokenizer_convention": ...}``: the schedule as
    ``diffusers_schedule`` describes it, the convention as ``clip.tokenize``
    names it ("diffusers" for a diffusers pipeline, else "official").
  """
  path = os.fspath(path)
  kind = _source_kind(path)
  if kind == "diffusers_pipeline":
    return {"schedule": diffusers_schedule(path, config), "tokenizer_convention": "diffusers"}
  default = {"schedule": {"name": "mask_and_replace", "num_timesteps": config.num_timesteps},
             "tokenizer_convention": "official"}
  if kind == "converted":
    return {**default, **converted.read_config(path).get("pipeline", {})}
  return default


def make_schedule(settings: dict[str, Any], codebook_size: int) -> schedules.Schedule:
  """The ``Schedule`` that ``pipeline_settings(...)["schedule"]`` describes."""
  arguments = dict(settings)
  return schedules.make(arguments.pop("name"), arguments.pop("num_timesteps"), codebook_size,
                        **arguments)


def _load_official(path: str, allow_pickle: bool) -> dict:
  import torch  # optional: the [torch] extra
  try:
    return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
  except pickle.UnpicklingError as error:
    raise ConversionError(
        f"{path} holds Python objects besides tensors; if you trust the file, load it with "
        "allow_pickle=True (--allow-pickle)") from error


def _official_config(path: str, preset: str | None,
                     config: transformer.TransformerConfig | None, **overrides):
  if config is not None:
    return dataclasses.replace(config, **overrides)
  if preset is None:
    raise ValueError(f"{path}: an official checkpoint does not record its sizes; name a preset "
                     f"({sorted(transformer.PRESETS)}) or pass a TransformerConfig")
  return transformer.preset(preset, **overrides)


def load_denoiser(path: str | os.PathLike, *, preset: str | None = None,
                  config: transformer.TransformerConfig | None = None, use_ema: bool = True,
                  allow_pickle: bool = False, **overrides):
  """The denoiser module and params from any supported source.

  Args:
    path: our converted directory, a diffusers pipeline or Transformer2DModel
      directory, or an official ``.pth`` file.
    preset: for an official ``.pth``: the ``transformer.PRESETS`` name of its
      sizes (e.g. "base", "large").
    config: for an official ``.pth``: the exact config instead of a preset.
    use_ema: for an official ``.pth``: take the EMA weights.
    allow_pickle: for an official ``.pth`` holding non-tensor objects: allow
      unpickling them (only for files you trust).
    **overrides: runtime config fields, e.g. ``dtype=jnp.bfloat16``,
      ``remat=True``, ``scan_layers=True``.

  Returns:
    ``(module, params)``: a ``VQDiffusionTransformer`` and its params.
  """
  path = os.fspath(path)
  kind = _source_kind(path)
  if kind == "converted":
    stored = converted.read_config(path)["components"]
    if "denoiser" not in stored:
      raise KeyError(f"{path} has no denoiser; it has {sorted(stored)}")
    cfg = _from_dict(transformer.TransformerConfig, stored["denoiser"], **overrides)
    # Stored per block; stacked here when the run scans its layers.
    plain = dataclasses.replace(cfg, scan_layers=False)
    params = converted.restore(path, "denoiser", _unboxed(transformer.abstract_params(plain)))
    if cfg.scan_layers:
      params = transformer.stack_layers(params, cfg.num_layers)
  elif kind == "diffusers_pipeline":
    cfg, params = denoiser.load_diffusers_pipeline(path, **overrides)
  elif kind == "diffusers_transformer":
    cfg, params = denoiser.load_diffusers(path, **overrides)
  else:
    cfg = _official_config(path, preset, config, **overrides)
    params = denoiser.from_official(_load_official(path, allow_pickle), cfg, use_ema=use_ema,
                                    name=f"{denoiser.OFFICIAL_NAME} {path}")
  return transformer.VQDiffusionTransformer(cfg), params


def load_vqvae(path: str | os.PathLike, *, dtype: Any = jnp.float32,
               config_yaml: str | os.PathLike | None = None,
               remap: str | os.PathLike | None = None, allow_pickle: bool = False):
  """The VQ-VAE module and params from any supported source.

  Args:
    path: our converted directory, a diffusers pipeline or VQModel directory, or an
      official image codec's PyTorch file (taming / Net2NetTransformer checkpoint, or an
      official VQ-Diffusion model ``.pth`` holding ``content_codec.*``).
    dtype: compute dtype of the module.
    config_yaml: for a PyTorch file: its taming config (``vqvae.load_official_codec``).
    remap: for a PyTorch file: the official token remap file, if the codec has one.
    allow_pickle: for a PyTorch file holding Python objects: unpickle them (trusted files).

  Returns:
    ``(module, params)``: a ``VQGAN`` and its params (a remapped codec's tables included).
  """
  path = os.fspath(path)
  if os.path.isfile(path):
    if config_yaml is None:
      raise ValueError(f"{path}: an official codec checkpoint needs its taming config YAML "
                       "(config_yaml)")
    return vqvae.load_official_codec(path, config_yaml, remap, dtype=dtype,
                                     allow_pickle=allow_pickle)
  if converted.is_converted(path):
    stored = converted.read_config(path)["components"]
    if "vqvae" not in stored:
      raise KeyError(f"{path} has no vqvae; it has {sorted(stored)}")
    module = vqgan.VQGAN(_from_dict(vqgan.VQGANConfig, stored["vqvae"]), dtype=dtype)
    return module, converted.restore(path, "vqvae", _unboxed(_abstract(module)))
  if os.path.isfile(os.path.join(path, "model_index.json")):
    path = os.path.join(path, "vqvae")
  return vqvae.load_diffusers_vqvae(path, dtype=dtype)


def load_text_encoder(path: str | os.PathLike, *, dtype: Any = jnp.float32):
  """(module, params, tokenizer) of the CLIP text tower, from our dir or a Hugging Face one."""
  path = os.fspath(path)
  if not converted.is_converted(path):
    return clip.load_clip_text(path, dtype=dtype)
  stored = converted.read_config(path)["components"]
  if "text_encoder" not in stored:
    raise KeyError(f"{path} has no text_encoder; it has {sorted(stored)}")
  module = clip_text.CLIPTextTransformer(dtype=dtype, **stored["text_encoder"])
  abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  params = converted.restore(path, "text_encoder", _unboxed(abstract["params"]))
  return module, params, clip.load_tokenizer(os.path.join(path, converted.TOKENIZER_DIR))


def _abstract(module: vqgan.VQGAN):
  images = jnp.zeros((1, 8 * module.config.downsampling_factor,
                      8 * module.config.downsampling_factor, module.config.in_channels))
  return jax.eval_shape(module.init, jax.random.key(0), images)["params"]


def _unboxed(tree):
  """Abstract params without their logical-partitioning boxes."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.meta.unbox(tree))


def convert(src: str | os.PathLike, out: str | os.PathLike, *, preset: str | None = None,
            config: transformer.TransformerConfig | None = None, use_ema: bool = True,
            allow_pickle: bool = False, overwrite: bool = False,
            **overrides) -> dict[str, int]:
  """Converts a checkpoint into our directory format (see ``converted.py``).

  A diffusers pipeline gives the denoiser, the VQ-VAE and the text
  encoder with its tokenizer; the other sources give the denoiser. The
  ``pipeline_settings`` (schedule, tokenizer padding) are stored with them.

  Args:
    src: the source checkpoint (see ``load_denoiser``).
    out: the directory to write.
    preset, config, use_ema, allow_pickle: as in ``load_denoiser``.
    overwrite: replace an existing ``out``.
    **overrides: denoiser config fields, e.g. ``learnable_null_text=False``
      for official checkpoints trained without ``learnable_cf``.

  Returns:
    Parameter counts by component.
  """
  src = os.fspath(src)
  module, params = load_denoiser(src, preset=preset, config=config, use_ema=use_ema,
                                 allow_pickle=allow_pickle, **overrides)
  components = {"denoiser": (_config_dict(module.config), params)}
  settings = pipeline_settings(src, module.config)
  tokenizer = None
  if _source_kind(src) == "diffusers_pipeline":
    if os.path.isdir(os.path.join(src, "vqvae")):
      vq_module, vq_params = load_vqvae(src)
      components["vqvae"] = (_config_dict(vq_module.config), vq_params)
    if os.path.isdir(os.path.join(src, "text_encoder")):
      text_module, text_params, tokenizer = load_text_encoder(src)
      components["text_encoder"] = (_config_dict(text_module), text_params)
  converted.save(out, components, source=os.path.abspath(src), tokenizer=tokenizer,
                 pipeline=settings, overwrite=overwrite)
  return {name: sum(x.size for x in jax.tree.leaves(p)) for name, (_, p) in components.items()}
