"""The basic reverse-process sampler."""

import jax
import jax.numpy as jnp
import numpy as np

from vqdiffusion_jax.diffusion import sampler
from vqdiffusion_jax.diffusion import schedule as schedules


def test_a_certain_denoiser_yields_its_target_and_sampling_is_seeded():
  s = schedules.mask_and_replace(20, 16)
  target = jnp.asarray(np.random.default_rng(0).integers(0, 16, (3, 12)), jnp.int32)
  certain = lambda x_t, t: 50.0 * jax.nn.one_hot(target, 16)  # noqa: E731
  run = jax.jit(lambda key: sampler.sample(certain, s, key, 3, 12))
  np.testing.assert_array_equal(run(jax.random.key(0)), target)

  uniform = lambda x_t, t: jnp.zeros(x_t.shape + (16,))  # noqa: E731
  draw = jax.jit(lambda key: sampler.sample(uniform, s, key, 4, 64))
  a, b, c = draw(jax.random.key(1)), draw(jax.random.key(1)), draw(jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert a.dtype == jnp.int32 and int(a.max()) < 16 and len(np.unique(a)) > 8
