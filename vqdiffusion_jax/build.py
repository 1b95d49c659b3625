"""Models from an experiment config: the VQ-VAE, the text side, the denoiser, the schedule.

Training, restoring a workdir for sampling, and planning build their networks
here, so the models a run trains and the ones its checkpoints are read into
are the same. Nothing here trains or restores: the functions take a config
(``config_schema``) and return unbound Flax modules, the ``Denoiser``
interface and plain functions.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from etils import epath

from vqdiffusion_jax import config_schema
from vqdiffusion_jax.convert import clip as clip_convert
from vqdiffusion_jax.diffusion import schedule as schedules
from vqdiffusion_jax.models import clip_text, precision
from vqdiffusion_jax.models.conditioned import TextConditionedDenoiser, TextConditionedPaella
from vqdiffusion_jax.models.denoiser import Denoiser
from vqdiffusion_jax.models.paella import PaellaPredictor
from vqdiffusion_jax.models.text_encoder import TextEncoder, WordTokenizer, split_words
from vqdiffusion_jax.models.transformer import TransformerConfig, VQDiffusionTransformer
from vqdiffusion_jax.models.vqgan import VQGAN, VQGANConfig

# The caption vocabulary of a trained text encoder, in the denoiser's directory.
VOCABULARY_FILE = "text_tokenizer.json"

Tokenize = Callable[[Sequence[str]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class VQVAE:
  """A VQ-VAE ready to encode and decode: its module, variables and image size."""

  module: VQGAN
  variables: dict
  image_size: int

  @property
  def codebook_size(self) -> int:
    return self.module.config.vocabulary_size

  @property
  def grid(self) -> tuple[int, int]:
    side = self.image_size // self.module.config.downsampling_factor
    return side, side


def vqvae_matmul_dtype(config: Any) -> str:
  """``vqvae.train.matmul_dtype`` with "auto" resolved for this machine.

  The convolutional VQGAN, which takes its precision from ``train.dtype``,
  resolves "auto" to "float32"; the patch VQ-VAE follows the machine.
  """
  name = str(config.vqvae.train.matmul_dtype)
  if name == "auto" and not config.vqvae.model.patch_size:
    return "float32"
  return precision.resolve_matmul_dtype(name)


def vqvae_module(config: Any, *, training: bool = False) -> VQGAN:
  """The configured VQ-VAE; its matmuls are ``vqvae_matmul_dtype`` in training, else float32."""
  model = {k: tuple(v) if isinstance(v, list) else v
           for k, v in config.vqvae.model.to_dict().items()}
  return VQGAN(VQGANConfig(**model), dtype=jnp.dtype(config.train.dtype),
               matmul_dtype=vqvae_matmul_dtype(config) if training else "float32")


def latent_grid(config: Any) -> tuple[int, int]:
  """The token grid of the configured VQ-VAE at ``data.image_size``."""
  return VQVAE(vqvae_module(config), {}, int(config.data.image_size)).grid


def denoiser_matmul_dtype(config: Any) -> str:
  """``train.matmul_dtype`` with "auto" resolved for this machine."""
  return precision.resolve_matmul_dtype(str(config.train.matmul_dtype))


def transformer_config(config: Any, *, codebook_size: int, grid: tuple[int, int],
                       condition: tuple[int, int]) -> TransformerConfig:
  """The denoiser's ``TransformerConfig``: sizes from the config, K and grid from the VQ-VAE.

  Args:
    config: the experiment config.
    codebook_size: K of the VQ-VAE.
    grid: (h, w) of its tokens.
    condition: (L, D) of the text features.
  """
  model, train = config.denoiser.model, config.train
  return TransformerConfig(
      conditioning=str(model.conditioning), num_classes=int(model.num_classes),
      learnable_null_class=bool(model.learnable_null_class), mlp_type=str(model.mlp_type),
      position_grid=tuple(model.position_grid) or None,
      codebook_size=codebook_size, spatial_size=tuple(grid),
      num_layers=int(model.num_layers), embed_dim=int(model.embed_dim),
      num_heads=int(model.num_heads), mlp_ratio=int(model.mlp_ratio),
      condition_length=condition[0], condition_dim=condition[1],
      num_timesteps=int(config.diffusion.num_timesteps),
      learnable_null_text=bool(model.learnable_null_text), pooled_text=bool(model.pooled_text),
      dtype=jnp.dtype(train.dtype), remat=bool(train.remat),
      remat_policy=str(train.remat_policy), scan_layers=bool(train.scan_layers),
      matmul_dtype=denoiser_matmul_dtype(config), attention=str(model.attention))


def trained_text_encoder(config: Any, vocab_size: int) -> TextEncoder:
  """The "trainable" text kind's encoder over a ``vocab_size`` word vocabulary."""
  text = config.text
  return TextEncoder(vocab_size=vocab_size, width=int(text.width),
                     num_layers=int(text.num_layers), num_heads=int(text.num_heads),
                     max_length=int(text.length), position_encoding=str(text.position_encoding),
                     dtype=jnp.dtype(config.train.dtype),
                     matmul_dtype=denoiser_matmul_dtype(config))


