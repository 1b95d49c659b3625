"""Tests for the token cache: round trip, dtypes, atomic build, clear errors, batches and resume."""

import json
import os

import numpy as np
import pytest
from array_record.python import array_record_module

from vqdiffusion_jax.data import loader, token_cache

L, D = 3, 4


def make_source(n, seed=0):
  """Non-square random images; record i has i % 3 captions (record 0 has none)."""
  rng = np.random.default_rng(seed)
  return [{"image": rng.integers(0, 256, (10, 14, 3), dtype=np.uint8),
           "captions": [f"image {i} says {j}".encode() for j in range(i % 3)]}
          for i in range(n)]


def fake_image_encoder(codebook_size, calls=None):
  """(b, 8, 8, 3) -> (b, 4, 4) ids spread over the whole codebook."""
  def encode(images):
    if calls is not None:
      calls.append(images.shape)
    pooled = images.reshape(images.shape[0], 4, 2, 4, 2, 3).mean(axis=(2, 4, 5))
    return np.floor((pooled + 1) / 2 * (codebook_size - 1)).astype(np.int64)
  return encode


def fake_text_encoder(calls=None):
  """(b,) captions -> (b, L, D) features that identify the caption."""
  def encode(captions):
    if calls is not None:
      calls.append(len(captions))
    out = np.zeros((len(captions), L, D), np.float32)
    for i, c in enumerate(captions):
      out[i, :, 0] = len(c)
      out[i, :, 1] = sum(map(ord, c)) % 97
      out[i, 0, 2] = 0.25
      out[i, :, 3] = np.arange(L) / 8
    return out
  return encode


def build(tmp_path, n=7, codebook_size=1024, text=True, **kw):
  source = make_source(n)
  out = tmp_path / "cache"
  metadata = token_cache.build_token_cache(
      source, fake_image_encoder(codebook_size), out, codebook_size=codebook_size, image_size=8,
      batch_size=3, encode_text=fake_text_encoder() if text else None, description="test", **kw)
  return source, out, metadata


@pytest.mark.parametrize("codebook_size,dtype", [(1024, np.int16), (40000, np.int32)])
def test_round_trip_equals_the_encoders(tmp_path, codebook_size, dtype):
  source, out, metadata = build(tmp_path, codebook_size=codebook_size)
  cache = token_cache.TokenCacheSource(out)
  assert len(cache) == len(source) == metadata["num_records"]
  assert metadata["token_grid"] == [4, 4] and metadata["codebook_size"] == codebook_size
  assert metadata["text_features"] == {"shape": [L, D], "dtype": "float16", "encoder": None}
  assert metadata["captions_per_record"] == [0, 2]
  assert json.loads((out / token_cache.METADATA).read_text()) == metadata
  encode_text = fake_text_encoder()
  for i, record in enumerate(source):
    image = loader.to_float(loader.resize_and_crop(record["image"], 8))
    expected = fake_image_encoder(codebook_size)(image[None])[0].reshape(-1)
    item = cache[i]
    assert item["tokens"].dtype == dtype
    np.testing.assert_array_equal(item["tokens"], expected)
    captions = loader.decode_captions(record["captions"])
    assert item["captions"] == captions
    assert item["text_features"].dtype == np.float16
    assert item["text_features"].shape == (max(len(captions), 1), L, D)
    np.testing.assert_allclose(item["text_features"], encode_text(captions or [""]), rtol=1e-3)
  assert sorted(os.listdir(tmp_path)) == ["cache"]


def test_encoders_see_fixed_batch_sizes(tmp_path):
  image_calls, text_calls = [], []
  token_cache.build_token_cache(
      make_source(7), fake_image_encoder(64, image_calls), tmp_path / "c", codebook_size=64,
      image_size=8, batch_size=3, encode_text=fake_text_encoder(text_calls))
  assert image_calls == [(3, 8, 8, 3)] * 3
  assert set(text_calls) == {3}


