"""A folder of captioned images as a TFDS dataset, and what every captioned builder shares.

The manual directory of ``CaptionedFolder`` holds the images, anywhere below
it, and ``captions.jsonl``, one JSON object a line naming an image by its path
relative to the directory::

  MANUAL_DIR/captions.jsonl
  MANUAL_DIR/cats/001.jpg
  MANUAL_DIR/cats/002.png

  {"file": "cats/001.jpg", "caption": "a cat on a mat"}
  {"file": "cats/002.png", "captions": ["a grey cat", "a cat asleep"], "split": "test"}

Lines naming the same file are merged, captions in file order, so a file with
one caption a line works too; blank lines are skipped and other fields are
ignored. An image's split is its ``split`` field where a line gives one;
otherwise the config decides: ``default`` puts it in ``train``, ``hash_split``
puts the files whose path hashes below ``test_fraction`` = 0.05 in ``test``
(``hash_split`` below; pass ``CaptionedFolderConfig(name=..., test_fraction=f)``
for another fraction). Only splits with at least one image are built.

Every captioned builder has the features ``image`` (uint8 HxWx3), ``captions``
(one or more strings, whitespace collapsed) and ``id`` (the image's name).
Images are stored as their own JPEG or PNG bytes when those decode to RGB;
grayscale, RGBA, palette, CMYK and other formats are converted to RGB with
PIL, as the official data code does when it loads them, and stored as PNG.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import json
import posixpath
import re
from collections.abc import Iterable, Iterator, Sequence

import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

CAPTIONS_FILE = "captions.jsonl"
_PASS_THROUGH_FORMATS = ("JPEG", "PNG")
_SPLIT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")


class ImageError(ValueError):
  """An image file that PIL cannot read."""


def captioned_features() -> tfds.features.FeaturesDict:
  """The features of every captioned dataset: image, captions, id."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "captions": tfds.features.Sequence(tfds.features.Text()),
      "id": tfds.features.Text(),
  })


def captioned_info(builder: tfds.core.DatasetBuilder, description: str, homepage: str = "",
                   metadata: bool = False) -> tfds.core.DatasetInfo:
  """The DatasetInfo of a captioned builder.

  Args:
    builder: the builder the info describes.
    description: what the dataset is.
    homepage: where it comes from.
    metadata: attach a ``tfds.core.MetadataDict`` (saved with the dataset) for
      counts the builder records while generating.

  Returns:
    A DatasetInfo with ``captioned_features()``.
  """
  return tfds.core.DatasetInfo(
      builder=builder, description=description, homepage=homepage or None,
      features=captioned_features(), metadata=tfds.core.MetadataDict() if metadata else None)


def manual_dir(dl_manager: tfds.download.DownloadManager) -> epath.Path:
  """The manual directory, or a FileNotFoundError naming it with the instructions.

  Args:
    dl_manager: the download manager handed to ``_split_generators``.

  Returns:
    The path of the manual directory, which exists and is not empty.
  """
  try:
    return dl_manager.manual_dir
  except AssertionError as e:  # TFDS signals a missing or empty manual dir this way.
    raise FileNotFoundError(str(e)) from None


def rgb_image_bytes(path: epath.PathLike) -> bytes:
  """An image file as bytes that decode to RGB, re-encoded only when needed.

  Args:
    path: the image file.

  Returns:
    The file's own bytes when it is an RGB JPEG or PNG; otherwise the image
    converted to RGB by PIL (alpha dropped, gray replicated) as PNG bytes.

  Raises:
    FileNotFoundError: no such file.
    ImageError: PIL cannot decode it.
  """
  data = epath.Path(path).read_bytes()
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.format in _PASS_THROUGH_FORMATS and image.mode == "RGB":
        return data
      rgb = image.convert("RGB")
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ImageError(f"{path}: not a readable image ({e})") from e
  buffer = io.BytesIO()
  rgb.save(buffer, format="PNG")
  return buffer.getvalue()


def clean_caption(caption: str) -> str:
  """A caption with its whitespace runs collapsed to single spaces, stripped."""
  return " ".join(caption.split())


def clean_captions(captions: Iterable[str]) -> list[str]:
  """The cleaned non-empty captions of an image, in order.

  Args:
    captions: raw captions (text-file lines, annotation strings).

  Returns:
    ``clean_caption`` of each, empty ones dropped.
  """
  return [c for c in map(clean_caption, captions) if c]


def hash_split(key: str, test_fraction: float) -> str:
  """``"test"`` for a fixed pseudo-random ``test_fraction`` of keys, else ``"train"``.

  Args:
    key: a stable name of the example (here, its file path).
    test_fraction: the fraction of keys, in [0, 1], to put in ``test``.

  Returns:
    ``"test"`` when the first 8 bytes of SHA-256(key), as a fraction of
    2**64, fall below ``test_fraction``; ``"train"`` otherwise. The choice
    depends on the key alone, so adding images never moves others.
  """
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return "test" if int.from_bytes(digest[:8], "big") < test_fraction * 2.0**64 else "train"


class CaptionedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the captioned builders: TFDS finds their code without ``importlib_resources``."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup imports the `importlib_resources` backport, which
    # tensorflow-datasets installs only on Python < 3.9.
    return epath.Path(inspect.getfile(cls))


