"""The captioned-folder, CUB, COCO and Conceptual Captions builders on tiny fake downloads.

Each test writes a few 12x16 images (RGB, grayscale, RGBA, CMYK; PNG and
JPEG) in a dataset's real layout, builds it with TFDS (no TensorFlow) and
reads it back through ``as_data_source``.
"""

import io
import pathlib
import pickle

import ml_collections
import numpy as np
import pytest
from PIL import Image

from tests import user_files
from tests.user_files import (
  H,
  W,
  coco_split,
  cub,
  listing,
  noise,
  py2_pickle,
  smooth,
  tsv,
  write,
)
from vqdiffusion_jax.data import folder, real, sources


def _rgb(pixels: np.ndarray) -> np.ndarray:
  if pixels.ndim == 2:
    return np.repeat(pixels[..., None], 3, axis=-1)
  return pixels[..., :3]


def _read(builder, split: str) -> dict:
  """id -> (image, captions) of a built split, checking every image's type."""
  source = builder.as_data_source(split=split)
  out = {}
  for i in range(len(source)):
    example = source[i]
    image = example["image"]
    assert image.dtype == np.uint8 and image.shape == (H, W, 3)
    captions = [c.decode("utf-8") for c in example["captions"]]
    out[example["id"].decode("utf-8")] = (image, captions)
  assert len(out) == len(source)
  return out


def _prepare(name, tmp_path, manual, config=None, data="data"):
  return real.prepare(name, data_dir=tmp_path / data, manual_dir=manual, config=config)


# -- shared image handling ------------------------------------------------------------------------

