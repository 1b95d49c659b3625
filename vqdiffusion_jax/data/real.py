"""CUB-200 birds, MSCOCO and Conceptual Captions as TFDS datasets from a user's downloads.

Nothing is downloaded: each builder reads the manual directory laid out as its
``MANUAL_DOWNLOAD_INSTRUCTIONS`` say, and writes examples with the features of
``folder.captioned_features`` (``image``, ``captions``, ``id``)::

  builder = real.prepare("mscoco_captions", data_dir="~/tfds", manual_dir="~/coco")
  source = builder.as_data_source(split="train")   # source[i]["image"]: uint8 (H, W, 3)

Splits and ids:

* ``cub200_captions``: ``train`` / ``test``, class-disjoint as in text-to-image
  work; id ``<class>/<image>`` (no extension), as in ``filenames.pickle``.
* ``mscoco_captions`` (configs ``2014``, the default, and ``2017``): ``train``
  and ``validation`` (the ``val`` images); every caption of an image grouped;
  id the image's file name.
* ``conceptual_captions``: ``train`` / ``validation``, for whichever TSVs are
  present; rows whose image is missing or unreadable are skipped and counted
  in ``builder.info.metadata``; id the image's file name.

``prepare`` also builds the uncaptioned datasets of ``image_folders``:
``class_image_folders`` (ImageNet's class folders, with labels) and
``plain_image_folder`` (FFHQ's folders of images).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pickle
import re
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from vqdiffusion_jax.data import folder, image_folders
from vqdiffusion_jax.data.folder import CaptionedFolder

# -- CUB-200 with the captions of Reed et al. (2016) --------------------------------------------

CUB_IMAGE_DIRS = ("CUB_200_2011/images", "images")
CUB_TEXT_DIRS = ("text_c10", "text/text", "text")
CUB_CLASS_LISTS = {"train": "trainvalclasses.txt", "test": "testclasses.txt"}
# Without split files, every CUB_TEST_EVERY-th class (in name order) is a test class.
CUB_TEST_EVERY = 4


@dataclasses.dataclass(frozen=True)
class CubLayout:
  """Where a CUB manual directory keeps its images and caption files."""
  images: epath.Path
  text: epath.Path


def _first_dir(root: epath.Path, candidates: Sequence[str], what: str) -> epath.Path:
  for candidate in candidates:
    if (root / candidate).is_dir():
      return root / candidate
  raise FileNotFoundError(f"no {what} folder in {root}: looked for {', '.join(candidates)}")


def cub_layout(root: epath.Path) -> CubLayout:
  """Finds the image and caption folders of a CUB manual directory.

  Args:
    root: the manual directory.

  Returns:
    The first existing folder of ``CUB_IMAGE_DIRS`` and of ``CUB_TEXT_DIRS``.
  """
  return CubLayout(_first_dir(root, CUB_IMAGE_DIRS, "image"),
                   _first_dir(root, CUB_TEXT_DIRS, "caption text"))


class _StringsOnlyUnpickler(pickle.Unpickler):
  """Unpickles lists of strings and refuses every class, so no code can run."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(
        f"refusing to load {module}.{name}: a filenames.pickle holds only a list of strings")


def read_filenames_pickle(path: epath.PathLike) -> list[str]:
  """The image names of an AttnGAN/StackGAN ``filenames.pickle`` (Python 2 or 3).

  Args:
    path: the pickle file.

  Returns:
    Its names, e.g. ``"001.Black_footed_Albatross/Black_Footed_Albatross_0046_18"``.
  """
  with epath.Path(path).open("rb") as f:
    names = _StringsOnlyUnpickler(f, encoding="latin1").load()
  if not isinstance(names, list | tuple) or not all(isinstance(n, str | bytes) for n in names):
    raise ValueError(f"{path}: expected a list of image names, got {type(names).__name__}")
  return [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]


def _read_lines(path: epath.Path) -> list[str]:
  return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _class_images(images: epath.Path, classes: Sequence[str]) -> list[str]:
  names = []
  for cls in classes:
    if not (images / cls).is_dir():
      raise FileNotFoundError(f"CUB class folder {images / cls} not found")
    names += sorted(f"{cls}/{p.stem}" for p in (images / cls).iterdir() if p.suffix == ".jpg")
  return names


