"""Scaled dot-product attention of multi-head projections, computed heads-first.

The projections come as ``(B, L, H, Dh)``. Written as one einsum over that
layout, XLA:CPU runs both attention matmuls about three times slower than
with the heads moved before the lengths, so the heads are moved explicitly:
``(B, H, L, Dh)`` for the two batched matmuls and the softmax, then back.

Long sequences on CPU go one head at a time (``per_head_attention``): the
whole ``(B, H, Lq, Lk)`` score tensor of 32 x 32 tokens does not fit in any
cache, and its softmax passes run at memory speed; one head's scores do.
On GPUs attention goes through ``jax.nn.dot_product_attention``
(``fused_attention``): cuDNN's fused kernel where it takes the operands,
XLA's own lowering otherwise.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from vqdiffusion_jax.models import precision

# (B, H, Lq, Dh) x (B, H, Lk, Dh) -> (B, H, Lq, Lk), and the weights times the values.
_SCORES = (((3,), (3,)), ((0, 1), (0, 1)))
_MIX = (((3,), (2,)), ((0, 1), (0, 1)))
# One head, kept as a batch of one (so remat policies see batched products, as above):
# (1, Lq, Dh) x (1, Lk, Dh) -> (1, Lq, Lk); (1, Lq, Lk) x (1, Lk, Dh) -> (1, Lq, Dh);
# (1, Lq, Lk) x (1, Lq, Dh) -> (1, Lk, Dh), the transposed weights times a query-side array.
_HEAD_SCORES = (((2,), (2,)), ((0,), (0,)))
_HEAD_MIX = (((2,), (1,)), ((0,), (0,)))
_HEAD_MIX_T = (((1,), (1,)), ((0,), (0,)))

IMPLEMENTATIONS = ("auto", "materialised", "per_head", "fused")
# "auto" goes per head on CPU from this many scores per head (Lq x Lk) up.
PER_HEAD_MIN_SCORES = 512 * 512


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: jax.Array | None = None,
                          dot_general=lax.dot_general, implementation: str = "auto") -> jax.Array:
  """softmax(q k^T / sqrt(Dh)) v per head, the scores and softmax in float32.

  Args:
    query: ``(B, Lq, H, Dh)``.
    key, value: ``(B, Lk, H, Dh)``.
    mask: boolean, broadcastable to ``(B, H, Lq, Lk)``; True where a query may
      attend to a key. None attends everywhere.
    dot_general: the two matmuls' ``lax.dot_general`` (see ``precision``).
    implementation: "materialised" (all heads' scores at once), "per_head"
      (``per_head_attention``; no mask), "fused" (``fused_attention``) or
      "auto" (``choose_implementation``).

  Returns:
    ``(B, Lq, H, Dh)`` in the dtype of ``value``.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} not in {IMPLEMENTATIONS}")
  if implementation == "auto":
    implementation = choose_implementation(jax.default_backend(), query.shape[1], key.shape[1],
                                           masked=mask is not None)
  if implementation == "fused":
    return fused_attention(query, key, value, mask, dot_general)
  if implementation == "per_head":
    if mask is not None:
      raise ValueError("per_head attention takes no mask")
    return per_head_attention(query, key, value, dot_general)
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
  scores = _scaled_scores(q, k, _SCORES, dot_general)
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
  return jnp.swapaxes(dot_general(weights, v, _MIX).astype(value.dtype), 1, 2)


def choose_implementation(platform: str, query_length: int, key_length: int, *,
                          masked: bool) -> str:
  """What "auto" runs: "fused" on GPU; "per_head" on CPU for long unmasked sequences.

  Per head from ``PER_HEAD_MIN_SCORES`` scores per head up; "materialised"
  everywhere else, TPUs included (XLA fuses the all-heads program well there).
  """
  if platform in ("gpu", "cuda", "rocm"):
    return "fused"
  if platform == "cpu" and not masked and query_length * key_length >= PER_HEAD_MIN_SCORES:
    return "per_head"
  return "materialised"


def fused_backend(platform: str, dtype) -> str:
  """``jax.nn.dot_product_attention``'s implementation: cuDNN for 16-bit operands on GPU."""
  sixteen_bit = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if platform in ("gpu", "cuda") and sixteen_bit else "xla"


