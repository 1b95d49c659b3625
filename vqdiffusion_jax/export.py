"""Exports a pipeline to PyTorch: a diffusers directory or an official VQ-Diffusion checkpoint.

  python -m vqdiffusion_jax.export SRC --to diffusers --out DIR [--denoiser-only]
  python -m vqdiffusion_jax.export SRC --to official --out FILE.pth [--denoiser-only]

SRC is anything ``Pipeline.from_pretrained`` reads: a training workdir (its
EMA weights unless --raw-weights; --step picks a checkpoint) or a converted
directory.

``--to diffusers`` writes DIR with ``VQDiffusionPipeline.save_pretrained``:
transformer/ (``Transformer2DModel``), vqvae/ (``VQModel``), text_encoder/
and tokenizer/ (CLIP), learned_classifier_free_sampling_embeddings/,
scheduler/ (``VQDiffusionScheduler``) and model_index.json;
``VQDiffusionPipeline.from_pretrained(DIR)`` loads it. That needs a
transformer on frozen CLIP features, the convolutional VQ-VAE and the linear
mask-and-replace schedule. With --denoiser-only DIR holds only transformer/
and learned_classifier_free_sampling_embeddings/, the pipeline's layout for
those two parts; the text encoder, VQ-VAE and schedule are not looked at.

``--to official`` writes a microsoft/VQ-Diffusion checkpoint, a dict with
``model`` (the DALLE model's keys, ``transformer.transformer.*``,
``transformer.empty_text_embed`` and the DiffusionTransformer's buffers) and
``ema`` (the same DiffusionTransformer keys without the leading
``transformer.``; both entries share their tensors, stored once). It holds
no codec and no CLIP weights: the official config loads those from their own
files, and its inference loads the checkpoint with ``strict=False``. A model
with its own trained text encoder needs --denoiser-only here too.

What cannot be exported is a clear error naming it: our trained word-level
text encoder, the patch VQ-VAE, Paella's predictor, ``pooled_text``, a
cosine or uniform schedule for diffusers, and each denoiser option the
target format lacks. Outputs are written under a temporary name and moved
into place; an existing output is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from vqdiffusion_jax import extras, outputs

try:
  import torch
  import transformers
  from diffusers import Transformer2DModel, VQDiffusionPipeline, VQDiffusionScheduler, VQModel
  from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
    LearnedClassifierFreeSamplingEmbeddings,
  )
except ModuleNotFoundError as error:
  _missing = extras.missing(error, "exporting to PyTorch")
  if __name__ == "__main__":
    sys.exit(f"error: {_missing}")
  raise _missing from None

from vqdiffusion_jax import loading
from vqdiffusion_jax.convert import clip as clip_convert
from vqdiffusion_jax.convert import denoiser as denoiser_convert
from vqdiffusion_jax.convert import export as convert_export
from vqdiffusion_jax.convert.export import ExportError
from vqdiffusion_jax.models import clip_text
from vqdiffusion_jax.pipeline import Pipeline

TARGETS = ("diffusers", "official")
MODEL_INDEX = "model_index.json"
OFFICIAL_MODEL_PREFIX = "transformer."  # the DiffusionTransformer inside the DALLE model


def _network(pipeline: Pipeline, denoiser_only: bool):
  """(config, params) of the pipeline's ``VQDiffusionTransformer``."""
  den = pipeline.denoiser
  if den.resizable:
    raise ExportError("Paella's convolutional predictor (PaellaPredictor) has no PyTorch "
                      "counterpart in diffusers or the official code")
  if den.trains_text_encoder:
    if not denoiser_only:
      raise ExportError(
          "the denoiser reads our trained word-level text encoder (TextConditionedDenoiser), "
          "which has no PyTorch counterpart; --denoiser-only (denoiser_only=True) exports the "
          "transformer alone, which then needs that encoder's features")
    return den.network.config, pipeline.params["denoiser"]
  return den.network.config, pipeline.params


def _frozen_clip(pipeline: Pipeline):
  """(CLIPTextTransformer, its params, the Hugging Face tokenizer) of a frozen-CLIP pipeline."""
  encoder, tokenize = pipeline.denoiser.frozen_text_encoder, pipeline.tokenize
  is_clip = (isinstance(encoder, functools.partial)
             and encoder.func is clip_text.vq_diffusion_features
             and isinstance(tokenize, functools.partial) and tokenize.func is clip_convert.tokenize)
  if not is_clip:
    raise ExportError("a VQDiffusionPipeline needs a frozen CLIP text encoder; this pipeline's "
                      "text side is not one")
  return encoder.args[0], pipeline.text_params, tokenize.args[0]


