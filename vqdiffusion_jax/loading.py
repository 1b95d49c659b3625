"""Builds a ``Pipeline`` from a training workdir or a converted checkpoint directory."""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from vqdiffusion_jax.convert import checkpoints, converted
from vqdiffusion_jax.convert import clip as clip_convert
from vqdiffusion_jax.diffusion import schedule as schedules
from vqdiffusion_jax.models.conditioned import TextConditionedDenoiser
from vqdiffusion_jax.train import checkpoint as ckpt_lib
from vqdiffusion_jax.train import denoiser_stage, loop
from vqdiffusion_jax.train import mesh as mesh_lib

TOKENIZER_STAGE, DENOISER_STAGE = "tokenizer", "denoiser"


def is_workdir(path: str) -> bool:
  return all(os.path.isdir(os.path.join(path, stage)) for stage in (TOKENIZER_STAGE,
                                                                     DENOISER_STAGE))


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir's denoiser was trained with (from its checkpoint)."""
  with ckpt_lib.Checkpointer.for_workdir(os.path.join(workdir, DENOISER_STAGE),
                                         read_only=True) as checkpointer:
    return ml_collections.ConfigDict(checkpointer.read_config())


def load_pipeline(cls, path: str, *, use_ema: bool = True, dtype: Any = None,
                  step: int | None = None):
  """``cls`` (a ``Pipeline``) built from ``path``; see ``Pipeline.from_pretrained``."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  if is_workdir(path):
    return _from_workdir(cls, path, use_ema, step)
  if step is not None:
    raise ValueError(f"step={step} needs a training workdir; {path} is a converted checkpoint")
  if converted.is_converted(path) or os.path.isfile(os.path.join(path, "model_index.json")):
    return _from_converted(cls, path, dtype)
  raise FileNotFoundError(
      f"{path} is neither a training workdir (with {TOKENIZER_STAGE}/ and {DENOISER_STAGE}/) "
      "nor a converted (python -m vqdiffusion_jax.convert) or diffusers pipeline directory")


def _from_workdir(cls, workdir: str, use_ema: bool, step: int | None):
  config = run_config(workdir)
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  tokenizer = loop.load_tokenizer(config, os.path.join(workdir, TOKENIZER_STAGE), mesh)
  directory = os.path.join(workdir, DENOISER_STAGE)
  setup = denoiser_stage.denoiser_setup(config, directory, mesh, tokenizer)
  with ckpt_lib.Checkpointer.for_workdir(directory, read_only=True) as checkpointer:
    _, state, _ = checkpointer.restore(setup.abstract_state, step)
  params = jax.device_get(state.ema_params if use_ema else state.params)
  model = setup.model
  if isinstance(model, TextConditionedDenoiser):
    encode = lambda p, _, ids: model.apply({"params": p}, ids, method="encode_text")  # noqa: E731
  else:
    encode = lambda _, text_params, ids: setup.text_encoder_fn(text_params, ids)  # noqa: E731
  return cls(denoiser=model, params=params, schedule=setup.schedule, vqvae=tokenizer.module,
             vqvae_variables=tokenizer.variables, tokenize=setup.tokenize, encode_text=encode,
             text_params=setup.frozen, image_size=tokenizer.image_size)


def _from_converted(cls, path: str, dtype: Any):
  kwargs = {} if dtype is None else {"dtype": dtype}
  model, params = checkpoints.load_denoiser(path, **kwargs)
  vqvae, vq_params = checkpoints.load_vqvae(path, **kwargs)
  text_module, text_params, hf_tokenizer = checkpoints.load_text_encoder(path, **kwargs)
  cfg = model.config
  schedule = schedules.mask_and_replace(cfg.num_timesteps, cfg.codebook_size)
  tokenize, encode_clip = clip_convert.conditioning(text_module, hf_tokenizer)
  encode = lambda _, text_params, ids: encode_clip(text_params, ids)  # noqa: E731
  image_size = cfg.spatial_size[0] * vqvae.config.downsampling_factor
  return cls(denoiser=model, params=params, schedule=schedule, vqvae=vqvae,
             vqvae_variables={"params": vq_params}, tokenize=tokenize, encode_text=encode,
             text_params=text_params, image_size=image_size)