def fused_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                    mask: jax.Array | None = None, dot_general=lax.dot_general) -> jax.Array:
  """``dot_product_attention`` by ``jax.nn.dot_product_attention``.

  With ``precision.mixed_dot_general`` the operands go in as bfloat16 (float32
  scores and softmax either way), which lets cuDNN's fused kernel take them on
  GPU. Where cuDNN refuses the shapes or the installed version, XLA's lowering
  runs instead. Same arguments and result as ``dot_product_attention``.
  """
  dtype = jnp.bfloat16 if precision.is_mixed(dot_general) else query.dtype
  q, k, v = (x.astype(dtype) for x in (query, key, value))
  backend = fused_backend(jax.default_backend(), dtype)
  if backend == "cudnn":
    try:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn").astype(
          value.dtype)
    except (ValueError, NotImplementedError, RuntimeError):
      pass
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla").astype(
      value.dtype)


def _by_head(x: jax.Array) -> jax.Array:
  """(B, L, H, Dh) -> (B * H, 1, L, Dh): one head per row of a ``lax.map``."""
  b, length, h, d = x.shape
  return jnp.swapaxes(x, 1, 2).reshape(b * h, 1, length, d)


def _from_heads(x: jax.Array, batch: int, heads: int) -> jax.Array:
  return jnp.swapaxes(x.reshape(batch, heads, *x.shape[2:]), 1, 2)


def _scaled_scores(q, k, dimension_numbers, dot_general):
  """q k^T / sqrt(Dh) in float32, whatever the operands' dtype."""
  scores = dot_general(q, k, dimension_numbers, preferred_element_type=jnp.float32)
  return scores.astype(jnp.float32) * q.shape[-1] ** -0.5


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def per_head_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                       dot_general=lax.dot_general) -> jax.Array:
  """``dot_product_attention`` one (batch row, head) at a time, without a mask.

  A ``lax.map`` over the B x H heads keeps one head's ``(Lq, Lk)`` scores in
  cache. The backward pass recomputes each head's scores from the saved
  log-sum-exp of its rows rather than keeping them: memory O(B H L) beyond
  the inputs and output, not O(B H Lq Lk). Same arguments and result as
  ``dot_product_attention``.
  """
  return _per_head_forward(query, key, value, dot_general)[0]


def _per_head_forward(query, key, value, dot_general):
  def one_head(head):
    q, k, v = head
    scores = _scaled_scores(q, k, _HEAD_SCORES, dot_general)
    top = jnp.max(scores, axis=-1, keepdims=True)
    exp = jnp.exp(scores - top)
    total = jnp.sum(exp, axis=-1, keepdims=True)
    out = dot_general((exp / total).astype(v.dtype), v, _HEAD_MIX).astype(v.dtype)
    return out, top + jnp.log(total)

  out, log_total = lax.map(one_head, (_by_head(query), _by_head(key), _by_head(value)))
  out = _from_heads(out, query.shape[0], query.shape[2])
  return out, (query, key, value, out, log_total)


def _per_head_backward(dot_general, residuals, cotangent):
  query, key, value, out, log_total = residuals

  def one_head(head):
    q, k, v, o, g, lse = head
    weights = jnp.exp(_scaled_scores(q, k, _HEAD_SCORES, dot_general) - lse)
    d_value = dot_general(weights.astype(g.dtype), g, _HEAD_MIX_T).astype(v.dtype)
    d_weights = dot_general(g, v, _HEAD_SCORES, preferred_element_type=jnp.float32)
    # Softmax backward: w * (dw - sum(w * dw)), and sum(w * dw) = sum(g * o) per row.
    row = jnp.sum(g.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    d_scores = (weights * (d_weights.astype(jnp.float32) - row) * q.shape[-1] ** -0.5)
    d_scores = d_scores.astype(q.dtype)
    d_query = dot_general(d_scores, k, _HEAD_MIX).astype(q.dtype)
    d_key = dot_general(d_scores, q, _HEAD_MIX_T).astype(k.dtype)
    return d_query, d_key, d_value

  heads = tuple(_by_head(x) for x in (query, key, value, out, cotangent)) + (log_total,)
  batch, num_heads = query.shape[0], query.shape[2]
  return tuple(_from_heads(x, batch, num_heads) for x in lax.map(one_head, heads))


per_head_attention.defvjp(_per_head_forward, _per_head_backward)


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
