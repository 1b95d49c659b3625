"""Importance sampling of timesteps against the official rule, in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np

from vqdiffusion_jax.diffusion import importance


def _official_probs(lt2, count):
  num_timesteps = lt2.shape[0]
  if not np.all(count > 10):
    return np.full(num_timesteps, 1.0 / num_timesteps)
  weights = np.sqrt(lt2 + 1e-10) + 0.0001
  weights[0] = weights[1]
  return weights / weights.sum()


def _official_update(lt2, count, t, vb):
  """The official scatter, with the last duplicate winning."""
  new = 0.1 * vb ** 2 + 0.9 * lt2[t]
  lt2, count = lt2.copy(), count.copy()
  for i in range(t.size):
    lt2[t[i]] = new[i]
    count[t[i]] += 1
  return lt2, count


def test_uniform_until_every_step_is_seen_more_than_ten_times():
  history = importance.LossHistory.create(5)
  history = history.replace(lt2=jnp.arange(5.0), count=jnp.array([11, 11, 11, 11, 10]))
  np.testing.assert_allclose(importance.timestep_probs(history), 0.2)
  warm = history.replace(count=jnp.full((5,), 11))
  np.testing.assert_allclose(importance.timestep_probs(warm),
                             _official_probs(np.arange(5.0), np.full(5, 11)), rtol=1e-6)


def test_history_update_matches_the_official_rule():
  rng = np.random.default_rng(0)
  lt2 = rng.uniform(0, 5, 8).astype(np.float32)
  count = rng.integers(0, 20, 8).astype(np.int32)
  t = np.array([3, 1, 3, 7, 0, 3])
  vb = rng.uniform(0, 3, t.size).astype(np.float32)
  history = importance.LossHistory(lt2=jnp.asarray(lt2), count=jnp.asarray(count))
  got = jax.jit(importance.update_history)(history, jnp.asarray(t), jnp.asarray(vb))
  want_lt2, want_count = _official_update(lt2, count, t, vb)
  np.testing.assert_allclose(got.lt2, want_lt2, rtol=1e-6)
  np.testing.assert_array_equal(got.count, want_count)


def test_sampled_steps_follow_the_probabilities():
  lt2 = jnp.asarray(np.linspace(0.0, 9.0, 6) ** 2, jnp.float32)
  history = importance.LossHistory(lt2=lt2, count=jnp.full((6,), 50))
  probs = np.asarray(importance.timestep_probs(history), np.float64)
  draws = 60000
  t, pt = jax.jit(importance.sample_timesteps, static_argnums=2)(
      jax.random.key(0), history, draws)
  freq = np.bincount(np.asarray(t), minlength=6) / draws
  assert np.all(np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / draws))
  np.testing.assert_allclose(pt, probs[np.asarray(t)], rtol=1e-6)
  assert t.dtype == jnp.int32


def test_cold_history_draws_uniformly_with_pt_one_over_t():
  history = importance.LossHistory.create(100)
  t, pt = importance.sample_timesteps(jax.random.key(1), history, 4096)
  np.testing.assert_allclose(pt, 0.01, rtol=1e-6)
  assert int(t.min()) == 0 and int(t.max()) == 99