def cub_splits(root: epath.Path, layout: CubLayout) -> dict[str, list[str]]:
  """The image names of each CUB split, from the first split source present.

  Args:
    root: the manual directory.
    layout: its folders, from ``cub_layout``.

  Returns:
    ``{"train": names, "test": names}``, from ``train/`` and
    ``test/filenames.pickle``; else from ``trainvalclasses.txt`` and
    ``testclasses.txt`` (all images of those classes); else every
    ``CUB_TEST_EVERY``-th class in name order (4th, 8th, ...) is test.
  """
  pickles = {split: root / split / "filenames.pickle" for split in ("train", "test")}
  lists = {split: root / name for split, name in CUB_CLASS_LISTS.items()}
  for files in (pickles, lists):
    present = [split for split, path in files.items() if path.exists()]
    if present and len(present) < len(files):
      missing = [str(path) for path in files.values() if not path.exists()]
      raise FileNotFoundError(f"CUB split file {missing[0]} not found beside its partner")
  if pickles["train"].exists():
    return {split: list(dict.fromkeys(read_filenames_pickle(p))) for split, p in pickles.items()}
  if lists["train"].exists():
    return {split: _class_images(layout.images, _read_lines(p)) for split, p in lists.items()}
  classes = sorted(p.name for p in layout.images.iterdir() if p.is_dir())
  logging.warning("No CUB split files in %s; holding out every %dth class as test.", root,
                  CUB_TEST_EVERY)
  return {"train": _class_images(layout.images, [c for i, c in enumerate(classes, 1)
                                                 if i % CUB_TEST_EVERY]),
          "test": _class_images(layout.images, classes[CUB_TEST_EVERY - 1::CUB_TEST_EVERY])}


