"""What every command writes and shows: atomic JSON, image grids, the console.

Neutral ground for the layers above it (training, sampling, evaluation):
nothing here knows about models or trainers.

* ``absolute_path``, ``write_json_atomically``, ``write_text``,
  ``write_bytes``, ``read_json``, ``save_image``: paths and files under a
  workdir, local or remote (``gs://``), all through ``etils.epath``; every
  small file is written atomically (a temporary sibling renamed into place),
  and a corrupt JSON file is named in the error; ``local_path`` for the
  writers that need a local file system.
* ``tile``: a batch of images in [-1, 1] as one uint8 grid.
* ``Progress``: one console line per stage or long job (name, count, rate,
  ETA, chosen scalars), redrawn in place on a terminal, from process 0 only.
* ``quiet_logging``: library INFO logs (Orbax, absl) off unless asked for.
* ``bad_input_is_one_line`` and ``print_error``: a command's checks end it
  with one ``error:`` line (exit status 2) instead of a traceback;
  ``one_line_warnings``: a command's warnings without their source line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging as py_logging
import math
import os
import sys
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from absl import flags, logging
from etils import epath
from PIL import Image

# absl's verbosity for warnings and errors only; 0 is INFO, 1 and up DEBUG.
WARNINGS_ONLY = -1
# A command's exit status for a bad input (flag, file, missing package), as argparse's.
BAD_INPUT_EXIT_STATUS = 2


def absolute_path(path: str | os.PathLike) -> epath.Path:
  """``path`` as an ``epath.Path``: a URL (``gs://``) as is, a local path made absolute."""
  path = epath.Path(path)
  return path if path.is_absolute() else path.resolve()


def local_path(path: str | os.PathLike, what: str) -> str:
  """``path`` made absolute, for writers that need a local file system; a URL is refused."""
  if is_url(path):
    raise ValueError(f"{what} {os.fspath(path)} is a URL, but it is written with local file "
                     "operations: give a local path")
  return os.path.abspath(os.fspath(path))


def write_json_atomically(path: str | os.PathLike, value: Any) -> None:
  """Writes ``value`` as JSON to ``path`` atomically (``write_bytes``)."""
  write_text(path, json.dumps(value, indent=2, sort_keys=True))


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` atomically (``write_bytes``)."""
  write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` (parents created) so that a reader finds the old file or the new.

  The bytes go to a temporary sibling (``.NAME.HEX.tmp``), which is then
  renamed over ``path``; a kill leaves at most that sibling, never a
  truncated ``path``. A local file is flushed to disk before the rename. Where
  a URL's file system cannot rename, ``path`` is written directly: an object
  store shows an object only once its upload is complete.
  """
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
  try:
    with tmp.open("wb") as f:
      f.write(data)
      if not is_url(path):
        f.flush()
        os.fsync(f.fileno())
    try:
      tmp.replace(path)
    except NotImplementedError:
      path.write_bytes(data)
  finally:
    tmp.unlink(missing_ok=True)


def is_url(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a URL (``gs://...``) rather than a local path."""
  return "://" in os.fspath(path)


def read_json(path: str | os.PathLike, remedy: str = "") -> Any:
  """The JSON value in ``path``; a ValueError naming the file when it is corrupt or truncated.

  Args:
    path: the file (local or a URL).
    remedy: what the user can do about a bad file, appended to the message.
  """
  text = epath.Path(path).read_text(encoding="utf-8")
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{os.fspath(path)} is corrupt or truncated (not valid JSON: {e.msg} at "
                     f"line {e.lineno} column {e.colno}){'; ' + remedy if remedy else ''}"
                     ) from None


def save_image(path: str | os.PathLike, image: Image.Image) -> None:
  """Saves a PIL image to ``path`` atomically, in the format its suffix names."""
  path = epath.Path(path)
  image_format = Image.registered_extensions().get(path.suffix.lower())
  if image_format is None:
    raise ValueError(f"{path}: unknown image file extension {path.suffix!r} (use .png)")
  encoded = io.BytesIO()
  image.save(encoded, format=image_format)
  write_bytes(path, encoded.getvalue())


def tile(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
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


def _scalar(value) -> float:
  return float(np.asarray(value))


def duration(seconds: float) -> str:
  """``MM:SS`` or ``H:MM:SS``; ``--:--`` for an unknown (infinite) time."""
  if not math.isfinite(seconds):
    return "--:--"
  minutes, secs = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
  """A console progress line: name, count, rate, ETA and chosen scalars.

  Only process 0 draws it. On a terminal the line is redrawn in place; into a
  file or pipe it is written as a new line at most every ``interval``
  seconds, and once more at the end.
  """

  def __init__(self, total: int, start: int = 0, *, name: str = "", unit: str = "steps",
               stream=None, clock=time.perf_counter, interval: float = 30.0):
    """A line for ``total`` units, ``start`` of them already done before this run."""
    self.total, self.name, self.unit = total, name, unit
    self.stream = sys.stderr if stream is None else stream
    self._start, self._clock, self._interval = start, clock, interval
    self._start_time = clock()
    self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self._last_written: float | None = None
    self._pending = ""

  def update(self, done: int, scalars: Mapping[str, object] | None = None) -> str:
    """Redraws the line at ``done`` units; returns its text."""
    now = self._clock()
    elapsed = now - self._start_time
    count = done - self._start
    rate = count / elapsed if elapsed > 0 and count > 0 else 0.0
    eta = (self.total - done) / rate if rate else float("inf")
    filled = int(30 * done / max(self.total, 1))
    text = (f"{self.name + ' ' if self.name else ''}[{'#' * filled}{'.' * (30 - filled)}] "
            f"{done}/{self.total} {rate:.2f} {self.unit}/s ETA {duration(eta)}")
    if scalars:
      text += " " + " ".join(f"{k}={_scalar(v):.4g}" for k, v in scalars.items())
    if self._tty:
      self._write(f"\r{text}\x1b[K")
    elif (self._last_written is None or now - self._last_written >= self._interval
          or done >= self.total):
      self._write(text + "\n")
      self._last_written, self._pending = now, ""
    else:
      self._pending = text
    return text

  def close(self) -> None:
    """Ends the line (and writes the last state a file has not seen yet)."""
    if self._tty:
      self._write("\n")
    elif self._pending:
      self._write(self._pending + "\n")
      self._pending = ""

  def _write(self, text: str) -> None:
    if jax.process_index() == 0:
      self.stream.write(text)
      self.stream.flush()


# The warning Orbax logs on each read-only open of a checkpoint directory (its format string).
READ_ONLY_NOTICE = "Given directory is read only=%s"
# Warnings libraries log on every run that ask nothing of the user: Orbax on each
# read-only open, TFDS on each custom builder config and image decode without OpenCV.
_ROUTINE_WARNINGS = ("Given directory is read only", "Using custom data configuration",
                     "OpenCV is not installed")


class _ReadOnlyNoticeFilter(py_logging.Filter):
  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.msg != READ_ONLY_NOTICE


def hide_read_only_notice() -> None:
  """Drops Orbax's ``READ_ONLY_NOTICE`` from absl's log, and no other message.

  For the readers of checkpoints (a pipeline loading a run), which open every
  checkpoint directory read-only, also outside the commands.
  """
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _ReadOnlyNoticeFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_ReadOnlyNoticeFilter())


class _RoutineFilter(py_logging.Filter):
  def filter(self, record: py_logging.LogRecord) -> bool:
    return not any(text in record.getMessage() for text in _ROUTINE_WARNINGS)


def quiet_logging(verbosity: int | None = None) -> None:
  """Sets absl's verbosity: warnings only by default, INFO and more when asked.

  Orbax, TFDS and absl log through absl's logger; at the default their INFO
  lines (one per save, restore and directory scan) stay off the console, and
  their routine warnings (``_ROUTINE_WARNINGS``) are dropped.

  Args:
    verbosity: absl's scale (-1 warnings, 0 INFO, 1+ DEBUG); None: -1.
  """
  logging.set_verbosity(WARNINGS_ONLY if verbosity is None else verbosity)
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _RoutineFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_RoutineFilter())


