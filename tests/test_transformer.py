"""The transformer denoiser: shapes, dtypes, logical axes, remat / scan, variants, sizes."""

import dataclasses
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import assert_logically_partitioned
from vqdiffusion_jax.models import transformer

TINY = transformer.TransformerConfig(
    codebook_size=31, spatial_size=(3, 4), num_layers=2, embed_dim=64, num_heads=4,
    condition_dim=24, condition_length=7, num_timesteps=10)
BATCH = 2


@functools.lru_cache
def _apply(config):
  return jax.jit(transformer.VQDiffusionTransformer(config).apply)


def _random_params(config, seed=0):
  """Boxed abstract params (eval_shape of init) and random values for them.

  Values are N(0, 0.2), LayerNorm scales 1 + N(0, 0.2): far enough from the
  init (std 0.02) that every part of the network moves the output. Drawn with
  NumPy, which compiles nothing.
  """
  abstract = transformer.abstract_params(config)
  flat = flax.traverse_util.flatten_dict(nn.meta.unbox(abstract))
  rng = np.random.default_rng(seed)
  params = {path: jnp.asarray((path[-1] == "scale") + 0.2 * rng.normal(size=leaf.shape),
                              jnp.float32) for path, leaf in flat.items()}
  return abstract, flax.traverse_util.unflatten_dict(params)


def _inputs(config, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, config.codebook_size + 1, size=(BATCH, config.num_tokens))
  tokens[0, :5] = config.codebook_size  # [MASK]
  t = jnp.asarray(rng.integers(0, config.num_timesteps, size=(BATCH,)))
  if config.conditioning == "text":
    condition = jnp.asarray(rng.normal(size=(BATCH, config.condition_length,
                                              config.condition_dim)), jnp.float32)
  elif config.conditioning == "class":
    condition = jnp.asarray([1, config.num_classes - 1])
  else:
    condition = None
  return jnp.asarray(tokens), t, condition


@pytest.fixture(scope="module")
def tiny():
  module = transformer.VQDiffusionTransformer(TINY)
  variables = jax.jit(module.init)(jax.random.key(0), *transformer.dummy_inputs(TINY))
  _, params = _random_params(TINY)
  inputs = _inputs(TINY)
  return variables, params, inputs, _apply(TINY)({"params": params}, *inputs)


def test_shapes_dtypes_and_logical_axes(tiny):
  variables, params, _, logits = tiny
  assert logits.shape == (BATCH, 12, 31) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert_logically_partitioned(variables["params"])
  initialised = nn.meta.unbox(variables["params"])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(initialised))
  assert jax.tree.structure(initialised) == jax.tree.structure(params)
  assert initialised["token_embed"]["tokens"].shape == (32, 64)  # K + 1 rows, [MASK] = K


def test_timesteps_and_text_are_per_sample(tiny):
  _, params, (tokens, t, text), logits = tiny
  apply = _apply(TINY)
  for b in range(BATCH):
    alone = apply({"params": params}, tokens[b:b + 1], t[b:b + 1], text[b:b + 1])
    np.testing.assert_allclose(alone[0], logits[b], atol=1e-5)
  other_t = apply({"params": params}, tokens, (t + 1) % TINY.num_timesteps, text)
  other_text = apply({"params": params}, tokens, t, text[::-1])
  assert np.abs(other_t - logits).max() > 1e-2 and np.abs(other_text - logits).max() > 1e-2


def test_bfloat16_compute_keeps_float32_params_and_logits(tiny):
  _, params, inputs, logits = tiny
  config = dataclasses.replace(TINY, dtype=jnp.bfloat16)
  abstract = transformer.abstract_params(config)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.meta.unbox(abstract)))
  low = _apply(config)({"params": params}, *inputs)
  assert low.dtype == jnp.float32
  diff = float(np.abs(low - logits).max())
  print(f"bfloat16 vs float32 logits: max abs diff {diff:.3g}, max |logit| "
        f"{float(np.abs(logits).max()):.3g}")
  assert 0 < diff < 0.05 * float(np.abs(logits).max()), diff


@pytest.mark.parametrize("options", [{"remat": True}, {"scan_layers": True},
                                     {"scan_layers": True, "remat": True}],
                         ids=["remat", "scan", "scan_remat"])
