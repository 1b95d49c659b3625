"""Tests of the Paella convolutional token predictor."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import assert_logically_partitioned
from vqdiffusion_jax.models.paella import PaellaPredictor

K, T, TEXT_DIM, TEXT_LEN = 16, 10, 8, 4
CONFIG = {"codebook_size": K, "num_timesteps": T, "condition_dim": TEXT_DIM,
          "condition_length": TEXT_LEN, "channels": (32, 64), "blocks_per_level": 1,
          "modulation_dim": 32, "timestep_dim": 16}


def _inputs(seed, batch, height, width):
  k_tokens, k_t, k_text = jax.random.split(jax.random.key(seed), 3)
  tokens = jax.random.randint(k_tokens, (batch, height, width), 0, K + 1)
  t = jax.random.randint(k_t, (batch,), 0, T)
  text = jax.random.normal(k_text, (batch, TEXT_LEN, TEXT_DIM))
  return tokens, t, text


@functools.partial(jax.jit, static_argnames=("seed", "scale"))
def _randomised(params, seed=1, scale=0.3):
  """Adds noise to every parameter, so zero-initialised maps and tiny layer scales matter."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [p + scale * jax.random.normal(k, p.shape, p.dtype)
           for p, k in zip(leaves, keys, strict=True)]
  return treedef.unflatten(noisy)


@functools.cache
def _apply_fn(**overrides):
  model = PaellaPredictor(**{**CONFIG, **overrides})
  return jax.jit(lambda params, tokens, t, text: model.apply({"params": params}, tokens, t, text))


def _loss_and_grads(params, tokens, t, text, targets, **overrides):
  model = PaellaPredictor(**{**CONFIG, **overrides})

  def loss_fn(p):
    logits = model.apply({"params": p}, tokens, t, text)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1))

  return jax.jit(jax.value_and_grad(loss_fn))(params)


@pytest.fixture(scope="module")
def init_params():
  tokens, t, text = _inputs(0, 1, 8, 8)
  return jax.jit(PaellaPredictor(**CONFIG).init)(jax.random.key(0), tokens, t, text)["params"]


@pytest.fixture(scope="module")
def params(init_params):
  return _randomised(init_params)


@pytest.fixture(scope="module")
def grad_inputs():
  tokens, t, text = _inputs(5, 2, 8, 8)
  targets = jax.random.randint(jax.random.key(6), tokens.shape, 0, K)
  return tokens, t, text, targets


@pytest.fixture(scope="module")
def plain_loss_and_grads(params, grad_inputs):
  return _loss_and_grads(params, *grad_inputs)


def test_logical_axes_on_every_parameter(init_params):
  assert_logically_partitioned(init_params)


@pytest.mark.parametrize("height,width", [(8, 8), (8, 16), (16, 16)])
def test_any_latent_size_with_one_set_of_params(params, height, width):
  tokens, t, text = _inputs(1, 2, height, width)
  logits = _apply_fn()(params, tokens, t, text)
  assert logits.shape == (2, height, width, K)
  assert logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


