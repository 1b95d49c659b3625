"""Checks of what a sampling request is given, each a one-line error naming the value.

The notebook pipeline (``Pipeline``) and the ``sample`` and ``evaluate``
command lines check every argument with these before any work: counts are
positive integers (a bool or 2.5 is not one), seeds are integers in
0..2**32 - 1, scales and rates are finite numbers in their range, images are
uint8 in 0..255 or floats in [0, 1] of the pipeline's size, output files
have an image extension and a writable folder. ``name`` is what the message
calls the value: an argument (``num_inference_steps``) or a flag
(``--steps``).

Prompts the text side cannot read give a ``PromptWarning`` (or a
ValueError, per ``unknown_words``): an empty prompt, and words a trained text
encoder never saw (they become [UNK]). CLIP's byte-level BPE reads every
word, so only empty prompts are reported for it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
from PIL import Image

from vqdiffusion_jax import outputs
from vqdiffusion_jax.models import precision
from vqdiffusion_jax.models.text_encoder import split_words

MAX_SEED = 2**32 - 1  # jax.random.key keeps the low 32 bits of a seed
UNKNOWN_WORDS_MODES = ("warn", "error", "ignore")
HALF_LEVEL = 0.5 / 255  # float images may overshoot [0, 1] by rounding, by less than this
_LISTED = 3  # prompts named in one message
_LISTED_WORDS = 10


class PromptWarning(UserWarning):
  """A prompt read as (partly) nothing: empty, or with words the text encoder never saw."""


def shown(value: Any) -> str:
  """``value`` as a message shows it: numpy and JAX scalars as plain Python values."""
  if isinstance(value, np.generic) or (hasattr(value, "dtype") and np.ndim(value) == 0):
    value = np.asarray(value).item()
  return repr(value)


def _scalar_of(value: Any, kind: type) -> bool:
  """Whether ``value`` is a Python, numpy or 0-d array scalar of numpy ``kind``."""
  if isinstance(value, bool | np.bool_):
    return False
  if isinstance(value, int | float):
    return np.issubdtype(type(value), kind)
  dtype = getattr(value, "dtype", None)
  return dtype is not None and np.ndim(value) == 0 and np.issubdtype(dtype, kind)


def _is_int(value: Any) -> bool:
  return _scalar_of(value, np.integer)


def positive_int(name: str, value: Any) -> int:
  """``value`` as an int >= 1; bools and floats (even 2.0) are refused."""
  if not _is_int(value) or int(value) < 1:
    raise ValueError(f"{name} must be a positive integer, got {shown(value)}")
  return int(value)


def non_negative_int(name: str, value: Any) -> int:
  """``value`` as an int >= 0; bools and floats are refused."""
  if not _is_int(value) or int(value) < 0:
    raise ValueError(f"{name} must be a non-negative integer, got {shown(value)}")
  return int(value)


def optional_positive_int(name: str, value: Any) -> int | None:
  """None, or ``positive_int``."""
  return None if value is None else positive_int(name, value)


def seed(name: str, value: Any) -> int:
  """An integer seed in 0..MAX_SEED (larger ones would alias smaller ones)."""
  if not _is_int(value) or not 0 <= int(value) <= MAX_SEED:
    raise ValueError(f"{name} must be an integer in 0..{MAX_SEED}, got {shown(value)}")
  return int(value)


def number(name: str, value: Any, *, low: float = -math.inf, high: float = math.inf,
           low_open: bool = False, high_open: bool = False) -> float:
  """``value`` as a finite float in the interval low..high (open ends as flagged)."""
  allowed = _interval(low, high, low_open, high_open)
  if not (_scalar_of(value, np.integer) or _scalar_of(value, np.floating)):
    raise ValueError(f"{name} must be a finite number {allowed}, got {shown(value)}")
  x = float(value)
  inside = (math.isfinite(x) and (x > low if low_open else x >= low)
            and (x < high if high_open else x <= high))
  if not inside:
    raise ValueError(f"{name} must be a finite number {allowed}, got {shown(value)}")
  return x


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
  if math.isinf(high) and math.isinf(low):
    return "(not nan or inf)"
  if math.isinf(high):
    return f"{'>' if low_open else '>='} {low:g}"
  if math.isinf(low):
    return f"{'<' if high_open else '<='} {high:g}"
  return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def choice(name: str, value: Any, allowed: Sequence[str]) -> str:
  """``value`` if it is one of ``allowed``."""
  if not isinstance(value, str) or value not in allowed:
    raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {shown(value)}")
  return value


def sampler_options(*, num_inference_steps: Any = None, guidance_scale: Any = 1.0,
                    truncation_rate: Any = 1.0, purity_temperature: Any = 1.0,
                    typical_mass: Any = 1.0, max_reveal_per_call: Any = None,
                    names: dict[str, str] | None = None) -> dict[str, Any]:
  """The numeric sampler options checked and converted; ``names`` renames them in messages."""
  names = names or {}
  name = lambda key: names.get(key, key)  # noqa: E731
  return {
      "num_inference_steps": optional_positive_int(name("num_inference_steps"),
                                                   num_inference_steps),
      "guidance_scale": number(name("guidance_scale"), guidance_scale, low=0.0),
      "truncation_rate": number(name("truncation_rate"), truncation_rate, low=0.0, high=1.0,
                                low_open=True),
      "purity_temperature": number(name("purity_temperature"), purity_temperature, low=0.0),
      "typical_mass": number(name("typical_mass"), typical_mass, low=0.0, high=1.0,
                             low_open=True),
      "max_reveal_per_call": optional_positive_int(name("max_reveal_per_call"),
                                                   max_reveal_per_call),
  }


def finite_numbers(name: str, values: Any) -> np.ndarray:
  """A non-empty 1-D list of finite numbers as float32."""
  array = np.asarray(values)
  if (array.ndim != 1 or not array.size or not np.issubdtype(array.dtype, np.number)
      or not np.isfinite(array).all()):
    raise ValueError(f"{name} must be a non-empty list of finite numbers, got {shown(values)}")
  return array.astype(np.float32)


# Prompts.


def prompt_list(name: str, prompts: Any) -> list[str]:
  """One prompt or a non-empty sequence of them, as a list of str."""
  if isinstance(prompts, str):
    return [prompts]
  if not isinstance(prompts, Sequence | np.ndarray):
    raise ValueError(f"{name} must be a str or a list of str, got {shown(prompts)}")
  prompts = list(prompts)
  if not prompts:
    raise ValueError(f"{name} is an empty list; give at least one prompt")
  for i, prompt in enumerate(prompts):
    if not isinstance(prompt, str):
      raise ValueError(f"{name}[{i}] must be a str, got {shown(prompt)}")
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
  choice(option or "unknown_words", mode, UNKNOWN_WORDS_MODES)
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
  values = tuple(np.asarray(pad).tolist()) if isinstance(pad, Sequence | np.ndarray) else ()
  if len(values) != 4 or not all(_is_int(p) and p >= 0 and p % factor == 0 for p in values):
    raise ValueError(f"{name} must be 4 non-negative multiples of {factor} pixels "
                     f"(top, bottom, left, right), got {shown(pad)}")
  return tuple(int(p) for p in values)


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
