"""Scaled dot-product attention of multi-head projections, computed heads-first.

The projections come as ``(B, L, H, Dh)``. Written as one einsum over that
layout, XLA:CPU runs both attention matmuls about three times slower than
with the heads moved before the lengths, so the heads are moved explicitly:
``(B, H, L, Dh)`` for the two batched matmuls and the softmax, then back.
"""

import jax
import jax.numpy as jnp
from jax import lax

# (B, H, Lq, Dh) x (B, H, Lk, Dh) -> (B, H, Lq, Lk), and the weights times the values.
_SCORES = (((3,), (3,)), ((0, 1), (0, 1)))
_MIX = (((3,), (2,)), ((0, 1), (0, 1)))


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: jax.Array | None = None,
                          dot_general=lax.dot_general) -> jax.Array:
  """softmax(q k^T / sqrt(Dh)) v per head, the scores and softmax in float32.

  Args:
    query: ``(B, Lq, H, Dh)``.
    key, value: ``(B, Lk, H, Dh)``.
    mask: boolean, broadcastable to ``(B, H, Lq, Lk)``; True where a query may
      attend to a key. None attends everywhere.
    dot_general: the two matmuls' ``lax.dot_general`` (see ``precision``).

  Returns:
    ``(B, Lq, H, Dh)`` in the dtype of ``value``.
  """
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
  scores = dot_general(q, k, _SCORES, preferred_element_type=jnp.float32)
  scores = scores.astype(jnp.float32) * query.shape[-1] ** -0.5
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
  return jnp.swapaxes(dot_general(weights, v, _MIX).astype(value.dtype), 1, 2)


def rotary(x: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding (RoFormer) of ``(B, L, H, Dh)`` projections.

  Channel ``i`` of the first half and ``i`` of the second half of each head
  are rotated together by ``position * base^(-2i / Dh)``, so the product of a
  rotated query at position m and a rotated key at n depends on m - n only.
  Computed in float32, returned in ``x``'s dtype.
  """
  length, head_dim = x.shape[1], x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"rotary positions need an even head size, not {head_dim}")
  half = head_dim // 2
  frequencies = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.arange(length, dtype=jnp.float32)[:, None] * frequencies  # (L, Dh / 2)
  cos, sin = jnp.cos(angles)[:, None], jnp.sin(angles)[:, None]  # (L, 1, Dh / 2)
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)