DENOISER_KINDS = ("transformer", "paella")



def paella_predictor(config: Any, *, codebook_size: int,
                     condition: tuple[int, int]) -> PaellaPredictor:
  """Paella's predictor of ``config.denoiser.paella`` over (L, D) text features."""
  sizes = config.denoiser.paella
  return PaellaPredictor(
      codebook_size=codebook_size, num_timesteps=int(config.diffusion.num_timesteps),
      condition_dim=condition[1], condition_length=condition[0],
      channels=tuple(int(c) for c in sizes.channels),
      blocks_per_level=int(sizes.blocks_per_level), kernel_size=int(sizes.kernel_size),
      mlp_ratio=int(sizes.mlp_ratio), modulation_dim=int(sizes.modulation_dim),
      timestep_dim=int(sizes.timestep_dim), dtype=jnp.dtype(config.train.dtype),
      remat=bool(config.train.remat))


def denoiser(config: Any, *, codebook_size: int, grid: tuple[int, int],
             vocab_size: int | None = None,
             clip: clip_text.CLIPTextTransformer | None = None) -> Denoiser:
  """The denoiser of ``config.denoiser`` and ``config.text.kind``, behind ``Denoiser``.

  Args:
    config: the experiment config.
    codebook_size, grid: the VQ-VAE's K and token grid.
    vocab_size: the word vocabulary's size ("trainable" text).
    clip: the frozen CLIP text tower ("clip" text); its params are the
      frozen params every ``Denoiser.encode_text`` call is given.
  """
  if config.denoiser.kind not in DENOISER_KINDS:
    raise ValueError(f"unknown denoiser kind {config.denoiser.kind!r}; choose one of "
                     f"{DENOISER_KINDS}")
  paella = config.denoiser.kind == "paella"
  geometry = {"codebook_size": codebook_size, "grid": grid}
  if not config_schema.reads_text(config):
    return Denoiser(VQDiffusionTransformer(transformer_config(config, condition=(1, 1),
                                                              **geometry)))
  kind = config.text.kind
  if kind == "trainable":
    if vocab_size is None:
      raise ValueError("a trainable text encoder needs the vocabulary's size")
    text = config.text
    condition = (int(text.length), int(text.width))
    encoder = trained_text_encoder(config, vocab_size)
    if paella:
      return Denoiser(TextConditionedPaella(
          paella_predictor(config, codebook_size=codebook_size, condition=condition), encoder))
    cfg = transformer_config(config, condition=condition, **geometry)
    return Denoiser(TextConditionedDenoiser(cfg, encoder))
  if kind == "clip":
    if clip is None:
      raise ValueError("text.kind 'clip' needs the CLIP text tower")
    condition = (clip.max_positions, clip.hidden_size)
    if paella:
      network = paella_predictor(config, codebook_size=codebook_size, condition=condition)
    else:
      network = VQDiffusionTransformer(transformer_config(config, condition=condition,
                                                          **geometry))
    return Denoiser(network, frozen_text_encoder=clip_features(clip))
  raise ValueError(f"unknown text kind {kind!r}; choose 'trainable' or 'clip'")


