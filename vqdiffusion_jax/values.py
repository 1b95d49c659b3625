"""Checks of single values, each a one-line ValueError naming the value.

Counts are positive integers (a bool or 2.5 is not one), seeds are integers
in 0..MAX_SEED, scales and rates are finite numbers in their range. ``name``
is what the message calls the value: an argument (``num_inference_steps``),
a flag (``--steps``) or a field. Nothing of ours is imported here, so every
layer can check what it is given.
"""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

MAX_SEED = 2**32 - 1  # jax.random.key keeps the low 32 bits of a seed


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


def is_int(value: Any) -> bool:
  """Whether ``value`` is an integer scalar (Python, numpy or 0-d array; not a bool)."""
  return _scalar_of(value, np.integer)


def positive_int(name: str, value: Any) -> int:
  """``value`` as an int >= 1; bools and floats (even 2.0) are refused."""
  if not is_int(value) or int(value) < 1:
    raise ValueError(f"{name} must be a positive integer, got {shown(value)}")
  return int(value)


def non_negative_int(name: str, value: Any) -> int:
  """``value`` as an int >= 0; bools and floats are refused."""
  if not is_int(value) or int(value) < 0:
    raise ValueError(f"{name} must be a non-negative integer, got {shown(value)}")
  return int(value)


def optional_positive_int(name: str, value: Any) -> int | None:
  """None, or ``positive_int``."""
  return None if value is None else positive_int(name, value)


def seed(name: str, value: Any) -> int:
  """An integer seed in 0..MAX_SEED (larger ones would alias smaller ones)."""
  if not is_int(value) or not 0 <= int(value) <= MAX_SEED:
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


def finite_numbers(name: str, values: Any) -> np.ndarray:
  """A non-empty 1-D list of finite numbers as float32."""
  array = np.asarray(values)
  if (array.ndim != 1 or not array.size or not np.issubdtype(array.dtype, np.number)
      or not np.isfinite(array).all()):
    raise ValueError(f"{name} must be a non-empty list of finite numbers, got {shown(values)}")
  return array.astype(np.float32)
