"""The shapes dataset: scenes, rendering, the caption grammar and the TFDS builder."""

import numpy as np
import pytest

from vqdiffusion_jax.data import shapes

NUM_SCENES = 500


def _scenes(seed: int, count: int = NUM_SCENES) -> list[list[dict]]:
  return [shapes.sample_scene(np.random.default_rng([seed, i])) for i in range(count)]


def _names(scene: list[dict]) -> list[dict]:
  return [{k: obj[k] for k in shapes.ATTRIBUTES} for obj in scene]


def test_scenes_follow_the_rules():
  scenes = _scenes(0)
  assert {len(s) for s in scenes} == {1, 2}
  for scene in scenes:
    assert len({o["colour"] for o in scene}) == len(scene)
    assert len({o["position"] for o in scene}) == len(scene)
    for obj in scene:
      jitter = shapes.max_jitter(obj["size"])
      assert all(abs(d) <= jitter for d in obj["offset"])
  for key, values in (("shape", shapes.SHAPES), ("colour", shapes.COLOURS),
                      ("size", shapes.SIZES), ("position", shapes.POSITIONS)):
    assert {o[key] for s in scenes for o in s} == set(values), key


def test_caption_grammar_round_trips():
  for scene in _scenes(1):
    text = shapes.caption(scene)
    assert shapes.parse_caption(text) == _names(scene)
  assert shapes.parse_caption(" A big White circle in the center ") == [
      {"shape": "circle", "colour": "white", "size": "big", "position": "center"}]


def test_caption_examples_and_rejections():
  scene = [{"shape": "square", "colour": "blue", "size": "big", "position": "bottom right"},
           {"shape": "triangle", "colour": "yellow", "size": "small", "position": "center"}]
  text = shapes.caption(scene)
  assert text == "a big blue square at the bottom right and a small yellow triangle in the center"
  assert shapes.caption(scene[:1]) == "a big blue square at the bottom right"
  for bad in ("a big blue hexagon in the center", "a blue square on the left",
              "a big blue square at the middle", text + " and", ""):
    with pytest.raises(ValueError):
      shapes.parse_caption(bad)


@pytest.mark.parametrize("image_size", [32, 48, 64])
def test_objects_are_drawn_where_and_how_big_they_should_be(image_size):
  for scene in _scenes(2, 150):
    image = shapes.render(scene, image_size)
    assert image.shape == (image_size, image_size, 3) and image.dtype == np.uint8
    drawn = np.zeros((image_size, image_size), bool)
    for obj in scene:
      alpha, (top, left) = shapes.coverage(obj, image_size)
      full = np.zeros((image_size, image_size), np.float32)
      full[top:top + alpha.shape[0], left:left + alpha.shape[1]] = alpha
      side = shapes.SIZE_EXTENT[obj["size"]] * image_size
      # Sampling 8x8 per pixel misplaces an edge by at most 1/16 pixel.
      assert abs(full.sum() - shapes.SHAPE_FILL[obj["shape"]] * side ** 2) <= 4 * side / 16
      row, col = shapes.cell_of(obj["position"])
      ys, xs = np.nonzero(full)
      cell = image_size / 3
      assert ys.min() >= row * cell and ys.max() < (row + 1) * cell
      assert xs.min() >= col * cell and xs.max() < (col + 1) * cell
      colour = np.asarray(shapes.COLOURS[obj["colour"]])
      inside = full == 1.0
      assert inside.any() and (image[inside] == colour).all()
      assert not (drawn & (full > 0)).any(), "objects overlap"
      drawn |= full > 0
    assert (image[~drawn] == np.asarray(shapes.BACKGROUND)).all()


def test_render_rejects_small_images_and_unknown_shapes():
  scene = [{"shape": "circle", "colour": "red", "size": "big", "position": "center"}]
  with pytest.raises(ValueError):
    shapes.render(scene, 16)
  with pytest.raises(ValueError):
    shapes.render([{**scene[0], "shape": "hexagon"}], 32)


def test_shapes_differ_from_each_other():
  base = {"colour": "red", "size": "big", "position": "center"}
  images = [shapes.render([{**base, "shape": s}], 32) for s in shapes.SHAPES]
  for i in range(len(images)):
    for j in range(i):
      assert not np.array_equal(images[i], images[j])


def test_json_round_trip_renders_the_same_image():
  for scene in _scenes(3, 50):
    again = shapes.from_json(shapes.to_json(scene))
    assert again == scene
    assert np.array_equal(shapes.render(again, 32), shapes.render(scene, 32))


def test_examples_are_deterministic_and_splits_differ():
  first = [shapes.example("train", i, 32) for i in range(20)]
  second = [shapes.example("train", i, 32) for i in range(20)]
  test = [shapes.example("test", i, 32) for i in range(20)]
  for a, b in zip(first, second, strict=True):
    assert np.array_equal(a["image"], b["image"]) and a["attributes"] == b["attributes"]
  assert sum(a["attributes"] == t["attributes"] for a, t in zip(first, test, strict=True)) < 3
  assert len({e["attributes"] for e in first}) == len(first)


def _read(builder, split: str) -> list[dict]:
  source = builder.as_data_source(split=split)
  return [source[i] for i in range(len(source))]


def _assert_consistent(examples: list[dict], split: str, image_size: int):
  for index, ex in enumerate(examples):
    scene = shapes.from_json(ex["attributes"])
    assert ex["image"].shape == (image_size, image_size, 3)
    assert np.array_equal(ex["image"], shapes.render(scene, image_size))
    assert [c.decode() for c in ex["captions"]] == [shapes.caption(scene)]
    assert ex["attributes"].decode() == shapes.example(split, index, image_size)["attributes"]


def test_tfds_build_32(tmp_path):
  builder = shapes.build(str(tmp_path / "a"), image_size=32, num_train=40, num_test=12)
  train, test = _read(builder, "train"), _read(builder, "test")
  assert (len(train), len(test)) == (40, 12)
  _assert_consistent(train, "train", 32)
  _assert_consistent(test, "test", 32)
  again = shapes.build(str(tmp_path / "b"), image_size=32, num_train=40, num_test=12)
  for a, b in zip(train, _read(again, "train"), strict=True):
    assert np.array_equal(a["image"], b["image"]) and a["attributes"] == b["attributes"]
  assert sum(a["attributes"] == b["attributes"] for a, b in zip(train, test, strict=False)) < 3
  assert {"32px", "64px"} <= set(shapes.Shapes.builder_configs)


def test_tfds_build_64(tmp_path):
  builder = shapes.build(str(tmp_path), image_size=64, num_train=6, num_test=3)
  train = _read(builder, "train")
  assert len(train) == 6 and len(_read(builder, "test")) == 3
  _assert_consistent(train, "train", 64)
  assert builder.info.features["image"].shape == (64, 64, 3)
