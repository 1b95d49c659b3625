"""Writers of tiny image folders laid out as ImageNet and FFHQ ship them.

``write_imagenet_folders`` writes the ILSVRC-2012 train layout
(``train/<wnid>/<wnid>_<n>.JPEG``) and validation images sorted into class
folders (``val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG``), as torchvision's
``ImageFolder`` reads them; ``write_ffhq_folder`` writes the FFHQ release's
``images1024x1024`` layout (``00000/00000.png``, a folder per thousand
images) beside its metadata JSON, at a small size.
"""

import json
import pathlib

import numpy as np
from PIL import Image

WNIDS = ("n01440764", "n01443537", "n01484850")  # tench, goldfish, great white shark


def class_colour(label: int) -> np.ndarray:
  """A distinct colour per class, so a class's images share a look."""
  return np.array([(70 * label + 40) % 256, (150 * label + 90) % 256, (90 * label + 200) % 256],
                  np.uint8)


def _image(rng, size, colour=None) -> Image.Image:
  base = rng.integers(0, 256, 3, dtype=np.uint8) if colour is None else colour
  pixels = np.clip(base[None, None, :].astype(np.int16) + rng.integers(-20, 21, (*size, 3)),
                   0, 255).astype(np.uint8)
  return Image.fromarray(pixels)


def write_imagenet_folders(root: pathlib.Path, per_class: int = 4, val_per_class: int = 2,
                           size=(40, 48), seed: int = 0) -> list[str]:
  """Writes JPEGs under ``root/train`` and ``root/val``; returns the class names in label order."""
  rng = np.random.default_rng(seed)
  val_index = 1
  for label, wnid in enumerate(WNIDS):
    for i in range(per_class):
      path = root / "train" / wnid / f"{wnid}_{10026 + 7 * i}.JPEG"
      path.parent.mkdir(parents=True, exist_ok=True)
      _image(rng, size, class_colour(label)).save(path, format="JPEG", quality=90)
    for _ in range(val_per_class):
      path = root / "val" / wnid / f"ILSVRC2012_val_{val_index:08d}.JPEG"
      path.parent.mkdir(parents=True, exist_ok=True)
      _image(rng, size, class_colour(label)).save(path, format="JPEG", quality=90)
      val_index += 1
  return sorted(WNIDS)


def write_ffhq_folder(root: pathlib.Path, count: int = 40, size=(32, 32),
                      seed: int = 0) -> list[str]:
  """Writes ``count`` PNGs as ``<thousands:05d>/<index:05d>.png``; returns their paths."""
  rng = np.random.default_rng(seed)
  names = []
  for index in range(count):
    name = f"{index // 1000 * 1000:05d}/{index:05d}.png"
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    _image(rng, size).save(path, format="PNG")
    names.append(name)
  (root / "ffhq-dataset-v2.json").write_text(json.dumps(
      {str(i): {"image": {"file_path": f"images1024x1024/{n}"}} for i, n in enumerate(names)}))
  (root / "LICENSE.txt").write_text("Creative Commons BY-NC-SA 4.0\n")
  return names