def test_rgb_image_bytes_passes_rgb_through_and_converts_the_rest(tmp_path):
  rgb_png, rgb_jpg = tmp_path / "a.png", tmp_path / "b.jpg"
  write(rgb_png, noise(0, 3))
  write(rgb_jpg, smooth(1))
  assert folder.rgb_image_bytes(rgb_png) == rgb_png.read_bytes()
  assert folder.rgb_image_bytes(rgb_jpg) == rgb_jpg.read_bytes()
  for name, pixels, mode in [("g.jpg", smooth(2), "L"), ("a.png", noise(3, 4), None),
                             ("c.jpg", smooth(4), "CMYK"), ("p.png", noise(5, 3), "P")]:
    path = tmp_path / "other" / name
    expected = write(path, pixels, mode)
    encoded = folder.rgb_image_bytes(path)
    assert encoded[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as original, Image.open(io.BytesIO(encoded)) as image:
      assert image.mode == "RGB"
      np.testing.assert_array_equal(np.asarray(image), expected)
      np.testing.assert_array_equal(np.asarray(image), np.asarray(original.convert("RGB")))


def test_rgb_image_bytes_names_an_unreadable_file(tmp_path):
  path = tmp_path / "broken.jpg"
  path.write_bytes(b"<html>not found</html>")
  with pytest.raises(folder.ImageError, match="broken.jpg"):
    folder.rgb_image_bytes(path)
  with pytest.raises(FileNotFoundError):
    folder.rgb_image_bytes(tmp_path / "absent.jpg")


def test_hash_split_is_stable_and_takes_the_fraction():
  keys = [f"dir/{i}.jpg" for i in range(4000)]
  tenth = [folder.hash_split(k, 0.1) for k in keys]
  assert tenth == [folder.hash_split(k, 0.1) for k in keys]
  assert 0.08 < tenth.count("test") / len(keys) < 0.12
  quarter = [folder.hash_split(k, 0.25) for k in keys]
  assert all(q == "test" for t, q in zip(tenth, quarter, strict=True) if t == "test")
  assert {folder.hash_split(k, 0.0) for k in keys} == {"train"}
  assert {folder.hash_split(k, 1.0) for k in keys} == {"test"}


# -- captioned folder -----------------------------------------------------------------------------

def _folder_images(manual: pathlib.Path) -> dict:
  return {
      "a.png": write(manual / "a.png", noise(10, 3)),
      "sub/b.jpg": write(manual / "sub" / "b.jpg", smooth(11)),
      "c.png": write(manual / "c.png", noise(12, 1)),
      "d.png": write(manual / "d.png", noise(13, 4)),
      "sub/e.jpg": write(manual / "sub" / "e.jpg", smooth(14), "L"),
  }


def test_captioned_folder_groups_captions_and_keeps_pixels(tmp_path):
  manual = tmp_path / "manual"
  expected = _folder_images(manual)
  listing(manual, [
      {"file": "a.png", "caption": "  a red\tsquare \n"},
      {"file": "./sub/b.jpg", "captions": ["first of b", "second  of b"], "extra": 1},
      "",
      {"file": "c.png", "caption": "gray c", "split": "test"},
      {"file": "a.png", "captions": ["another a"]},
      {"file": "d.png", "caption": "rgba d"},
      {"file": "sub/e.jpg", "caption": "gray jpeg e"},
  ])
  builder = _prepare("captioned_folder", tmp_path, manual)
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {"train": 4, "test": 1}
  train, test = _read(builder, "train"), _read(builder, "test")
  assert train["a.png"][1] == ["a red square", "another a"]
  assert train["sub/b.jpg"][1] == ["first of b", "second of b"]
  assert test["c.png"][1] == ["gray c"]
  examples = train | test
  assert set(examples) == set(expected)
  for name in ("a.png", "c.png", "d.png", "sub/e.jpg"):
    np.testing.assert_array_equal(examples[name][0], expected[name])
  np.testing.assert_array_equal(test["c.png"][0], _rgb(noise(12, 1)))
  np.testing.assert_array_equal(train["d.png"][0], noise(13, 4)[..., :3])
  np.testing.assert_array_equal(train["sub/b.jpg"][0], expected["sub/b.jpg"])
  diff = np.abs(train["sub/b.jpg"][0].astype(int) - smooth(11))
  assert diff.max() <= 8 and diff.mean() < 2
  gray = np.abs(train["sub/e.jpg"][0].astype(int) - _rgb(np.asarray(
      Image.fromarray(smooth(14)).convert("L"))))
  assert gray.max() <= 8


def test_captioned_folder_hash_split_config_and_determinism(tmp_path):
  manual = tmp_path / "manual"
  names = [f"img{i}.png" for i in range(12)]
  for i, name in enumerate(names):
    write(manual / name, noise(100 + i, 3))
  listing(manual, [{"file": n, "caption": f"image {i}"} for i, n in enumerate(names)]
          + [{"file": names[0], "caption": "pinned", "split": "val"}])
  config = folder.CaptionedFolderConfig(name="half", test_fraction=0.5)
  first = _prepare("captioned_folder", tmp_path, manual, config=config, data="one")
  again = _prepare("captioned_folder", tmp_path, manual, config=config, data="two")
  want = {n: folder.hash_split(n, 0.5) for n in names[1:]} | {names[0]: "val"}
  for split in first.info.splits:
    got = _read(first, split)
    assert {n for n, s in want.items() if s == split} == set(got)
    source_1, source_2 = first.as_data_source(split), again.as_data_source(split)
    for i in range(len(source_1)):
      assert source_1[i]["id"] == source_2[i]["id"]
      np.testing.assert_array_equal(source_1[i]["image"], source_2[i]["image"])
  assert set(first.info.splits) == set(want.values())
  assert _read(first, "val")[names[0]][1] == ["image 0", "pinned"]


@pytest.mark.parametrize("lines, error, pattern", [
    ([{"file": "a.png", "caption": "ok"}, '{"file": "a.png", "caption": '],
     ValueError, r"captions.jsonl line 2: not valid JSON"),
    ([{"file": "a.png", "caption": "ok"}, "", {"file": "missing.png", "caption": "x"}],
     FileNotFoundError, r"line 3: image file missing.png not found"),
    ([{"file": "a.png", "captions": ["fine", "   "]}], ValueError, r"line 1: empty caption"),
    ([{"file": "a.png"}], ValueError, r"line 1: give exactly one of"),
    ([{"file": "../a.png", "caption": "x"}], ValueError, r"line 1: .*inside the folder"),
    ([{"file": "a.png", "caption": "x", "split": "test"},
      {"file": "a.png", "caption": "y", "split": "train"}], ValueError, r"line 2: .*line 1"),
    ([["a.png", "x"]], ValueError, r"line 1: expected a JSON object"),
])
def test_captioned_folder_errors_name_the_line(tmp_path, lines, error, pattern):
  manual = tmp_path / "manual"
  write(manual / "a.png", noise(0, 3))
  listing(manual, lines)
  with pytest.raises(error, match=pattern):
    _prepare("captioned_folder", tmp_path, manual)


def test_missing_manual_dir_and_captions_file_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"(?s)nowhere.*captions.jsonl"):
    _prepare("captioned_folder", tmp_path, tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=r"(?s)nowhere.*CUB-200-2011"):
    _prepare("cub200_captions", tmp_path, tmp_path / "nowhere")
  manual = tmp_path / "no_listing"
  write(manual / "a.png", noise(0, 3))
  with pytest.raises(FileNotFoundError, match=r"no_listing/captions.jsonl not found"):
    _prepare("captioned_folder", tmp_path, manual)
  with pytest.raises(ValueError, match="unknown dataset"):
    _prepare("imagenet", tmp_path, manual)


