"""Training batches from grain: per-host, deterministic, resumable, of images and captions.

Order. The stream is a sequence of (epoch, record) pairs: epoch ``e`` is a
permutation of all records, drawn by grain's index shuffle with the seed
``derive(seed) + e``, so every epoch is reshuffled. Batches run across epoch
boundaries; only the end of a finite stream is trimmed.

Sharding. Every host builds the same global stream and cuts it into global
batches of ``G = batch_size * process_count`` positions; host ``h``'s ``k``-th
batch is block ``h`` of global batch ``k``, positions ``[k * G + h * batch_size,
k * G + (h + 1) * batch_size)`` (``HostPositions``). Laid out host after host
(``jax.make_array_from_process_local_data`` on a mesh whose batch rows go
process by process), the hosts' batches at one step are exactly the batch one
host reading ``G`` would have, in the same order, so a run trains the same on
any number of hosts. An epoch is covered once when its length is a multiple of
``G``; of a last, partial global batch every host reads the same number of
positions, so that every host makes the same number of steps.

Randomness. Caption choice, caption dropout, crop and flip come from a NumPy
generator seeded by ``(seed, epoch, record index)``, never from shared state, so
they do not depend on threads, timing or where a run was resumed. The caption
and dropout draws come first and are the same in ``token_cache.token_batches``,
so a token cache built from a dataset sees the same captions as the images.

Resuming. The returned grain iterator's ``get_state()`` is a small dict (the
number of examples consumed); ``set_state`` on a fresh iterator built with the
same arguments continues exactly. The same ``process_count`` and batch size are
needed for that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

Record = Mapping[str, Any]
ExampleFn = Callable[[Record, np.random.Generator], dict]
Tokenize = Callable[[list[str]], np.ndarray]

_SHUFFLE_TAG = 0x5EED


def per_host_batch(global_batch: int, process_count: int) -> int:
  """The batch each host reads.

  Args:
    global_batch: examples per step over all hosts.
    process_count: number of hosts (``jax.process_count()``).

  Returns:
    ``global_batch // process_count``.

  Raises:
    ValueError: when the global batch is not a positive multiple of the host count.
  """
  if process_count < 1:
    raise ValueError(f"process_count must be >= 1, got {process_count}")
  if global_batch < 1 or global_batch % process_count:
    raise ValueError(
        f"global batch {global_batch} is not a positive multiple of the {process_count} "
        "hosts; pick a global batch divisible by jax.process_count()")
  return global_batch // process_count


def record_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The generator for one record in one epoch: independent of order and timing.

  Args:
    seed: the stream's seed (non-negative).
    epoch: 0-based pass over the data.
    index: the record's index in the source.

  Returns:
    A NumPy generator seeded by ``(seed, epoch, index)``.
  """
  return np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))


def decode_captions(value: Any) -> list[str]:
  """Captions as a list of str, from str, bytes, or a sequence / array of them.

  Args:
    value: a record's captions, or None.

  Returns:
    The captions, empty when there are none.
  """
  if value is None:
    return []
  if isinstance(value, (str, bytes, np.str_, np.bytes_)):
    value = [value]
  return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value]


def pick_caption(captions: Sequence[str], rng: np.random.Generator,
                 caption_dropout: float) -> tuple[int, str, bool]:
  """Chooses one caption and whether it is dropped for classifier-free guidance.

  Always makes the same two draws, so later draws (crop, flip) line up.

  Args:
    captions: the record's captions (may be empty: the caption is then "").
    rng: the record's generator.
    caption_dropout: probability that ``drop`` is True.

  Returns:
    ``(index, caption, drop)``.
  """
  k = int(rng.integers(max(len(captions), 1)))
  drop = bool(rng.random() < caption_dropout)
  return k, (captions[k] if captions else ""), drop


def _as_rgb(image: np.ndarray) -> Image.Image:
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image, got {image.dtype}")
  return Image.fromarray(image).convert("RGB")


