"""Tests for the grain data loader: order, sharding, resume, draws, preprocessing, TFDS."""

import io
import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vqdiffusion_jax.data import loader, sources

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def make_source(n, height=12, width=18, seed=0):
  """Random images; record i has 1 + i % 3 captions (mixed bytes / str) and label i."""
  rng = np.random.default_rng(seed)
  source = []
  for i in range(n):
    caps = [f"record {i} caption {j}" for j in range(1 + i % 3)]
    caps = [c.encode() if j % 2 else c for j, c in enumerate(caps)]
    source.append({"image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
                   "captions": caps, "label": i})
  return source


def stripes(height, width, colors, axis=1):
  """An image made of equal bands of the given colors along ``axis``."""
  image = np.zeros((height, width, 3), np.uint8)
  bands = np.array_split(np.arange(image.shape[axis]), len(colors))
  for band, color in zip(bands, colors, strict=True):
    index = (slice(None), band) if axis == 1 else (band, slice(None))
    image[index] = color
  return image


def take(it, k):
  return [next(it) for _ in range(k)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def labels(batches):
  return [int(v) for b in batches for v in b["label"]]


def test_same_seed_same_batches_and_other_seed_differs():
  source = make_source(20)
  kw = {"image_size": 8, "batch_size": 4, "caption_dropout": 0.3, "random_crop": True,
        "random_flip": True}
  a = take(loader.image_batches(source, seed=7, **kw), 8)
  b = take(loader.image_batches(source, seed=7, num_threads=2, **kw), 8)
  assert_batches_equal(a, b)
  c = take(loader.image_batches(source, seed=8, **kw), 8)
  assert labels(a) != labels(c)


def test_epochs_are_reshuffled_permutations():
  n = 16
  order = labels(loader.image_batches(make_source(n), image_size=4, batch_size=4, seed=1,
                                        num_epochs=3))
  epochs = [order[e * n:(e + 1) * n] for e in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(n))
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_host_shards_are_disjoint_and_cover_each_epoch_once():
  n, hosts, batch = 24, 3, 4
  source = make_source(n)
  per_host = [take(loader.image_batches(source, image_size=4, batch_size=batch, seed=3,
                                          process_index=h, process_count=hosts), 4)
              for h in range(hosts)]
  single = take(loader.image_batches(source, image_size=4, batch_size=batch * hosts, seed=3), 4)
  for step in range(4):
    step_labels = [labels([per_host[h][step]]) for h in range(hosts)]
    union = sorted(itertools.chain(*step_labels))
    assert len(set(union)) == batch * hosts
    assert union == sorted(labels([single[step]]))
  for epoch in range(2):
    seen = [x for h in range(hosts) for x in labels(per_host[h][2 * epoch:2 * epoch + 2])]
    assert sorted(seen) == list(range(n))


def test_hosts_batches_side_by_side_are_the_batch_of_one_host():
  source, hosts, batch = make_source(20), 4, 2
  kw = {"image_size": 4, "seed": 5, "caption_dropout": 0.5, "random_flip": True}
  per_host = [take(loader.image_batches(source, batch_size=batch, process_index=h,
                                        process_count=hosts, **kw), 6) for h in range(hosts)]
  single = take(loader.image_batches(source, batch_size=batch * hosts, **kw), 6)
  for step, want in enumerate(single):
    for key in ("label", "image", "drop_text", "captions"):
      got = np.concatenate([per_host[h][step][key] for h in range(hosts)])
      np.testing.assert_array_equal(got, want[key], err_msg=f"step {step} {key}")


def test_finite_stream_gives_every_host_the_same_number_of_steps():
  source = make_source(10)
  counts = []
  for h in range(3):
    it = loader.image_batches(source, image_size=4, batch_size=2, seed=0, process_index=h,
                                process_count=3, num_epochs=1, drop_remainder=False)
    counts.append([len(b["label"]) for b in it])
  assert counts[0] == counts[1] == counts[2] == [2, 1]


def test_resume_gives_exactly_the_same_batches():
  source = make_source(13)
  kw = {"image_size": 8, "batch_size": 3, "seed": 5, "caption_dropout": 0.5, "random_crop": True,
        "random_flip": True, "process_index": 1, "process_count": 2}
  it = loader.image_batches(source, num_threads=2, **kw)
  take(it, 5)
  state = it.get_state()
  expected = take(it, 6)
  resumed = loader.image_batches(source, **kw)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 6), expected)


