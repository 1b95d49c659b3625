"""The attribute oracle: right on renders, robust to blur and noise, and discriminating."""

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from vqdiffusion_jax.data import oracle, shapes

NUM_SCENES = 500
SIZES = (32, 64)


@pytest.fixture(scope="module")
def scenes() -> list[list[dict]]:
  return [shapes.sample_scene(np.random.default_rng([100, i])) for i in range(NUM_SCENES)]


@pytest.fixture(scope="module")
def renders(scenes) -> dict[int, np.ndarray]:
  return {s: np.stack([shapes.render(scene, s) for scene in scenes]) for s in SIZES}


def _captions(scenes: list[list[dict]]) -> list[str]:
  return [shapes.caption(scene) for scene in scenes]


def box_blur(image: np.ndarray) -> np.ndarray:
  """3x3 box blur, edges replicated."""
  return ndimage.uniform_filter(image.astype(np.float32), size=(3, 3, 1), mode="nearest")


def down_up(image: np.ndarray) -> np.ndarray:
  """2x2 box downsampling, then bilinear upsampling back (PIL, pixel-centre aligned)."""
  size = image.shape[0]
  small = Image.fromarray(image).resize((size // 2, size // 2), Image.BOX)
  return np.asarray(small.resize((size, size), Image.BILINEAR), np.float32)


def noisy(image: np.ndarray, rng: np.random.Generator, sigma: float = 8.0) -> np.ndarray:
  """Gaussian noise of ``sigma`` grey levels, rounded back to uint8."""
  return np.clip(np.round(image + rng.normal(0, sigma, image.shape)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", SIZES)
def test_renders_satisfy_their_captions(scenes, renders, size):
  results = oracle.check_batch(renders[size], _captions(scenes))
  assert np.mean([r["all"] for r in results]) >= 0.995
  for result, scene in zip(results, scenes, strict=True):
    assert len(result["objects"]) == len(scene)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("blur", [box_blur, down_up])
def test_robust_to_blur_and_noise(scenes, renders, size, blur):
  rng = np.random.default_rng(size)
  images = np.stack([noisy(blur(image), rng) for image in renders[size]])
  accuracy = oracle.accuracy(images, _captions(scenes))
  assert accuracy["all"] >= 0.98, accuracy


def test_float_images_and_dimmed_colours(scenes, renders):
  captions = _captions(scenes[:200])
  images = renders[32][:200].astype(np.float32)
  assert oracle.accuracy(images / 127.5 - 1, captions)["all"] >= 0.995
  dimmed = np.round(images * 0.8 + 15).astype(np.uint8)
  assert oracle.accuracy(dimmed, captions)["all"] >= 0.995


def _alter(obj: dict, attribute: str, present: set[str], rng: np.random.Generator) -> dict:
  """The object with one attribute changed; a new colour is one absent from the scene."""
  choices = {"shape": shapes.SHAPES, "size": shapes.SIZES, "position": shapes.POSITIONS,
             "colour": [c for c in shapes.COLOURS if c not in present]}[attribute]
  others = [v for v in choices if v != obj[attribute]]
  return {**obj, attribute: others[int(rng.integers(len(others)))]}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("attribute", shapes.ATTRIBUTES)
def test_altered_attribute_is_caught(scenes, renders, size, attribute):
  rng = np.random.default_rng(7)
  # An absent colour fails the whole object; any other change fails that attribute only.
  expected = list(shapes.ATTRIBUTES) if attribute == "colour" else [attribute]
  caught, exact = [], []
  for scene, image in zip(scenes[:250], renders[size][:250], strict=True):
    target = int(rng.integers(len(scene)))
    present = {o["colour"] for o in scene}
    altered = [_alter(o, attribute, present, rng) if i == target else o
               for i, o in enumerate(scene)]
    result = oracle.check(image, shapes.caption(altered))
    obj = result["objects"][target]
    failed = [k for k in shapes.ATTRIBUTES if not obj[k]]
    caught.append(attribute in failed and not obj["all"] and not result["all"])
    exact.append(failed == expected)
  assert np.mean(caught) >= 0.98
  assert np.mean(exact) >= 0.98


def test_colours_outside_the_palette_are_not_taken_for_it():
  scene = [{"shape": "square", "colour": "red", "size": "big", "position": "center"}]
  image = shapes.render(scene, 32)
  coverage = image[..., :1].astype(np.float32) / 255
  orange = np.round(coverage * [255, 128, 0]).astype(np.uint8)
  for text in ("a big red square in the center", "a big yellow square in the center"):
    assert oracle.check(image, text)["all"] == text.startswith("a big red")
    assert not oracle.check(orange, text)["colour"]


def test_blank_image_fails_everything():
  blank = np.zeros((32, 32, 3), np.uint8)
  result = oracle.check(blank, "a small red circle at the top left")
  assert not any(result[k] for k in (*shapes.ATTRIBUTES, "all"))


def test_per_object_results_and_aggregates(scenes, renders):
  scene = [o for o in scenes if len(o) == 2][0]
  image = shapes.render(scene, 32)
  wrong = [scene[0], {**scene[1], "size": "big" if scene[1]["size"] == "small" else "small"}]
  result = oracle.check(image, shapes.caption(wrong).encode())
  assert result["objects"][0]["all"] and not result["objects"][1]["size"]
  assert result["objects"][1]["colour"] and not result["size"] and not result["all"]
  assert result["shape"] and result["position"] and result["colour"]
  captions = _captions(scenes[:20])
  captions[3] = shapes.caption([{**o, "colour": "red"} if i == 0 else o
                                for i, o in enumerate(scenes[3])])
  checks = oracle.check_batch(renders[32][:20], captions)
  accuracy = oracle.accuracy(renders[32][:20], captions)
  assert accuracy["all"] == pytest.approx(np.mean([c["all"] for c in checks]))
  with pytest.raises(ValueError):
    oracle.accuracy(renders[32][:3], captions[:2])


def test_detect_reports_what_is_drawn():
  scene = [{"shape": "triangle", "colour": "cyan", "size": "small", "position": "bottom left"},
           {"shape": "circle", "colour": "white", "size": "big", "position": "top"}]
  image = shapes.render(scene, 64)
  for obj in scene:
    found = oracle.detect(image, obj["colour"])
    assert {k: found[k] for k in ("shape", "size", "position")} == {
        k: obj[k] for k in ("shape", "size", "position")}
  assert oracle.detect(image, "red") is None