def resize_and_crop(image: np.ndarray, image_size: int,
                    rng: np.random.Generator | None = None) -> np.ndarray:
  """Resizes the shorter side to ``image_size`` (bicubic, antialiased), then crops a square.

  Args:
    image: uint8 (H, W, 3), (H, W, 1) or (H, W).
    image_size: output side S.
    rng: None for a center crop; otherwise the crop's offset along the longer side
      is drawn from it (one uniform draw).

  Returns:
    uint8 (S, S, 3); ``image`` itself when it is that already.
  """
  if image.shape == (image_size, image_size, 3) and image.dtype == np.uint8:
    if rng is not None:
      rng.random()  # the crop's draw, so that later draws from ``rng`` stay the same
    return image
  pil = _as_rgb(image)
  w, h = pil.size
  scale = image_size / min(w, h)
  new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
  if (new_w, new_h) != (w, h):
    pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
  frac = 0.5 if rng is None else float(rng.random())
  left = int(round(frac * (new_w - image_size)))
  top = int(round(frac * (new_h - image_size)))
  return np.asarray(pil.crop((left, top, left + image_size, top + image_size)))


class MemoizedSource(Sequence):
  """A random-access source that keeps every record it has decoded, for small datasets.

  The first read of a record goes to the wrapped source; later reads return
  the same decoded dict, so from the second epoch on no PNG or npz is decoded
  again. Records are shared, so callers must not modify them (the batch streams
  here copy what they change). Attributes other than ``len`` and ``[]`` (e.g.
  a token cache's ``metadata``) are those of the wrapped source.
  """

  def __init__(self, source: Sequence[Record]):
    """Wraps ``source``; nothing is read until a record is asked for.

    Args:
      source: a random-access source (``len``, ``[i]``).
    """
    self.source = source
    self._records: list[Record | None] = [None] * len(source)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> Record:
    record = self._records[index]
    if record is None:
      record = self._records[index] = self.source[index]
    return record

  def __getattr__(self, name: str) -> Any:
    if name == "source":  # Not yet set: unpickling or a failed __init__.
      raise AttributeError(name)
    return getattr(self.source, name)

  def __repr__(self) -> str:
    return f"MemoizedSource({self.source!r})"


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] to float32 [-1, 1]."""
  return image.astype(np.float32) / 127.5 - 1.0


def _image_example(record: Record, rng: np.random.Generator, *, image_size: int,
                   caption_dropout: float, random_crop: bool, random_flip: bool) -> dict:
  _, caption, drop = pick_caption(decode_captions(record.get("captions")), rng, caption_dropout)
  image = resize_and_crop(record["image"], image_size, rng if random_crop else None)
  if random_flip and rng.random() < 0.5:
    image = image[:, ::-1]
  out = {"image": to_float(image), "captions": caption, "drop_text": drop}
  if "label" in record:
    out["label"] = np.int32(record["label"])
  return out


def stack_examples(examples: Sequence[dict]) -> dict:
  """Stacks per-example dicts into a batch of NumPy arrays (captions: a str array).

  Args:
    examples: dicts with the same keys.

  Returns:
    One dict of arrays with a leading batch axis.
  """
  return {k: np.asarray([e[k] for e in examples]) for k in examples[0]}


def tokenize_batch(batch: dict, tokenize: Tokenize | None) -> dict:
  """Adds ``text_ids`` int32 (b, L) for the chosen captions (dropped ones included).

  Args:
    batch: a stacked batch with ``captions``.
    tokenize: list of str -> (b, L) ints, or None to leave the batch as it is.

  Returns:
    The batch, with ``text_ids`` when ``tokenize`` is given.
  """
  if tokenize is None:
    return batch
  ids = np.asarray(tokenize([str(c) for c in batch["captions"]]))
  if ids.ndim != 2 or ids.shape[0] != len(batch["captions"]):
    raise ValueError(f"tokenize returned shape {ids.shape} for {len(batch['captions'])} captions")
  return {**batch, "text_ids": ids.astype(np.int32)}


def _shuffle_seed(seed: int) -> int:
  return int(np.random.SeedSequence([seed, _SHUFFLE_TAG]).generate_state(1)[0])


def global_order(num_records: int, *, seed: int, num_epochs: int | None) -> grain.MapDataset:
  """The global stream of ``(epoch, record_index)`` pairs, every epoch reshuffled.

  Args:
    num_records: records in the source.
    seed: non-negative seed.
    num_epochs: passes over the data; None repeats forever.

  Returns:
    A MapDataset of (epoch, index) tuples, identical on every host.
  """
  if num_records < 1:
    raise ValueError("the data source is empty")
  if seed < 0:
    raise ValueError(f"seed must be non-negative, got {seed}")
  order = grain.MapDataset.range(num_records).shuffle(seed=_shuffle_seed(seed))
  order = order.repeat(num_epochs)
  return order.map_with_index(lambda p, i: (p // num_records, int(i)))


@dataclasses.dataclass(frozen=True)
class HostPositions:
  """Which positions of the global stream one host reads, in its order.

  Global batch ``k`` is positions ``[k * G, (k + 1) * G)`` with ``G = batch_size
  * process_count``; host ``h`` reads its block ``[k * G + h * b, k * G + (h + 1)
  * b)``. Of a last, partial global batch of ``r`` positions each host reads the
  block of ``r // process_count`` at the same offset.
  """

  length: int
  batch_size: int
  process_index: int
  process_count: int
  last_block: int

  def __call__(self, i: int) -> int:
    batch, offset = divmod(int(i), self.batch_size)
    size = self.batch_size * self.process_count
    full = (self.length - self.last_block) // self.batch_size
    if batch < full:
      return batch * size + self.process_index * self.batch_size + offset
    return full * size + self.process_index * self.last_block + (int(i) - full * self.batch_size)


def host_positions(num_positions: int, batch_size: int, process_index: int,
                   process_count: int) -> HostPositions:
  """This host's share of a stream of ``num_positions`` (see ``HostPositions``)."""
  size = batch_size * process_count
  full, rest = divmod(num_positions, size)
  last_block = rest // process_count
  return HostPositions(length=full * batch_size + last_block, batch_size=batch_size,
                       process_index=process_index, process_count=process_count,
                       last_block=last_block)


