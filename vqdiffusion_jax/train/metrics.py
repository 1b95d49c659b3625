"""Metrics for people and for tools: TensorBoard, JSON lines, a progress bar.

Only process 0 writes. ``MetricWriter.write_scalars(step, scalars)`` appends
one JSON object per call to ``workdir/metrics.jsonl`` and logs the scalars to
TensorBoard (tensorboardX, no TensorFlow needed); ``write_images`` saves PNG
grids beside them. ``Progress`` prints a one-line bar with steps/s and ETA.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping

import jax
import numpy as np
from PIL import Image


def _is_writer() -> bool:
  return jax.process_index() == 0


def _scalar(value) -> float:
  return float(np.asarray(value))


class MetricWriter:
  """Scalars to TensorBoard and JSON lines, images to PNG; no-ops off process 0."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._jsonl = None
    self._tensorboard = None
    if _is_writer():
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # noqa: PLC0415
      self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115

  def write_scalars(self, step: int, scalars: Mapping[str, object]) -> None:
    if not _is_writer():
      return
    values = {k: _scalar(v) for k, v in scalars.items()}
    for name, value in values.items():
      self._tensorboard.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self._jsonl.flush()

  def write_images(self, step: int, name: str, images: np.ndarray) -> str | None:
    """Saves a grid of (B, H, W, 3) images in [-1, 1] as ``samples/<name>_<step>.png``."""
    if not _is_writer():
      return None
    grid = make_grid(images)
    path = os.path.join(self.workdir, "samples", f"{name}_{step:08d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(grid).save(path)
    self._tensorboard.add_image(name, grid, step, dataformats="HWC")
    return path

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._tensorboard.close()
      self._jsonl = self._tensorboard = None


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
  """Tiles (B, H, W, C) images in [-1, 1] into one uint8 (rows*H, cols*W, 3) grid."""
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f"expected (B, H, W, C) images, got shape {images.shape}")
  count, height, width, _ = images.shape
  columns = columns or math.ceil(math.sqrt(count))
  rows = math.ceil(count / columns)
  pixels = np.clip((images + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
  grid = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, 3), 255, np.uint8)
  for i, image in enumerate(pixels):
    top, left = pad + (i // columns) * (height + pad), pad + (i % columns) * (width + pad)
    grid[top:top + height, left:left + width] = image[..., :3]
  return grid


class Progress:
  """A console progress line: step, steps/s, ETA and chosen scalars."""

  def __init__(self, total_steps: int, start_step: int = 0, stream=sys.stderr):
    self.total = total_steps
    self.stream = stream
    self._start_step = start_step
    self._start_time = time.perf_counter()

  def update(self, step: int, scalars: Mapping[str, object] | None = None) -> str:
    elapsed = time.perf_counter() - self._start_time
    done = step - self._start_step
    rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
    eta = (self.total - step) / rate if rate else float("inf")
    filled = int(30 * step / max(self.total, 1))
    text = (f"\r[{'#' * filled}{'.' * (30 - filled)}] {step}/{self.total} "
            f"{rate:.2f} steps/s ETA {_duration(eta)}")
    if scalars:
      text += " " + " ".join(f"{k}={_scalar(v):.4g}" for k, v in scalars.items())
    if _is_writer():
      self.stream.write(text)
      self.stream.flush()
    return text

  def close(self) -> None:
    if _is_writer():
      self.stream.write("\n")


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "--:--"
  minutes, secs = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class NonFiniteError(FloatingPointError):
  """The loss or a gradient became NaN or Inf; the message names the step."""


def check_finite(step: int, scalars: Mapping[str, object]) -> None:
  """Raises NonFiniteError naming the step and the offending metrics."""
  bad = sorted(k for k, v in scalars.items() if not np.all(np.isfinite(np.asarray(v))))
  if bad:
    raise NonFiniteError(f"non-finite {', '.join(bad)} at step {step}; stopping (the last "
                         "checkpoint is intact)")