# -- CUB-200 --------------------------------------------------------------------------------------

def _check_cub(builder, written: dict, splits: dict):
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
      s: len(names) for s, names in splits.items()}
  for split, names in splits.items():
    got = _read(builder, split)
    assert set(got) == set(names)
    for name in names:
      np.testing.assert_array_equal(got[name][0], written[name][0])
      assert got[name][1] == written[name][1]


def test_cub_attngan_layout_with_filenames_pickles(tmp_path):
  manual = tmp_path / "birds"
  written = cub(manual, "CUB_200_2011/images", "text", {
      "001.Black_footed_Albatross": ["Black_Footed_Albatross_0001_1", "Black_Footed_Albatross_2"],
      "002.Laysan_Albatross": ["Laysan_Albatross_0003_3"],
      "003.Sooty_Albatross": ["Sooty_Albatross_0004_4", "Sooty_Albatross_0005_5"]})
  names = sorted(written)
  splits = {"train": names[:2], "test": names[3:]}
  (manual / "train").mkdir()
  (manual / "train" / "filenames.pickle").write_bytes(py2_pickle(splits["train"]))
  (manual / "test").mkdir()
  with open(manual / "test" / "filenames.pickle", "wb") as f:
    pickle.dump(splits["test"], f, protocol=4)
  _check_cub(_prepare("cub200_captions", tmp_path, manual), written, splits)


def test_cub_reed_and_vq_diffusion_layouts(tmp_path):
  reed = tmp_path / "reed"
  classes = {f"{i:03d}.Class_{i}": [f"Class_{i}_{j}" for j in range(2)] for i in (1, 2, 3)}
  written = cub(reed, "images", "text_c10", classes)
  (reed / "trainvalclasses.txt").write_text("001.Class_1\n003.Class_3\n\n")
  (reed / "testclasses.txt").write_text("002.Class_2\n")
  splits = {"train": [n for n in written if not n.startswith("002")],
            "test": [n for n in written if n.startswith("002")]}
  _check_cub(_prepare("cub200_captions", tmp_path, reed, data="reed_data"), written, splits)

  vq = tmp_path / "vq"
  written = cub(vq, "images", "text/text", {f"{i:03d}.C{i}": [f"C{i}_0"] for i in range(1, 9)})
  splits = {"train": [n for n in written if not n.startswith(("004", "008"))],
            "test": [n for n in written if n.startswith(("004", "008"))]}
  _check_cub(_prepare("cub200_captions", tmp_path, vq, data="vq_data"), written, splits)


