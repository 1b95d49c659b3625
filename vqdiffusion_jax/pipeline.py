"""Images in a notebook: every sampler, inpainting, outpainting, editing.

  from vqdiffusion_jax import Pipeline, make_grid
  pipe = Pipeline.from_pretrained("runs/shapes")      # a workdir, EMA weights
  images = pipe(["a big red circle in the center"], num_inference_steps=25,
                guidance_scale=3.0, sampler="purity", seed=0)
  make_grid(images)

A class-conditional denoiser (ImageNet) takes ``class_labels=[1, 207]``
instead of prompts, guided through its null class; an unconditional one
(FFHQ) takes ``num_images=4``.

``from_pretrained`` reads one of our training workdirs (VQ-VAE and
denoiser checkpoints, the caption vocabulary of a trained text encoder) or a
converted directory (``python -m vqdiffusion_jax.convert``: denoiser,
VQ-VAE and, for a text model, CLIP text tower and tokenizer); see
``loading``. Every request is one jitted program (``sampling.program``:
encoding the condition, the whole sampling loop, decoding), compiled once
per sampler settings and batch size, with the batch split over all devices.
With several JAX processes (hosts), every process makes the same call: the
batch is split over the devices of all of them and every process gets all
the images.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from vqdiffusion_jax import hosts, inputs, loading, outputs, sampling, values
from vqdiffusion_jax.diffusion import samplers
from vqdiffusion_jax.diffusion.schedule import Schedule
from vqdiffusion_jax.inputs import PromptWarning  # noqa: F401  (re-exported)
from vqdiffusion_jax.models import precision as mixed_precision
from vqdiffusion_jax.models.denoiser import Denoiser, null_condition_error
from vqdiffusion_jax.models.text_encoder import WordTokenizer
from vqdiffusion_jax.models.vqgan import VQGAN

ImageLike = Image.Image | np.ndarray

# The argument that carries each kind of condition (``Denoiser.conditioning``).
CONDITION_ARGUMENT = {"text": "prompts", "class": "class_labels", "none": "num_images"}


def make_grid(images: Sequence[ImageLike], columns: int | None = None, pad: int = 2) -> Image.Image:
  """One PIL image tiling ``images`` (PIL or HWC uint8 / [0, 1] float arrays)."""
  arrays = np.stack([_to_unit(np.asarray(image)) for image in images])
  return Image.fromarray(outputs.tile(arrays * 2.0 - 1.0, columns=columns, pad=pad))


def _to_unit(image: np.ndarray) -> np.ndarray:
  """HWC uint8 or [0, 1] float -> float32 in [0, 1]."""
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  return image.astype(np.float32)


@dataclasses.dataclass
class Pipeline:
  """A denoiser, its VQ-VAE and its conditioning, ready to sample.

  Attributes:
    denoiser: the denoiser network behind its one interface (``Denoiser``:
      a transformer on frozen-CLIP features, on class labels or on nothing,
      one with its own trained text encoder, or Paella's convolutional
      predictor).
    params: its params (EMA weights by default in ``from_pretrained``).
    schedule: its noise schedule.
    vqvae: the VQ-VAE module (``VQGAN``) and ``vqvae_variables``.
    tokenize: prompts -> (B, L) int32 ids; warns when a prompt is cut. None
      for a denoiser that reads no text.
    text_params: params of a frozen text encoder (CLIP), or None.
    image_size: side of the generated images in pixels.
    vocabulary: the word vocabulary of a trained text encoder (None for
      CLIP or no text): prompt words outside it are read as [UNK].
    unknown_words: what an empty prompt or a word outside ``vocabulary``
      does: "warn" (a ``PromptWarning``), "error" (a ValueError) or
      "ignore".
  """

  denoiser: Denoiser
  params: Any
  schedule: Schedule
  vqvae: VQGAN
  vqvae_variables: Any
  tokenize: Callable[[Sequence[str]], np.ndarray] | None = None
  text_params: Any = None
  image_size: int = 256
  vocabulary: WordTokenizer | None = None
  unknown_words: str = "warn"
  _cache: dict = dataclasses.field(default_factory=dict, repr=False)

  def __post_init__(self):
    values.choice("unknown_words", self.unknown_words, inputs.UNKNOWN_WORDS_MODES)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, *, use_ema: bool = True,
                      dtype: Any = jnp.float32, step: int | None = None,
                      unknown_words: str = "warn", precision: str = "fast") -> Pipeline:
    """Loads a training workdir or a converted checkpoint directory.

    Args:
      path: a workdir of ``python -m vqdiffusion_jax.main`` (with
        ``vqvae/`` and ``denoiser/``), a ``vqdiffusion_jax.convert`` output
        directory or a diffusers ``VQDiffusionPipeline`` directory.
      use_ema: take the EMA weights of a workdir (else the raw params).
      dtype: compute dtype of a converted checkpoint's networks.
      step: a workdir's denoiser checkpoint step (default: the newest good one).
      unknown_words: "warn", "error" or "ignore": what an empty prompt, or a
        word a trained text encoder never saw, does (see ``check_prompts``).
      precision: the denoiser's matmuls (``precision.SAMPLING_PRECISIONS``):
        "fast" runs bfloat16 products with float32 accumulation where the
        machine has bfloat16 units (GPU, TPU, CPUs with AVX512-BF16 or AMX)
        and float32 elsewhere; "float32" is the exact path (parity with
        PyTorch); "bfloat16" forces bfloat16 products. Activations, norms,
        softmax and log-probs stay in ``dtype`` either way.
    """
    values.choice("unknown_words", unknown_words, inputs.UNKNOWN_WORDS_MODES)
    values.choice("precision", precision, mixed_precision.SAMPLING_PRECISIONS)
    if step is not None:
      values.non_negative_int("step", step)
    matmul_dtype = mixed_precision.sampling_matmul_dtype(precision)
    return cls(**loading.pipeline_parts(os.fspath(path), use_ema=use_ema, dtype=dtype,
                                        step=step, matmul_dtype=matmul_dtype),
               unknown_words=unknown_words)

  # Geometry.

  @property
  def downsampling_factor(self) -> int:
    return self.vqvae.config.downsampling_factor

  @property
  def latent_grid(self) -> tuple[int, int]:
    side = self.image_size // self.downsampling_factor
    return side, side

  # Public API.

  def __call__(self, prompts: str | Sequence[str] | None = None, *,
               class_labels: int | Sequence[int] | None = None, num_images: int | None = None,
               num_inference_steps: int | None = None, guidance_scale: float = 1.0,
               truncation_rate: float = 1.0, sampler: str = "vqdiffusion", seed: int = 0,
               num_images_per_prompt: int = 1, purity_temperature: float = 1.0,
               typical_mass: float = 1.0, max_reveal_per_call: int | None = None,
               output_type: str = "pil") -> list:
    """Generates images; one list entry per image, prompt- (or label-) major.

    Give what the denoiser is conditioned on (``denoiser.conditioning``):
    ``prompts`` for a text model, ``class_labels`` for a class-conditional
    one, ``num_images`` (default 1) for an unconditional one.

    Args:
      prompts: one prompt or a list (text models).
      class_labels: one label or a list, each in 0..num_classes - 1
        (class-conditional models).
      num_images: how many images (unconditional models).
      num_inference_steps: network calls (see ``samplers.SamplerConfig``);
        None: every step (T) or, for reveal samplers, one token per call.
      guidance_scale: classifier-free guidance scale; 1 = off. The
        unconditional pass reads the learnable null text of a text model or
        the null class of a class model.
      truncation_rate: truncation r in (0, 1]; 1 = off.
      sampler: "vqdiffusion", "vqdiffusion_fast", "fewer_tokens", "purity",
        "fewer_tokens_official", "purity_official" or "paella"
        (``samplers.SAMPLERS``).
      seed: the result is a deterministic function of it.
      num_images_per_prompt: images drawn for each prompt or label.
      purity_temperature: r of the purity sampler's sharpening.
      typical_mass: tau of the Paella sampler's locally typical sampling.
      max_reveal_per_call: the official ``prior_ps`` of the official reveal
        samplers (None: 1024, one call per step).
      output_type: "pil" (PIL images), "np" (HWC float32 in [0, 1]) or
        "tokens" ((h, w) int32 codebook tokens).

    Every argument is checked before any work, each bad one a ValueError
    naming it, its value and what is allowed. Prompts that are empty or
    have words a trained text encoder never saw warn (``unknown_words``).
    """
    self._check_condition_arguments(prompts, class_labels, num_images)
    seed = self._check_call(seed, output_type)
    per_condition = values.positive_int("num_images_per_prompt", num_images_per_prompt)
    config = self._sampler_config(sampler, num_inference_steps, guidance_scale, truncation_rate,
                                  purity_temperature, typical_mass, max_reveal_per_call)
    conditions = self._condition_inputs(prompts, class_labels, num_images, per_condition)
    return self._run(config, seed, [conditions], output_type=output_type)

  def inpaint(self, prompts: str | Sequence[str] | None, image: ImageLike, mask: np.ndarray, *,
              class_labels: int | Sequence[int] | None = None, num_images: int | None = None,
              seed: int = 0, output_type: str = "pil", **sampler_options) -> list:
    """Regenerates the region ``mask`` (H, W; True = repaint) of ``image``.

    A token is kept when none of its pixels is in the mask; the kept tokens
    are clamped through the whole run. Conditions (``prompts`` or None with
    ``class_labels`` / ``num_images``) and options as ``__call__``. ``image``
    is a PIL image, uint8 HWC pixels in 0..255 or float HWC in [0, 1], of the
    pipeline's ``image_size``.
    """
    self._check_condition_arguments(prompts, class_labels, num_images)
    seed = self._check_call(seed, output_type)
    config = self._sampler_config(**self._options(sampler_options))
    pixels = inputs.image_pixels("image", image, self.image_size)
    repaint = inputs.pixel_mask("mask", mask, self.image_size)
    conditions = self._condition_inputs(prompts, class_labels, num_images)
    known = ~self._pixels_to_tokens(repaint).any(axis=(-1, -2))
    return self._edit(conditions, self._encode(pixels), known, config, seed, output_type)

  def outpaint(self, prompts: str | Sequence[str] | None, image: ImageLike,
               pad: tuple[int, int, int, int], *, class_labels: int | Sequence[int] | None = None,
               num_images: int | None = None, seed: int = 0, output_type: str = "pil",
               **sampler_options) -> list:
    """Extends ``image`` by ``pad`` = (top, bottom, left, right) pixels.

    With a convolutional (Paella) denoiser the latent grid grows by the
    padding; a transformer's grid is fixed, so the canvas keeps the model's
    size and the image is shifted by (top, left), its far side cropped.
    Padding must be a multiple of the VQ-VAE's downsampling factor.
    Conditions and ``image`` as ``inpaint``.
    """
    self._check_condition_arguments(prompts, class_labels, num_images)
    seed = self._check_call(seed, output_type)
    config = self._sampler_config(**self._options(sampler_options))
    factor = self.downsampling_factor
    top, bottom, left, right = (p // factor for p in inputs.padding("pad", pad, factor))
    pixels = inputs.image_pixels("image", image, self.image_size)
    conditions = self._condition_inputs(prompts, class_labels, num_images)
    h, w = self.latent_grid
    grid = (h + top + bottom, w + left + right) if self.denoiser.resizable else (h, w)
    canvas = np.zeros(grid, np.int32)
    known = np.zeros(grid, bool)
    rows, cols = min(h, grid[0] - top), min(w, grid[1] - left)
    if rows <= 0 or cols <= 0:
      raise ValueError(f"pad {pad} leaves none of the image on the {grid} token canvas")
    canvas[top:top + rows, left:left + cols] = self._encode(pixels)[:rows, :cols]
    known[top:top + rows, left:left + cols] = True
    return self._edit(conditions, canvas, known, config, seed, output_type)

  def edit(self, prompts: str | Sequence[str] | None, image: ImageLike, strength: float = 0.5,
           *, class_labels: int | Sequence[int] | None = None, num_images: int | None = None,
           seed: int = 0, output_type: str = "pil", **sampler_options) -> list:
    """Editing: noise ``image``'s tokens to step strength * (T - 1), then denoise.

    Conditions and ``image`` as ``inpaint``.
    """
    self._check_condition_arguments(prompts, class_labels, num_images)
    seed = self._check_call(seed, output_type)
    strength = values.number("strength", strength, low=0.0, high=1.0)
    start = round(strength * (self.schedule.num_timesteps - 1))
    config = self._sampler_config(**self._options(sampler_options), start_step=start)
    pixels = inputs.image_pixels("image", image, self.image_size)
    conditions = self._condition_inputs(prompts, class_labels, num_images)
    return self._edit(conditions, self._encode(pixels), None, config, seed, output_type)

  def interpolate(self, prompt_a: str, prompt_b: str, weights: Sequence[float], *,
                  seed: int = 0, output_type: str = "pil", **sampler_options) -> list:
    """One image per weight w, conditioned on (1 - w) * text(a) + w * text(b); same noise."""
    seed = self._check_call(seed, output_type)
    weights = values.finite_numbers("weights", weights)
    config = self._sampler_config(**self._options(sampler_options))
    for name, prompt in (("prompt_a", prompt_a), ("prompt_b", prompt_b)):
      if not isinstance(prompt, str):
        raise ValueError(f"{name} must be a str, got {values.shown(prompt)}")
    ids = self._text_ids([prompt_a, prompt_b], labels=["prompt_a", "prompt_b"])
    return self._run(config, seed, [np.repeat(ids[:1], len(weights), 0),
                                    np.repeat(ids[1:], len(weights), 0)],
                     mix=weights, output_type=output_type, same_noise=True)

  def regions(self, prompts: Sequence[str], masks: Sequence[np.ndarray], *, seed: int = 0,
              output_type: str = "pil", **sampler_options) -> list:
    """One image whose region ``masks[r]`` (H, W bool) follows ``prompts[r]``.

    Each position's x0 distribution is the weighted geometric mean of the
    prompts' by the fraction of its pixels in each mask; positions in no
    mask weigh the prompts equally.
    """
    seed = self._check_call(seed, output_type)
    prompts = inputs.prompt_list("prompts", prompts)
    if len(prompts) != len(masks):
      raise ValueError(f"{len(prompts)} prompts need as many region masks, got {len(masks)}")
    config = self._sampler_config(**self._options(sampler_options))
    cover = []
    for r, mask in enumerate(masks):
      tokens = self._pixels_to_tokens(inputs.pixel_mask(f"masks[{r}]", mask, self.image_size))
      cover.append(tokens.mean(axis=(-1, -2)).reshape(-1))
    cover = np.stack(cover)
    total = cover.sum(0, keepdims=True)
    weights = np.where(total > 0, cover / np.maximum(total, 1e-9), 1.0 / len(prompts))
    ids = self._text_ids(prompts)
    return self._run(config, seed, [ids[r:r + 1] for r in range(len(prompts))],
                     regions=weights.astype(np.float32), output_type=output_type)

  def encode_image(self, image: ImageLike) -> np.ndarray:
    """(h, w) codebook tokens of one image of the pipeline's size (``image`` as ``inpaint``)."""
    return self._encode(inputs.image_pixels("image", image, self.image_size))

  def check_prompts(self, prompts: str | Sequence[str], *,
                    labels: Sequence[str] | None = None) -> list[str]:
    """``prompts`` as a list, after reporting the ones the text side cannot read.

    An empty prompt, or words outside a trained text encoder's vocabulary
    (read as [UNK]), give a ``PromptWarning`` (``unknown_words="warn"``), a
    ValueError (``"error"``) or nothing (``"ignore"``). CLIP reads any word,
    so only empty prompts count there. ``labels`` name the prompts in the
    message (default ``prompts[i]``).
    """
    prompts = inputs.prompt_list("prompts", prompts)
    inputs.report_prompt_problems(self.prompt_problems(prompts, labels=labels),
                                  self.unknown_words, "unknown_words")
    return prompts

  def report_prompts_once(self, prompts: Sequence[str], labels: Sequence[str], mode: str,
                          option: str | None) -> None:
    """Reports every unreadable prompt of a whole job now, per ``mode``.

    For the command lines, which sample their prompts in batches: a text
    model's problems are warned about (or refused) once, before sampling, and
    this pipeline's later calls then leave them be. ``option`` names the
    setting that changes ``mode`` in the message (None: none).
    """
    if self.denoiser.conditioning != "text":
      return
    inputs.report_prompt_problems(self.prompt_problems(prompts, labels=labels), mode, option)
    self.unknown_words = "ignore"

  def prompt_problems(self, prompts: Sequence[str], *,
                      labels: Sequence[str] | None = None) -> list[str]:
    """One line per kind of unreadable prompt (``inputs.prompt_problems``); [] if none."""
    labels = labels or [f"prompts[{i}]" for i in range(len(prompts))]
    known = None if self.vocabulary is None else self.vocabulary.vocab
    return inputs.prompt_problems(prompts, labels, known)

  def _encode(self, pixels: np.ndarray) -> np.ndarray:
    """(h, w) tokens of checked float (H, W, 3) pixels in [0, 1]."""
    if "encode" not in self._cache:
      self._cache["encode"] = jax.jit(
          lambda v, x: self.vqvae.apply(v, x * 2.0 - 1.0, method="encode"))
    return np.asarray(self._cache["encode"](self.vqvae_variables, jnp.asarray(pixels[None])))[0]

  # Conditions: what each kind of denoiser reads.

  def _condition_inputs(self, prompts, class_labels, num_images,
                        per_condition: int = 1) -> np.ndarray:
    """A request's condition inputs, ``per_condition`` rows for each prompt or label.

    Returns (B, L) text ids, (B,) int32 class labels, or an empty (B, 0)
    array for an unconditional denoiser (``Denoiser.encode_condition``).
    """
    kind = self._check_condition_arguments(prompts, class_labels, num_images)
    if kind == "text":
      return np.repeat(self._text_ids(prompts), per_condition, axis=0)
    if kind == "class":
      return np.repeat(self._checked_labels(class_labels), per_condition)
    if per_condition != 1:
      raise ValueError("an unconditional denoiser takes num_images, not num_images_per_prompt")
    count = values.positive_int("num_images", 1 if num_images is None else num_images)
    return np.zeros((count, 0), np.int32)

  def _check_condition_arguments(self, prompts, class_labels, num_images) -> str:
    """The denoiser's kind of condition, if the request gives the argument it takes."""
    kind = self.denoiser.conditioning
    given = [name for name, value in (("prompts", prompts), ("class_labels", class_labels),
                                      ("num_images", num_images)) if value is not None]
    wanted = CONDITION_ARGUMENT[kind]
    wrong = [name for name in given if name != wanted]
    if wrong or (kind != "none" and not given):
      raise ValueError(f"this denoiser is {self._kind_in_words()}: give {wanted}"
                       + (f", not {' or '.join(wrong)}" if wrong else ""))
    return kind

  def _kind_in_words(self) -> str:
    if self.denoiser.conditioning == "class":
      return f"class-conditional ({self.denoiser.num_classes} classes)"
    return {"text": "text-conditioned", "none": "unconditional"}[self.denoiser.conditioning]

  def _checked_labels(self, class_labels) -> np.ndarray:
    """``class_labels`` as (B,) int32, or a ValueError naming the bad ones."""
    labels = np.atleast_1d(np.asarray(class_labels))
    if labels.ndim != 1 or not labels.size or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"class_labels must be a non-empty list of ints, got {class_labels!r}")
    count = self.denoiser.num_classes
    bad = [f"class_labels[{i}] = {label}" for i, label in enumerate(labels.tolist())
           if not 0 <= label < count]
    if bad:
      raise ValueError(f"{', '.join(bad)} out of range 0..{count - 1} ({count} classes)")
    return labels.astype(np.int32)

  def _text_ids(self, prompts: str | Sequence[str],
                labels: Sequence[str] | None = None) -> np.ndarray:
    """(B, L) ids of checked ``prompts``; a ValueError for a denoiser that reads no text."""
    if self.denoiser.conditioning != "text":
      raise ValueError(f"this denoiser is {self._kind_in_words()}: it takes no prompts")
    if self.tokenize is None:
      raise ValueError("this pipeline has no tokenizer for its text-conditioned denoiser")
    return np.asarray(self.tokenize(self.check_prompts(prompts, labels=labels)))

  # Internals.

  @staticmethod
  def _options(options: dict) -> dict:
    names = {"num_inference_steps", "guidance_scale", "truncation_rate", "sampler",
             "purity_temperature", "typical_mass", "max_reveal_per_call"}
    unknown = set(options) - names
    if unknown:
      raise TypeError(f"unknown sampler options {sorted(unknown)}; known: {sorted(names)}")
    defaults = {"num_inference_steps": None, "guidance_scale": 1.0, "truncation_rate": 1.0,
                "sampler": "vqdiffusion", "purity_temperature": 1.0, "typical_mass": 1.0,
                "max_reveal_per_call": None}
    return {**defaults, **options}

  def _sampler_config(self, sampler, num_inference_steps, guidance_scale, truncation_rate,
                      purity_temperature, typical_mass, max_reveal_per_call=None,
                      start_step=None):
    options = inputs.sampler_options(
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        truncation_rate=truncation_rate, purity_temperature=purity_temperature,
        typical_mass=typical_mass, max_reveal_per_call=max_reveal_per_call)
    if options["guidance_scale"] != 1.0 and not self.denoiser.has_null_condition:
      raise ValueError(null_condition_error(self.denoiser.conditioning))
    config = samplers.SamplerConfig(name=sampler, start_step=start_step, **options)
    h, w = self.latent_grid
    config.steps(self.schedule.num_timesteps, h * w)
    return config

  def _check_call(self, seed, output_type) -> int:
    """The checked seed; a ValueError for a bad seed or ``output_type``."""
    values.choice("output_type", output_type, ("pil", "np", "tokens"))
    return values.seed("seed", seed)

  def _edit(self, conditions, tokens, known, config, seed, output_type):
    batch = conditions.shape[0]
    grid = tokens.shape
    tokens = np.broadcast_to(tokens.reshape(1, -1), (batch, tokens.size))
    extra = {"init_tokens": tokens} if config.start_step is not None else {
        "known_tokens": tokens, "known_mask": np.broadcast_to(known.reshape(1, -1), tokens.shape)}
    return self._run(config, seed, [conditions], extra=extra, grid=grid, output_type=output_type)

  def _pixels_to_tokens(self, mask: np.ndarray) -> np.ndarray:
    """(H, W) -> (h, w, f, f): each token's pixels."""
    f = self.downsampling_factor
    h, w = mask.shape[0] // f, mask.shape[1] // f
    return mask[:h * f, :w * f].reshape(h, f, w, f).transpose(0, 2, 1, 3)

  def _program(self, config, grid, num_prompts, mix, regions, same_noise):
    """The jitted request (``sampling.program``), cached per static settings."""
    key = (config, grid, num_prompts, mix is not None, regions is not None, same_noise)
    if key not in self._cache:
      self._cache[key] = jax.jit(sampling.program(
          self.denoiser, self.schedule, self.vqvae, config, grid, mix=mix is not None,
          regions=regions is not None, same_noise=same_noise))
    return self._cache[key]

  def _run(self, config, seed, ids, *, mix=None, regions=None, extra=None, grid=None,
           output_type="pil", same_noise=False):
    grid = tuple(grid or self.latent_grid)
    batch = ids[0].shape[0]
    devices = jax.device_count()
    split = batch >= devices or jax.process_count() > 1
    padded = math.ceil(batch / devices) * devices if split else batch
    pad = lambda a: np.concatenate([a, np.repeat(a[-1:], padded - batch, 0)])  # noqa: E731
    ids = [pad(np.asarray(i)) for i in ids]
    extra = {k: pad(np.asarray(v)) for k, v in (extra or {}).items()}
    weights = pad(np.asarray(mix)) if mix is not None else regions
    program = self._program(config, grid, len(ids), mix, regions, same_noise)
    sharding = self._batch_sharding(padded)
    place = functools.partial(_global_array, sharding=sharding)
    tokens, images = program(self.params, self.text_params, self.vqvae_variables,
                             [place(i) for i in ids], jax.random.key(seed),
                             None if weights is None else
                             (place(weights) if mix is not None else jnp.asarray(weights)),
                             {k: place(v) for k, v in extra.items()})
    tokens, images = hosts.to_host(tokens)[:batch], hosts.to_host(images)[:batch]
    if output_type == "tokens":
      return list(tokens.reshape(batch, *grid))
    if output_type == "np":
      return list(images)
    return [Image.fromarray(np.asarray(image * 255 + 0.5, np.uint8)) for image in images]

  def _batch_sharding(self, batch: int):
    devices = jax.devices()
    if batch % len(devices):
      devices = devices[:1]
    mesh = jax.make_mesh((len(devices),), ("batch",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    return NamedSharding(mesh, PartitionSpec("batch"))


def _global_array(value: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A batch every process holds in full, as one array split over ``sharding``'s devices."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
