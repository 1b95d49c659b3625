"""Metrics for tools: TensorBoard, JSON lines, image grids, and the NaN stop.

Only process 0 writes. ``MetricWriter.write_scalars(step, scalars)`` appends
one JSON object per call to ``workdir/metrics.jsonl`` and logs the scalars to
TensorBoard (tensorboardX, no TensorFlow needed); ``write_images`` saves PNG
grids beside them. The console line is ``outputs.Progress``. Every file goes
through ``etils.epath``, so a workdir may be remote (``gs://``); there, where
objects cannot be appended to, ``metrics.jsonl`` and TensorBoard's event files
are rewritten whole at each flush.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping

import jax
import numpy as np
from etils import epath
from PIL import Image
from tensorboardX import SummaryWriter, record_writer

from vqdiffusion_jax import outputs


def _is_writer() -> bool:
  return jax.process_index() == 0


def _scalar(value) -> float:
  return float(np.asarray(value))


def _is_url(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


class _RewrittenFile:
  """An appendable binary file on any ``epath`` file system, rewritten whole on each flush."""

  def __init__(self, path: str | os.PathLike, keep: bool = False):
    self._path = epath.Path(path)
    self._buffer = io.BytesIO()
    if keep and self._path.exists():
      self._buffer.write(self._path.read_bytes())

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    self._path.write_bytes(self._buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EventFiles:
  """tensorboardX's writer factory for a URL scheme, through ``epath``."""

  def open(self, path: str) -> _RewrittenFile:
    return _RewrittenFile(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _tensorboard_writer(logdir: epath.Path) -> SummaryWriter:
  """A SummaryWriter whose event files go through ``epath`` when ``logdir`` is a URL."""
  if _is_url(logdir):
    record_writer.register_writer_factory(os.fspath(logdir).split("://")[0], _EventFiles())
  return SummaryWriter(os.fspath(logdir))


class MetricWriter:
  """Scalars to TensorBoard and JSON lines, images to PNG; no-ops off process 0."""

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = epath.Path(workdir)
    self._jsonl = None
    self._tensorboard = None
    if _is_writer():
      self.workdir.mkdir(parents=True, exist_ok=True)
      self._tensorboard = _tensorboard_writer(self.workdir / "tensorboard")
      jsonl = self.workdir / "metrics.jsonl"
      self._jsonl = _RewrittenFile(jsonl, keep=True) if _is_url(jsonl) else jsonl.open("ab")

  def write_scalars(self, step: int, scalars: Mapping[str, object]) -> None:
    if not _is_writer():
      return
    values = {k: _scalar(v) for k, v in scalars.items()}
    for name, value in values.items():
      self._tensorboard.add_scalar(name, value, step)
    self._jsonl.write((json.dumps({"step": int(step), **values}) + "\n").encode())
    self._jsonl.flush()

  def write_images(self, step: int, name: str, images: np.ndarray) -> str | None:
    """Saves a grid of (B, H, W, 3) images in [-1, 1] as ``samples/<name>_<step>.png``."""
    if not _is_writer():
      return None
    grid = outputs.tile(images)
    path = self.workdir / "samples" / f"{name}_{step:08d}.png"
    outputs.save_image(path, Image.fromarray(grid))
    self._tensorboard.add_image(name, grid, step, dataformats="HWC")
    return os.fspath(path)

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
