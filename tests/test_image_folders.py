"""The class-folder (ImageNet) and plain-folder (FFHQ) dataset builders on their layouts."""

import numpy as np
import pytest

from tests import image_folders
from vqdiffusion_jax.data import folder, real, sources


def test_imagenet_class_folders_build_with_sorted_class_labels(tmp_path):
  classes = image_folders.write_imagenet_folders(tmp_path / "imagenet", per_class=3,
                                                 val_per_class=2)
  builder = real.prepare("class_image_folders", data_dir=tmp_path / "tfds",
                         manual_dir=tmp_path / "imagenet")
  assert builder.info.features["label"].names == classes
  train = builder.as_data_source(split="train")
  assert len(train) == 3 * len(classes)
  labels = {}
  for i in range(len(train)):
    record = train[i]
    name = record["id"].decode()
    labels[name] = int(record["label"])
    assert record["image"].shape == (40, 48, 3) and record["image"].dtype == np.uint8
    # Each fixture class has its own colour: the image and its label agree.
    np.testing.assert_allclose(record["image"].reshape(-1, 3).mean(0),
                               image_folders.class_colour(labels[name]), atol=8)
  assert {n: classes.index(n.split("/")[0]) for n in labels} == labels
  validation = sources.tfds_source("class_image_folders", "validation", str(tmp_path / "tfds"))
  assert sorted(int(validation[i]["label"]) for i in range(len(validation))) == [0, 0, 1, 1, 2, 2]


def test_imagenet_validation_class_unknown_to_train_is_named(tmp_path):
  image_folders.write_imagenet_folders(tmp_path / "imagenet", per_class=1, val_per_class=1)
  stray = tmp_path / "imagenet" / "val" / "n99999999"
  stray.mkdir()
  (tmp_path / "imagenet" / "val" / "n01440764" / "ILSVRC2012_val_00000001.JPEG").rename(
      stray / "x.JPEG")
  with pytest.raises(ValueError, match="n99999999"):
    real.prepare("class_image_folders", data_dir=tmp_path / "tfds",
                 manual_dir=tmp_path / "imagenet")


def test_ffhq_folder_splits_by_path_hash_and_skips_other_files(tmp_path):
  names = image_folders.write_ffhq_folder(tmp_path / "ffhq", count=40)
  builder = real.prepare("plain_image_folder", data_dir=tmp_path / "tfds",
                         manual_dir=tmp_path / "ffhq")
  ids = {split: sorted(builder.as_data_source(split=split)[i]["id"].decode()
                       for i in range(builder.info.splits[split].num_examples))
         for split in ("train", "test")}
  assert sorted(ids["train"] + ids["test"]) == names  # the JSON and licence are not images
  assert ids["test"] == [n for n in names if folder.hash_split(n, 0.05) == "test"]
  assert ids["test"]
  assert set(builder.as_data_source(split="test")[0]) == {"image", "id"}


def test_empty_plain_folder_is_named(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "notes.txt").write_text("no images\n")
  with pytest.raises(FileNotFoundError, match="no images"):
    real.prepare("plain_image_folder", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "empty")
