"""Encode a dataset once to VQ tokens (and text features) in an ArrayRecord cache.

The denoiser trainer then reads tokens, never images, and never runs the VQ
encoder (nor, with cached features, the frozen text encoder). A cache is a
directory::

  records-00000-of-00002.array_record   one shard per process, records in source order
  records-00000-of-00002.json           the shard's counts (read once, when the cache is made)
  metadata.json                         written last: grid, codebook size, counts, shards,
                                        the labels' [min, max] (``label_range``, None
                                        without), source

Process ``p`` of ``P`` encodes the contiguous range ``shard_range(n, p, P)`` of
the source and writes its shard; after a barrier process 0 writes the metadata,
so ``TokenCacheSource`` presents the shards in order as one source of ``n``
records, the same record for record whatever the number of processes.

Each record is an ``.npz`` (no pickle) with ``tokens`` (h * w,)
int16 when the codebook has at most 2**15 entries, else int32; ``captions``, all
captions of the image as UTF-8 bytes; and, when a text encoder was given,
``text_features`` (C, L, D) float16 (or the build's ``feature_dtype``), one row
per caption, or one row holding the empty caption's features for an image
without captions (the caption the batch streams then pick). Features of every
caption are kept so that training still draws a fresh caption each epoch (the
same draw as ``loader.image_batches``); the price is C * L * D * 2 bytes per
image (about 400 KB for 5 CLIP captions of 77 x 512), which ``max_captions``
bounds. The metadata names the text encoder that made the features
(``text_encoder_identity``), so a run can tell a cache made with another one.
A record of a class-labelled source (``image_folders``) also holds its
``label``, an int64 scalar.

The cache is built in a sibling staging directory, each file under a
temporary name renamed when complete, and the directory is renamed into place
at the end, so a crash leaves no directory that looks complete, and the next
build first removes what a killed one left beside the cache (with a warning
naming it: ``remove_leftover_builds``). ``TokenCacheSource`` refuses a
directory without ``metadata.json``, with a shard missing, or whose record
counts disagree with it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import logging
from array_record.python import array_record_module
from etils import epath

from vqdiffusion_jax import hosts, outputs
from vqdiffusion_jax.data import loader

FORMAT = "vqdiffusion_jax.token_cache"
VERSION = 2
METADATA = "metadata.json"
_WRITER_OPTIONS = "group_size:1"  # One record per chunk: cheap random access.

EncodeImages = Callable[[np.ndarray], np.ndarray]
EncodeText = Callable[[list[str]], np.ndarray]
Barrier = Callable[[str], None]


def shard_name(process_index: int, process_count: int) -> str:
  """The records file of one process's shard."""
  return f"records-{process_index:05d}-of-{process_count:05d}.array_record"


