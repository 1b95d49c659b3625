"""A small text encoder trained jointly from scratch, with its word tokenizer.

Latent Diffusion trains its text encoder together with the denoiser instead
of freezing CLIP. ``WordTokenizer`` is a word-level vocabulary fitted on the
training captions (lower-cased, split on non-alphanumerics, the most frequent
words kept); ``TextEncoder`` is a bidirectional pre-LN transformer over its
ids. Its output has the CLIP features' contract, ``(B, L, D)`` float32 per
token (optionally of unit L2 norm), so the denoiser takes either.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqdiffusion_jax import outputs
from vqdiffusion_jax.models import axes
from vqdiffusion_jax.models.clip_text import EncoderLayer, l2_normalize, layer_norm

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(len(SPECIAL_TOKENS))
_FORMAT = "vqdiffusion_jax.WordTokenizer"
POSITION_ENCODINGS = ("learned", "rotary")
_WORD = re.compile(r"[^\W_]+")


def split_words(text: str) -> list[str]:
  """Lower-cases ``text`` and splits it into runs of letters and digits."""
  return _WORD.findall(text.lower())


@dataclasses.dataclass(frozen=True)
class WordTokenizer:
  """A word-level vocabulary: ``vocab[i]`` is the word with id ``i``.

  Ids 0..3 are [PAD], [UNK], [BOS], [EOS]; words follow by falling frequency.
  """

  vocab: tuple[str, ...]

  def __post_init__(self):
    if tuple(self.vocab[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
      raise ValueError(f"a vocabulary starts with {SPECIAL_TOKENS}, got {self.vocab[:4]}")
    object.__setattr__(self, "_ids", {word: i for i, word in enumerate(self.vocab)})

  @classmethod
  def fit(cls, captions: Iterable[str], max_vocab: int, min_count: int = 1) -> WordTokenizer:
    """Builds the vocabulary of the most frequent words in ``captions``.

    Args:
      captions: training captions.
      max_vocab: vocabulary size including the 4 special tokens.
      min_count: words seen fewer times are left out (they become [UNK]).

    Returns:
      The tokenizer; ties in frequency are broken alphabetically.
    """
    if max_vocab < len(SPECIAL_TOKENS):
      raise ValueError(f"max_vocab must be at least {len(SPECIAL_TOKENS)}, got {max_vocab}")
    counts = collections.Counter(w for caption in captions for w in split_words(caption))
    ranked = sorted((w for w, n in counts.items() if n >= min_count),
                    key=lambda w: (-counts[w], w))
    return cls(SPECIAL_TOKENS + tuple(ranked[:max_vocab - len(SPECIAL_TOKENS)]))

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def encode(self, texts: str | Sequence[str], max_length: int = 77
             ) -> tuple[np.ndarray, np.ndarray]:
    """Ids ``[BOS] words [EOS]`` padded with [PAD] to ``max_length``.

    Args:
      texts: one caption or a list of captions.
      max_length: the sequence length; longer captions keep their first
        ``max_length - 2`` words (training captions are cut silently).

    Returns:
      ``(ids, mask)``: int32 ``(B, max_length)`` and bool ``(B, max_length)``,
      True at real (non-padding) positions.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int | np.integer) or (
        max_length < 2):
      raise ValueError(f"max_length must be an integer >= 2 (room for [BOS] and [EOS]), got "
                       f"{max_length!r}")
    texts = [texts] if isinstance(texts, str) else list(texts)
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise ValueError(f"texts[{i}] must be a str, got {text!r}")
    ids = np.full((len(texts), max_length), PAD_ID, dtype=np.int32)
    for row, text in enumerate(texts):
      words = split_words(text)[:max_length - 2]
      tokens = [BOS_ID, *(self._ids.get(w, UNK_ID) for w in words), EOS_ID]
      ids[row, :len(tokens)] = tokens
    return ids, ids != PAD_ID

  def decode(self, ids: Sequence[int]) -> str:
    """The words of ``ids`` joined by spaces; [PAD], [BOS], [EOS] left out."""
    return " ".join(self.vocab[i] for i in ids if i not in (PAD_ID, BOS_ID, EOS_ID))

  def save(self, path: str | os.PathLike) -> None:
    """Writes the vocabulary as JSON to ``path`` (local or a URL), atomically."""
    outputs.write_text(
        path, json.dumps({"format": _FORMAT, "vocab": list(self.vocab)}, ensure_ascii=False))

  @classmethod
  def load(cls, path: str | os.PathLike) -> WordTokenizer:
    """Reads a tokenizer written by ``save``."""
    data = outputs.read_json(path, remedy="delete it to fit the vocabulary again from the "
                             "token cache's captions (they give the same one)")
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
      raise ValueError(f"{path} is not a {_FORMAT} file")
    return cls(tuple(data["vocab"]))


class TextEncoder(nn.Module):
  """Bidirectional pre-LN transformer encoder with a padding mask.

  Token embeddings plus positions, ``num_layers`` layers whose real
  positions never attend to padding, a final LayerNorm in float32.
  Positions are learned embeddings added to the tokens
  (``position_encoding="learned"``), or rotations of every layer's queries
  and keys (``"rotary"``), which make attention depend on relative positions
  only: a word finds the words of its own phrase wherever the phrase starts.
  """

  vocab_size: int
  width: int = 512
  num_layers: int = 4
  num_heads: int = 8
  mlp_ratio: int = 4
  max_length: int = 77
  layer_norm_eps: float = 1e-5
  activation: str = "gelu"
  normalize: bool = False
  position_encoding: str = "learned"
  dtype: jnp.dtype = jnp.float32
  matmul_dtype: str = "float32"

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Encodes token ids.

    Args:
      ids: int ``(B, L)``, ``L <= max_length``.
      mask: bool ``(B, L)``, True at real tokens; by default ``ids != PAD_ID``.

    Returns:
      float32 ``(B, L, width)`` features, of unit L2 norm per token when
      ``normalize``. Padded positions get features too (they are not zeroed)
      but do not change those of real positions.
    """
    length = ids.shape[-1]
    if length > self.max_length:
      raise ValueError(f"{length} tokens but the encoder has {self.max_length} positions")
    mask = ids != PAD_ID if mask is None else mask
    if self.position_encoding not in POSITION_ENCODINGS:
      raise ValueError(f"unknown position_encoding {self.position_encoding!r}; "
                       f"known: {POSITION_ENCODINGS}")
    x = nn.Embed(
        self.vocab_size, self.width, dtype=self.dtype, param_dtype=jnp.float32,
        name="token_embedding",
        embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (axes.VOCAB, axes.EMBED)))(ids)
    rotary = self.position_encoding == "rotary"
    if not rotary:
      positions = self.param(
          "position_embedding",
          nn.with_logical_partitioning(nn.initializers.normal(0.01),
                                       (axes.POSITION, axes.EMBED)),
          (self.max_length, self.width), jnp.float32)
      x = x + positions[:length].astype(self.dtype)
    attend = mask[:, None, None, :]
    for i in range(self.num_layers):
      x = EncoderLayer(self.num_heads, self.width * self.mlp_ratio, self.layer_norm_eps,
                       self.activation, self.dtype, self.matmul_dtype, rotary,
                       name=f"layer_{i}")(x, attend)
    x = layer_norm(self.layer_norm_eps, jnp.float32, "final_norm")(x)
    return l2_normalize(x) if self.normalize else x
