"""Encode a dataset once to VQ tokens (and text features) in an ArrayRecord cache.

The denoiser trainer then reads tokens, never images, and never runs the VQ
encoder. A cache is a directory::

  records.array_record   one record per image, in source order
  metadata.json          written last: grid, codebook size, counts, shapes, the
                         labels' [min, max] (``label_range``, None without), source

Each record is an ``.npz`` (no pickle) with ``tokens`` (h * w,)
int16 when the codebook has at most 2**15 entries, else int32; ``captions``, all
captions of the image as UTF-8 bytes; and, when a text encoder was given,
``text_features`` float16 (C, L, D), one row per caption. Features of every
caption are kept so that training still draws a fresh caption each epoch (the
same draw as ``loader.image_batches``); the price is C * L * D * 2 bytes per
image (about 400 KB for 5 CLIP captions of 77 x 512), which ``max_captions``
bounds. A record of a class-labelled source (``image_folders``) also holds
its ``label``, an int64 scalar.

The cache is built in a temporary sibling directory and renamed into place at
the end, so a crash leaves no directory that looks complete;
``TokenCacheSource`` refuses a directory without ``metadata.json`` or whose
record count disagrees with it.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
from array_record.python import array_record_module

from vqdiffusion_jax.data import loader

FORMAT = "vqdiffusion_jax.token_cache"
VERSION = 1
METADATA = "metadata.json"
RECORDS = "records.array_record"
_WRITER_OPTIONS = "group_size:1"  # One record per chunk: cheap random access.

EncodeImages = Callable[[np.ndarray], np.ndarray]
EncodeText = Callable[[list[str]], np.ndarray]


def token_dtype(codebook_size: int) -> np.dtype:
  """The smallest signed integer type holding token ids ``0 .. codebook_size - 1``.

  Args:
    codebook_size: number of codebook entries K.

  Returns:
    int16 for K <= 2**15, else int32.
  """
  if codebook_size < 1:
    raise ValueError(f"codebook_size must be positive, got {codebook_size}")
  return np.dtype(np.int16 if codebook_size <= 2**15 else np.int32)


def encode_record(tokens: np.ndarray, captions: Sequence[str],
                  text_features: np.ndarray | None = None, label: int | None = None) -> bytes:
  """Serializes one cache record.

  Args:
    tokens: (N,) token ids, already in the cache's dtype.
    captions: all captions of the image.
    text_features: (C, L, D) features, one per caption, or None.
    label: the image's class label, or None.

  Returns:
    The record's bytes.
  """
  arrays = {"tokens": np.asarray(tokens),
            "captions": np.asarray([c.encode("utf-8") for c in captions], dtype=np.bytes_)}
  if text_features is not None:
    arrays["text_features"] = np.asarray(text_features, np.float16)
  if label is not None:
    arrays["label"] = np.asarray(label, np.int64)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def decode_record(data: bytes) -> dict:
  """Inverse of ``encode_record``.

  Args:
    data: a record's bytes.

  Returns:
    ``{"tokens": (N,), "captions": list[str]}`` plus ``text_features`` and
    ``label`` (an int) when stored.
  """
  with np.load(io.BytesIO(data), allow_pickle=False) as npz:
    out = {k: npz[k] for k in npz.files}
  out["captions"] = [c.decode("utf-8") for c in out["captions"].tolist()]
  if "label" in out:
    out["label"] = int(out["label"])
  return out


def _is_source(data: Any) -> bool:
  return hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, dict)


def _input_batches(data: Any, image_size: int | None, batch_size: int, num_threads: int
                   ) -> Iterator[tuple[np.ndarray, list[list[str]], np.ndarray | None]]:
  """(images float32 (b, S, S, 3), captions per image, labels (b,) or None) per batch."""
  if _is_source(data):
    if image_size is None:
      raise ValueError("image_size is needed to encode a record source")
    if len(data) and np.ndim(data[0]["image"]) > 3:
      raise TypeError("the data looks like a list of batches; pass iter(batches) instead")
    for batch in loader.sequential_batches(data, image_size=image_size, batch_size=batch_size,
                                             num_threads=num_threads):
      yield batch["image"], batch["captions"], batch.get("label")
    return
  for batch in data:
    captions = [loader.decode_captions(c) for c in batch["captions"]]
    yield np.asarray(batch["image"], np.float32), captions, batch.get("label")


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  if len(x) >= rows:
    return x
  return np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)])


def _encode_tokens(encode_images: EncodeImages, images: np.ndarray, pad_to: int,
                   codebook_size: int) -> np.ndarray:
  """Encodes at a fixed batch size (jitted encoders compile once) and checks the ids."""
  tokens = np.asarray(encode_images(_pad_rows(images, pad_to)))[:len(images)]
  if (tokens.ndim != 3 or len(tokens) != len(images)
      or not np.issubdtype(tokens.dtype, np.integer)):
    raise ValueError(f"encode_images must return (b, h, w) integers, got {tokens.dtype} "
                     f"{tokens.shape}")
  if tokens.size and (tokens.min() < 0 or tokens.max() >= codebook_size):
    raise ValueError(f"token ids in [{tokens.min()}, {tokens.max()}] are outside the codebook "
                     f"of size {codebook_size}")
  return tokens


def _encode_captions(encode_text: EncodeText, captions: list[list[str]],
                     chunk: int) -> list[np.ndarray]:
  """Per image, float16 (C, L, D): all captions encoded in fixed chunks, padded with "".

  A batch without any caption still makes one call, to learn L and D.
  """
  flat = [c for caps in captions for c in caps]
  feats = []
  for start in range(0, max(len(flat), 1), chunk):
    part = flat[start:start + chunk]
    out = np.asarray(encode_text(part + [""] * (chunk - len(part))))
    if out.ndim != 3 or out.shape[0] != chunk:
      raise ValueError(f"encode_text must return (b, L, D), got {out.shape} for {chunk} texts")
    feats.append(out[:len(part)].astype(np.float16))
  flat_feats = np.concatenate(feats)
  bounds = np.cumsum([0] + [len(caps) for caps in captions])
  return [flat_feats[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _write_records(path: pathlib.Path, batches: Iterable[tuple],
                   encode_images: EncodeImages, encode_text: EncodeText | None,
                   codebook_size: int, max_captions: int | None) -> dict:
  """Writes every record; returns the facts that go into the metadata."""
  writer = array_record_module.ArrayRecordWriter(str(path), _WRITER_OPTIONS)
  dtype = token_dtype(codebook_size)
  facts = {"num_records": 0, "grid": None, "feature_shape": None, "image_size": None,
           "caption_counts": [], "label_range": None}
  pad_to = None
  try:
    for images, captions, labels in batches:
      pad_to = pad_to or len(images)
      captions = [caps[:max_captions] for caps in captions]
      tokens = _encode_tokens(encode_images, images, pad_to, codebook_size)
      if facts["grid"] not in (None, list(tokens.shape[1:])):
        raise ValueError(f"token grid changed from {facts['grid']} to {tokens.shape[1:]}")
      facts["grid"], facts["image_size"] = list(tokens.shape[1:]), int(images.shape[1])
      feats = (_encode_captions(encode_text, captions, pad_to) if encode_text
               else [None] * len(images))
      if labels is None:
        labels = [None] * len(images)
      else:
        labels = [int(v) for v in labels]
        low, high = facts["label_range"] or (min(labels), max(labels))
        facts["label_range"] = [min(low, *labels), max(high, *labels)]
      for tok, caps, feat, label in zip(tokens, captions, feats, labels, strict=True):
        if feat is not None:
          facts["feature_shape"] = list(feat.shape[1:])
        writer.write(encode_record(tok.reshape(-1).astype(dtype), caps, feat, label))
        facts["caption_counts"].append(len(caps))
      facts["num_records"] += len(images)
  finally:
    writer.close()
  return facts


def _metadata(facts: dict, codebook_size: int, max_captions: int | None,
              description: str) -> dict:
  counts = facts["caption_counts"]
  h, w = facts["grid"]
  return {
      "format": FORMAT, "version": VERSION, "num_records": facts["num_records"],
      "token_grid": [h, w], "num_tokens": h * w, "codebook_size": codebook_size,
      "token_dtype": token_dtype(codebook_size).name, "image_size": facts["image_size"],
      "text_features": (None if facts["feature_shape"] is None
                        else {"shape": facts["feature_shape"], "dtype": "float16"}),
      "max_captions": max_captions, "captions_per_record": [min(counts), max(counts)],
      "label_range": facts["label_range"],
      "source": description, "files": [RECORDS],
  }


def _install(tmp: pathlib.Path, out: pathlib.Path, overwrite: bool) -> None:
  """Renames the finished temporary directory into place."""
  old = None
  if out.exists():
    if not overwrite:
      raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
  os.rename(tmp, out)
  if old is not None:
    shutil.rmtree(old)


def build_token_cache(data: Any, encode_images: EncodeImages, out_dir: str | os.PathLike, *,
                      codebook_size: int, image_size: int | None = None, batch_size: int = 64,
                      encode_text: EncodeText | None = None, max_captions: int | None = None,
                      description: str = "", overwrite: bool = False,
                      num_threads: int = 0) -> dict:
  """Encodes a dataset once into a token cache at ``out_dir``.

  Args:
    data: a random-access source of records (as for ``loader.image_batches``),
      read in order with center crops at ``image_size``; or an iterable (not a
      sequence) of batches ``{"image": float32 (b, S, S, 3) in [-1, 1],
      "captions": b strs or lists of str}``.
    encode_images: float32 (b, S, S, 3) -> (b, h, w) integer ids. Always called
      with the first batch's size (the last batch is padded), so a jitted encoder
      compiles once.
    out_dir: the cache directory; must not exist unless ``overwrite``.
    codebook_size: K; picks the token dtype and bounds the ids.
    image_size: S, for a record source.
    batch_size: images per encoder call, for a record source.
    encode_text: list of str -> (b, L, D) features, called with fixed-size chunks
      of all captions (padded with ""); None to store no features.
    max_captions: keep at most this many captions per image (None: all).
    description: where the data came from, stored in the metadata.
    overwrite: replace an existing cache.
    num_threads: grain reader threads for a record source.

  Returns:
    The metadata written to ``metadata.json``.
  """
  out = pathlib.Path(out_dir)
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
  tmp.mkdir()
  try:
    batches = _input_batches(data, image_size, batch_size, num_threads)
    facts = _write_records(tmp / RECORDS, batches, encode_images, encode_text, codebook_size,
                           max_captions)
    if not facts["num_records"]:
      raise ValueError("no records to encode")
    metadata = _metadata(facts, codebook_size, max_captions, description)
    with open(tmp / METADATA, "w") as f:
      json.dump(metadata, f, indent=2)
      f.flush()
      os.fsync(f.fileno())
    _install(tmp, out, overwrite)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)
  return metadata


def _read_metadata(root: pathlib.Path) -> dict:
  if not root.is_dir():
    raise FileNotFoundError(f"no token cache at {root}; build one with build_token_cache")
  path = root / METADATA
  if not path.is_file():
    raise ValueError(f"token cache {root} is incomplete: {METADATA} is missing (the build did "
                     "not finish); rebuild it")
  try:
    metadata = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"token cache {root}: {METADATA} is corrupt ({e}); rebuild it") from None
  if metadata.get("format") != FORMAT or metadata.get("version") != VERSION:
    raise ValueError(f"{root} is not a version-{VERSION} token cache: format "
                     f"{metadata.get('format')!r}, version {metadata.get('version')!r}")
  return metadata


class TokenCacheSource:
  """A built token cache as a random-access source (``len``, ``[i]``).

  Items are ``{"tokens": (N,) int16 or int32, "captions": list[str]}`` plus
  ``"text_features"`` float16 (C, L, D) when the cache has them.
  """

  def __init__(self, path: str | os.PathLike):
    """Opens the cache; raises a clear error when it is missing, incomplete or corrupt.

    Args:
      path: the cache directory.
    """
    self.path = pathlib.Path(path)
    self.metadata = _read_metadata(self.path)
    files = [self.path / name for name in self.metadata["files"]]
    for f in files:
      if not f.is_file():
        raise ValueError(f"token cache {self.path} is incomplete: {f.name} is missing")
    try:
      self._records = grain.sources.ArrayRecordDataSource([str(f) for f in files])
      count = len(self._records)
    except RuntimeError as e:
      raise ValueError(f"token cache {self.path} is corrupt or truncated: {e}") from None
    if count != self.metadata["num_records"]:
      raise ValueError(f"token cache {self.path} is truncated: {count} records, metadata "
                       f"says {self.metadata['num_records']}")

  def __len__(self) -> int:
    return self.metadata["num_records"]

  def __getitem__(self, index: int) -> dict:
    try:
      return decode_record(self._records[index])
    except (ValueError, OSError, RuntimeError, KeyError, zipfile.BadZipFile) as e:
      raise ValueError(f"token cache {self.path}: record {index} is corrupt ({e})") from None

  def __repr__(self) -> str:
    return f"TokenCacheSource({str(self.path)!r}, num_records={len(self)})"


def _token_example(record: dict, rng: np.random.Generator, caption_dropout: float,
                   feature_shape: Sequence[int] | None) -> dict:
  k, caption, drop = loader.pick_caption(record["captions"], rng, caption_dropout)
  out = {"tokens": record["tokens"].astype(np.int32), "captions": caption, "drop_text": drop}
  if "label" in record:
    out["label"] = np.int32(record["label"])
  if feature_shape is not None:
    feats = record.get("text_features")
    out["text_features"] = (feats[k].astype(np.float32) if feats is not None and len(feats)
                            else np.zeros(feature_shape, np.float32))
  return out


def token_batches(cache: TokenCacheSource | loader.MemoizedSource | str | os.PathLike, *,
                  batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  tokenize: loader.Tokenize | None = None, caption_dropout: float = 0.1,
                  text_features: bool = True, num_epochs: int | None = None,
                  drop_remainder: bool = True, num_threads: int = 0) -> grain.DatasetIterator:
  """Training batches from a token cache, with the guarantees of ``loader.image_batches``.

  Same order, sharding, resumable state, and per-record draws: for a cache built
  from a source, the captions and dropout flags equal those that
  ``image_batches`` gives for the source with the same seed.

  Args:
    cache: a ``TokenCacheSource`` (or one wrapped in ``loader.MemoizedSource``) or
      its directory.
    batch_size: this host's batch, ``loader.per_host_batch(global_batch, process_count)``.
    seed: non-negative seed.
    process_index, process_count: this host and the number of hosts.
    tokenize: list of str -> (b, L) ids; None for no ``text_ids``.
    caption_dropout: probability of ``drop_text``.
    text_features: yield the cached features of the chosen caption, when cached.
    num_epochs: passes over the data; None repeats forever.
    drop_remainder: drop a last partial batch of a finite stream.
    num_threads: grain reader threads.

  Returns:
    A grain iterator of dicts: ``tokens`` int32 (b, N); ``captions`` str (b,);
    ``drop_text`` bool (b,); ``text_ids`` int32 (b, L) with ``tokenize``;
    ``text_features`` float32 (b, L, D) when cached and wanted (zeros for an
    image without captions); ``label`` int32 (b,) when cached (``drop_text``
    then marks the rows trained on the null class).
  """
  source = TokenCacheSource(cache) if isinstance(cache, str | os.PathLike) else cache
  spec = source.metadata["text_features"]
  feature_shape = spec["shape"] if (spec and text_features) else None

  def example(epoch: int, index: int) -> dict:
    return _token_example(source[index], loader.record_rng(seed, epoch, index),
                          caption_dropout, feature_shape)

  return loader.sharded_batches(
      len(source), example, batch_size=batch_size, seed=seed, process_index=process_index,
      process_count=process_count, finalize=lambda b: loader.tokenize_batch(b, tokenize),
      num_epochs=num_epochs, drop_remainder=drop_remainder, num_threads=num_threads)