def shard_range(num_records: int, process_index: int, process_count: int) -> tuple[int, int]:
  """The contiguous ``[start, stop)`` of the source that one process encodes.

  Args:
    num_records: records in the source.
    process_index, process_count: this process and the number of processes.

  Returns:
    Ranges that tile ``[0, num_records)`` in process order, sizes differing by at most 1.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  return (process_index * num_records // process_count,
          (process_index + 1) * num_records // process_count)


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


def params_fingerprint(params: Any) -> str:
  """A sha256 of a params tree: every leaf's path, dtype, shape and bytes.

  Args:
    params: a pytree of arrays (host or device).

  Returns:
    A hex digest that changes when any weight does.
  """
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    value = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}|".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def text_encoder_identity(kind: str, path: str, params: Any, **settings: Any) -> dict:
  """What names a text encoder in a cache's metadata (compared, never interpreted).

  Args:
    kind: the encoder's kind, e.g. "clip".
    path: where its weights were read.
    params: its params, fingerprinted.
    **settings: JSON values that change its features (e.g. text length, width).

  Returns:
    A JSON-able dict.
  """
  return {"kind": kind, "path": str(path), "fingerprint": params_fingerprint(params),
          **settings}


def encode_record(tokens: np.ndarray, captions: Sequence[str],
                  text_features: np.ndarray | None = None,
                  feature_dtype: str = "float16", label: int | None = None) -> bytes:
  """Serializes one cache record.

  Args:
    tokens: (N,) token ids, already in the cache's dtype.
    captions: all captions of the image.
    text_features: (C, L, D) features, one per caption (one, of "", without captions), or None.
    feature_dtype: the stored features' dtype.
    label: the image's class label, or None.

  Returns:
    The record's bytes.
  """
  arrays = {"tokens": np.asarray(tokens),
            "captions": np.asarray([c.encode("utf-8") for c in captions], dtype=np.bytes_)}
  if text_features is not None:
    arrays["text_features"] = np.asarray(text_features, feature_dtype)
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


class _Range(Sequence):
  """Records ``[start, stop)`` of a random-access source."""

  def __init__(self, source: Any, start: int, stop: int):
    self.source, self.start, self.stop = source, start, stop

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, index: int) -> Any:
    if not 0 <= index < len(self):
      raise IndexError(index)
    return self.source[self.start + index]


def _input_batches(data: Any, image_size: int | None, batch_size: int, num_threads: int,
                   process_index: int, process_count: int,
                   ) -> Iterator[tuple[np.ndarray, list[list[str]], np.ndarray | None]]:
  """(images float32 (b, S, S, 3), captions per image, labels (b,) or None) of this range."""
  if _is_source(data):
    if image_size is None:
      raise ValueError("image_size is needed to encode a record source")
    if len(data) and np.ndim(data[0]["image"]) > 3:
      raise TypeError("the data looks like a list of batches; pass iter(batches) instead")
    part = _Range(data, *shard_range(len(data), process_index, process_count))
    for batch in loader.sequential_batches(part, image_size=image_size, batch_size=batch_size,
                                             num_threads=num_threads):
      yield batch["image"], batch["captions"], batch.get("label")
    return
  if process_count != 1:
    raise ValueError("an iterable of batches can only be encoded by one process; pass a "
                     "random-access source to share the work")
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


def _encode_captions(encode_text: EncodeText, captions: list[list[str]], chunk: int,
                     dtype: str) -> list[np.ndarray]:
  """Per image, (C, L, D) in ``dtype``: all captions encoded in fixed chunks, padded with "".

  An image without captions gets the features of "" (the caption it is trained with).
  """
  texts = [caps or [""] for caps in captions]
  flat = [c for caps in texts for c in caps]
  feats = []
  for start in range(0, len(flat), chunk):
    part = flat[start:start + chunk]
    out = np.asarray(encode_text(part + [""] * (chunk - len(part))))
    if out.ndim != 3 or out.shape[0] != chunk:
      raise ValueError(f"encode_text must return (b, L, D), got {out.shape} for {chunk} texts")
    feats.append(out[:len(part)].astype(dtype))
  flat_feats = np.concatenate(feats)
  bounds = np.cumsum([0] + [len(caps) for caps in texts])
  return [flat_feats[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _write_records(path: epath.Path, batches: Iterable[tuple],
                   encode_images: EncodeImages, encode_text: EncodeText | None,
                   codebook_size: int, max_captions: int | None, pad_to: int | None,
                   feature_dtype: str) -> dict:
  """Writes every record of a shard; returns the facts that go into the metadata."""
  writer = array_record_module.ArrayRecordWriter(os.fspath(path), _WRITER_OPTIONS)
  dtype = token_dtype(codebook_size)
  facts = {"num_records": 0, "grid": None, "feature_shape": None, "image_size": None,
           "caption_counts": [], "label_range": None}
  try:
    for images, captions, labels in batches:
      pad_to = pad_to or len(images)
      captions = [caps[:max_captions] for caps in captions]
      tokens = _encode_tokens(encode_images, images, pad_to, codebook_size)
      if facts["grid"] not in (None, list(tokens.shape[1:])):
        raise ValueError(f"token grid changed from {facts['grid']} to {tokens.shape[1:]}")
      facts["grid"], facts["image_size"] = list(tokens.shape[1:]), int(images.shape[1])
      feats = (_encode_captions(encode_text, captions, pad_to, feature_dtype) if encode_text
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
        writer.write(encode_record(tok.reshape(-1).astype(dtype), caps, feat, feature_dtype,
                                   label))
        facts["caption_counts"].append(len(caps))
      facts["num_records"] += len(images)
  finally:
    writer.close()
  return facts


def write_shard(data: Any, encode_images: EncodeImages, staging_dir: str | os.PathLike, *,
                codebook_size: int, process_index: int = 0, process_count: int = 1,
                image_size: int | None = None, batch_size: int = 64,
                encode_text: EncodeText | None = None, max_captions: int | None = None,
                feature_dtype: str = "float16", num_threads: int = 0) -> dict:
  """Encodes one process's range of the data into its shard of a cache being built.

  The records file and its facts (``.json``) appear under their final names
  only when complete. Arguments as for ``build_token_cache``.

  Returns:
    The shard's facts: record count, grid, feature shape, image size, caption counts.
  """
  staging = epath.Path(staging_dir)
  records = staging / shard_name(process_index, process_count)
  tmp = records.with_name(f".{records.name}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    batches = _input_batches(data, image_size, batch_size, num_threads, process_index,
                             process_count)
    facts = _write_records(tmp, batches, encode_images, encode_text, codebook_size,
                           max_captions, batch_size if _is_source(data) else None,
                           feature_dtype)
    tmp.rename(records)
  finally:
    if tmp.exists():
      tmp.unlink()
  outputs.write_text(records.with_suffix(".json"), json.dumps(facts))
  return facts


def _merge_facts(staging: epath.Path, process_count: int) -> list[dict]:
  shards = []
  for p in range(process_count):
    path = (staging / shard_name(p, process_count)).with_suffix(".json")
    if not path.exists():
      raise ValueError(f"token cache shard {p} of {process_count} is missing ({path}): its "
                       "process did not finish")
    shards.append(outputs.read_json(path, remedy="build the cache again"))
  grids = {tuple(s["grid"]) for s in shards if s["num_records"]}
  features = {tuple(s["feature_shape"] or ()) for s in shards if s["num_records"]}
  if len(grids) > 1 or len(features) > 1:
    raise ValueError(f"token cache shards disagree: grids {sorted(grids)}, feature shapes "
                     f"{sorted(features)}")
  return shards


def _label_range(shards: list[dict]) -> list[int] | None:
  """[min, max] of every shard's labels; None when the records carry none."""
  ranges = [s["label_range"] for s in shards if s.get("label_range")]
  return [min(r[0] for r in ranges), max(r[1] for r in ranges)] if ranges else None


