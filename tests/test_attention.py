"""The attention core: per-head and fused attention against dense math and the materialised path."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_transformer import TINY, _inputs, _random_params
from vqdiffusion_jax.models import attention, precision, transformer


def _qkv(batch=2, queries=24, keys=7, heads=3, head_dim=8, seed=0):
  rng = np.random.default_rng(seed)
  query = rng.normal(size=(batch, queries, heads, head_dim)).astype(np.float32)
  key, value = (rng.normal(size=(batch, keys, heads, head_dim)).astype(np.float32)
                for _ in range(2))
  return query, key, value


def _dense(query, key, value):
  """softmax(q k^T / sqrt(d)) v with explicit float64 matrices, head by head."""
  q, k, v = (np.asarray(x, np.float64) for x in (query, key, value))
  out = np.empty_like(q)
  for b in range(q.shape[0]):
    for h in range(q.shape[2]):
      scores = q[b, :, h] @ k[b, :, h].T / np.sqrt(q.shape[-1])
      weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
      out[b, :, h] = (weights / weights.sum(axis=-1, keepdims=True)) @ v[b, :, h]
  return out


@pytest.mark.parametrize("implementation", ["materialised", "per_head", "fused"])
def test_attention_is_the_dense_softmax_product(implementation):
  query, key, value = _qkv()
  got = attention.dot_product_attention(query, key, value, implementation=implementation)
  np.testing.assert_allclose(got, _dense(query, key, value), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["per_head", "fused"])
@pytest.mark.parametrize("dot_general, tolerance", [
    (jax.lax.dot_general, 1e-5), (precision.mixed_dot_general, 2e-2)])
def test_gradients_match_the_materialised_path(implementation, dot_general, tolerance):
  query, key, value = _qkv(queries=16, keys=16)
  weights = np.random.default_rng(1).normal(size=query.shape).astype(np.float32)

  def loss(implementation):
    def fn(q, k, v):
      out = attention.dot_product_attention(q, k, v, dot_general=dot_general,
                                            implementation=implementation)
      return jnp.sum(jnp.sin(out) * weights)
    return jax.grad(fn, argnums=(0, 1, 2))(query, key, value)

  for got, want in zip(loss(implementation), loss("materialised"), strict=True):
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(got, want, atol=tolerance * scale, rtol=0)


def test_fused_attention_takes_a_mask_and_bfloat16_operands():
  query, key, value = _qkv(queries=7, keys=7)
  mask = np.tril(np.ones((7, 7), bool))
  want = attention.dot_product_attention(query, key, value, mask, implementation="materialised")
  got = attention.dot_product_attention(query, key, value, mask, implementation="fused")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  mixed = attention.fused_attention(query, key, value, mask, precision.mixed_dot_general)
  rounded = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in (query, key, value)]
  assert mixed.dtype == jnp.float32
  np.testing.assert_allclose(mixed, attention.dot_product_attention(
      *rounded, mask, implementation="materialised"), atol=2e-2)
  assert "bf16" in str(jax.make_jaxpr(
      lambda q: attention.fused_attention(q, key, value, None, precision.mixed_dot_general))(
          query))


def test_auto_and_fused_backend_choices():
  long = int(np.sqrt(attention.PER_HEAD_MIN_SCORES))
  choose = attention.choose_implementation
  assert choose("gpu", 8, 8, masked=True) == "fused"
  assert choose("cpu", long, long, masked=False) == "per_head"
  assert choose("cpu", long, long, masked=True) == "materialised"
  assert choose("cpu", long // 2, long, masked=False) == "materialised"
  assert choose("tpu", long, long, masked=False) == "materialised"
  assert attention.fused_backend("gpu", jnp.bfloat16) == "cudnn"
  assert attention.fused_backend("gpu", jnp.float16) == "cudnn"
  assert attention.fused_backend("gpu", jnp.float32) == "xla"
  assert attention.fused_backend("cpu", jnp.bfloat16) == "xla"


def _has_loop(implementation, queries, mask=None):
  query, key, value = _qkv(batch=1, queries=queries, keys=queries, heads=1)
  jaxpr = jax.make_jaxpr(lambda q, k, v: attention.dot_product_attention(
      q, k, v, mask, implementation=implementation))(query, key, value)
  return "while" in str(jaxpr) or "scan" in str(jaxpr)


def test_auto_goes_per_head_for_long_unmasked_sequences_on_cpu():
  long = int(np.sqrt(attention.PER_HEAD_MIN_SCORES))
  assert jax.default_backend() == "cpu"
  assert _has_loop("auto", long)
  assert not _has_loop("auto", long // 2)
  assert not _has_loop("auto", long, mask=np.ones((long, long), bool))
  assert _has_loop("per_head", 8) and not _has_loop("materialised", long)


def test_per_head_backward_does_not_keep_every_heads_scores():
  query, key, value = _qkv(batch=2, queries=512, keys=512, heads=4, head_dim=16)
  all_scores = 2 * 4 * 512 * 512 * 4  # bytes of the float32 (B, H, Lq, Lk) scores

  def temp_bytes(implementation):
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention.dot_product_attention(
        q, k, v, implementation=implementation) ** 2), argnums=(0, 1, 2)))
    return grad.lower(query, key, value).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes("materialised") >= all_scores
  assert temp_bytes("per_head") < all_scores / 2


def test_bad_implementation_or_mask_is_an_error():
  query, key, value = _qkv()
  with pytest.raises(ValueError, match="not in"):
    attention.dot_product_attention(query, key, value, implementation="flash")
  with pytest.raises(ValueError, match="no mask"):
    attention.dot_product_attention(query, key, value, np.ones((24, 7), bool),
                                    implementation="per_head")


@pytest.mark.parametrize("implementation, layout", [
    ("per_head", {}), ("per_head", {"scan_layers": True, "remat": True, "remat_policy": "minimal"}),
    ("fused", {"scan_layers": True, "remat": True, "remat_policy": "minimal"})])
def test_denoiser_matches_the_materialised_one(implementation, layout):
  base = dataclasses.replace(TINY, **layout)
  _, params = _random_params(base)
  tokens, t, condition = _inputs(base)

  def loss_fn(name):
    module = transformer.VQDiffusionTransformer(dataclasses.replace(base, attention=name))
    return lambda p: jnp.sum(jnp.sin(module.apply({"params": p}, tokens, t, condition)))

  def logits_and_grads(name):
    return jax.jit(jax.value_and_grad(loss_fn(name)))(params)

  if implementation == "per_head":
    loops = {name: str(jax.make_jaxpr(loss_fn(name))(params)).count("scan[")
             for name in ("per_head", "materialised")}
    assert loops["per_head"] > loops["materialised"], loops
  (value, grads), (want_value, want_grads) = (logits_and_grads(name) for name in
                                              (implementation, "materialised"))
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               grads, want_grads)


def test_unknown_denoiser_attention_is_an_error():
  with pytest.raises(ValueError, match="attention 'flash' not in"):
    dataclasses.replace(TINY, attention="flash")