def sharded_batches(num_records: int, example_fn: Callable[[int, int], dict], *,
                    batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
                    finalize: Callable[[dict], dict] | None = None,
                    num_epochs: int | None = None, drop_remainder: bool = True,
                    num_threads: int = 0, prefetch: int = 0) -> grain.DatasetIterator:
  """This host's batches of the global stream; shared by the image and token streams.

  Args:
    num_records: records in the source.
    example_fn: ``(epoch, index) -> dict`` for one example; must be a pure function.
    batch_size: this host's batch (see ``per_host_batch``).
    seed: non-negative seed of the order and of every per-record draw.
    process_index, process_count: this host and the number of hosts.
    finalize: applied to each stacked batch (e.g. tokenization).
    num_epochs: passes over the data; None repeats forever.
    drop_remainder: drop a last partial batch of a finite stream.
    num_threads: grain reader threads (0: read in the caller's thread).
    prefetch: examples to read ahead with those threads (default ``2 * batch_size``).

  Returns:
    A grain iterator of dicts with ``get_state`` / ``set_state``.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  order = global_order(num_records, seed=seed, num_epochs=num_epochs)
  position = host_positions(len(order), batch_size, process_index, process_count)
  ds = grain.MapDataset.range(position.length).map(lambda i: example_fn(*order[position(i)]))
  if num_threads:
    options = grain.ReadOptions(num_threads=num_threads,
                                prefetch_buffer_size=prefetch or 2 * batch_size)
  else:
    options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  it_ds = ds.to_iter_dataset(options).batch(
      batch_size, drop_remainder=drop_remainder, batch_fn=stack_examples)
  if finalize is not None:
    it_ds = it_ds.map(finalize)
  return iter(it_ds)


def image_batches(source: Sequence[Record], *, image_size: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  tokenize: Tokenize | None = None, caption_dropout: float = 0.1,
                  random_flip: bool = False, random_crop: bool = False,
                  num_epochs: int | None = None, drop_remainder: bool = True,
                  num_threads: int = 0) -> grain.DatasetIterator:
  """Training batches of images and captions for this host.

  Images: shorter side resized to ``image_size`` (bicubic), then a center crop, or
  a random crop along the longer side with ``random_crop``; a horizontal flip with
  probability 1/2 with ``random_flip``. Flipping is off by default because it
  swaps left and right in the image but not in the caption ("a dog left of a
  cat"), which teaches the model wrong text-image pairs.

  Args:
    source: random-access records ``{"image": uint8 (H, W, 3), "captions": [...]}``
      (e.g. ``tfds_source``); an optional integer ``label`` is passed through.
    image_size: output side S.
    batch_size: this host's batch, ``per_host_batch(global_batch, process_count)``.
    seed: non-negative seed.
    process_index, process_count: this host and the number of hosts.
    tokenize: list of str -> (b, L) token ids; None for no ``text_ids``.
    caption_dropout: probability of ``drop_text`` (null text for guidance).
    random_flip, random_crop: augmentations, see above.
    num_epochs: passes over the data; None repeats forever.
    drop_remainder: drop a last partial batch of a finite stream.
    num_threads: grain reader threads (0: decode in the caller's thread).

  Returns:
    A grain iterator (``get_state`` / ``set_state``) of dicts: ``image`` float32
    (b, S, S, 3) in [-1, 1]; ``captions`` str (b,), the chosen captions, dropped or
    not; ``drop_text`` bool (b,); ``text_ids`` int32 (b, L) with ``tokenize``;
    ``label`` int32 (b,) when records have one.
  """
  def example(epoch: int, index: int) -> dict:
    return _image_example(source[index], record_rng(seed, epoch, index), image_size=image_size,
                          caption_dropout=caption_dropout, random_crop=random_crop,
                          random_flip=random_flip)

  return sharded_batches(
      len(source), example, batch_size=batch_size, seed=seed, process_index=process_index,
      process_count=process_count, finalize=lambda b: tokenize_batch(b, tokenize),
      num_epochs=num_epochs, drop_remainder=drop_remainder, num_threads=num_threads)


def sequential_batches(source: Sequence[Record], *, image_size: int, batch_size: int,
                       process_index: int = 0, process_count: int = 1,
                       num_threads: int = 0) -> Iterator[dict]:
  """One pass in source order, center crops, all captions: for encoding and evaluation.

  Host ``h`` reads records ``h, h + P, ...``; its last batch may be smaller.

  Args:
    source: random-access records as for ``image_batches``.
    image_size: output side S.
    batch_size: examples per batch.
    process_index, process_count: this host and the number of hosts.
    num_threads: grain reader threads (0: decode in the caller's thread).

  Returns:
    An iterator of dicts: ``image`` float32 (b, S, S, 3) in [-1, 1], ``captions`` a
    list of b lists of str, ``index`` int64 (b,) the records' indices, and
    ``label`` int64 (b,) when the records have one.
  """
  def example(index: int) -> dict:
    record = source[index]
    out = {"image": to_float(resize_and_crop(record["image"], image_size)),
           "captions": decode_captions(record.get("captions")), "index": index}
    if "label" in record:
      out["label"] = int(record["label"])
    return out

  def stack(examples: Sequence[dict]) -> dict:
    out = {"image": np.stack([e["image"] for e in examples]),
           "captions": [e["captions"] for e in examples],
           "index": np.asarray([e["index"] for e in examples], np.int64)}
    if "label" in examples[0]:
      out["label"] = np.asarray([e["label"] for e in examples], np.int64)
    return out

  ds = grain.MapDataset.range(process_index, len(source), process_count).map(example)
  ds = ds.batch(batch_size, drop_remainder=False, batch_fn=stack)
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
  return iter(ds.to_iter_dataset(options))
