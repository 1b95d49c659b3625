"""Uncaptioned image datasets from folders: class folders (ImageNet) and plain folders (FFHQ).

Nothing is downloaded; each builder reads its manual directory:

* ``class_image_folders``: the ImageNet (ILSVRC-2012) layout of torchvision's
  ``ImageFolder``, one folder of images per class::

    MANUAL_DIR/train/n01440764/n01440764_10026.JPEG
    MANUAL_DIR/val/n01440764/ILSVRC2012_val_00000293.JPEG

  Splits ``train`` and, when ``val/`` exists, ``validation``. The label of an
  image is the index of its class folder among the sorted folder names of
  ``train/`` (ImageNet's wnids sort into the usual 0..999 order); the names
  are the ``label`` feature's names (``info.features["label"].names``).
  Features: ``image``, ``label``, ``id`` (``<class>/<file name>``).
* ``plain_image_folder``: images anywhere below the manual directory, flat or
  in numbered subfolders as the FFHQ release ships them
  (``images1024x1024/00000/00000.png``); splits ``train`` and ``test``,
  ``test`` holding the files whose path hashes below the config's
  ``test_fraction`` (``folder.hash_split``; 0.05 by default, another with
  ``prepare(..., config=PlainImageFolderConfig(name=..., test_fraction=f))``). Features:
  ``image``, ``id`` (the path relative to the manual directory).

Image files are those with an extension of ``IMAGE_EXTENSIONS`` (any case);
other files (FFHQ's JSON metadata, licence texts) are ignored. Images are
stored as ``folder.rgb_image_bytes`` stores captioned ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds
from etils import epath

from vqdiffusion_jax.data import folder

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".webp")
CLASS_SPLITS = {"train": "train", "validation": "val"}


def is_image_file(path: epath.Path) -> bool:
  """Whether ``path`` is a file named like an image (``IMAGE_EXTENSIONS``, any case)."""
  return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def image_files(root: epath.Path) -> list[str]:
  """Paths (relative to ``root``, with ``/``) of every image file below it, sorted."""
  found = []
  pending = [root]
  while pending:
    directory = pending.pop()
    for path in directory.iterdir():
      if path.is_dir():
        pending.append(path)
      elif is_image_file(path):
        found.append(str(path.relative_to(root)).replace("\\", "/"))
  return sorted(found)


def class_names(split_dir: epath.Path) -> list[str]:
  """The sorted names of the class folders of one split folder."""
  if not split_dir.is_dir():
    raise FileNotFoundError(f"class folder split {split_dir} not found")
  names = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
  if not names:
    raise FileNotFoundError(f"no class folders in {split_dir}; expected {split_dir}/<class>/"
                            "<image>")
  return names


def class_examples(split_dir: epath.Path, classes: Sequence[str]) -> list[tuple[str, int]]:
  """``(<class>/<file>, label)`` of every image of a split, class by class, files sorted.

  Args:
    split_dir: the split's folder of class folders.
    classes: every class name, in label order (those of ``train/``).

  Raises:
    ValueError: a class folder that is not one of ``classes``.
  """
  labels = {name: i for i, name in enumerate(classes)}
  examples = []
  for name in class_names(split_dir):
    if name not in labels:
      raise ValueError(f"class folder {split_dir / name} is not a class of the train split "
                       f"({len(classes)} classes, e.g. {classes[0]!r})")
    files = sorted(p.name for p in (split_dir / name).iterdir() if is_image_file(p))
    examples += [(f"{name}/{file}", labels[name]) for file in files]
  return examples


class ClassImageFolders(folder.CaptionedBuilder):
  """Images in one folder per class, ImageNet's ``train/<wnid>/*.JPEG`` layout."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Lay out the images one folder per class, as torchvision's ImageFolder and the
  ILSVRC-2012 train archive do:
    train/<class>/<image>.JPEG    (e.g. train/n01440764/n01440764_10026.JPEG)
    val/<class>/<image>.JPEG      (optional: the validation split)
  The ILSVRC-2012 validation images ship in one flat folder; sort them into
  class folders (e.g. with the devkit's ground truth) first. Labels are the
  indices of the sorted class folder names of train/.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description="Class-labelled images from one folder per class.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(),
            "id": tfds.features.Text(),
        }))

  def _split_generators(self, dl_manager):
    root = folder.manual_dir(dl_manager)
    classes = class_names(root / CLASS_SPLITS["train"])
    self.info.features["label"].names = classes
    generators = {}
    for split, name in CLASS_SPLITS.items():
      if split != "train" and not (root / name).is_dir():
        continue
      examples = class_examples(root / name, classes)
      if not examples:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class "
                                f"folders of {root / name}")
      generators[split] = self._generate_examples(root / name, examples)
    return generators

  def _generate_examples(self, split_dir: epath.Path, examples) -> Iterator:
    for name, label in examples:
      yield name, {"image": folder.rgb_image_bytes(split_dir / name), "label": label,
                   "id": name}


@dataclasses.dataclass(eq=False)
class PlainImageFolderConfig(tfds.core.BuilderConfig):
  """How many images go to ``test``.

  Attributes:
    test_fraction: the fraction put in ``test`` by ``folder.hash_split``.
  """
  test_fraction: float = 0.05


class PlainImageFolder(folder.CaptionedBuilder):
  """Uncaptioned, unlabelled images below one folder (FFHQ's layout), split by path hash."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      PlainImageFolderConfig(name="default", description="5% of the images to test."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put the images in the manual directory, flat or in subfolders; the FFHQ
  release's folders work as they are, e.g. images1024x1024/ with
    00000/00000.png, 00000/00001.png, ..., 69000/69999.png
  (point the manual directory at images1024x1024/ or a resized copy).
  Files with other extensions than {', '.join(IMAGE_EXTENSIONS)} are ignored.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description="Unlabelled images from a folder, split by path hash.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "id": tfds.features.Text(),
        }))

  def _split_generators(self, dl_manager):
    root = folder.manual_dir(dl_manager)
    test_fraction = self.builder_config.test_fraction
    if not 0.0 <= test_fraction <= 1.0:
      raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    files = image_files(root)
    if not files:
      raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) below {root}:\n"
                              f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    splits: dict[str, list[str]] = {}
    for name in files:
      splits.setdefault(folder.hash_split(name, test_fraction), []).append(name)
    return {split: self._generate_examples(root, names) for split, names in splits.items()}

  def _generate_examples(self, root: epath.Path, names: Sequence[str]) -> Iterator:
    for name in names:
      yield name, {"image": folder.rgb_image_bytes(root / name), "id": name}
