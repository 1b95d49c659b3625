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
  with its config YAML and token remap (``vqvae.load_official_codec``).

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
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqdiffusion_jax import outputs
from vqdiffusion_jax.convert import clip, common, converted, denoiser, identify, vqvae
from vqdiffusion_jax.diffusion import schedule as schedules
from vqdiffusion_jax.models import clip_text, transformer, vqgan

# Config fields chosen at load time, not properties of the weights.
RUNTIME_FIELDS = ("dtype", "remat", "remat_policy", "scan_layers", "weight_grads")

PIPELINE_CLASS = "VQDiffusionPipeline"
SCHEDULER_CONFIG = os.path.join("scheduler", "scheduler_config.json")
SCHEDULER_CLASS = "VQDiffusionScheduler"
SOURCES = ("our converted directory, a diffusers VQDiffusionPipeline or Transformer2DModel "
           "directory, or an official VQ-Diffusion .pth file")
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
  """Which source ``path`` is; an error saying what it looks like for anything else."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  if os.path.isfile(path):
    kind, description = identify.identify_file(path)
    if kind != identify.TORCH:
      raise common.ConversionError(f"{path} is not a PyTorch checkpoint ({description}); "
                                   f"expected {SOURCES}")
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
  raise ValueError(f"{path} is not a checkpoint we know ({identify.describe_directory(path)}); "
                   f"expected {SOURCES}")


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
    checkpoint = common.load_torch_checkpoint(path, "official checkpoint", allow_pickle)
    params = denoiser.from_official(checkpoint, cfg, use_ema=use_ema,
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
    config_yaml: for a PyTorch file: its config YAML (``vqvae.load_official_codec``).
    remap: for a PyTorch file: the official token remap file, if the codec has one.
    allow_pickle: for a PyTorch file holding Python objects: unpickle them (trusted files).

  Returns:
    ``(module, params)``: a ``VQGAN`` and its params (a remapped codec's tables included).
  """
  path = os.fspath(path)
  if os.path.isfile(path):
    if config_yaml is None:
      raise ValueError(f"{path}: an official codec checkpoint needs its config YAML "
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
            vqvae: str | os.PathLike | None = None,
            vqvae_config: str | os.PathLike | None = None,
            vqvae_remap: str | os.PathLike | None = None,
            clip_dir: str | os.PathLike | None = None, **overrides) -> dict[str, int]:
  """Converts a checkpoint into our directory format (see ``converted.py``).

  A diffusers pipeline gives the denoiser, the VQ-VAE and the text
  encoder with its tokenizer. The other sources give the denoiser, and the
  rest of a sampling directory is named beside it: the VQ-VAE (an official
  model ``.pth`` holds its codec's weights, which its taming YAML and token
  remap complete; or a separate codec file or diffusers ``VQModel``
  directory) and, for a text model, a Hugging Face CLIP directory. The
  ``pipeline_settings`` (schedule, tokenizer padding) are stored with them.

  Args:
    src: the source checkpoint (see ``load_denoiser``).
    out: the directory to write.
    preset, config, use_ema, allow_pickle: as in ``load_denoiser``.
    overwrite: replace an existing ``out``.
    vqvae: the VQ-VAE's source when ``src`` has none: a codec's PyTorch file
      or a ``VQModel`` directory; by default ``src`` itself when
      ``vqvae_config`` is given.
    vqvae_config: a PyTorch codec's config YAML (taming's, or ITHQ's PatchVQGAN one).
    vqvae_remap: the official token remap of the codec (e.g.
      ``taming_vqvae_2887.pt``), when it has one.
    clip_dir: a Hugging Face CLIP directory (weights and tokenizer) for a
      text model that does not bring its text encoder.
    **overrides: denoiser config fields, e.g. ``learnable_null_text=False``
      for official checkpoints trained without ``learnable_cf``.

  Returns:
    Parameter counts by component.

  Raises:
    ValueError: parts that do not fit together (a VQ-VAE whose code count
      is not the denoiser's, a CLIP of the wrong width or length, a text
      encoder for a model that reads none), naming the files.
  """
  src = os.fspath(src)
  kind = _source_kind(src)
  module, params = load_denoiser(src, preset=preset, config=config, use_ema=use_ema,
                                 allow_pickle=allow_pickle, **overrides)
  components = {"denoiser": (_config_dict(module.config), params)}
  settings = pipeline_settings(src, module.config)
  tokenizer = None
  named = {"vqvae": vqvae, "vqvae_config": vqvae_config, "clip_dir": clip_dir}
  if kind == "diffusers_pipeline":
    given = [name for name, value in named.items() if value is not None]
    if given:
      raise ValueError(f"{src} is a whole diffusers pipeline; {', '.join(given)} cannot replace "
                       "its parts")
    if os.path.isdir(os.path.join(src, "vqvae")):
      vq_module, vq_params = load_vqvae(src)
      components["vqvae"] = (_config_dict(vq_module.config), vq_params)
    if os.path.isdir(os.path.join(src, "text_encoder")):
      text_module, text_params, tokenizer = load_text_encoder(src)
      components["text_encoder"] = (_config_dict(text_module), text_params)
  else:
    vq_source = _vqvae_source(src, kind, vqvae, vqvae_config)
    if vq_source is not None:
      vq_module, vq_params = load_vqvae(vq_source, config_yaml=vqvae_config, remap=vqvae_remap,
                                        allow_pickle=allow_pickle)
      _check_codes(module.config, vq_module.config, src, vq_source)
      components["vqvae"] = (_config_dict(vq_module.config), vq_params)
    if clip_dir is not None:
      text_module, text_params, tokenizer = load_text_encoder(clip_dir)
      _check_text_encoder(module.config, text_module, src, os.fspath(clip_dir))
      components["text_encoder"] = (_config_dict(text_module), text_params)
  converted.save(out, components, source=os.fspath(outputs.absolute_path(src)), tokenizer=tokenizer,
                 pipeline=settings, overwrite=overwrite)
  return {name: sum(x.size for x in jax.tree.leaves(p)) for name, (_, p) in components.items()}