def test_caption_dropout_rate_and_caption_choice():
  n, epochs = 500, 4
  source = [{"image": np.zeros((4, 4, 3), np.uint8), "captions": ["a", "b", "c"], "label": i}
            for i in range(n)]
  batches = list(loader.image_batches(source, image_size=4, batch_size=100, seed=11,
                                        num_epochs=epochs))
  drops = np.concatenate([b["drop_text"] for b in batches])
  assert drops.dtype == bool and drops.shape == (n * epochs,)
  sigma = np.sqrt(0.1 * 0.9 / drops.size)
  assert abs(drops.mean() - 0.1) < 5 * sigma
  counts = dict.fromkeys("abc", 0)
  for c in np.concatenate([b["captions"] for b in batches]):
    counts[str(c)] += 1
  for count in counts.values():
    assert abs(count / (n * epochs) - 1 / 3) < 5 * np.sqrt(2 / 9 / (n * epochs))
  for p in (0.0, 1.0):
    batch = next(loader.image_batches(source, image_size=4, batch_size=50, seed=0,
                                        caption_dropout=p))
    assert batch["drop_text"].all() == (p == 1.0) and batch["drop_text"].any() == (p == 1.0)


def test_caption_choice_depends_on_epoch_but_not_on_position():
  source = make_source(6)
  one = labels_and_captions(loader.image_batches(source, image_size=4, batch_size=6, seed=2,
                                                   num_epochs=8))
  chosen = {}
  for pairs in one:
    for label, caption in pairs:
      assert caption in loader.decode_captions(source[label]["captions"])
      chosen.setdefault(label, set()).add(caption)
  assert len(chosen[2]) > 1  # Record 2 has 3 captions; 8 epochs pick more than one.
  hosts = [labels_and_captions(loader.image_batches(source, image_size=4, batch_size=3,
                                                      seed=2, process_index=h, process_count=2,
                                                      num_epochs=8)) for h in range(2)]
  merged = [sorted(hosts[0][e] + hosts[1][e]) for e in range(8)]
  assert merged == [sorted(pairs) for pairs in one]


def labels_and_captions(it):
  return [list(zip(labels([b]), map(str, b["captions"]), strict=True)) for b in it]


@pytest.mark.parametrize("height,width,axis", [(20, 60, 1), (60, 20, 0)])
def test_center_and_random_crop_of_non_square_images(height, width, axis):
  source = [{"image": stripes(height, width, [RED, GREEN, BLUE], axis), "captions": ["x"]}] * 16
  center = next(loader.image_batches(source, image_size=10, batch_size=16, seed=0))["image"]
  assert center.shape == (16, 10, 10, 3) and center.dtype == np.float32
  assert center.min() >= -1.0 and center.max() <= 1.0
  np.testing.assert_allclose(center[:, 5, 5], np.tile([-1.0, 1.0, -1.0], (16, 1)), atol=0.02)
  crops = next(loader.image_batches(source, image_size=10, batch_size=16, seed=0,
                                      random_crop=True))["image"]
  assert crops.min() >= -1.0 and crops.max() <= 1.0
  dominant = {int(np.argmax(c[5, 5])) for c in crops}
  assert len(dominant) >= 2


def test_an_image_already_at_size_is_returned_as_it_is_after_the_same_draw():
  image = make_source(1, height=8, width=8)[0]["image"]
  rgba = np.concatenate([image, np.full((8, 8, 1), 255, np.uint8)], axis=-1)
  by_pil = loader.resize_and_crop(rgba, 8)  # the general path: RGBA -> RGB, no resize
  rng, reference = np.random.default_rng(3), np.random.default_rng(3)
  same = loader.resize_and_crop(image, 8, rng)
  assert same is image
  np.testing.assert_array_equal(by_pil, image)
  reference.random()
  assert rng.random() == reference.random()


def test_flip_and_crop_are_deterministic_and_flip_swaps_sides():
  source = [{"image": stripes(16, 24, [RED, BLUE]), "captions": ["red left of blue"]}] * 32
  kw = {"image_size": 8, "batch_size": 32, "random_flip": True, "random_crop": True}
  a = next(loader.image_batches(source, seed=4, **kw))["image"]
  b = next(loader.image_batches(source, seed=4, **kw))["image"]
  np.testing.assert_array_equal(a, b)
  red_left = a[:, 4, 0, 0] > 0
  assert 0 < red_left.sum() < 32
  plain = next(loader.image_batches(source, seed=4, image_size=8, batch_size=32))["image"]
  assert (plain[:, 4, 0, 0] > 0).all() and (plain[:, 4, -1, 2] > 0).all()


def test_tokenize_is_called_with_the_chosen_captions():
  calls = []

  def tokenize(captions):
    calls.append(list(captions))
    return np.array([[ord(ch) for ch in c.ljust(24)[:24]] for c in captions], np.int64)

  source = make_source(9)
  batch = next(loader.image_batches(source, image_size=6, batch_size=4, seed=0,
                                      tokenize=tokenize, caption_dropout=0.5))
  assert calls == [[str(c) for c in batch["captions"]]]
  assert batch["text_ids"].shape == (4, 24) and batch["text_ids"].dtype == np.int32
  decoded = ["".join(map(chr, row)).rstrip() for row in batch["text_ids"]]
  assert decoded == [str(c) for c in batch["captions"]]
  for label, caption in zip(batch["label"], batch["captions"], strict=True):
    assert str(caption) in loader.decode_captions(source[label]["captions"])
  with pytest.raises(ValueError, match="tokenize returned shape"):
    next(loader.image_batches(source, image_size=6, batch_size=4, seed=0,
                                tokenize=lambda cs: np.zeros((len(cs) + 1, 3))))