class Cub200Captions(folder.CaptionedBuilder):
  """CUB-200-2011 bird photographs with ten captions each (Reed et al., 2016)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download CUB-200-2011 (https://www.vision.caltech.edu/datasets/cub_200_2011/)
  and the captions of Reed et al. 2016 (cvpr2016_cub, https://github.com/reedscot/cvpr2016),
  and lay them out in the manual directory as
    CUB_200_2011/images/<class>/<image>.jpg   (or images/<class>/<image>.jpg)
    text_c10/<class>/<image>.txt              (or text/text/... or text/...; a caption a line)
  with, for the class-disjoint train/test split, either
    train/filenames.pickle, test/filenames.pickle  (the AttnGAN / StackGAN "birds" metadata,
                                                    as microsoft/VQ-Diffusion uses: 8,855 / 2,933)
  or
    trainvalclasses.txt, testclasses.txt           (from cvpr2016_cub: 150 / 50 classes).
  The AttnGAN data/birds folder and VQ-Diffusion's CUB-200 folder are both this
  layout. Without split files every 4th class in name order is held out as test.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return folder.captioned_info(
        self, "CUB-200-2011 birds with the ten captions an image of Reed et al. (2016).",
        homepage="https://github.com/reedscot/cvpr2016")

  def _split_generators(self, dl_manager):
    root = folder.manual_dir(dl_manager)
    layout = cub_layout(root)
    splits = cub_splits(root, layout)
    for names in splits.values():
      for name in names:
        for path in (layout.images / f"{name}.jpg", layout.text / f"{name}.txt"):
          if not path.exists():
            raise FileNotFoundError(f"CUB image {name}: {path} not found")
    return {split: self._generate_examples(layout, names) for split, names in splits.items()}

  def _generate_examples(self, layout: CubLayout, names: Sequence[str]) -> Iterator:
    for name in names:
      text = (layout.text / f"{name}.txt").read_bytes().decode("utf-8", errors="replace")
      captions = folder.clean_captions(text.splitlines())
      if not captions:
        raise ValueError(f"CUB image {name}: no captions in {layout.text / name}.txt")
      image = folder.rgb_image_bytes(layout.images / f"{name}.jpg")
      yield name, {"image": image, "captions": captions, "id": name}


# -- MSCOCO captions ------------------------------------------------------------------------------

COCO_SPLITS = {"train": "train", "validation": "val"}


@dataclasses.dataclass(eq=False)
class MscocoCaptionsConfig(tfds.core.BuilderConfig):
  """Which COCO release.

  Attributes:
    year: "2014" or "2017", the suffix of the annotation files and folders.
  """
  year: str = "2014"


def coco_images_dir(root: epath.Path, folder_name: str) -> epath.Path:
  """``root/<folder_name>``, or the ``root/<folder_name>/<folder_name>`` nesting of VQ-Diffusion."""
  for path in (root / folder_name / folder_name, root / folder_name):
    if path.is_dir():
      return path
  raise FileNotFoundError(f"COCO image folder {root / folder_name} not found")


def read_coco_captions(path: epath.PathLike) -> tuple[list[tuple[str, list[str]]], int]:
  """The images of a ``captions_*.json`` file with their captions grouped.

  Args:
    path: the annotation file.

  Returns:
    ``([(file_name, captions), ...] in image-id order, captions in annotation-id
    order; the number of images without a caption, left out)``.
  """
  data = json.loads(epath.Path(path).read_text(encoding="utf-8"))
  files = {image["id"]: image["file_name"] for image in data["images"]}
  captions = collections.defaultdict(list)
  for ann in sorted(data["annotations"], key=lambda a: (a["image_id"], a["id"])):
    if ann["image_id"] not in files:
      raise ValueError(f"{path}: caption {ann['id']} names unknown image {ann['image_id']}")
    captions[ann["image_id"]].append(ann["caption"])
  images = [(files[i], folder.clean_captions(captions[i])) for i in sorted(files)]
  kept = [(name, caps) for name, caps in images if caps]
  return kept, len(images) - len(kept)


class MscocoCaptions(folder.CaptionedBuilder):
  """MSCOCO images with all five-or-so captions of each grouped."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [MscocoCaptionsConfig(name="2014", year="2014"),
                     MscocoCaptionsConfig(name="2017", year="2017")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download from https://cocodataset.org/#download the train and val images and
  the train/val annotations of the year (2014 by default, or config "2017"), and
  extract them into the manual directory as
    annotations/captions_train2014.json, annotations/captions_val2014.json
    train2014/COCO_train2014_000000000009.jpg, ...
    val2014/COCO_val2014_000000000042.jpg, ...
  (train2014/train2014/... and val2014/val2014/..., as microsoft/VQ-Diffusion
  lays them out, work too). Splits: train, and validation from the val images.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return folder.captioned_info(
        self, "MSCOCO images, each with all its captions.",
        homepage="https://cocodataset.org", metadata=True)

  def _split_generators(self, dl_manager):
    root = folder.manual_dir(dl_manager)
    year = self.builder_config.year
    generators = {}
    for split, prefix in COCO_SPLITS.items():
      annotations = root / "annotations" / f"captions_{prefix}{year}.json"
      if not annotations.exists():
        raise FileNotFoundError(f"COCO annotations {annotations} not found")
      images_dir = coco_images_dir(root, f"{prefix}{year}")
      images, uncaptioned = read_coco_captions(annotations)
      for name, _ in images:
        if not (images_dir / name).exists():
          raise FileNotFoundError(f"COCO image {name} of {annotations.name} not found in "
                                  f"{images_dir}")
      self.info.metadata[split] = {"images": len(images), "without_captions": uncaptioned}
      generators[split] = self._generate_examples(images_dir, images)
    return generators

  def _generate_examples(self, images_dir: epath.Path, images) -> Iterator:
    for name, captions in images:
      yield name, {"image": folder.rgb_image_bytes(images_dir / name), "captions": captions,
                   "id": name}


# -- Conceptual Captions (3M) ---------------------------------------------------------------------

CC_SPLITS = {"train": ("Train_GCC-training.tsv", "training"),
             "validation": ("Validation_GCC-1.1.0-Validation.tsv", "validation")}
CC_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_ROW_INDEX = re.compile(r"[0-9]+\Z")


def index_row_images(images_dir: epath.Path) -> dict[int, str]:
  """Maps TSV row indices to image file names ``<row>.<ext>`` in a folder.

  Args:
    images_dir: the folder of downloaded images.

  Returns:
    ``{row_index: file_name}`` for every file named by a (possibly zero-padded)
    0-based row index with one of ``CC_IMAGE_EXTENSIONS``; others are ignored.

  Raises:
    ValueError: two files for the same row.
  """
  rows: dict[int, str] = {}
  for path in images_dir.iterdir():
    if path.suffix.lower() in CC_IMAGE_EXTENSIONS and _ROW_INDEX.match(path.stem):
      row = int(path.stem)
      if row in rows:
        raise ValueError(f"{images_dir}: {rows[row]} and {path.name} are both row {row}")
      rows[row] = path.name
  return rows


