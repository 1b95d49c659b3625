"""Checks of what a sampling request is given, each a one-line error naming the value.

The notebook pipeline (``Pipeline``) and the ``sample`` and ``evaluate``
command lines check every argument with these (and the single-value checks
of ``values``) before any work: the sampler's numeric options, prompts,
images (uint8 in 0..255 or floats in [0, 1] of the pipeline's size), masks,
padding, and output files (an image extension and a writable folder).
``name`` is what the message calls the value: an argument
(``num_inference_steps``) or a flag (``--steps``).

Prompts the text side cannot read give a ``PromptWarning`` (or a
ValueError, per ``unknown_words``): an empty prompt, and words a trained text
encoder never saw (they become [UNK]). CLIP's byte-level BPE reads every
word, so only empty prompts are reported for it.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
from PIL import Image

from vqdiffusion_jax import outputs, values
from vqdiffusion_jax.diffusion import samplers
from vqdiffusion_jax.models import precision
from vqdiffusion_jax.models.text_encoder import split_words

UNKNOWN_WORDS_MODES = ("warn", "error", "ignore")
HALF_LEVEL = 0.5 / 255  # float images may overshoot [0, 1] by rounding, by less than this
_LISTED = 3  # prompts named in one message
_LISTED_WORDS = 10


class PromptWarning(UserWarning):
  """A prompt read as (partly) nothing: empty, or with words the text encoder never saw."""


def sampler_options(*, num_inference_steps: Any = None, guidance_scale: Any = 1.0,
                    truncation_rate: Any = 1.0, purity_temperature: Any = 1.0,
                    typical_mass: Any = 1.0, max_reveal_per_call: Any = None,
                    names: dict[str, str] | None = None) -> dict[str, Any]:
  """The numeric sampler options checked and converted; ``names`` renames them in messages."""
  names = names or {}
  name = lambda key: names.get(key, key)  # noqa: E731
  floats = {"guidance_scale": guidance_scale, "truncation_rate": truncation_rate,
            "purity_temperature": purity_temperature, "typical_mass": typical_mass}
  return {
      "num_inference_steps": values.optional_positive_int(name("num_inference_steps"),
                                                          num_inference_steps),
      **{key: values.number(name(key), value, **samplers.OPTION_RANGES[key])
         for key, value in floats.items()},
      "max_reveal_per_call": values.optional_positive_int(name("max_reveal_per_call"),
                                                          max_reveal_per_call),
  }


# Prompts.


def prompt_list(name: str, prompts: Any) -> list[str]:
  """One prompt or a non-empty sequence of them, as a list of str."""
  if isinstance(prompts, str):
    return [prompts]
  if not isinstance(prompts, Sequence | np.ndarray):
    raise ValueError(f"{name} must be a str or a list of str, got {values.shown(prompts)}")
  prompts = list(prompts)
  if not prompts:
    raise ValueError(f"{name} is an empty list; give at least one prompt")
  for i, prompt in enumerate(prompts):
    if not isinstance(prompt, str):
      raise ValueError(f"{name}[{i}] must be a str, got {values.shown(prompt)}")
  return prompts


def prompt_problems(prompts: Sequence[str], labels: Sequence[str],
                    known_words: Collection[str] | None) -> list[str]:
  """One line per kind of unreadable prompt: empty ones, and ones with unknown words.

  Args:
    prompts: the prompts.
    labels: how messages name each prompt, e.g. ``prompts[0]``.
    known_words: a trained text encoder's vocabulary; None for a tokenizer
      that reads any text (CLIP), where only empty prompts are reported.
  """
  words = [split_words(p) for p in prompts]
  empty = [i for i, p in enumerate(prompts)
           if (not words[i] if known_words is not None else not p.strip())]
  problems = []
  if empty:
    listed = _listing([f"{labels[i]} = {prompts[i]!r}" for i in empty], _LISTED)
    verb = "has" if len(empty) == 1 else "have"
    problems.append(f"{listed} {verb} no words: the image will follow no text")
  if known_words is None:
    return problems
  unknown = {i: [w for w in words[i] if w not in known_words] for i in range(len(prompts))}
  unknown = {i: found for i, found in unknown.items() if found}
  if unknown:
    all_words = list(dict.fromkeys(w for found in unknown.values() for w in found))
    listed = _listing([f"{labels[i]} = {prompts[i]!r}" for i in unknown], _LISTED)
    verb = "has" if len(unknown) == 1 else "have"
    problems.append(f"{listed} {verb} words the text encoder never saw in training: "
                    f"{_listing([repr(w) for w in all_words], _LISTED_WORDS)} (read as [UNK]; "
                    "the image will not follow them)")
  return problems


def report_prompt_problems(problems: Sequence[str], mode: str, option: str | None) -> None:
  """Warns (``PromptWarning``), raises (ValueError) or does nothing, per ``mode``.

  ``option`` names the setting in the message's hint: the Pipeline argument
  ``unknown_words`` or the flag ``--unknown_words``; None for no hint.
  """
  values.choice(option or "unknown_words", mode, UNKNOWN_WORDS_MODES)
  if not problems or mode == "ignore":
    return
  if mode == "error":
    hint = f" ({option}=warn samples them anyway)" if option else ""
    raise ValueError("; ".join(problems) + hint)
  hint = f" ({option}=error refuses such prompts)" if option else ""
  for problem in problems:
    warnings.warn(problem + hint, PromptWarning, stacklevel=_caller_outside_package())


def _caller_outside_package() -> int:
  """The ``stacklevel`` of the first frame outside this package: the user's call."""
  frame, level = sys._getframe(1), 1
  while frame is not None and frame.f_globals.get("__name__", "").startswith("vqdiffusion_jax."):
    frame, level = frame.f_back, level + 1
  return level