def _metadata(shards: list[dict], codebook_size: int, max_captions: int | None,
              description: str, feature_dtype: str, text_encoder: dict | None) -> dict:
  filled = [s for s in shards if s["num_records"]]
  if not filled:
    raise ValueError("no records to encode")
  first = filled[0]
  counts = [c for s in shards for c in s["caption_counts"]]
  h, w = first["grid"]
  features = None
  if first["feature_shape"] is not None:
    features = {"shape": first["feature_shape"], "dtype": feature_dtype,
                "encoder": text_encoder}
  return {
      "format": FORMAT, "version": VERSION, "num_records": sum(s["num_records"] for s in shards),
      "token_grid": [h, w], "num_tokens": h * w, "codebook_size": codebook_size,
      "token_dtype": token_dtype(codebook_size).name, "image_size": first["image_size"],
      "text_features": features, "max_captions": max_captions,
      "captions_per_record": [min(counts), max(counts)], "source": description,
      "files": [shard_name(p, len(shards)) for p in range(len(shards))],
      "shard_records": [s["num_records"] for s in shards],
      "label_range": _label_range(shards),
  }


def finish_cache(staging_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                 process_count: int, codebook_size: int, max_captions: int | None = None,
                 description: str = "", feature_dtype: str = "float16",
                 text_encoder: dict | None = None, overwrite: bool = False) -> dict:
  """Writes the metadata of a staged cache whose shards are all written, and installs it.

  Returns:
    The metadata written to ``metadata.json``.
  """
  staging, out = epath.Path(staging_dir), epath.Path(out_dir)
  shards = _merge_facts(staging, process_count)
  metadata = _metadata(shards, codebook_size, max_captions, description, feature_dtype,
                       text_encoder)
  for p in range(process_count):
    (staging / shard_name(p, process_count)).with_suffix(".json").unlink()
  outputs.write_text(staging / METADATA, json.dumps(metadata, indent=2))
  _install(staging, out, overwrite)
  return metadata