def test_remat_and_scan_match_plain(tiny, options):
  _, params, inputs, logits = tiny
  config = dataclasses.replace(TINY, **options)
  module = transformer.VQDiffusionTransformer(config)
  variables = jax.eval_shape(module.init, jax.random.key(0), *transformer.dummy_inputs(config))
  if config.scan_layers:
    names = variables["params"]["blocks"]["mlp"]["fc1"]["kernel"].names
    assert names == ("layers", "embed", "mlp")
    params = transformer.stack_layers(params, TINY.num_layers)
    jax.tree.map(np.testing.assert_array_equal, transformer.unstack_layers(params), tiny[1])
  assert_logically_partitioned(variables["params"])
  assert jax.tree.structure(params) == jax.tree.structure(nn.meta.unbox(variables["params"]))
  out = _apply(config)({"params": params}, *inputs)
  print(f"{options}: max abs diff {float(np.abs(out - logits).max()):.2e}")
  np.testing.assert_allclose(out, logits, atol=1e-5)


@pytest.mark.parametrize("policy", sorted(transformer.REMAT_POLICIES))
def test_scan_remat_gradients_match_plain(tiny, policy):
  _, params, inputs, _ = tiny
  config = dataclasses.replace(TINY, scan_layers=True, remat=True, remat_policy=policy)

  def grad(cfg, p):
    module = transformer.VQDiffusionTransformer(cfg)
    loss = lambda p: jnp.sum(jax.nn.log_softmax(module.apply({"params": p}, *inputs))[..., 0])
    return jax.jit(jax.grad(loss))(p)

  plain = grad(TINY, params)
  scanned = transformer.unstack_layers(grad(config, transformer.stack_layers(params, 2)))
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), scanned, plain))
  print(f"scan + remat ({policy}) gradients: max abs diff {max(diffs):.2e}")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), scanned, plain)


def _dot_generals(fn, *args) -> tuple[int, int]:
  """(all, batched) dot_general ops in the StableHLO of ``jit(fn)``."""
  dots = [line for line in jax.jit(fn).lower(*args).as_text().splitlines()
          if "dot_general" in line]
  return len(dots), sum("batching_dims" in line for line in dots)


def test_minimal_remat_recomputes_only_the_attention_products():
  def counts(**options):
    module = transformer.VQDiffusionTransformer(
        dataclasses.replace(TINY, scan_layers=True, **options))
    inputs = transformer.dummy_inputs(module.config)
    params = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    loss = lambda p: jnp.sum(module.apply({"params": p}, *inputs))
    return _dot_generals(loss, params), _dot_generals(jax.grad(loss), params)

  (_, forward_batched), (plain, _) = counts()
  _, (full, _) = counts(remat=True)
  _, (minimal, _) = counts(remat=True, remat_policy="minimal")
  print(f"backward dot_generals: plain {plain}, full remat {full}, minimal remat {minimal}")
  assert forward_batched > 0
  assert minimal - plain == forward_batched  # q k^T and p v of each attention, again
  assert full - plain > forward_batched  # the weight products too
  with pytest.raises(ValueError, match="remat_policy"):
    dataclasses.replace(TINY, remat_policy="dots")


