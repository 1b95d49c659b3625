"""Batch-sharded calls on 8 CPU devices equal the single-device ones.

Both kinds of mesh axes are covered: Auto (GSPMD propagation, pjit style)
and Explicit (sharding in types, ``jax.make_mesh``'s default).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqdiffusion_jax.diffusion import discrete, importance
from vqdiffusion_jax.diffusion import schedule as schedules

SCHEDULE = schedules.mask_and_replace(100, 64)


@pytest.fixture(params=["Auto", "Explicit"])
def batch_sharded(request):
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  axis_type = getattr(jax.sharding.AxisType, request.param)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  with jax.set_mesh(mesh):
    yield lambda tree: jax.device_put(tree, sharding)


def _batch(seed=0, batch=8, length=32):
  rng = np.random.default_rng(seed)
  x0 = jnp.asarray(rng.integers(0, 64, (batch, length)), jnp.int32)
  t = jnp.asarray(rng.integers(0, 100, (batch,)), jnp.int32)
  x_t = discrete.q_sample(SCHEDULE, jax.random.key(seed), x0, t)
  logits = jnp.asarray(rng.normal(size=(batch, length, 64)), jnp.float32)
  return logits, x0, x_t, t, jnp.full((batch,), 0.01, jnp.float32)


def test_loss_and_gradient(batch_sharded):
  def loss(z, x0, x_t, t, pt):
    return discrete.training_losses(SCHEDULE, z, x0, x_t, t, pt, aux_weight=5e-4,
                                    max_chunk_elements=8 * 8 * 64)["loss"]
  step = jax.jit(jax.value_and_grad(loss))
  args = _batch()
  want, want_grad = step(*args)
  got, got_grad = step(*batch_sharded(args))
  assert got_grad.sharding.spec[0] == "data"
  # Per-device programs round differently; the math is per position, so the
  # differences stay at float32 rounding of the largest entries.
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5,
                             atol=1e-5 * np.abs(want_grad).max())


def test_forward_sampling_and_posterior_sampling(batch_sharded):
  _, x0, x_t, t, _ = _batch(seed=1)
  forward = jax.jit(lambda x0, t: discrete.q_sample(SCHEDULE, jax.random.key(3), x0, t))
  np.testing.assert_array_equal(forward(*batch_sharded((x0, t))), forward(x0, t))
  logits = jnp.zeros(x0.shape + (64,))
  reverse = jax.jit(lambda z, x_t, t: discrete.sample_categorical(
      jax.random.key(4), discrete.p_prev(SCHEDULE, z, x_t, t)))
  np.testing.assert_array_equal(reverse(*batch_sharded((logits, x_t, t))),
                                reverse(logits, x_t, t))


def test_history_update(batch_sharded):
  t = jnp.asarray([3, 5, 3, 9, 0, 5, 5, 2], jnp.int32)
  vb = jnp.arange(8, dtype=jnp.float32)
  update = jax.jit(importance.update_history)
  want = update(importance.LossHistory.create(10), t, vb)
  got = update(importance.LossHistory.create(10), *batch_sharded((t, vb)))
  np.testing.assert_allclose(got.lt2, want.lt2, rtol=1e-6)
  np.testing.assert_array_equal(got.count, want.count)