def test_per_host_batch():
  assert loader.per_host_batch(64, 8) == 8
  assert loader.per_host_batch(5, 1) == 5
  for global_batch, hosts in [(10, 4), (0, 2), (3, 0)]:
    with pytest.raises(ValueError):
      loader.per_host_batch(global_batch, hosts)


def test_bad_arguments_are_rejected():
  source = make_source(4)
  with pytest.raises(ValueError, match="process_index"):
    loader.image_batches(source, image_size=4, batch_size=2, seed=0, process_index=2,
                           process_count=2)
  with pytest.raises(ValueError, match="seed"):
    loader.image_batches(source, image_size=4, batch_size=2, seed=-1)
  with pytest.raises(ValueError, match="empty"):
    loader.image_batches([], image_size=4, batch_size=2, seed=0)


def test_sequential_batches_keep_source_order_and_all_captions():
  source = make_source(7)
  batches = list(loader.sequential_batches(source, image_size=6, batch_size=3))
  assert [len(b["index"]) for b in batches] == [3, 3, 1]
  assert np.concatenate([b["index"] for b in batches]).tolist() == list(range(7))
  assert batches[1]["captions"][2] == loader.decode_captions(source[5]["captions"])
  expected = loader.to_float(loader.resize_and_crop(source[4]["image"], 6))
  np.testing.assert_array_equal(batches[1]["image"][1], expected)


class TinyCaptionsForPipelineTest(tfds.core.GeneratorBasedBuilder):
  """Five non-square PNG images with two captions each."""

  VERSION = tfds.core.Version("1.0.0")
  # TFDS locates a packaged builder's source with `importlib_resources`, which is
  # not installed; the path only serves checksum files, which this builder lacks.
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "captions": tfds.features.Sequence(tfds.features.Text()),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(5):
      buf = io.BytesIO()
      Image.fromarray(np.full((10, 15, 3), 40 * i, np.uint8)).save(buf, "PNG")
      yield i, {"image": buf.getvalue(), "captions": [f"gray {i}", f"level {i}"]}


def test_tfds_array_record_dataset_flows_through(tmp_path):
  TinyCaptionsForPipelineTest(data_dir=str(tmp_path),
                              file_format="array_record").download_and_prepare()
  source = sources.tfds_source("tiny_captions_for_pipeline_test", "train", str(tmp_path))
  assert len(source) == 5
  batches = list(loader.image_batches(source, image_size=8, batch_size=5, seed=0,
                                        num_epochs=2, tokenize=lambda cs: [[len(c)] for c in cs]))
  assert len(batches) == 2
  for batch in batches:
    assert batch["image"].shape == (5, 8, 8, 3)
    levels = sorted(int(round((float(v) + 1) * 127.5)) for v in batch["image"][:, 0, 0, 0])
    assert levels == [0, 40, 80, 120, 160]
    for caption, image in zip(batch["captions"], batch["image"], strict=True):
      level = int(round((float(image[0, 0, 0]) + 1) * 127.5)) // 40
      assert str(caption) in (f"gray {level}", f"level {level}")
  with pytest.raises(FileNotFoundError, match="tiny_captions_for_pipeline_test.*not built"):
    sources.tfds_source("tiny_captions_for_pipeline_test", "train", str(tmp_path / "none"))
  with pytest.raises(FileNotFoundError, match="no_such_dataset_xyz"):
    sources.tfds_source("no_such_dataset_xyz", "train", str(tmp_path))


class CountingSource(list):
  """A list source that counts reads per index."""

  def __init__(self, records):
    super().__init__(records)
    self.reads = [0] * len(records)
    self.metadata = {"num_records": len(records)}

  def __getitem__(self, index):
    self.reads[index] += 1
    return super().__getitem__(index)


def test_memoized_source_reads_each_record_once_and_changes_no_batch():
  plain = make_source(6)
  counting = CountingSource(plain)
  memo = loader.MemoizedSource(counting)
  kw = {"image_size": 8, "batch_size": 4, "seed": 2, "caption_dropout": 0.3,
        "random_crop": True, "random_flip": True}
  expected = take(loader.image_batches(plain, **kw), 6)
  got = take(loader.image_batches(memo, **kw), 6)
  assert_batches_equal(got, expected)
  assert counting.reads == [1] * 6  # four epochs of six records, each decoded once
  assert len(memo) == 6 and memo.metadata == {"num_records": 6}
  with pytest.raises(IndexError):
    memo[6]