def test_pooled_text_modulates_by_the_mean_caption(tiny):
  _, params, (tokens, t, text), logits = tiny
  config = dataclasses.replace(TINY, pooled_text=True)
  abstract = nn.meta.unbox(transformer.abstract_params(config))
  assert abstract["block_0"]["pooled_text"]["kernel"].shape == (24, 64)
  rng = np.random.default_rng(3)
  pooled = {f"block_{i}": {"pooled_text": {
      "kernel": jnp.asarray(0.2 * rng.normal(size=(24, 64)), jnp.float32),
      "bias": jnp.asarray(0.2 * rng.normal(size=(64,)), jnp.float32)}} for i in range(2)}
  def with_blocks(extra):
    return {k: {**v, **extra.get(k, {})} if isinstance(v, dict) else v
            for k, v in params.items()}

  with_pooled = with_blocks(pooled)
  apply = _apply(config)
  out = apply({"params": with_pooled}, tokens, t, text)
  assert np.abs(out - logits).max() > 1e-2
  # The pooled row is the mean over text positions, so their order does not matter to it.
  zero_cross = jax.tree.map(jnp.zeros_like, params["block_0"]["cross_attn"])
  order_free = {**with_pooled, **{f"block_{i}": {**with_pooled[f"block_{i}"],
                                                 "cross_attn": zero_cross} for i in range(2)}}
  np.testing.assert_allclose(apply({"params": order_free}, tokens, t, text[:, ::-1]),
                             apply({"params": order_free}, tokens, t, text), atol=1e-5)
  # A zero projection adds nothing: the plain model's logits.
  plain = with_blocks(jax.tree.map(jnp.zeros_like, pooled))
  np.testing.assert_allclose(apply({"params": plain}, tokens, t, text), logits, atol=1e-5)
  with pytest.raises(ValueError, match="pooled_text needs text"):
    dataclasses.replace(TINY, pooled_text=True, conditioning="none")


def test_null_text(tiny):
  _, params, _, _ = tiny
  module = transformer.VQDiffusionTransformer(TINY)
  null = module.apply({"params": params}, 3, method="null_text")
  assert null.shape == (3, 7, 24) and null.dtype == jnp.float32
  np.testing.assert_array_equal(null[1], params["null_text"])
  no_null = dataclasses.replace(TINY, learnable_null_text=False)
  assert "null_text" not in transformer.abstract_params(no_null)


def test_class_conditional_variant():
  config = dataclasses.replace(TINY, conditioning="class", num_classes=5, mlp_type="conv",
                               spatial_size=(4, 4), position_grid=(8, 8))
  abstract, params = _random_params(config)
  assert_logically_partitioned(abstract)
  assert "cross_attn" not in params["block_0"]
  assert params["block_0"]["mlp_norm"]["embedding"].shape == (5, 64)
  assert params["token_embed"]["rows"].shape == (8, 64)
  tokens, t, labels = _inputs(config)
  apply = _apply(config)
  logits = apply({"params": params}, tokens, t, labels)
  assert logits.shape == (BATCH, 16, 31) and logits.dtype == jnp.float32
  assert np.abs(apply({"params": params}, tokens, t, labels[::-1]) - logits).max() > 1e-2
  # Label num_classes (the null class) reads the mean row of every class table.
  mean_tables = flax.traverse_util.flatten_dict(params)
  for path, value in mean_tables.items():
    if path[1:] == ("mlp_norm", "embedding"):
      mean_tables[path] = jnp.broadcast_to(value.mean(0), value.shape)
  mean_tables = flax.traverse_util.unflatten_dict(mean_tables)
  null = jnp.full((BATCH,), config.num_classes)
  np.testing.assert_allclose(apply({"params": params}, tokens, t, null),
                             apply({"params": mean_tables}, tokens, t, labels), atol=1e-5)


def test_unconditional_variant():
  config = dataclasses.replace(TINY, conditioning="none", mlp_type="conv")
  abstract, params = _random_params(config)
  assert_logically_partitioned(abstract)
  assert set(params["block_0"]) == {"self_attn_norm", "self_attn", "mlp_norm", "mlp"}
  assert "null_text" not in params
  tokens, t, _ = _inputs(config)
  logits = _apply(config)({"params": params}, tokens, t, None)
  assert logits.shape == (BATCH, 12, 31) and logits.dtype == jnp.float32
  with pytest.raises(ValueError, match="conditioning"):
    _apply(config)({"params": params}, tokens, t, jnp.zeros((BATCH, 7, 24)))


@pytest.mark.parametrize("name", ["base", "large"])
def test_parameter_counts(name):
  config = transformer.preset(name)
  count = transformer.count_params(config)
  module = transformer.VQDiffusionTransformer(config)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *transformer.dummy_inputs(config))
  leaves = jax.tree.leaves(nn.meta.unbox(shapes["params"]))
  assert count == sum(int(np.prod(x.shape)) for x in leaves)
  d = config.embed_dim
  assert leaves and count > config.num_layers * 12 * d * d  # attention + MLP at least
  print(f"{name}: {count:,} parameters")
