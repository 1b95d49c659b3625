"""A denoiser together with its own trainable text encoder.

LDM trains its text encoder jointly with the denoiser when there is no
frozen CLIP to use; these modules hold both so that one params tree (and one
optimizer) covers them: ``TextConditionedDenoiser`` for the transformer,
``TextConditionedPaella`` for Paella's predictor. Each behaves like the
network it wraps (``__call__``, ``null_text``; the transformer's ``config``)
and adds ``encode_text(ids)``.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from vqdiffusion_jax.models.paella import PaellaPredictor
from vqdiffusion_jax.models.text_encoder import TextEncoder
from vqdiffusion_jax.models.transformer import TransformerConfig, VQDiffusionTransformer


class TextConditionedDenoiser(nn.Module):
  """``encode_text(ids) -> (B, L, D)`` features, ``__call__`` as the denoiser.

  Attributes:
    config: the denoiser's config (text-conditioned; ``condition_dim`` equals
      the text encoder's width, ``condition_length`` its ``max_length``).
    text_encoder: the (unbound) text encoder module.
  """

  config: TransformerConfig
  text_encoder: TextEncoder

  def setup(self):
    if self.config.conditioning != "text":
      raise ValueError("a text encoder needs a text-conditioned denoiser")
    if (self.text_encoder.width, self.text_encoder.max_length) != (
        self.config.condition_dim, self.config.condition_length):
      raise ValueError(f"text encoder output ({self.text_encoder.max_length}, "
                       f"{self.text_encoder.width}) does not match the denoiser's condition "
                       f"({self.config.condition_length}, {self.config.condition_dim})")
    self.denoiser = VQDiffusionTransformer(self.config)

  def encode_text(self, ids: jax.Array) -> jax.Array:
    """(B, L) int token ids -> (B, L, D) float32 features."""
    return self.text_encoder(ids)

  def __call__(self, tokens: jax.Array, t: jax.Array, condition: jax.Array) -> jax.Array:
    return self.denoiser(tokens, t, condition)

  def null_text(self, batch_size: int) -> jax.Array:
    return self.denoiser.null_text(batch_size)

  def from_ids(self, tokens: jax.Array, t: jax.Array, ids: jax.Array) -> jax.Array:
    """The denoiser on encoded text; ``init`` with this method creates every param."""
    return self(tokens, t, self.encode_text(ids))


class TextConditionedPaella(nn.Module):
  """Paella's predictor with its own trainable text encoder; as ``TextConditionedDenoiser``.

  Attributes:
    denoiser: the (unbound) ``PaellaPredictor``; its ``condition_dim`` and
      ``condition_length`` equal the text encoder's width and ``max_length``.
    text_encoder: the (unbound) text encoder module.
  """

  denoiser: PaellaPredictor
  text_encoder: TextEncoder

  def setup(self):
    if (self.text_encoder.width, self.text_encoder.max_length) != (
        self.denoiser.condition_dim, self.denoiser.condition_length):
      raise ValueError(f"text encoder output ({self.text_encoder.max_length}, "
                       f"{self.text_encoder.width}) does not match the predictor's condition "
                       f"({self.denoiser.condition_length}, {self.denoiser.condition_dim})")

  def encode_text(self, ids: jax.Array) -> jax.Array:
    """(B, L) int token ids -> (B, L, D) float32 features."""
    return self.text_encoder(ids)

  def __call__(self, tokens: jax.Array, t: jax.Array, condition: jax.Array) -> jax.Array:
    return self.denoiser(tokens, t, condition)

  def null_text(self, batch_size: int) -> jax.Array:
    return self.denoiser.null_text(batch_size)

  def from_ids(self, tokens: jax.Array, t: jax.Array, ids: jax.Array) -> jax.Array:
    """The predictor on encoded text; ``init`` with this method creates every param."""
    return self(tokens, t, self.encode_text(ids))