def test_batches_iterable_and_max_captions(tmp_path):
  rng = np.random.default_rng(1)
  batches = [{"image": rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32),
              "captions": ["one", ["two", "three", "four"]]} for _ in range(2)]
  metadata = token_cache.build_token_cache(
      iter(batches), fake_image_encoder(16), tmp_path / "c", codebook_size=16,
      encode_text=fake_text_encoder(), max_captions=2)
  cache = token_cache.TokenCacheSource(tmp_path / "c")
  assert metadata["num_records"] == 4 and metadata["captions_per_record"] == [1, 2]
  assert cache[3]["captions"] == ["two", "three"]
  assert cache[3]["text_features"].shape == (2, L, D)
  expected = fake_image_encoder(16)(batches[1]["image"])[1].reshape(-1)
  np.testing.assert_array_equal(cache[3]["tokens"], expected)
  with pytest.raises(TypeError, match="iter"):
    token_cache.build_token_cache(batches, fake_image_encoder(16), tmp_path / "d",
                                  codebook_size=16, image_size=8)


def test_without_text_encoder_and_bad_encoder_outputs(tmp_path):
  _, out, metadata = build(tmp_path, text=False)
  assert metadata["text_features"] is None
  assert "text_features" not in token_cache.TokenCacheSource(out)[1]
  with pytest.raises(ValueError, match="outside the codebook"):
    token_cache.build_token_cache(make_source(3), fake_image_encoder(64), tmp_path / "x",
                                  codebook_size=32, image_size=8)
  assert not (tmp_path / "x").exists()


def test_a_failed_build_leaves_nothing_behind(tmp_path):
  def broken(images):
    if broken.calls:
      raise RuntimeError("encoder died")
    broken.calls += 1
    return fake_image_encoder(64)(images)
  broken.calls = 0
  with pytest.raises(RuntimeError, match="encoder died"):
    token_cache.build_token_cache(make_source(7), broken, tmp_path / "c", codebook_size=64,
                                  image_size=8, batch_size=2)
  assert os.listdir(tmp_path) == []
  with pytest.raises(FileNotFoundError, match="no token cache"):
    token_cache.TokenCacheSource(tmp_path / "c")


def test_existing_cache_is_kept_unless_overwrite(tmp_path):
  _, out, _ = build(tmp_path, n=4)
  with pytest.raises(FileExistsError):
    build(tmp_path, n=5)
  assert len(token_cache.TokenCacheSource(out)) == 4
  build(tmp_path, n=5, overwrite=True)
  assert len(token_cache.TokenCacheSource(out)) == 5
  assert sorted(os.listdir(tmp_path)) == ["cache"]


def test_incomplete_or_corrupt_caches_give_clear_errors(tmp_path):
  _, out, _ = build(tmp_path)
  records = out / token_cache.shard_name(0, 1)
  data = records.read_bytes()
  records.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match="corrupt or truncated"):
    token_cache.TokenCacheSource(out)
  records.write_bytes(data)
  metadata = json.loads((out / token_cache.METADATA).read_text())
  (out / token_cache.METADATA).write_text(json.dumps({**metadata, "num_records": 9}))
  with pytest.raises(ValueError, match="truncated: 7 records, metadata says 9"):
    token_cache.TokenCacheSource(out)
  (out / token_cache.METADATA).write_text("{")
  with pytest.raises(ValueError, match="corrupt"):
    token_cache.TokenCacheSource(out)
  (out / token_cache.METADATA).unlink()
  with pytest.raises(ValueError, match="incomplete.*metadata.json"):
    token_cache.TokenCacheSource(out)


def test_a_corrupt_record_is_named(tmp_path):
  _, out, _ = build(tmp_path, n=2)
  writer = array_record_module.ArrayRecordWriter(str(out / token_cache.shard_name(0, 1)),
                                                 "group_size:1")
  writer.write(token_cache.encode_record(np.zeros(16, np.int16), ["fine"]))
  writer.write(b"not a record")
  writer.close()
  cache = token_cache.TokenCacheSource(out)
  assert cache[0]["captions"] == ["fine"]
  with pytest.raises(ValueError, match="record 1 is corrupt"):
    cache[1]


