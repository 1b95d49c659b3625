"""Metrics for tools: TensorBoard, JSON lines, image grids, and the NaN stop.

Only process 0 writes. ``MetricWriter.write_scalars(step, scalars)`` appends
one JSON object per call to ``workdir/metrics.jsonl`` and logs the scalars to
TensorBoard (tensorboardX, no TensorFlow needed); ``write_images`` saves PNG
grids beside them. The console line is ``outputs.Progress``. Every file goes
through ``etils.epath``, so a workdir may be remote (``gs://``); there, where
objects cannot be appended to, ``metrics.jsonl`` and TensorBoard's event files
are rewritten whole at each flush.

A resumed stage starts at its checkpoint's step, so the records the stopped
run logged after that step are dropped from ``metrics.jsonl``
(``MetricWriter.resume_at``) before they are logged again; readers keep the
last record of a step (``latest_per_step``) all the same.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging
from etils import epath
from PIL import Image
from tensorboardX import SummaryWriter, record_writer

from vqdiffusion_jax import outputs

METRICS_FILE = "metrics.jsonl"


def _is_writer() -> bool:
  return jax.process_index() == 0


def _scalar(value) -> float:
  return float(np.asarray(value))


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
  if outputs.is_url(logdir):
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
      self._jsonl = self._open_jsonl()

  def _open_jsonl(self):
    jsonl = self.workdir / METRICS_FILE
    return _RewrittenFile(jsonl, keep=True) if outputs.is_url(jsonl) else jsonl.open("ab")

  def resume_at(self, step: int) -> None:
    """Drops the records of steps after ``step``, where a resumed stage starts, atomically."""
    if self._jsonl is None:
      return
    self._jsonl.close()
    path = self.workdir / METRICS_FILE
    dropped = drop_records_after(path, step)
    self._jsonl = self._open_jsonl()
    if dropped:
      logging.warning("%s: dropped %d record(s) after step %d, where training resumes (those "
                      "steps run again)", os.fspath(path), dropped, step)

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


def _record_step(line: str) -> int | None:
  """The step of one ``metrics.jsonl`` line; None for a line that is no whole record."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError:
    return None
  step = record.get("step") if isinstance(record, dict) else None
  return step if isinstance(step, int) else None


def drop_records_after(path: str | os.PathLike, step: int) -> int:
  """Rewrites ``metrics.jsonl`` atomically without the records after ``step``.

  A line that is no whole record (the end of a write that a kill cut short)
  is dropped too.

  Returns:
    How many lines were dropped (0: the file, if any, is left untouched).
  """
  path = epath.Path(path)
  if not path.exists():
    return 0
  lines = path.read_text(encoding="utf-8").splitlines()
  kept = [line for line in lines if (s := _record_step(line)) is not None and s <= step]
  if len(kept) < len(lines):
    outputs.write_text(path, "".join(line + "\n" for line in kept))
  return len(lines) - len(kept)


def read_records(path: str | os.PathLike) -> list[dict]:
  """The records of a ``metrics.jsonl`` in file order ([] when it is missing).

  Raises:
    ValueError: a line is no JSON record, naming the file and the line.
  """
  path = epath.Path(path)
  if not path.exists():
    return []
  records = []
  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if _record_step(line) is None:
      raise ValueError(f"{os.fspath(path)} line {number} is corrupt or truncated (not a JSON "
                       f"record with an integer step): {line[:80]!r}")
    records.append(json.loads(line))
  return records


def latest_per_step(records: list[dict]) -> list[dict]:
  """The last record of each step, in step order (a step logged twice keeps its newer record)."""
  return sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])


class NonFiniteError(FloatingPointError):
  """The loss or a gradient became NaN or Inf; the message names the step."""


def check_finite(step: int, scalars: Mapping[str, object]) -> None:
  """Raises NonFiniteError naming the step and the offending metrics."""
  bad = sorted(k for k, v in scalars.items() if not np.all(np.isfinite(np.asarray(v))))
  if bad:
    raise NonFiniteError(f"non-finite {', '.join(bad)} at step {step}; stopping (the last "
                         "checkpoint is intact)")