def _listing(items: Sequence[str], limit: int) -> str:
  shown_items = ", ".join(items[:limit])
  return shown_items + (f" and {len(items) - limit} more" if len(items) > limit else "")


# Images.


def image_pixels(name: str, image: Any, size: int) -> np.ndarray:
  """A PIL image, uint8 HWC in 0..255 or float HWC in [0, 1] -> float32 (size, size, 3) in [0, 1].

  Other integer dtypes are taken as 0..255 pixel values; floats may overshoot
  [0, 1] by less than half a uint8 level (they are clipped).
  """
  array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
  if array.shape != (size, size, 3):
    raise ValueError(f"{name} has shape {array.shape}; this pipeline works on "
                     f"({size}, {size}, 3) RGB images")
  if np.issubdtype(array.dtype, np.integer):
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 255:
      raise ValueError(f"{name} is an {array.dtype} image with values in {low}..{high}; "
                       "integer pixels must be in 0..255")
    return array.astype(np.float32) / 255.0
  if not np.issubdtype(array.dtype, np.floating):
    raise ValueError(f"{name} has dtype {array.dtype}; give a PIL image, uint8 pixels in 0..255 "
                     "or floats in [0, 1]")
  if not np.isfinite(array).all():
    raise ValueError(f"{name} has nan or inf values; float pixels must be finite, in [0, 1]")
  low, high = float(array.min()), float(array.max())
  if low < -HALF_LEVEL or high > 1.0 + HALF_LEVEL:
    raise ValueError(f"{name} is a float image with values in {low:g}..{high:g}; float pixels "
                     "must be in [0, 1] (divide 0..255 values by 255, or give uint8)")
  return np.clip(array.astype(np.float32), 0.0, 1.0)


def pixel_mask(name: str, mask: Any, size: int) -> np.ndarray:
  """``mask`` as (size, size) bool (nonzero = True)."""
  array = np.asarray(mask)
  if array.shape != (size, size):
    raise ValueError(f"{name} has shape {array.shape}; expected ({size}, {size}) like the image")
  return array.astype(bool)


def padding(name: str, pad: Any, factor: int) -> tuple[int, int, int, int]:
  """(top, bottom, left, right): non-negative integer multiples of ``factor`` pixels."""
  sides = tuple(np.asarray(pad).tolist()) if isinstance(pad, Sequence | np.ndarray) else ()
  if len(sides) != 4 or not all(values.is_int(p) and p >= 0 and p % factor == 0 for p in sides):
    raise ValueError(f"{name} must be 4 non-negative multiples of {factor} pixels "
                     f"(top, bottom, left, right), got {values.shown(pad)}")
  return tuple(int(p) for p in sides)


# Output files.


def image_output_path(name: str, path: str | os.PathLike) -> str:
  """``path`` if it names an image file PIL writes whose folder can be created and written.

  A URL (``gs://``) is checked for its extension only.
  """
  path = os.fspath(path)
  local = not outputs.is_url(path)
  if local and os.path.isdir(path):
    raise ValueError(f"{name} {path} is a directory; give an image file path such as "
                     f"{os.path.join(path, 'samples.png')}")
  suffix = os.path.splitext(path)[1].lower()
  if not suffix or suffix not in Image.registered_extensions():
    raise ValueError(f"{name} {path} needs an image file extension such as .png, got "
                     f"{suffix or 'none'}")
  if not local:
    return path
  folder = os.path.dirname(os.path.abspath(path))
  existing = folder
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f"{name} {path}: {existing} is a file, so the folder {folder} cannot be "
                     "created")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f"{name} {path}: the folder {existing} is not writable")
  return path


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
  """``--precision`` of the sampling commands, for ``Pipeline.from_pretrained``."""
  parser.add_argument("--precision", default="fast", choices=precision.SAMPLING_PRECISIONS,
                      help="The denoiser's matmuls: fast (bfloat16 products, float32 "
                           "accumulation, where the machine has bfloat16 units; else float32), "
                           "float32 (exact) or bfloat16.")