def test_cub_errors(tmp_path):
  manual = tmp_path / "birds"
  cub(manual, "images", "text_c10", {"001.A": ["A_1", "A_2"]})
  (manual / "text_c10" / "001.A" / "A_2.txt").unlink()
  with pytest.raises(FileNotFoundError, match=r"001.A/A_2.*A_2.txt not found"):
    _prepare("cub200_captions", tmp_path, manual)
  (manual / "train").mkdir()
  (manual / "train" / "filenames.pickle").write_bytes(pickle.dumps(["001.A/A_1"]))
  with pytest.raises(FileNotFoundError, match=r"test/filenames.pickle not found"):
    _prepare("cub200_captions", tmp_path, manual)
  evil = tmp_path / "evil.pickle"
  evil.write_bytes(pickle.dumps([pathlib.PurePosixPath("001.A/A_1")]))
  with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
    real.read_filenames_pickle(evil)


# -- MSCOCO ---------------------------------------------------------------------------------------

def test_coco_2014_groups_captions_per_image(tmp_path):
  manual = tmp_path / "coco"
  train = coco_split(manual, "train", "2014", [
      (9, [(30, "A plate of food. "), (12, "Some  food\n"), (41, "dinner")]),
      (25, [(7, "A giraffe.")]),
      (30, [])], nested=False)
  val = coco_split(manual, "val", "2014", [(42, [(2, "a cat"), (1, "two cats")]),
                                            (73, [(5, "a bike")])], nested=True)
  builder = _prepare("mscoco_captions", tmp_path, manual)
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
      "train": 2, "validation": 2}
  for split, expected in (("train", train), ("validation", val)):
    got = _read(builder, split)
    assert set(got) == set(expected)
    for name, (pixels, captions) in expected.items():
      np.testing.assert_array_equal(got[name][0], pixels)
      assert got[name][1] == captions
  assert _read(builder, "train")["COCO_train2014_000000000009.jpg"][1] == [
      "Some food", "A plate of food.", "dinner"]
  reloaded = real.MscocoCaptions(data_dir=tmp_path / "data", config="2014",
                                 file_format="array_record")
  assert reloaded.info.metadata["train"] == {"images": 2, "without_captions": 1}


def test_coco_2017_and_missing_image(tmp_path):
  manual = tmp_path / "coco17"
  train = coco_split(manual, "train", "2017", [(3, [(1, "x")])], nested=False)
  coco_split(manual, "val", "2017", [(4, [(2, "y")])], nested=False)
  builder = _prepare("mscoco_captions", tmp_path, manual, config="2017")
  assert set(_read(builder, "train")) == set(train) == {"000000000003.jpg"}
  (manual / "val2017" / "000000000004.jpg").unlink()
  with pytest.raises(FileNotFoundError, match=r"000000000004.jpg of captions_val2017.json"):
    _prepare("mscoco_captions", tmp_path, manual, config="2017", data="again")


# -- Conceptual Captions --------------------------------------------------------------------------

