"""One interface to every denoiser: a condition in (text ids, class labels or none), x0 logits out.

The trainers, the sampling program and the pipeline reach a denoiser only
through ``Denoiser`` and never ask which network is behind it:

* ``VQDiffusionTransformer``: conditioned on text features it is given (from a
  frozen encoder such as CLIP, ``frozen_text_encoder``), on class labels, or
  on nothing;
* ``TextConditionedDenoiser``: the transformer with its own text encoder,
  trained with it (its params include the encoder's);
* ``PaellaPredictor``: the convolutional predictor, on a token grid of any
  size its U-Net divides, alone (text features given) or with its own
  trained text encoder (``TextConditionedPaella``).

Everything here is pure: params come in as arguments, so the methods trace
inside any jitted step or sampling loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqdiffusion_jax.models import transformer
from vqdiffusion_jax.models.conditioned import TextConditionedDenoiser, TextConditionedPaella
from vqdiffusion_jax.models.paella import PaellaPredictor

FrozenTextEncoder = Callable[[Any, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """A denoiser network and how its text reaches it.

  Attributes:
    network: the (unbound) Flax module.
    frozen_text_encoder: ``(frozen_params, ids) -> (B, L, D)`` features for a
      network conditioned on features it does not compute itself (a frozen
      CLIP); None when the network encodes its text or takes none.
  """

  network: nn.Module
  frozen_text_encoder: FrozenTextEncoder | None = None

  @property
  def trains_text_encoder(self) -> bool:
    """Whether the text encoder is part of the network and trains with it."""
    return isinstance(self.network, TextConditionedDenoiser | TextConditionedPaella)

  @property
  def resizable(self) -> bool:
    """Whether the network works on token grids of other sizes (convolutional)."""
    return isinstance(self.network, PaellaPredictor | TextConditionedPaella)

  @property
  def predictor(self) -> PaellaPredictor:
    """The Paella predictor of a resizable network."""
    return self.network.denoiser if self.trains_text_encoder else self.network

  @property
  def codebook_size(self) -> int:
    return self.predictor.codebook_size if self.resizable else self.network.config.codebook_size

  @property
  def num_timesteps(self) -> int:
    return self.predictor.num_timesteps if self.resizable else self.network.config.num_timesteps

  @property
  def conditioning(self) -> str:
    """How the network is conditioned: "text", "class" or "none"."""
    return "text" if self.resizable else self.network.config.conditioning

  @property
  def has_null_condition(self) -> bool:
    """Whether there is a null condition for classifier-free guidance.

    A text network has one when it owns the learnable null text; a class
    network always has its null class (label ``num_classes``: a learned row
    with ``learnable_null_class``, else the mean row of every class table);
    an unconditional one has none.
    """
    if self.conditioning == "class":
      return True
    return self.resizable or self.network.config.has_null_text

  @property
  def num_classes(self) -> int | None:
    """Labels of a class-conditional network (0..num_classes - 1); None for the others."""
    return self.network.config.num_classes if self.conditioning == "class" else None

  def condition_shape(self) -> tuple[int, int]:
    """(L, D) of the text features the network reads."""
    if self.resizable:
      return self.predictor.condition_length, self.predictor.condition_dim
    return self.network.config.condition_length, self.network.config.condition_dim

  def init(self, rng: jax.Array, grid: tuple[int, int] | None = None) -> dict:
    """The network's variables (text encoder included) for one example input.

    Args:
      rng: the init key.
      grid: the token grid; default the transformer's own (required for Paella).
    """
    if self.resizable:
      length, width = self.condition_shape()
      tokens, t = jnp.zeros((1, *grid), jnp.int32), jnp.zeros((1,), jnp.int32)
      if self.trains_text_encoder:
        return self.network.init(rng, tokens, t, jnp.zeros((1, length), jnp.int32),
                                 method="from_ids")
      return self.network.init(rng, tokens, t, jnp.zeros((1, length, width)))
    config = self.network.config
    tokens, t, condition = transformer.dummy_inputs(config)
    if self.trains_text_encoder:
      ids = jnp.zeros((1, config.condition_length), jnp.int32)
      return self.network.init(rng, tokens, t, ids, method="from_ids")
    return self.network.init(rng, tokens, t, condition)

  def with_network_params(self, params: Any, network_params: Any) -> Any:
    """``params`` with the denoiser's own part replaced (e.g. converted PyTorch weights).

    A network that trains its text encoder keeps that encoder's params.
    """
    if self.trains_text_encoder:
      return {**params, "denoiser": network_params}
    return network_params

  def encode_text(self, params: Any, frozen_params: Any, ids: jax.Array) -> jax.Array:
    """(B, L) text ids -> (B, L, D) features, from the network's encoder or the frozen one."""
    if self.trains_text_encoder:
      return self.network.apply({"params": params}, ids, method="encode_text")
    if self.frozen_text_encoder is None:
      raise ValueError("this denoiser has no text encoder; give it text features")
    return jax.lax.stop_gradient(self.frozen_text_encoder(frozen_params, ids))

  def encode_condition(self, params: Any, frozen_params: Any, inputs: jax.Array) -> jax.Array:
    """The network's condition from what a request gives, by ``conditioning``.

    Args:
      params: the network's params.
      frozen_params: a frozen text encoder's params, or None.
      inputs: (B, L) text ids ("text"), (B,) int class labels ("class"), or
        an empty (B, 0) array that only carries the batch size ("none").

    Returns:
      (B, L, D) text features, the labels, or the empty array, which
      ``logits`` reads as no condition.
    """
    if self.conditioning == "text":
      return self.encode_text(params, frozen_params, inputs)
    return inputs

  def null_condition(self, params: Any, batch_size: int) -> jax.Array:
    """The unconditional branch of guidance, batch ``batch_size``.

    (B, L, D) learnable null text features, or (B,) labels of the null class.
    """
    if not self.has_null_condition:
      raise ValueError(null_condition_error(self.conditioning))
    if self.conditioning == "class":
      return jnp.full((batch_size,), self.num_classes, jnp.int32)
    return self.network.apply({"params": params}, batch_size, method="null_text")

  def logits(self, params: Any, x_t: jax.Array, t: jax.Array, condition: Any,
             grid: tuple[int, int] | None = None, *, extra: dict | None = None) -> jax.Array:
    """(B, N, K) float32 x0 logits of noised tokens ``x_t`` (B, N) at steps ``t``.

    Args:
      params: the network's params.
      x_t: (B, N) tokens in [0, K] (K = [MASK]).
      t: (B,) timesteps.
      condition: text features, class labels or None (or the empty array of
        ``encode_condition``), by ``conditioning``.
      grid: (h, w) of the N tokens; needed by a resizable network.
      extra: other variable collections of the network, if any.
    """
    variables = {"params": params, **(extra or {})}
    if self.conditioning == "none":
      condition = None
    if not self.resizable:
      return self.network.apply(variables, x_t, t, condition)
    batch = x_t.shape[0]
    out = self.network.apply(variables, x_t.reshape(batch, *grid), t, condition)
    return out.reshape(batch, grid[0] * grid[1], -1)


def null_condition_error(conditioning: str) -> str:
  """Why a network conditioned by ``conditioning`` cannot be guided."""
  if conditioning == "none":
    return ("classifier-free guidance needs a condition to drop; this denoiser is "
            "unconditional: use guidance_scale=1")
  return "guidance needs a learnable null text embedding; this denoiser has none"
