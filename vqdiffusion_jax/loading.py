"""A pipeline's parts from a training workdir or a converted checkpoint directory.

A training workdir (``python -m vqdiffusion_jax.main``) is laid out as::

  WORKDIR/vqvae/        the VQ-VAE stage: checkpoints, metrics, config.json
  WORKDIR/token_cache/  the training split encoded to tokens
  WORKDIR/denoiser/     the denoiser stage (and text_tokenizer.json, the caption
                        vocabulary of a trained text encoder)
  WORKDIR/report/       the end-of-run evaluation

Reading one needs neither the optimizer nor the trainers: the saved config
says which networks to build (``build``), and the checkpoints' arrays are
restored as they were saved (``Checkpointer.restore_arrays``), verified.
A converted directory (``python -m vqdiffusion_jax.convert``) or a diffusers
``VQDiffusionPipeline`` directory holds the denoiser, the VQ-VAE and, for a
text-conditioned denoiser, the CLIP text tower and its tokenizer (a
class-conditional or unconditional denoiser needs no text side); its schedule
and the tokenizer's padding are ``checkpoints.pipeline_settings`` (a diffusers
pipeline's scheduler config and ``_encode_prompt`` padding).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import ml_collections
from etils import epath

from vqdiffusion_jax import build, config_schema, extras
from vqdiffusion_jax.convert import checkpoints, converted
from vqdiffusion_jax.convert import clip as clip_convert
from vqdiffusion_jax.models.denoiser import Denoiser
from vqdiffusion_jax.train import checkpoint as ckpt_lib

VQVAE_STAGE, TOKEN_CACHE, DENOISER_STAGE, REPORT_DIR = (
    "vqvae", "token_cache", "denoiser", "report")


# What reading a user's checkpoint or command input raises when it is the input that is
# wrong (missing, corrupt, mismatched, an optional package not installed).
BAD_INPUT_ERRORS = (ValueError, FileNotFoundError, ckpt_lib.CheckpointError,
                    extras.MissingExtraError)


def is_workdir(path: str | os.PathLike) -> bool:
  """Whether ``path`` (local or a URL) holds a training run: its denoiser stage's checkpoints.

  Its VQ-VAE is the VQ-VAE stage's, or the converted one its config's
  ``vqvae.path`` names (then no VQ-VAE stage ran).
  """
  return (epath.Path(path) / DENOISER_STAGE / "checkpoints").is_dir()


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir's denoiser was trained with, keys added since defaulted."""
  with ckpt_lib.Checkpointer.for_workdir(epath.Path(workdir) / DENOISER_STAGE,
                                         read_only=True) as checkpointer:
    return config_schema.complete(checkpointer.read_config())


def restore_vqvae(config: Any, directory: str | os.PathLike) -> build.VQVAE:
  """The run's VQ-VAE: ``vqvae.path`` when set, else the stage's newest verified checkpoint."""
  size = int(config.data.image_size)
  if config.vqvae.path:
    module, params = checkpoints.load_vqvae(config.vqvae.path)
    return build.VQVAE(module, {"params": params}, size)
  with ckpt_lib.Checkpointer.for_workdir(directory, read_only=True) as checkpointer:
    _, arrays, _ = checkpointer.restore_arrays()
  generator = arrays["generator"]
  variables = jax.device_get({"params": generator["params"], **generator["extra"]})
  return build.VQVAE(build.vqvae_module(config), variables, size)


def pipeline_parts(path: str, *, use_ema: bool = True, dtype: Any = None,
                   step: int | None = None, matmul_dtype: str = "float32") -> dict[str, Any]:
  """The ``Pipeline`` fields of ``path``; see ``Pipeline.from_pretrained``.

  ``matmul_dtype`` ("float32" or "bfloat16") is the denoiser's (and a
  trained text encoder's) matmul dtype, whatever the run trained with.
  """
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"no checkpoint at {path}")
  if is_workdir(path):
    return _workdir_parts(path, use_ema, step, matmul_dtype)
  if step is not None:
    raise ValueError(f"step={step} needs a training workdir; {path} is a converted checkpoint")
  if converted.is_converted(path) or os.path.isfile(os.path.join(path, "model_index.json")):
    return _converted_parts(path, dtype, matmul_dtype)
  raise FileNotFoundError(
      f"{path} is neither a training workdir (with {DENOISER_STAGE}/checkpoints/) "
      "nor a converted (python -m vqdiffusion_jax.convert) or diffusers pipeline directory")


def _workdir_parts(workdir: str, use_ema: bool, step: int | None,
                   matmul_dtype: str) -> dict[str, Any]:
  config = run_config(workdir)
  config.train.matmul_dtype = matmul_dtype
  vqvae = restore_vqvae(config, epath.Path(workdir) / VQVAE_STAGE)
  directory = epath.Path(workdir) / DENOISER_STAGE
  trained_text = config_schema.reads_text(config) and config.text.kind == "trainable"
  vocabulary = build.read_vocabulary(directory) if trained_text else None
  conditioned = build.conditioned_denoiser(config, vqvae, vocabulary)
  with ckpt_lib.Checkpointer.for_workdir(directory, read_only=True) as checkpointer:
    _, arrays, _ = checkpointer.restore_arrays(step)
  params = jax.device_get(arrays["ema_params" if use_ema else "params"])
  return {"denoiser": conditioned.denoiser, "params": params,
          "schedule": build.schedule(config, vqvae.codebook_size), "vqvae": vqvae.module,
          "vqvae_variables": vqvae.variables, "tokenize": conditioned.tokenize,
          "text_params": conditioned.frozen_params, "image_size": vqvae.image_size,
          "vocabulary": vocabulary}


def _converted_parts(path: str, dtype: Any, matmul_dtype: str) -> dict[str, Any]:
  kwargs = {} if dtype is None else {"dtype": dtype}
  network, params = checkpoints.load_denoiser(path, matmul_dtype=matmul_dtype, **kwargs)
  cfg = network.config
  settings = checkpoints.pipeline_settings(path, cfg)
  vqvae, vqvae_params = checkpoints.load_vqvae(path, **kwargs)
  if vqvae.config.vocabulary_size != cfg.codebook_size:
    raise ValueError(f"{path}: the VQ-VAE has {vqvae.config.vocabulary_size} codes but the "
                     f"denoiser predicts {cfg.codebook_size}")
  return {**_converted_text_side(path, network, settings, kwargs), "params": params,
          "schedule": checkpoints.make_schedule(settings["schedule"], cfg.codebook_size),
          "vqvae": vqvae, "vqvae_variables": {"params": vqvae_params},
          "image_size": cfg.spatial_size[0] * vqvae.config.downsampling_factor}


def _converted_text_side(path: str, network: Any, settings: dict,
                         kwargs: dict) -> dict[str, Any]:
  """The denoiser with its CLIP text encoder, or alone when it reads labels or nothing."""
  if network.config.conditioning != "text":
    return {"denoiser": Denoiser(network), "tokenize": None, "text_params": None}
  clip, clip_params, hf_tokenizer = checkpoints.load_text_encoder(path, **kwargs)
  tokenize = functools.partial(clip_convert.tokenize, hf_tokenizer, max_length=clip.max_positions,
                               convention=settings["tokenizer_convention"])
  return {"denoiser": Denoiser(network, frozen_text_encoder=build.clip_features(clip)),
          "tokenize": tokenize, "text_params": clip_params}