def test_conceptual_captions_skips_and_counts_missing_images(tmp_path):
  manual = tmp_path / "cc"
  manual.mkdir()
  tsv(manual / "Train_GCC-training.tsv",
       [f"  caption  {i} " for i in range(6)])
  tsv(manual / "Validation_GCC-1.1.0-Validation.tsv", ["val zero", "val one"])
  train = {"0.jpg": (write(manual / "training" / "0.jpg", smooth(0)), ["caption 0"]),
           "000002.png": (write(manual / "training" / "000002.png", noise(2, 1)), ["caption 2"]),
           "5.png": (write(manual / "training" / "5.png", noise(5, 4)), ["caption 5"])}
  (manual / "training" / "3.jpg").write_bytes(b"<html>gone</html>")
  (manual / "training" / "notes.txt").write_text("ignored")
  val = {"1.jpeg": (write(manual / "validation" / "1.jpeg", smooth(8), "L"), ["val one"])}
  builder = _prepare("conceptual_captions", tmp_path, manual)
  for split, expected in (("train", train), ("validation", val)):
    got = _read(builder, split)
    assert set(got) == set(expected)
    for name, (pixels, captions) in expected.items():
      np.testing.assert_array_equal(got[name][0], pixels)
      assert got[name][1] == captions
  assert builder.info.metadata["train"] == {"rows": 6, "images": 3, "missing": 2, "unreadable": 1}
  assert builder.info.metadata["validation"] == {
      "rows": 2, "images": 1, "missing": 1, "unreadable": 0}


def test_conceptual_captions_layout_errors(tmp_path):
  manual = tmp_path / "cc"
  manual.mkdir()
  tsv(manual / "Validation_GCC-1.1.0-Validation.tsv", ["a", "b"])
  with pytest.raises(FileNotFoundError, match=r"cc/validation for Validation_GCC"):
    _prepare("conceptual_captions", tmp_path, manual, data="d1")
  write(manual / "validation" / "1.jpg", smooth(0))
  write(manual / "validation" / "01.png", noise(1, 3))
  with pytest.raises(ValueError, match=r"both row 1"):
    _prepare("conceptual_captions", tmp_path, manual, data="d2")
  (manual / "validation" / "01.png").unlink()
  write(manual / "validation" / "7.jpg", smooth(7))
  with pytest.raises(ValueError, match=r"7.jpg: row 7 is past the end"):
    _prepare("conceptual_captions", tmp_path, manual, data="d3")
  (manual / "validation" / "7.jpg").unlink()
  (manual / "Validation_GCC-1.1.0-Validation.tsv").write_text("a\thttp://x\nno tab here\n")
  with pytest.raises(ValueError, match=r"Validation_GCC-1.1.0-Validation.tsv line 2"):
    _prepare("conceptual_captions", tmp_path, manual, data="d4")


# -- built in the run -----------------------------------------------------------------------------

def _data_section(name, manual_dir="", data_dir=""):
  return ml_collections.ConfigDict({"name": name, "data_dir": data_dir, "manual_dir": manual_dir,
                                    "image_size": 32, "num_train": 0, "num_test": 0})


def test_a_run_builds_its_dataset_from_the_manual_dir_once(tmp_path):
  manual = user_files.coco_download(tmp_path / "coco")
  workdir = tmp_path / "run"
  source = sources.split_source(_data_section("mscoco_captions", str(manual)), "train",
                                str(workdir))
  assert len(source) == 12 and source[0]["image"].shape == (40, 48, 3)
  built = workdir / "data" / "mscoco_captions"
  assert built.is_dir()
  stamp = {p: p.stat().st_mtime_ns for p in built.rglob("*") if p.is_file()}
  again = sources.split_source(_data_section("mscoco_captions", str(manual)), "validation",
                               str(workdir))
  assert len(again) == 4
  assert {p: p.stat().st_mtime_ns for p in built.rglob("*") if p.is_file()} == stamp


def test_a_run_names_the_flag_or_the_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"empty: pass --config.data.manual_dir"):
    sources.split_source(_data_section("cub200_captions", data_dir=str(tmp_path / "tfds")),
                         "train", str(tmp_path / "run"))
  manual = user_files.coco_download(tmp_path / "coco")
  (manual / "annotations" / "captions_val2014.json").unlink()
  with pytest.raises(FileNotFoundError, match=r"annotations/captions_val2014.json not found"):
    sources.split_source(_data_section("mscoco_captions", str(manual)), "train",
                         str(tmp_path / "run"))
