"""The embedded default dataset: procedurally generated captioned shapes.

Each image shows one or two flat-coloured shapes on a black background. An
object has four attributes, each from a small fixed vocabulary:

  shape     circle, square, triangle (isosceles, apex up, as tall as wide)
  colour    red, green, blue, yellow, magenta, cyan, white (pure RGB corners)
  size      small, big (the bounding box side, ``SIZE_EXTENT`` times the image side)
  position  a cell of the 3x3 grid: top left, top, top right, left, center,
            right, bottom left, bottom, bottom right

plus an ``offset``: a jitter of the bounding-box centre away from the cell
centre, as fractions of the image side, small enough that every shape stays
inside its cell with a margin (``max_jitter``: up to 0.047 for small shapes,
0.002 for big ones, which nearly fill their cell). Two objects never share a
cell or a colour, so the colour names the object.

Captions follow one fixed grammar, which ``parse_caption`` inverts exactly:

  caption   := object (" and " object)*    (the dataset has one or two)
  object    := "a " size " " colour " " shape " " place
  place     := "in the center" | "on the left" | "on the right"
             | "at the " ("top" | "bottom" | "top left" | "top right"
                          | "bottom left" | "bottom right")

e.g. "a small red circle at the top left" or "a big blue square at the
bottom right and a small yellow triangle in the center".

Everything here is pure NumPy (``sample_scene``, ``render``, ``caption``,
``parse_caption``); shapes are antialiased with 8x8 samples per pixel. The
TFDS builder ``Shapes`` (dataset name ``shapes``; configs ``32px`` and
``64px`` with 20000 train and 1000 test examples, ``build`` makes others)
stores ``image`` (PNG), ``captions`` (one caption) and ``attributes`` (the
scene as JSON, offsets included, so ``render(from_json(attributes))``
reproduces the stored image exactly). Example ``i`` of a split is drawn from
its own generator seeded with (split seed, i) and stored at index ``i``, so
building is deterministic and an example does not depend on the split size:

  builder = shapes.build("/tmp/tfds", image_size=32, num_train=2000, num_test=200)
  train = builder.as_data_source(split="train")  # train[i]: example("train", i, 32), decoded
"""

import dataclasses
import io
import json
import re

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from vqdiffusion_jax import outputs

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "magenta": (255, 0, 255), "cyan": (0, 255, 255), "white": (255, 255, 255),
}
BACKGROUND = (0, 0, 0)
SIZES = ("small", "big")
# Bounding-box side as a fraction of the image side; a grid cell is 1/3.
SIZE_EXTENT = {"small": 0.2, "big": 0.29}
# Fraction of its bounding box that each shape covers.
SHAPE_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
# Gap kept between a shape's bounding box and its cell's border, fraction of the image side.
CELL_MARGIN = 0.02
ATTRIBUTES = ("shape", "colour", "size", "position")
SPLIT_SEEDS = {"train": 0, "test": 1}
DEFAULT_NUM_TRAIN = 20000
DEFAULT_NUM_TEST = 1000
_SUPERSAMPLE = 8


def cell_of(position: str) -> tuple[int, int]:
  """(row, column) of a position name on the 3x3 grid."""
  index = POSITIONS.index(position)
  return index // 3, index % 3


def place_phrase(position: str) -> str:
  """The caption's words for a position, e.g. "at the top left", "in the center"."""
  if position == "center":
    return "in the center"
  if position in ("left", "right"):
    return f"on the {position}"
  return f"at the {position}"


def max_jitter(size: str) -> float:
  """Largest offset (fraction of the image side) that keeps a shape inside its cell."""
  return max(0.0, (1 / 3 - SIZE_EXTENT[size]) / 2 - CELL_MARGIN)