def _install(staging: epath.Path, out: epath.Path, overwrite: bool) -> None:
  """Renames the finished staging directory into place."""
  old = None
  if out.exists():
    if not overwrite:
      raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    out.rename(old)
  staging.rename(out)
  if old is not None:
    old.rmtree()


def staging_dir(out_dir: str | os.PathLike) -> epath.Path:
  """Where a cache is built before it is renamed to ``out_dir`` (shared by all processes)."""
  out = epath.Path(out_dir)
  return out.with_name(f".{out.name}{_STAGING_SUFFIX}")


# The temporary siblings of a cache ``NAME``: its staging directory, and (by prefix) an
# old cache renamed aside while the new one is installed, or a temporary copy.
_STAGING_SUFFIX = ".building"
_LEFTOVER_PREFIXES = (".old-", ".tmp-")


def leftover_builds(out_dir: str | os.PathLike) -> list[epath.Path]:
  """The temporary siblings of ``out_dir`` that builds killed before their end left."""
  out = epath.Path(out_dir)
  if not out.parent.is_dir():
    return []
  staging = staging_dir(out).name
  prefixes = tuple(f".{out.name}{prefix}" for prefix in _LEFTOVER_PREFIXES)
  return sorted(p for p in out.parent.iterdir()
                if p.name == staging or p.name.startswith(prefixes))


def remove_leftover_builds(out_dir: str | os.PathLike) -> list[epath.Path]:
  """Removes ``leftover_builds(out_dir)``, with a warning naming them; returns them.

  Called by the one process that builds, before it starts: nothing else builds
  this cache then, so whatever is there is a dead build's.
  """
  leftovers = leftover_builds(out_dir)
  for path in leftovers:
    if path.is_dir():
      path.rmtree()
    else:
      path.unlink()
  if leftovers:
    logging.warning("Removed what token cache builds that did not finish left: %s",
                    ", ".join(os.fspath(p) for p in leftovers))
  return leftovers