def clip_features(clip: clip_text.CLIPTextTransformer) -> Callable[[Any, Any], Any]:
  """``(params, ids) -> features`` of a frozen CLIP text tower, as VQ-Diffusion reads them."""
  return functools.partial(clip_text.vq_diffusion_features, clip)


def clip_tokenize(clip: clip_text.CLIPTextTransformer, hf_tokenizer: Any) -> Tokenize:
  """Prompts -> CLIP ids padded to the tower's length (the official convention)."""
  return functools.partial(clip_convert.tokenize, hf_tokenizer, max_length=clip.max_positions)


def encode_words(words: WordTokenizer, length: int, texts: Sequence[str]) -> np.ndarray:
  """Caption ids of the trainable encoder; warns about captions cut to ``length``."""
  texts = list(texts)
  too_long = [t for t in texts if len(split_words(t)) > length - 2]
  if too_long:
    warnings.warn(f"{len(too_long)} prompt(s) longer than the text encoder's {length - 2} words "
                  f"were truncated, e.g. {too_long[0]!r}", stacklevel=2)
  return words.encode(texts, length)[0]


@dataclasses.dataclass(frozen=True)
class Conditioned:
  """A run's denoiser with its text side: prompts -> ids (None without text), frozen params."""

  denoiser: Denoiser
  tokenize: Tokenize | None
  frozen_params: Any = None


def conditioned_denoiser(config: Any, vqvae: VQVAE,
                         vocabulary: WordTokenizer | None = None) -> Conditioned:
  """The denoiser and text side of a run, its CLIP weights read from ``text.clip_path``.

  Args:
    config: the experiment config.
    vqvae: the run's VQ-VAE (K and the token grid).
    vocabulary: the caption vocabulary of a "trainable" text encoder.
  """
  geometry = {"codebook_size": vqvae.codebook_size, "grid": vqvae.grid}
  if not config_schema.reads_text(config):
    return Conditioned(denoiser(config, **geometry), tokenize=None)
  if config.text.kind == "clip":
    module, params, hf_tokenizer = clip_convert.load_clip_text(required_clip_path(config.text))
    check_clip_width(config.text, module)
    return Conditioned(denoiser(config, clip=module, **geometry),
                       clip_tokenize(module, hf_tokenizer), params)
  if vocabulary is None:
    raise ValueError("a trainable text encoder needs its caption vocabulary")
  return Conditioned(denoiser(config, vocab_size=vocabulary.vocab_size, **geometry),
                     functools.partial(encode_words, vocabulary, int(config.text.length)))


def required_clip_path(text: Any) -> str:
  """``text.clip_path``, or a ValueError naming the flag that sets it."""
  if not text.clip_path:
    raise ValueError("text.clip_path is empty: text.kind 'clip' reads a Hugging Face CLIP "
                     "directory (weights and tokenizer, e.g. a local copy of "
                     "openai/clip-vit-base-patch32); pass --config.text.clip_path=DIR")
  return str(text.clip_path)


def check_clip_width(text: Any, clip: clip_text.CLIPTextTransformer) -> None:
  """A ValueError when the config states a text width (above 0) that the CLIP lacks."""
  width = int(text.get("width", 0))
  if width and width != clip.hidden_size:
    raise ValueError(f"the CLIP text tower in {text.clip_path} is {clip.hidden_size} wide, the "
                     f"config's text.width is {width}: pass the CLIP the config was made for, "
                     f"or --config.text.width={clip.hidden_size}")


def read_vocabulary(directory: str | os.PathLike) -> WordTokenizer:
  """The caption vocabulary a denoiser stage saved in ``directory``."""
  path = epath.Path(directory) / VOCABULARY_FILE
  if not path.exists():
    raise FileNotFoundError(f"no caption vocabulary at {path}; the denoiser stage writes it")
  return WordTokenizer.load(path)


def schedule(config: Any, codebook_size: int) -> schedules.Schedule:
  """The configured noise schedule over ``codebook_size`` tokens."""
  return schedules.make(config.diffusion.schedule, int(config.diffusion.num_timesteps),
                        codebook_size)