def _influence_interval(position, model):
  """The positions along one axis whose logits can depend on the token at ``position``."""
  radius = model.blocks_per_level * (model.kernel_size // 2)
  deepest = len(model.channels) - 1
  low = high = position
  skips = []
  for level in range(deepest + 1):
    if level > 0:
      low, high = low // 2, high // 2
    low, high = low - radius, high + radius
    skips.append((low, high))
  for level in reversed(range(deepest + 1)):
    if level < deepest:
      low, high = min(low, skips[level][0]), max(high, skips[level][1])
    low, high = low - radius, high + radius
    if level > 0:
      low, high = 2 * low, 2 * high + 1
  return low, high


def test_receptive_field_is_local(params):
  size, row, col = 32, 12, 20
  tokens, t, text = _inputs(2, 1, size, size)
  changed = tokens.at[0, row, col].set((tokens[0, row, col] + 1) % (K + 1))
  logits = _apply_fn()(params, jnp.concatenate([tokens, changed]),
                       jnp.concatenate([t, t]), jnp.concatenate([text, text]))
  diff = np.asarray(jnp.max(jnp.abs(logits[0] - logits[1]), axis=-1))
  model = PaellaPredictor(**CONFIG)
  row_low, row_high = _influence_interval(row, model)
  col_low, col_high = _influence_interval(col, model)
  inside = np.zeros_like(diff, dtype=bool)
  inside[max(row_low, 0):row_high + 1, max(col_low, 0):col_high + 1] = True
  assert inside.sum() < diff.size / 2, "the bound should leave most of the latent outside"
  # Outside: only float32 rounding, which differs between the batch rows by CPU (1.4e-6
  # on an AVX2-only EPYC); inside, the change moves logits by more than 1e-3.
  assert diff[~inside].max() <= 1e-5
  assert diff[inside].max() > 1e-3
  assert diff[row, col] > 1e-3


def test_bfloat16_compute_keeps_float32_params_and_logits(params):
  tokens, t, text = _inputs(3, 2, 8, 8)
  bf16_params = jax.jit(PaellaPredictor(**CONFIG, dtype=jnp.bfloat16).init)(
      jax.random.key(0), tokens, t, text)["params"]
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(bf16_params))
  reference = _apply_fn()(params, tokens, t, text)
  logits = _apply_fn(dtype=jnp.bfloat16)(params, tokens, t, text)
  assert logits.dtype == jnp.float32
  scale = float(jnp.max(jnp.abs(reference)))
  error = float(jnp.max(jnp.abs(logits - reference)))
  assert error < 0.05 * scale, (error, scale)


def test_remat_matches_plain(params, grad_inputs, plain_loss_and_grads):
  loss, grads = plain_loss_and_grads
  remat_loss, remat_grads = _loss_and_grads(params, *grad_inputs, remat=True)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  for remat_leaf, leaf in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads), strict=True):
    np.testing.assert_allclose(remat_leaf, leaf, rtol=1e-5, atol=1e-6)


def test_gradients_finite_and_nonzero(plain_loss_and_grads):
  loss, grads = plain_loss_and_grads
  assert bool(jnp.isfinite(loss))
  for path, grad in jax.tree_util.tree_flatten_with_path(grads)[0]:
    name = jax.tree_util.keystr(path)
    assert bool(jnp.all(jnp.isfinite(grad))), name
    # The null embedding only enters through the caller, never through __call__.
    assert "null_text" in name or float(jnp.max(jnp.abs(grad))) > 0, name


def test_text_and_timestep_change_logits(params):
  tokens, t, text = _inputs(4, 1, 8, 8)
  other_text = text + 1.0
  other_t = (t + T // 2) % T
  logits = _apply_fn()(params, jnp.concatenate([tokens] * 3),
                       jnp.concatenate([t, t, other_t]),
                       jnp.concatenate([text, other_text, text]))
  assert float(jnp.max(jnp.abs(logits[1] - logits[0]))) > 1e-3
  assert float(jnp.max(jnp.abs(logits[2] - logits[0]))) > 1e-3


def test_null_text_shape(init_params):
  null = PaellaPredictor(**CONFIG).apply(
      {"params": init_params}, 3, method=PaellaPredictor.null_text)
  assert null.shape == (3, TEXT_LEN, TEXT_DIM)
  assert null.dtype == jnp.float32
  np.testing.assert_array_equal(null[0], null[2])


@pytest.mark.parametrize("shape", [(1, 8, 9), (1, 7, 8), (8, 8)])
def test_wrong_latent_shape_raises(init_params, shape):
  tokens = jnp.zeros(shape, jnp.int32)
  t = jnp.zeros((1,), jnp.int32)
  text = jnp.zeros((1, TEXT_LEN, TEXT_DIM))
  with pytest.raises(ValueError, match="divisible|must be"):
    PaellaPredictor(**CONFIG).apply({"params": init_params}, tokens, t, text)