class ConceptualCaptions(folder.CaptionedBuilder):
  """Conceptual Captions (Sharma et al., 2018): web images with one alt-text caption."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the TSVs (caption<TAB>url, one image a row) from
  https://ai.google.com/research/ConceptualCaptions/download, fetch the images
  yourself, and name each by its 0-based row in its TSV (zero padding allowed):
    Train_GCC-training.tsv                 training/0.jpg, training/1.jpg, ...
    Validation_GCC-1.1.0-Validation.tsv    validation/0.jpg, ...
  (extensions .jpg .jpeg .png .webp). Either split may be left out. Rows whose
  image is missing or unreadable are skipped and counted in info.metadata.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return folder.captioned_info(
        self, "Conceptual Captions: web images with their cleaned alt-text.",
        homepage="https://ai.google.com/research/ConceptualCaptions", metadata=True)

  def _split_generators(self, dl_manager):
    root = folder.manual_dir(dl_manager)
    generators = {}
    for split, (tsv, images) in CC_SPLITS.items():
      if not (root / tsv).exists():
        continue
      if not (root / images).is_dir():
        raise FileNotFoundError(f"image folder {root / images} for {tsv} not found")
      rows = index_row_images(root / images)
      if not rows:
        raise FileNotFoundError(f"no images named <row>.jpg etc. in {root / images}")
      generators[split] = self._generate_examples(split, root / tsv, root / images, rows)
    if not generators:
      raise FileNotFoundError(f"neither {' nor '.join(t for t, _ in CC_SPLITS.values())} "
                              f"in {root}:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return generators

  def _generate_examples(self, split: str, tsv: epath.Path, images_dir: epath.Path,
                         rows: dict[int, str]) -> Iterator:
    counts = {"rows": 0, "images": 0, "missing": 0, "unreadable": 0}
    with tsv.open("rb") as f:
      for row, line in enumerate(f):
        counts["rows"] += 1
        caption = _tsv_caption(line, f"{tsv.name} line {row + 1}")
        if row not in rows:
          counts["missing"] += 1
          continue
        try:
          image = folder.rgb_image_bytes(images_dir / rows[row])
        except folder.ImageError as e:
          logging.warning("Skipping row %d: %s", row, e)
          counts["unreadable"] += 1
          continue
        counts["images"] += 1
        yield rows[row], {"image": image, "captions": [caption], "id": rows[row]}
    beyond = sorted(r for r in rows if r >= counts["rows"])
    if beyond:
      raise ValueError(f"{images_dir / rows[beyond[0]]}: row {beyond[0]} is past the end of "
                       f"{tsv.name} ({counts['rows']} rows)")
    logging.info("Conceptual Captions %s: %s", split, counts)
    self.info.metadata[split] = counts


def _tsv_caption(line: bytes, where: str) -> str:
  """The cleaned caption of one ``caption<TAB>url`` row."""
  fields = line.decode("utf-8", errors="replace").rstrip("\r\n").split("\t")
  if len(fields) < 2:
    raise ValueError(f"{where}: expected caption<TAB>url, got {line[:80]!r}")
  caption = folder.clean_caption(fields[0])
  if not caption:
    raise ValueError(f"{where}: empty caption")
  return caption


# -- Building -------------------------------------------------------------------------------------

BUILDERS = {cls.name: cls for cls in (CaptionedFolder, Cub200Captions, MscocoCaptions,
                                       ConceptualCaptions, image_folders.ClassImageFolders,
                                       image_folders.PlainImageFolder)}


def prepare(name: str, *, data_dir: epath.PathLike, manual_dir: epath.PathLike | None = None,
            config: str | tfds.core.BuilderConfig | None = None) -> tfds.core.DatasetBuilder:
  """Builds a dataset as ArrayRecord files, once, and returns its builder.

  Args:
    name: a key of ``BUILDERS``: ``captioned_folder``, ``cub200_captions``,
      ``mscoco_captions``, ``conceptual_captions``, or the uncaptioned
      ``class_image_folders`` and ``plain_image_folder`` (``image_folders``).
    data_dir: where TFDS keeps built datasets.
    manual_dir: the user's download directory; TFDS's default
      (``data_dir/downloads/manual``) when None.
    config: a builder config or its name (e.g. ``"2017"`` for COCO).

  Returns:
    The prepared builder; read it with ``builder.as_data_source(split=...)``.
  """
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(BUILDERS)}")
  builder = BUILDERS[name](data_dir=epath.Path(data_dir).expanduser(), config=config,
                           file_format="array_record")
  manual = None if manual_dir is None else epath.Path(manual_dir).expanduser()
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
  return builder
