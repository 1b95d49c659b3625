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


def check_text_width(text_encoder: TextEncoder, condition: tuple[int, int], what: str) -> None:
  """A ValueError unless the encoder's (max_length, width) is the network's (L, D) condition."""
  if (text_encoder.max_length, text_encoder.width) != tuple(condition):
    raise ValueError(f"text encoder output ({text_encoder.max_length}, {text_encoder.width}) "
                     f"does not match the {what}'s condition ({condition[0]}, {condition[1]})")


class _WithTextEncoder(nn.Module):
  """The methods both modules share: a ``denoiser`` network fed by a ``text_encoder``."""

  def encode_text(self, ids: jax.Array) -> jax.Array:
    """(B, L) int token ids -> (B, L, D) float32 features."""
    return self.text_encoder(ids)

  def __call__(self, tokens: jax.Array, t: jax.Array, condition: jax.Array) -> jax.Array:
    return self.denoiser(tokens, t, condition)

  def null_text(self, batch_size: int) -> jax.Array:
    return self.denoiser.null_text(batch_size)

  def from_ids(self, tokens: jax.Array, t: jax.Array, ids: jax.Array) -> jax.Array:
    """The network on encoded text; ``init`` with this method creates every param."""
    return self(tokens, t, self.encode_text(ids))


class TextConditionedDenoiser(_WithTextEncoder):
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
    check_text_width(self.text_encoder,
                     (self.config.condition_length, self.config.condition_dim), "denoiser")
    self.denoiser = VQDiffusionTransformer(self.config)


class TextConditionedPaella(_WithTextEncoder):
  """Paella's predictor with its own trainable text encoder; as ``TextConditionedDenoiser``.

  Attributes:
    denoiser: the (unbound) ``PaellaPredictor``; its ``condition_dim`` and
      ``condition_length`` equal the text encoder's width and ``max_length``.
    text_encoder: the (unbound) text encoder module.
  """

  denoiser: PaellaPredictor
  text_encoder: TextEncoder

  def setup(self):
    check_text_width(self.text_encoder,
                     (self.denoiser.condition_length, self.denoiser.condition_dim), "predictor")
