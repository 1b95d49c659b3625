"""One interface to every denoiser: text ids in, x0 logits out.

The trainers, the sampling program and the pipeline reach a denoiser only
through ``Denoiser`` and never ask which network is behind it:

* ``VQDiffusionTransformer``: conditioned on text features it is given (from a
  frozen encoder such as CLIP, ``frozen_text_encoder``), on class labels, or
  on nothing;
* ``TextConditionedDenoiser``: the transformer with its own text encoder,
  trained with it (its params include the encoder's);
* ``PaellaPredictor``: the convolutional predictor, on a token grid of any
  size its U-Net divides.

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
from vqdiffusion_jax.models.conditioned import TextConditionedDenoiser
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
    return isinstance(self.network, TextConditionedDenoiser)

  @property
  def resizable(self) -> bool:
    """Whether the network works on token grids of other sizes (convolutional)."""
    return isinstance(self.network, PaellaPredictor)

  @property
  def codebook_size(self) -> int:
    return self.network.codebook_size if self.resizable else self.network.config.codebook_size

  @property
  def num_timesteps(self) -> int:
    return self.network.num_timesteps if self.resizable else self.network.config.num_timesteps

  @property
  def conditioning(self) -> str:
    """How the network is conditioned: "text", "class" or "none"."""
    return "text" if self.resizable else self.network.config.conditioning

  @property
  def has_null_condition(self) -> bool:
    """Whether there is a learnable null text (classifier-free guidance)."""
    return self.resizable or self.network.config.has_null_text

  def condition_shape(self) -> tuple[int, int]:
    """(L, D) of the text features the network reads."""
    if self.resizable:
      return self.network.condition_length, self.network.condition_dim
    return self.network.config.condition_length, self.network.config.condition_dim

  def init(self, rng: jax.Array, grid: tuple[int, int] | None = None) -> dict:
    """The network's variables (text encoder included) for one example input.

    Args:
      rng: the init key.
      grid: the token grid; default the transformer's own (required for Paella).
    """
    if self.resizable:
      length, width = self.condition_shape()
      return self.network.init(rng, jnp.zeros((1, *grid), jnp.int32), jnp.zeros((1,), jnp.int32),
                               jnp.zeros((1, length, width)))
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

  def null_condition(self, params: Any, batch_size: int) -> jax.Array:
    """(B, L, D) learnable null text features, the unconditional branch of guidance."""
    if not self.has_null_condition:
      raise ValueError("guidance needs a learnable null text embedding; this denoiser has none")
    return self.network.apply({"params": params}, batch_size, method="null_text")

  def logits(self, params: Any, x_t: jax.Array, t: jax.Array, condition: Any,
             grid: tuple[int, int] | None = None, *, extra: dict | None = None) -> jax.Array:
    """(B, N, K) float32 x0 logits of noised tokens ``x_t`` (B, N) at steps ``t``.

    Args:
      params: the network's params.
      x_t: (B, N) tokens in [0, K] (K = [MASK]).
      t: (B,) timesteps.
      condition: text features, class labels or None, by ``conditioning``.
      grid: (h, w) of the N tokens; needed by a resizable network.
      extra: other variable collections of the network, if any.
    """
    variables = {"params": params, **(extra or {})}
    if not self.resizable:
      return self.network.apply(variables, x_t, t, condition)
    batch = x_t.shape[0]
    out = self.network.apply(variables, x_t.reshape(batch, *grid), t, condition)
    return out.reshape(batch, grid[0] * grid[1], -1)
