"""Metrics for tools: TensorBoard, JSON lines, image grids, and the NaN stop.

Only process 0 writes. ``MetricWriter.write_scalars(step, scalars)`` appends
one JSON object per call to ``workdir/metrics.jsonl`` and logs the scalars to
TensorBoard (tensorboardX, no TensorFlow needed); ``write_images`` saves PNG
grids beside them. The console line is ``outputs.Progress``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import numpy as np
from PIL import Image
from tensorboardX import SummaryWriter

from vqdiffusion_jax import outputs


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
    grid = outputs.tile(images)
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


class NonFiniteError(FloatingPointError):
  """The loss or a gradient became NaN or Inf; the message names the step."""


def check_finite(step: int, scalars: Mapping[str, object]) -> None:
  """Raises NonFiniteError naming the step and the offending metrics."""
  bad = sorted(k for k, v in scalars.items() if not np.all(np.isfinite(np.asarray(v))))
  if bad:
    raise NonFiniteError(f"non-finite {', '.join(bad)} at step {step}; stopping (the last "
                         "checkpoint is intact)")