@dataclasses.dataclass
class CaptionEntry:
  """One image of captions.jsonl, its lines merged."""
  file: str
  line: int
  captions: list[str]
  split: str | None


def _relative_file(value, where: str) -> str:
  if not isinstance(value, str) or not value.strip():
    raise ValueError(f"{where}: \"file\" must be a non-empty string, got {value!r}")
  path = posixpath.normpath(value.strip().replace("\\", "/"))
  if posixpath.isabs(path) or path == ".." or path.startswith("../"):
    raise ValueError(f"{where}: \"file\" must be a path inside the folder, got {value!r}")
  return path


def _line_captions(record: dict, where: str) -> list[str]:
  if ("caption" in record) == ("captions" in record):
    raise ValueError(f"{where}: give exactly one of \"caption\" and \"captions\"")
  raw = [record["caption"]] if "caption" in record else record["captions"]
  if not isinstance(raw, list) or not raw or not all(isinstance(c, str) for c in raw):
    raise ValueError(f"{where}: \"captions\" must be a non-empty list of strings, got {raw!r}")
  captions = [clean_caption(c) for c in raw]
  if not all(captions):
    raise ValueError(f"{where}: empty caption in {raw!r}")
  return captions


def _parse_line(text: str, where: str) -> tuple[str, list[str], str | None]:
  """(file, captions, split or None) of one captions.jsonl line."""
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: not valid JSON ({e})") from None
  if not isinstance(record, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
  split = record.get("split")
  if split is not None and not (isinstance(split, str) and _SPLIT_NAME.match(split)):
    raise ValueError(f"{where}: \"split\" must be a name like \"train\", got {split!r}")
  return _relative_file(record.get("file"), where), _line_captions(record, where), split


def read_captions_jsonl(path: epath.PathLike) -> list[CaptionEntry]:
  """The images of a captions.jsonl file, lines naming the same file merged.

  Args:
    path: the JSONL file.

  Returns:
    One entry per distinct file, in order of first appearance.

  Raises:
    ValueError: naming the line, for invalid JSON, a missing or bad field, an
      empty caption, or a file given two different splits.
  """
  path = epath.Path(path)
  entries: dict[str, CaptionEntry] = {}
  for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
    if not text.strip():
      continue
    where = f"{path.name} line {number}"
    file, captions, split = _parse_line(text, where)
    entry = entries.setdefault(file, CaptionEntry(file, number, [], split))
    if split is not None and entry.split not in (None, split):
      raise ValueError(f"{where}: {file} has split {split!r} here but {entry.split!r} "
                       f"on line {entry.line}")
    entry.split = entry.split or split
    entry.captions.extend(captions)
  return list(entries.values())


@dataclasses.dataclass(eq=False)
class CaptionedFolderConfig(tfds.core.BuilderConfig):
  """Where images without a ``split`` field go.

  Attributes:
    test_fraction: the fraction put in ``test`` by ``hash_split``; 0 puts
      them all in ``train``.
  """
  test_fraction: float = 0.0


class CaptionedFolder(CaptionedBuilder):
  """Images with captions listed in a ``captions.jsonl`` (module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      CaptionedFolderConfig(name="default", description="Unsplit images go to train."),
      CaptionedFolderConfig(name="hash_split", test_fraction=0.05,
                            description="Unsplit images: 5% to test by path hash."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put your images in the manual directory (any subfolders) and beside them a
  file {CAPTIONS_FILE} with one JSON object a line, the image path relative to
  the directory and its caption or captions, and optionally its split:
    {{"file": "cats/001.jpg", "caption": "a cat on a mat"}}
    {{"file": "cats/002.png", "captions": ["a grey cat", "a cat asleep"], "split": "test"}}
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return captioned_info(self, "Captioned images from a user folder with captions.jsonl.")

  def _split_generators(self, dl_manager):
    root = manual_dir(dl_manager)
    listing = root / CAPTIONS_FILE
    if not listing.exists():
      raise FileNotFoundError(f"{listing} not found; the manual directory needs a {CAPTIONS_FILE}"
                              f":\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    test_fraction = self.builder_config.test_fraction
    if not 0.0 <= test_fraction <= 1.0:
      raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    splits: dict[str, list[CaptionEntry]] = {}
    for entry in read_captions_jsonl(listing):
      if not (root / entry.file).is_file():
        raise FileNotFoundError(f"{CAPTIONS_FILE} line {entry.line}: image file {entry.file} "
                                f"not found at {root / entry.file}")
      split = entry.split or hash_split(entry.file, test_fraction)
      splits.setdefault(split, []).append(entry)
    return {name: self._generate_examples(root, entries) for name, entries in splits.items()}

  def _generate_examples(self, root: epath.Path, entries: Sequence[CaptionEntry]) -> Iterator:
    for entry in entries:
      try:
        image = rgb_image_bytes(root / entry.file)
      except ImageError as e:
        raise ImageError(f"{CAPTIONS_FILE} line {entry.line}: {e}") from e
      yield entry.file, {"image": image, "captions": entry.captions, "id": entry.file}