def build_token_cache(data: Any, encode_images: EncodeImages, out_dir: str | os.PathLike, *,
                      codebook_size: int, image_size: int | None = None, batch_size: int = 64,
                      encode_text: EncodeText | None = None, max_captions: int | None = None,
                      description: str = "", overwrite: bool = False,
                      num_threads: int = 0, feature_dtype: str = "float16",
                      text_encoder: dict | None = None, process_index: int | None = None,
                      process_count: int | None = None, barrier: Barrier = hosts.barrier) -> dict:
  """Encodes a dataset once into a token cache at ``out_dir``, each process its share.

  Every process calls this with the same arguments: each encodes its range
  (``shard_range``) into its shard; after a barrier process 0 writes the
  metadata and renames the staging directory into place; after another, every
  process returns the metadata.

  Args:
    data: a random-access source of records (as for ``loader.image_batches``),
      read in order with center crops at ``image_size``; or, for one process, an
      iterable (not a sequence) of batches ``{"image": float32 (b, S, S, 3) in
      [-1, 1], "captions": b strs or lists of str}``.
    encode_images: float32 (b, S, S, 3) -> (b, h, w) integer ids, process-local.
      Always called with ``batch_size`` images for a source (the first batch's
      size for batches; the last batch is padded), so a jitted encoder compiles once.
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
    feature_dtype: the stored features' dtype.
    text_encoder: what made the features (``text_encoder_identity``), stored in the metadata.
    process_index, process_count: this process and their number (default: JAX's).
    barrier: ``barrier(name)`` returns once every process has called it; used
      only with more than one process.

  Returns:
    The metadata written to ``metadata.json``.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  out = epath.Path(out_dir)
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
  staging = staging_dir(out)
  sync = barrier if process_count > 1 else (lambda name: None)
  if process_index == 0:
    remove_leftover_builds(out)
    staging.mkdir(parents=True)
  sync("token_cache_staged")
  try:
    write_shard(data, encode_images, staging, codebook_size=codebook_size,
                process_index=process_index, process_count=process_count,
                image_size=image_size, batch_size=batch_size, encode_text=encode_text,
                max_captions=max_captions, feature_dtype=feature_dtype, num_threads=num_threads)
    sync("token_cache_shards_written")
    if process_index == 0:
      finish_cache(staging, out, process_count=process_count, codebook_size=codebook_size,
                   max_captions=max_captions, description=description,
                   feature_dtype=feature_dtype, text_encoder=text_encoder, overwrite=overwrite)
  finally:
    if process_index == 0 and staging.exists():
      staging.rmtree()
  sync("token_cache_installed")
  return _read_metadata(out)


def _read_metadata(root: epath.Path) -> dict:
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
  ``"text_features"`` (C, L, D) when the cache has them; record ``i`` is the
  source's record ``i``, whichever shard holds it.
  """

  def __init__(self, path: str | os.PathLike):
    """Opens the cache; raises a clear error when it is missing, incomplete or corrupt.

    Args:
      path: the cache directory.
    """
    self.path = epath.Path(path)
    self.metadata = _read_metadata(self.path)
    files = [self.path / name for name in self.metadata["files"]]
    for f in files:
      if not f.is_file():
        raise ValueError(f"token cache {self.path} is incomplete: {f.name} is missing")
    try:
      self._records = grain.sources.ArrayRecordDataSource([os.fspath(f) for f in files])
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
    if feats is None or len(feats) <= k or tuple(feats.shape[1:]) != tuple(feature_shape):
      raise ValueError(f"a token cache record lacks the features of caption {k}")
    out["text_features"] = feats[k].astype(np.float32)
  return out


def token_batches(cache: TokenCacheSource | loader.MemoizedSource | str | os.PathLike, *,
                  batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  tokenize: loader.Tokenize | None = None, caption_dropout: float = 0.1,
                  text_features: bool = True, features_key: str = "text_features",
                  num_epochs: int | None = None, drop_remainder: bool = True,
                  num_threads: int = 0) -> grain.DatasetIterator:
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
    features_key: the batch key of those features (the denoiser step reads "text").
    num_epochs: passes over the data; None repeats forever.
    drop_remainder: drop a last partial batch of a finite stream.
    num_threads: grain reader threads.

  Returns:
    A grain iterator of dicts: ``tokens`` int32 (b, N); ``captions`` str (b,);
    ``drop_text`` bool (b,); ``text_ids`` int32 (b, L) with ``tokenize``;
    ``features_key`` float32 (b, L, D) when cached and wanted (those of "" for
    an image without captions); ``label`` int32 (b,) when cached (``drop_text``
    then marks the rows trained on the null class).
  """
  source = TokenCacheSource(cache) if isinstance(cache, str | os.PathLike) else cache
  spec = source.metadata["text_features"]
  feature_shape = spec["shape"] if (spec and text_features) else None

  def example(epoch: int, index: int) -> dict:
    out = _token_example(source[index], loader.record_rng(seed, epoch, index),
                         caption_dropout, feature_shape)
    if "text_features" in out:
      out[features_key] = out.pop("text_features")
    return out

  return loader.sharded_batches(
      len(source), example, batch_size=batch_size, seed=seed, process_index=process_index,
      process_count=process_count, finalize=lambda b: loader.tokenize_batch(b, tokenize),
      num_epochs=num_epochs, drop_remainder=drop_remainder, num_threads=num_threads)