def missing_for_sampling(path: str | os.PathLike) -> list[str]:
  """The components our converted directory ``path`` still lacks before it can sample."""
  components = converted.read_config(path)["components"]
  needed = ["vqvae"]
  if components["denoiser"].get("conditioning", "text") == "text":
    needed.append("text_encoder")
  return [name for name in needed if name not in components]


def _vqvae_source(src: str, kind: str, vqvae, vqvae_config) -> str | None:
  if vqvae is not None:
    return os.fspath(vqvae)
  if vqvae_config is None:
    return None
  if kind != "official":
    raise ValueError(f"vqvae_config names a codec's YAML but {src} holds no codec; name the "
                     "codec file too (vqvae, --vqvae)")
  return src


def _check_codes(config: transformer.TransformerConfig, vq_config: Any, src: str,
                 vq_source: str) -> None:
  if vq_config.vocabulary_size != config.codebook_size:
    remapped = (f" ({vq_config.num_embeddings} remapped to {vq_config.used_codes})"
                if vq_config.used_codes else "")
    raise ValueError(f"the VQ-VAE of {vq_source} has {vq_config.vocabulary_size} codes"
                     f"{remapped} but the denoiser of {src} predicts {config.codebook_size}; "
                     "check the codec and its remap (--vqvae-remap)")


def _check_text_encoder(config: transformer.TransformerConfig, text_module: Any, src: str,
                        clip_dir: str) -> None:
  if config.conditioning != "text":
    raise ValueError(f"the denoiser of {src} is {config.conditioning}-conditioned; it reads no "
                     f"text, so {clip_dir} (--clip) has no place beside it")
  found = (text_module.hidden_size, text_module.max_positions)
  wanted = (config.condition_dim, config.condition_length)
  if found != wanted:
    raise ValueError(f"the CLIP text encoder of {clip_dir} gives {found[1]} features of width "
                     f"{found[0]}; the denoiser of {src} attends to {wanted[1]} of width "
                     f"{wanted[0]}")