def take(it, k):
  return [next(it) for _ in range(k)]


def assert_batches_equal(a, b):
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_token_batches_shapes_and_features_of_the_chosen_caption(tmp_path):
  _, out, _ = build(tmp_path, n=9)
  batch = next(token_cache.token_batches(out, batch_size=4, seed=0, caption_dropout=0.5,
                                         tokenize=lambda cs: [[len(c), 1] for c in cs]))
  assert batch["tokens"].shape == (4, 16) and batch["tokens"].dtype == np.int32
  assert batch["text_features"].shape == (4, L, D) and batch["text_features"].dtype == np.float32
  assert batch["text_ids"].shape == (4, 2) and batch["text_ids"].dtype == np.int32
  assert batch["drop_text"].dtype == bool
  encode_text = fake_text_encoder()
  for caption, feats in zip(batch["captions"], batch["text_features"], strict=True):
    np.testing.assert_allclose(feats, encode_text([str(caption)])[0], rtol=1e-3)
  plain = next(token_cache.token_batches(out, batch_size=4, seed=0, text_features=False))
  assert set(plain) == {"tokens", "captions", "drop_text"}


def test_token_batches_resume_determinism_and_shards(tmp_path):
  _, out, _ = build(tmp_path, n=8)
  cache = token_cache.TokenCacheSource(out)
  kw = {"batch_size": 2, "seed": 3, "caption_dropout": 0.5, "process_index": 1,
        "process_count": 2}
  it = token_cache.token_batches(cache, num_threads=2, **kw)
  take(it, 3)
  state = it.get_state()
  expected = take(it, 5)
  resumed = token_cache.token_batches(cache, **kw)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 5), expected)
  other = take(token_cache.token_batches(cache, **{**kw, "seed": 4}), 8)
  again = take(token_cache.token_batches(cache, **kw), 8)
  assert_batches_equal(again[3:], expected)
  assert any((a["tokens"] != b["tokens"]).any() for a, b in zip(again, other, strict=True))
  shards = [np.concatenate([b["tokens"] for b in take(token_cache.token_batches(
      cache, batch_size=2, seed=3, process_index=h, process_count=2), 2)]) for h in range(2)]
  every = np.stack([cache[i]["tokens"] for i in range(len(cache))]).astype(np.int32)
  rows = sorted(map(tuple, np.concatenate(shards)))
  assert rows == sorted(map(tuple, every))


def test_token_batches_draw_the_same_captions_as_image_batches(tmp_path):
  source, out, _ = build(tmp_path, n=9)
  kw = {"batch_size": 3, "seed": 6, "caption_dropout": 0.4, "num_epochs": 3}
  tokens = list(token_cache.token_batches(out, **kw))
  images = list(loader.image_batches(source, image_size=8, **kw))
  assert len(tokens) == len(images) == 9
  encode = fake_image_encoder(1024)
  for t, i in zip(tokens, images, strict=True):
    np.testing.assert_array_equal(t["captions"], i["captions"])
    np.testing.assert_array_equal(t["drop_text"], i["drop_text"])
    np.testing.assert_array_equal(t["tokens"], encode(i["image"]).reshape(3, -1))


def test_token_batches_from_a_memoized_cache_are_the_same(tmp_path):
  _, out, _ = build(tmp_path, n=8)
  kw = {"batch_size": 3, "seed": 1, "caption_dropout": 0.5, "num_epochs": 3}
  memo = loader.MemoizedSource(token_cache.TokenCacheSource(out))
  assert_batches_equal(list(token_cache.token_batches(memo, **kw)),
                       list(token_cache.token_batches(out, **kw)))


