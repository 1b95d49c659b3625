"""The trainable text encoder and its word tokenizer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import assert_logically_partitioned
from vqdiffusion_jax.models import attention, text_encoder
from vqdiffusion_jax.models.text_encoder import TextEncoder, WordTokenizer

CAPTIONS = ["A red bird.", "a blue bird", "Red, red BIRD!", "a small_bird"]
LENGTH = 12


def test_fit_ranks_words_by_frequency():
  tokenizer = WordTokenizer.fit(CAPTIONS, max_vocab=7)
  # bird 4, red 3, a 3 (ties alphabetical), then blue / small 1 each, cut by max_vocab.
  assert tokenizer.vocab == (*text_encoder.SPECIAL_TOKENS, "bird", "a", "red")
  assert tokenizer.vocab_size == 7
  assert text_encoder.split_words("Héllo, wörld_2x!") == ["héllo", "wörld", "2x"]
  assert WordTokenizer.fit(CAPTIONS, max_vocab=100, min_count=2).vocab[4:] == ("bird", "a", "red")


def test_encode_pads_marks_and_maps_unknown_words():
  tokenizer = WordTokenizer.fit(CAPTIONS, max_vocab=7)
  ids, mask = tokenizer.encode(["Red bird", "a purple bird flies", "bird " * 20], max_length=LENGTH)
  assert ids.shape == mask.shape == (3, LENGTH) and ids.dtype == np.int32 and mask.dtype == bool
  word = tokenizer.vocab.index
  np.testing.assert_array_equal(ids[0, :5], [text_encoder.BOS_ID, word("red"), word("bird"),
                                             text_encoder.EOS_ID, text_encoder.PAD_ID])
  np.testing.assert_array_equal(ids[1, 2:4], [text_encoder.UNK_ID, word("bird")])
  np.testing.assert_array_equal(mask, ids != text_encoder.PAD_ID)
  assert mask[0].sum() == 4 and mask[1].sum() == 6 and mask[2].all()
  assert ids[2, 0] == text_encoder.BOS_ID and ids[2, -1] == text_encoder.EOS_ID
  assert tokenizer.decode(ids[1]) == "a [UNK] bird [UNK]"


def test_save_load_round_trip(tmp_path):
  tokenizer = WordTokenizer.fit(CAPTIONS, max_vocab=50)
  tokenizer.save(str(tmp_path / "vocab.json"))
  loaded = WordTokenizer.load(str(tmp_path / "vocab.json"))
  assert loaded == tokenizer
  got_ids, got_mask = loaded.encode(CAPTIONS, LENGTH)
  expected_ids, expected_mask = tokenizer.encode(CAPTIONS, LENGTH)
  np.testing.assert_array_equal(got_ids, expected_ids)
  np.testing.assert_array_equal(got_mask, expected_mask)
  (tmp_path / "other.json").write_text('{"vocab": ["a"]}')
  with pytest.raises(ValueError, match="other.json"):
    WordTokenizer.load(str(tmp_path / "other.json"))


@pytest.fixture(scope="module")
def encoder_and_params():
  module = TextEncoder(vocab_size=20, width=32, num_layers=2, num_heads=4, max_length=LENGTH)
  ids = jnp.zeros((1, LENGTH), jnp.int32)
  return module, jax.jit(module.init)(jax.random.key(0), ids)["params"]


def test_shapes_axes_and_float32_params(encoder_and_params):
  module, params = encoder_and_params
  assert_logically_partitioned(params)
  assert {x.dtype for x in jax.tree.leaves(nn.unbox(params))} == {np.dtype(np.float32)}
  ids = jax.random.randint(jax.random.key(1), (3, LENGTH), 1, 20)
  out = jax.jit(module.apply)({"params": nn.unbox(params)}, ids)
  assert out.shape == (3, LENGTH, 32) and out.dtype == jnp.float32
  unit = module.clone(normalize=True, dtype=jnp.bfloat16)
  normed = jax.jit(unit.apply)({"params": nn.unbox(params)}, ids)
  assert normed.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(np.asarray(normed), axis=-1), 1.0, atol=1e-5)


def test_padding_does_not_reach_real_positions(encoder_and_params):
  module, params = encoder_and_params
  params = nn.unbox(params)
  apply = jax.jit(module.apply)
  tokenizer = WordTokenizer.fit(CAPTIONS, max_vocab=20)
  ids, mask = tokenizer.encode(["a red bird", "blue"], LENGTH)
  noise = np.random.default_rng(0).integers(1, 20, ids.shape).astype(np.int32)
  scrambled = np.where(mask, ids, noise)
  reference = np.asarray(apply({"params": params}, ids))
  np.testing.assert_array_equal(reference, apply({"params": params}, ids, mask))
  got = np.asarray(apply({"params": params}, scrambled, mask))
  np.testing.assert_allclose(got[mask], reference[mask], rtol=0, atol=1e-6)
  assert np.abs(got[~mask] - reference[~mask]).max() > 1e-3

  # Bidirectional: a real token changes the features before it, too.
  changed = ids.copy()
  changed[0, 3] = tokenizer.vocab.index("blue")
  later_changed = np.asarray(apply({"params": params}, changed))
  assert np.abs(later_changed[0, 0] - reference[0, 0]).max() > 1e-3


def test_rotary_scores_depend_on_relative_position_only():
  rng = np.random.default_rng(5)
  query, key = (jnp.asarray(rng.normal(size=(1, 12, 2, 8)), jnp.float32) for _ in range(2))
  same = jnp.broadcast_to(query[:, :1], query.shape)  # one query vector at every position
  scores = jnp.einsum("bqhd,bkhd->bhqk", attention.rotary(same),
                      attention.rotary(jnp.broadcast_to(key[:, :1], key.shape)))[0, 0]
  scores = np.asarray(scores)
  for offset in range(-5, 6):
    diagonal = np.diagonal(scores, offset)
    np.testing.assert_allclose(diagonal, diagonal[0], rtol=1e-5, atol=1e-5)
  assert np.ptp(np.diagonal(scores, 0)) < 1e-4 < abs(scores[0, 0] - scores[0, 3])
  np.testing.assert_allclose(np.linalg.norm(np.asarray(attention.rotary(query)), axis=-1),
                             np.linalg.norm(np.asarray(query), axis=-1), rtol=1e-5)
  np.testing.assert_array_equal(attention.rotary(query)[:, 0], query[:, 0])


def test_rotary_text_encoder_has_no_position_table_and_reads_relative_positions():
  module = TextEncoder(vocab_size=20, width=32, num_layers=2, num_heads=4, max_length=LENGTH,
                       position_encoding="rotary")
  ids = np.full((2, LENGTH), text_encoder.PAD_ID, np.int32)
  phrase = [text_encoder.BOS_ID, 7, 8, 9, text_encoder.EOS_ID]
  ids[0, :5] = phrase
  ids[1, 3:8] = phrase  # the same words three positions later, padding before them
  mask = ids != text_encoder.PAD_ID
  params = jax.jit(module.init)(jax.random.key(0), ids, mask)["params"]
  assert "position_embedding" not in params
  out = np.asarray(jax.jit(module.apply)({"params": params}, ids, mask))
  np.testing.assert_allclose(out[1, 3:8], out[0, :5], rtol=1e-4, atol=1e-5)
  learned = module.clone(position_encoding="learned")
  learned_params = learned.init(jax.random.key(0), ids, mask)["params"]
  shifted = np.asarray(learned.apply({"params": learned_params}, ids, mask))
  assert np.abs(shifted[1, 3:8] - shifted[0, :5]).max() > 1e-3
  with pytest.raises(ValueError, match="position_encoding"):
    module.clone(position_encoding="sinusoidal").init(jax.random.key(0), ids)
