"""What a file or directory given as a checkpoint is, from its first bytes and its layout.

``identify_file`` tells the formats a checkpoint comes in apart, without
loading anything: the zip archive of ``torch.save`` (magic ``PK\\x03\\x04``
with a ``data.pkl`` entry), the legacy pickle of ``torch.save`` (protocol
byte ``\\x80`` 2..5), safetensors (an 8-byte little-endian header length,
then that many bytes of JSON, then the tensors), NumPy arrays; and describes
anything else (text, an HTML page, a Git LFS pointer, a damaged archive) so
that an error can say what the file looks like. ``describe_directory`` does
the same for directories (diffusers layouts).
"""

from __future__ import annotations

import json
import os
import struct
import zipfile

ZIP_MAGIC = b"PK\x03\x04"
NPY_MAGIC = b"\x93NUMPY"
PICKLE_PROTOCOLS = range(2, 6)
SAFETENSORS_LENGTH_BYTES = 8
HEAD_BYTES = 4096

TORCH, SAFETENSORS, NUMPY, OTHER = "torch", "safetensors", "numpy", "other"


def identify_file(path: str | os.PathLike) -> tuple[str, str]:
  """``(kind, description)`` of a file: kind is ``TORCH``, ``SAFETENSORS``, ``NUMPY`` or ``OTHER``.

  The description says what the file looks like, e.g. "a zip archive that is
  truncated or damaged" or "text starting 'hello'".
  """
  path = os.fspath(path)
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(HEAD_BYTES)
  if not head:
    return OTHER, "an empty file"
  if head.startswith(ZIP_MAGIC):
    return _zip_kind(path)
  if head[0] == 0x80 and len(head) > 1 and head[1] in PICKLE_PROTOCOLS:
    return TORCH, f"a pickle of protocol {head[1]} (torch.save's legacy format)"
  if head.startswith(NPY_MAGIC):
    return NUMPY, "a NumPy .npy array"
  safetensors = _safetensors_problem(path, head, size)
  if safetensors is not None:
    return (SAFETENSORS, "a safetensors file") if not safetensors else (OTHER, safetensors)
  return OTHER, _describe_other(head, size)


def _zip_kind(path: str) -> tuple[str, str]:
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
  except (zipfile.BadZipFile, OSError, EOFError):
    return OTHER, "a zip archive that is truncated or damaged"
  if any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
    return TORCH, "torch.save's zip archive"
  if names and all(name.endswith(".npy") for name in names):
    return NUMPY, "a NumPy .npz archive"
  shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
  return OTHER, f"a zip archive of {len(names)} files ({shown}) without torch.save's data.pkl"


def _safetensors_problem(path: str, head: bytes, size: int) -> str | None:
  """None: not safetensors at all; "": a whole safetensors file; else what is wrong with it."""
  if len(head) <= SAFETENSORS_LENGTH_BYTES or head[SAFETENSORS_LENGTH_BYTES:][:1] != b"{":
    return None
  (length,) = struct.unpack("<Q", head[:SAFETENSORS_LENGTH_BYTES])
  if length > size - SAFETENSORS_LENGTH_BYTES:
    if length > 100 * 2**20:
      return None  # no header this long: text that happens to start "........{"
    return f"a safetensors header of {length} bytes in a file of {size} bytes"
  with open(path, "rb") as f:
    f.seek(SAFETENSORS_LENGTH_BYTES)
    header = f.read(length)
  try:
    entries = json.loads(header)
    ends = [int(entry["data_offsets"][1]) for key, entry in entries.items()
            if key != "__metadata__"]
  except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, KeyError,
          IndexError, ValueError):
    return "a safetensors-like header that does not list tensors"
  data = size - SAFETENSORS_LENGTH_BYTES - length
  if ends and max(ends) > data:
    return f"a safetensors header for {max(ends)} bytes of tensors but {data} bytes follow it"
  return ""


def _describe_other(head: bytes, size: int) -> str:
  try:
    text = head.decode("utf-8")
  except UnicodeDecodeError as error:
    # A multi-byte character cut by the read is still text.
    text = head[:error.start].decode("utf-8") if error.start > len(head) - 4 else None
  if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
    stripped = text.lstrip()
    if stripped.startswith("version https://git-lfs"):
      return "a Git LFS pointer, not the file it points to (run git lfs pull)"
    if stripped[:15].lower().startswith(("<!doctype html", "<html")):
      return "an HTML page (a download that saved a web page?)"
    first = stripped.splitlines()[0] if stripped else ""
    return f"text of {size} bytes starting {first[:40]!r}"
  return f"{size} bytes of binary data starting {head[:8].hex()}"


def describe_directory(path: str | os.PathLike) -> str:
  """What a directory given as a checkpoint looks like, for an error message."""
  path = os.fspath(path)
  for name in ("model_index.json", "config.json"):
    file = os.path.join(path, name)
    if os.path.isfile(file):
      return f"a directory whose {name} describes {_class_name(file)}"
  entries = sorted(os.listdir(path))
  shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
  return (f"a directory of {len(entries)} entries ({shown or 'empty'}), without "
          "model_index.json or config.json")


def _class_name(config_file: str) -> str:
  try:
    with open(config_file) as f:
      name = json.load(f).get("_class_name")
  except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
    return "nothing (not a JSON object)"
  return repr(name) if name else "no _class_name"