def _sharded_build(tmp_path, source, process_count, name, **kw):
  """What ``process_count`` processes build, each process's part run here in turn."""
  out, staging = tmp_path / name, token_cache.staging_dir(tmp_path / name)
  staging.mkdir()
  for p in range(process_count):
    token_cache.write_shard(source, fake_image_encoder(1024), staging, codebook_size=1024,
                            process_index=p, process_count=process_count, image_size=8,
                            batch_size=2, encode_text=fake_text_encoder(), **kw)
  return out, token_cache.finish_cache(staging, out, process_count=process_count,
                                       codebook_size=1024, description="test")


@pytest.mark.parametrize("process_count", [2, 3, 8])
def test_a_sharded_build_equals_the_one_process_build(tmp_path, process_count):
  source, one, metadata = build(tmp_path, n=7)
  out, sharded = _sharded_build(tmp_path, source, process_count, "sharded")
  assert sharded["files"] == [token_cache.shard_name(p, process_count)
                              for p in range(process_count)]
  assert sharded["shard_records"] == [
      b - a for a, b in (token_cache.shard_range(7, p, process_count)
                         for p in range(process_count))]
  differ = {"files", "shard_records"}
  assert ({k: v for k, v in sharded.items() if k not in differ}
          == {k: v for k, v in metadata.items() if k not in differ})
  a, b = token_cache.TokenCacheSource(one), token_cache.TokenCacheSource(out)
  assert len(a) == len(b) == 7
  for i in range(7):
    x, y = a[i], b[i]
    assert x.keys() == y.keys() and x["captions"] == y["captions"]
    for key in ("tokens", "text_features"):
      np.testing.assert_array_equal(x[key], y[key])
  assert sorted(os.listdir(tmp_path)) == ["cache", "sharded"]


def test_shard_ranges_tile_the_source():
  for n, count in [(0, 2), (7, 3), (2, 8), (100, 7)]:
    ranges = [token_cache.shard_range(n, p, count) for p in range(count)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(r[1] == s[0] for r, s in zip(ranges, ranges[1:], strict=False))
    assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1
  with pytest.raises(ValueError, match="process_index 2 is not in"):
    token_cache.shard_range(5, 2, 2)


def test_a_missing_shard_is_named_and_nothing_is_installed(tmp_path):
  source = make_source(6)
  staging = token_cache.staging_dir(tmp_path / "c")
  staging.mkdir()
  token_cache.write_shard(source, fake_image_encoder(64), staging, codebook_size=64,
                          process_index=0, process_count=2, image_size=8, batch_size=2)
  with pytest.raises(ValueError, match="shard 1 of 2 is missing"):
    token_cache.finish_cache(staging, tmp_path / "c", process_count=2, codebook_size=64)
  assert not (tmp_path / "c").exists()
  with pytest.raises(ValueError, match="only be encoded by one process"):
    token_cache.write_shard(iter([]), fake_image_encoder(64), staging, codebook_size=64,
                            process_index=1, process_count=2)


def test_a_build_replaces_what_an_unfinished_one_left(tmp_path):
  staging = token_cache.staging_dir(tmp_path / "cache")
  staging.mkdir()
  (staging / token_cache.shard_name(0, 1)).write_bytes(b"half")
  build(tmp_path, n=3)
  assert sorted(os.listdir(tmp_path)) == ["cache"]
  assert len(token_cache.TokenCacheSource(tmp_path / "cache")) == 3


def test_params_fingerprint_sees_every_weight():
  params = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": {"c": np.ones(2)}}
  same = {"a": params["a"].copy(), "b": {"c": np.ones(2)}}
  assert token_cache.params_fingerprint(params) == token_cache.params_fingerprint(same)
  changed = {"a": params["a"].copy(), "b": {"c": np.array([1.0, 1.5])}}
  reshaped = {"a": params["a"].reshape(3, 2), "b": params["b"]}
  prints = {token_cache.params_fingerprint(p) for p in (params, changed, reshaped)}
  assert len(prints) == 3