def _to_torch(state: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
  """Tensors of a state dict; arrays that are one object become one tensor."""
  tensors = {}
  return {key: tensors.setdefault(id(value), torch.from_numpy(np.ascontiguousarray(value)))
          for key, value in state.items()}


def _load(module: torch.nn.Module, state: dict[str, np.ndarray], what: str) -> torch.nn.Module:
  """``module`` with ``state`` loaded; every key of each side must be on the other."""
  try:
    result = module.load_state_dict(_to_torch(state), strict=False)
  except RuntimeError as error:  # shape mismatches
    raise ExportError(f"{what}: {error}") from error
  if result.missing_keys or result.unexpected_keys:
    raise ExportError(f"{what}: missing keys {sorted(result.missing_keys)}, unexpected keys "
                      f"{sorted(result.unexpected_keys)}")
  return module.eval()


def _denoiser_modules(pipeline: Pipeline, denoiser_only: bool) -> dict[str, Any]:
  config, params = _network(pipeline, denoiser_only)
  state, transformer_config, null_text = convert_export.denoiser_to_diffusers(params, config)
  modules = {"transformer": _load(Transformer2DModel(**transformer_config), state,
                                  "Transformer2DModel")}
  embeddings = LearnedClassifierFreeSamplingEmbeddings(**convert_export.null_text_config(config))
  if null_text is not None:
    _load(embeddings, {denoiser_convert.NULL_TEXT_KEY: null_text},
          "LearnedClassifierFreeSamplingEmbeddings")
  modules[denoiser_convert.PIPELINE_NULL_TEXT] = embeddings
  return modules


def diffusers_modules(pipeline: Pipeline, *, denoiser_only: bool = False) -> dict[str, Any]:
  """The torch components of a ``VQDiffusionPipeline`` holding ``pipeline``'s weights.

  Args:
    pipeline: our pipeline.
    denoiser_only: only ``transformer`` and the learned null text embeddings.

  Returns:
    ``{component name: module, tokenizer or scheduler}``, the modules in eval mode.

  Raises:
    ExportError: naming the first part that diffusers cannot hold.
  """
  if denoiser_only:
    return _denoiser_modules(pipeline, denoiser_only)
  config, _ = _network(pipeline, denoiser_only)
  if config.conditioning != "text":
    raise ExportError(f"a VQDiffusionPipeline is text-conditioned; this denoiser's conditioning "
                      f"is {config.conditioning!r} (--denoiser-only exports the "
                      "Transformer2DModel alone)")
  clip_module, clip_params, tokenizer = _frozen_clip(pipeline)
  scheduler = VQDiffusionScheduler(**convert_export.scheduler_config(pipeline.schedule))
  vq_state, vq_config = convert_export.vqvae_to_diffusers(
      pipeline.vqvae.config, pipeline.vqvae_variables, sample_size=pipeline.image_size)
  modules = _denoiser_modules(pipeline, denoiser_only)
  modules["vqvae"] = _load(VQModel(**vq_config), vq_state, "VQModel")
  text_state, fields = convert_export.clip_to_transformers(clip_module, clip_params)
  text_config = transformers.CLIPTextConfig(
      **fields, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id)
  text_encoder = transformers.CLIPTextModel(text_config)
  if any(k.startswith(clip_convert.TEXT_PREFIX) for k in text_encoder.state_dict()):
    text_state = {clip_convert.TEXT_PREFIX + k: v for k, v in text_state.items()}
  modules["text_encoder"] = _load(text_encoder, text_state, "CLIPTextModel")
  return modules | {"tokenizer": tokenizer, "scheduler": scheduler}


def official_checkpoint(pipeline: Pipeline, *, denoiser_only: bool = False) -> dict[str, Any]:
  """The official checkpoint dict: ``{"model": DALLE keys, "ema": DiffusionTransformer keys}``.

  Args:
    pipeline: our pipeline.
    denoiser_only: allow a denoiser trained with our own text encoder.

  Raises:
    ExportError: naming what the official module cannot hold.
  """
  config, params = _network(pipeline, denoiser_only)
  state = convert_export.denoiser_to_official(params, config, pipeline.schedule)
  tensors = _to_torch(state)
  return {"model": {OFFICIAL_MODEL_PREFIX + key: value for key, value in tensors.items()},
          "ema": tensors}


def _replace_atomically(out: str, overwrite: bool, write: Callable[[str], None], *,
                        directory: bool) -> None:
  """Runs ``write(staging)`` on a temporary sibling of ``out``, then renames it to ``out``."""
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  prefix = f".{os.path.basename(out)}."
  if directory:
    staging = tempfile.mkdtemp(prefix=prefix, dir=parent)
  else:
    handle, staging = tempfile.mkstemp(prefix=prefix, dir=parent)
    os.close(handle)
  remove = shutil.rmtree if directory else os.remove
  try:
    write(staging)
    if os.path.isdir(out):
      shutil.rmtree(out)
    elif os.path.exists(out):
      os.remove(out)
    os.replace(staging, out)
  except BaseException:
    if os.path.exists(staging):
      remove(staging)
    raise


def _declare_null_text_module(directory: str) -> None:
  """Names the null text embeddings' class by its module in model_index.json.

  The class lives in the deprecated pipeline's module, which
  ``save_pretrained`` records as plain "diffusers", where ``from_pretrained``
  does not find it; under its module path it is found once the pipeline's
  module is imported, as ``VQDiffusionPipeline`` is.
  """
  path = os.path.join(directory, MODEL_INDEX)
  with open(path) as f:
    index = json.load(f)
  cls = LearnedClassifierFreeSamplingEmbeddings
  index[denoiser_convert.PIPELINE_NULL_TEXT] = [cls.__module__, cls.__name__]
  with open(path, "w") as f:
    json.dump(index, f, indent=2)


def to_diffusers(pipeline: Pipeline, out: str | os.PathLike, *, overwrite: bool = False,
                 denoiser_only: bool = False) -> str:
  """Writes ``pipeline`` as a diffusers directory (see the module docstring); returns its path."""
  out = outputs.local_path(out, "the export")
  modules = diffusers_modules(pipeline, denoiser_only=denoiser_only)

  def write(staging: str) -> None:
    if denoiser_only:
      for name, module in modules.items():
        module.save_pretrained(os.path.join(staging, name))
    else:
      VQDiffusionPipeline(**modules).save_pretrained(staging)
      _declare_null_text_module(staging)

  _replace_atomically(out, overwrite, write, directory=True)
  return out


def to_official(pipeline: Pipeline, out: str | os.PathLike, *, overwrite: bool = False,
                denoiser_only: bool = False) -> str:
  """Writes ``pipeline``'s denoiser as an official ``.pth`` (see the module docstring)."""
  out = outputs.local_path(out, "the export")
  checkpoint = official_checkpoint(pipeline, denoiser_only=denoiser_only)
  _replace_atomically(out, overwrite, lambda path: torch.save(checkpoint, path), directory=False)
  return out


def export(src: str | os.PathLike | Pipeline, out: str | os.PathLike, *, to: str,
           overwrite: bool = False, denoiser_only: bool = False, use_ema: bool = True,
           step: int | None = None) -> str:
  """Exports a pipeline, or what ``Pipeline.from_pretrained(src)`` loads, to PyTorch.

  Args:
    src: a ``Pipeline``, a training workdir or a converted directory.
    out: the directory (``to="diffusers"``) or ``.pth`` file (``"official"``).
    to: "diffusers" or "official".
    overwrite: replace an existing ``out``.
    denoiser_only: export the denoiser alone (see the module docstring).
    use_ema, step: as ``Pipeline.from_pretrained`` (a workdir's weights).

  Returns:
    The absolute path written.

  Raises:
    ExportError: a part that the target format cannot hold, named.
    FileExistsError: ``out`` exists and ``overwrite`` is False.
  """
  if to not in TARGETS:
    raise ValueError(f"to must be one of {TARGETS}, not {to!r}")
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
  pipeline = src if isinstance(src, Pipeline) else Pipeline.from_pretrained(
      src, use_ema=use_ema, step=step)
  write = to_diffusers if to == "diffusers" else to_official
  return write(pipeline, out, overwrite=overwrite, denoiser_only=denoiser_only)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m vqdiffusion_jax.export",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("src", help="a training workdir or a converted checkpoint directory")
  parser.add_argument("--to", required=True, choices=TARGETS, help="the PyTorch format")
  parser.add_argument("--out", required=True,
                      help="directory (diffusers) or .pth file (official) to write")
  parser.add_argument("--denoiser-only", action="store_true",
                      help="export the denoiser alone, without text encoder, VQ-VAE, scheduler")
  parser.add_argument("--raw-weights", action="store_true",
                      help="a workdir's raw weights instead of the EMA ones")
  parser.add_argument("--step", type=int, help="a workdir's checkpoint step (default: newest)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  outputs.add_verbosity_argument(parser)
  args = parser.parse_args(argv)
  outputs.quiet_logging(args.verbosity)
  try:
    path = export(args.src, args.out, to=args.to, overwrite=args.overwrite,
                  denoiser_only=args.denoiser_only, use_ema=not args.raw_weights, step=args.step)
  except (*loading.BAD_INPUT_ERRORS, FileExistsError, KeyError) as error:
    return outputs.print_error(error)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