def sample_scene(rng: np.random.Generator, max_objects: int = 2) -> list[dict]:
  """Draws a scene: one to ``max_objects`` objects in distinct cells and colours.

  Args:
    rng: the NumPy generator to draw from.
    max_objects: at most this many objects (1 to 7), the count uniform in 1..max_objects.

  Returns:
    A list of objects, dicts with keys ``shape``, ``colour``, ``size``,
    ``position`` (names) and ``offset`` (dx, dy as fractions of the image side).
  """
  count = int(rng.integers(1, max_objects + 1))
  colours = rng.choice(len(COLOURS), size=count, replace=False)
  cells = rng.choice(len(POSITIONS), size=count, replace=False)
  scene = []
  for colour, cell in zip(colours, cells, strict=True):
    size = SIZES[int(rng.integers(len(SIZES)))]
    jitter = max_jitter(size)
    dx, dy = rng.uniform(-jitter, jitter, size=2)
    scene.append({
        "shape": SHAPES[int(rng.integers(len(SHAPES)))],
        "colour": list(COLOURS)[int(colour)],
        "size": size,
        "position": POSITIONS[int(cell)],
        "offset": (float(dx), float(dy)),
    })
  return scene


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Whether points (u, v), in units of the half side from the box centre, lie in the shape."""
  if shape == "circle":
    return u * u + v * v <= 1.0
  if shape == "square":
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
  if shape == "triangle":
    # Apex at (0, -1), base from (-1, 1) to (1, 1); image y grows downwards.
    return (np.abs(v) <= 1.0) & (np.abs(u) <= (v + 1.0) / 2)
  raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def coverage(obj: dict, image_size: int) -> tuple[np.ndarray, tuple[int, int]]:
  """Antialiased coverage of one object over the pixels of its bounding box.

  Args:
    obj: an object of a scene (``offset`` optional, default no jitter).
    image_size: the image side in pixels.

  Returns:
    (alpha, (top, left)): float32 coverage in [0, 1] (the fraction of a
    pixel's ``_SUPERSAMPLE``^2 samples inside the shape) of the pixel window
    whose top-left pixel is (top, left).
  """
  row, col = cell_of(obj["position"])
  dx, dy = obj.get("offset", (0.0, 0.0))
  half = SIZE_EXTENT[obj["size"]] * image_size / 2
  cx, cy = (col + 0.5 + 3 * dx) * image_size / 3, (row + 0.5 + 3 * dy) * image_size / 3
  left = max(int(np.floor(cx - half)) - 1, 0)
  top = max(int(np.floor(cy - half)) - 1, 0)
  right = min(int(np.ceil(cx + half)) + 1, image_size)
  bottom = min(int(np.ceil(cy + half)) + 1, image_size)
  sub = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
  xs = (np.arange(left, right)[:, None] + sub[None, :]).reshape(-1)
  ys = (np.arange(top, bottom)[:, None] + sub[None, :]).reshape(-1)
  hit = _inside(obj["shape"], (xs[None, :] - cx) / half, (ys[:, None] - cy) / half)
  alpha = hit.reshape(bottom - top, _SUPERSAMPLE, right - left, _SUPERSAMPLE).mean(axis=(1, 3))
  return alpha.astype(np.float32), (top, left)


def render(scene: list[dict], image_size: int = 32) -> np.ndarray:
  """Draws a scene.

  Args:
    scene: a list of objects as made by ``sample_scene``.
    image_size: the image side in pixels, at least 32.

  Returns:
    uint8 array (image_size, image_size, 3).
  """
  if image_size < 32:
    raise ValueError(f"image_size must be at least 32, got {image_size}")
  image = np.empty((image_size, image_size, 3), np.float32)
  image[:] = BACKGROUND
  for obj in scene:
    alpha, (top, left) = coverage(obj, image_size)
    window = image[top:top + alpha.shape[0], left:left + alpha.shape[1]]
    colour = np.asarray(COLOURS[obj["colour"]], np.float32)
    window += alpha[..., None] * (colour - window)
  return np.round(image).astype(np.uint8)


def caption(scene: list[dict]) -> str:
  """The caption of a scene in the module's grammar, objects in scene order."""
  return " and ".join(
      f"a {o['size']} {o['colour']} {o['shape']} {place_phrase(o['position'])}" for o in scene)


def _object_pattern() -> re.Pattern:
  alternatives = lambda names: "|".join(re.escape(n) for n in names)
  places = sorted((place_phrase(p) for p in POSITIONS), key=len, reverse=True)
  return re.compile(
      f"a ({alternatives(SIZES)}) ({alternatives(COLOURS)}) ({alternatives(SHAPES)}) "
      f"({alternatives(places)})")


_OBJECT = _object_pattern()
_PLACES = {place_phrase(p): p for p in POSITIONS}


def parse_caption(text: str) -> list[dict]:
  """Inverts ``caption``.

  Args:
    text: a caption in the module's grammar (surrounding whitespace and case ignored).

  Returns:
    The scene's objects, in caption order, with ``shape``, ``colour``,
    ``size`` and ``position`` (no ``offset``).

  Raises:
    ValueError: if the text does not follow the grammar.
  """
  parts = text.strip().lower().split(" and ")
  scene = []
  for part in parts:
    match = _OBJECT.fullmatch(part)
    if match is None:
      raise ValueError(f"not a shapes caption: {text!r} (at {part!r})")
    size, colour, shape, place = match.groups()
    scene.append({"shape": shape, "colour": colour, "size": size, "position": _PLACES[place]})
  return scene


def to_json(scene: list[dict]) -> str:
  """The scene as the JSON text stored in the ``attributes`` feature."""
  return json.dumps([{k: (list(v) if k == "offset" else v) for k, v in o.items()} for o in scene])


def from_json(text: str | bytes) -> list[dict]:
  """Reads the ``attributes`` feature back into a scene (offsets as tuples)."""
  scene = json.loads(text)
  for obj in scene:
    if "offset" in obj:
      obj["offset"] = tuple(obj["offset"])
  return scene


def example(split: str, index: int, image_size: int) -> dict:
  """The example at ``index`` of a split, before TFDS encoding.

  Args:
    split: "train" or "test" (selects the seed).
    index: the example's index in the split.
    image_size: the image side in pixels.

  Returns:
    dict with ``image`` (uint8 array), ``captions`` (one string) and ``attributes`` (JSON).
  """
  rng = np.random.default_rng([SPLIT_SEEDS[split], index])
  scene = sample_scene(rng)
  return {"image": render(scene, image_size), "captions": [caption(scene)],
          "attributes": to_json(scene)}


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """A variant of the dataset: image side and split sizes."""
  image_size: int = 32
  num_train: int = DEFAULT_NUM_TRAIN
  num_test: int = DEFAULT_NUM_TEST


def config_name(image_size: int, num_train: int, num_test: int) -> str:
  """The config name: "32px" for the default split sizes, else with the sizes appended."""
  if (num_train, num_test) == (DEFAULT_NUM_TRAIN, DEFAULT_NUM_TEST):
    return f"{image_size}px"
  return f"{image_size}px_{num_train}_{num_test}"


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Captioned shapes; see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      ShapesConfig(name=config_name(s, DEFAULT_NUM_TRAIN, DEFAULT_NUM_TEST), image_size=s,
                   description=f"{s}x{s} images") for s in (32, 64)]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description="One or two coloured shapes on a 3x3 grid, captioned from their attributes.",
        disable_shuffling=True,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "attributes": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    return {"train": self._generate_examples("train", config.num_train),
            "test": self._generate_examples("test", config.num_test)}

  def _generate_examples(self, split: str, count: int):
    size = self.builder_config.image_size
    progress = outputs.Progress(count, name=f"shapes {split} data", unit="images")
    for index in range(count):
      ex = example(split, index, size)
      yield index, {**ex, "image": _png(ex["image"])}
      if (index + 1) % 500 == 0 or index + 1 == count:
        progress.update(index + 1)
    progress.close()

  def _log_download_bytes(self) -> None:
    """Nothing to download; the progress line of each split says what happens."""

  def _log_download_done(self) -> None:
    """Quiet: the progress lines said it."""


def build(data_dir: str, image_size: int = 32, num_train: int = DEFAULT_NUM_TRAIN,
          num_test: int = DEFAULT_NUM_TEST) -> Shapes:
  """Builds (or finds already built) the dataset as ArrayRecord files.

  Args:
    data_dir: the TFDS data directory.
    image_size: the image side in pixels, at least 32.
    num_train: examples in the train split.
    num_test: examples in the test split.

  Returns:
    The prepared builder; read it with ``builder.as_data_source(split=...)``.
  """
  name = config_name(image_size, num_train, num_test)
  config = name if name in Shapes.builder_configs else ShapesConfig(
      name=name, image_size=image_size, num_train=num_train, num_test=num_test)
  builder = Shapes(data_dir=data_dir, file_format="array_record", config=config)
  tfds.display_progress_bar(False)  # our own progress line replaces TFDS's bars
  try:
    builder.download_and_prepare()
  finally:
    tfds.display_progress_bar(True)
  return builder