def absl_verbosity() -> int | None:
  """absl's ``--verbosity`` when given on the command line, else None (for ``quiet_logging``)."""
  flag = flags.FLAGS["verbosity"]
  return flag.value if flag.present else None


def add_verbosity_argument(parser: argparse.ArgumentParser) -> None:
  """``--verbosity`` for an argparse command, read by ``quiet_logging``."""
  parser.add_argument("--verbosity", type=int, default=None,
                      help="absl verbosity: 0 shows the libraries' INFO logs (default: warnings)")


@contextlib.contextmanager
def bad_input_is_one_line(*errors: type[BaseException]) -> Iterator[None]:
  """Around a command's checks: an error of a kind in ``errors`` ends the command.

  It prints ``error: <message>`` on stderr and exits with
  ``BAD_INPUT_EXIT_STATUS``; the messages name the input, so a traceback
  would only hide them. Errors of other kinds pass through.
  """
  try:
    yield
  except errors as error:
    raise SystemExit(print_error(error)) from None


def print_error(error: BaseException | str) -> int:
  """Prints ``error: <message>`` on stderr; returns ``BAD_INPUT_EXIT_STATUS``."""
  # str() of a KeyError is the repr of its message; print the message itself.
  message = error.args[0] if isinstance(error, KeyError) and error.args else error
  print(f"error: {message}", file=sys.stderr)
  return BAD_INPUT_EXIT_STATUS


def one_line_warnings() -> None:
  """Python warnings as ``Category: message`` lines, for commands (no file, no source line)."""
  warnings.formatwarning = (
      lambda message, category, filename, lineno, line=None: f"{category.__name__}: {message}\n")
