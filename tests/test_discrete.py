"""The forward process and posteriors: dense matrices, diffusers, jit/vmap."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests import dense
from vqdiffusion_jax.diffusion import discrete
from vqdiffusion_jax.diffusion import schedule as schedules

SCHEDULES = {
    "official": schedules.mask_and_replace(12, 6),
    "cosine": schedules.cosine(12, 6),
    "uniform": schedules.uniform(12, 6),
}


def _random_log_probs(rng, shape, mask_mass=0.0):
  """Random normalised log-probs over K + 1 classes with given [MASK] mass."""
  p = rng.dirichlet(np.full(shape[-1] - 1, 0.5), size=shape[:-1])
  p = np.concatenate([p * (1 - mask_mass), np.full(shape[:-1] + (1,), mask_mass)], -1)
  with np.errstate(divide="ignore"):
    return np.log(np.maximum(p, 1e-30)).astype(np.float32), p


def test_log_onehot_matches_official_floor():
  x = np.array([[0, 3, 6], [6, 1, 2]])
  ours = discrete.log_onehot(jnp.asarray(x), 7)
  onehot = torch.nn.functional.one_hot(torch.from_numpy(x), 7)
  theirs = torch.log(onehot.float().clamp(min=1e-30)).numpy()
  np.testing.assert_array_equal(ours, theirs)
  assert ours.dtype == jnp.float32


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("mask_mass", [0.0, 0.3])
def test_q_xt_given_x0_is_the_dense_product(name, mask_mass):
  s = SCHEDULES[name]
  rng = np.random.default_rng(0)
  log_x0, p_x0 = _random_log_probs(rng, (s.num_timesteps + 1, 3, s.num_classes), mask_mass)
  t = np.arange(-1, s.num_timesteps)
  got = np.exp(np.asarray(discrete.q_xt_given_x0(s, jnp.asarray(log_x0), jnp.asarray(t)),
                          np.float64))
  steps = dense.step_matrices(s)
  for i, ti in enumerate(t):
    expected = p_x0[i] @ dense.product(steps[:ti + 1], s.num_classes)
    np.testing.assert_allclose(got[i], expected, rtol=3e-5, atol=1e-7, err_msg=f"t={ti}")


@pytest.mark.parametrize("name", SCHEDULES)
def test_q_xt_given_xtm1_is_one_dense_step(name):
  s = SCHEDULES[name]
  rng = np.random.default_rng(1)
  log_x, p_x = _random_log_probs(rng, (s.num_timesteps, 4, s.num_classes), 0.2)
  t = np.arange(s.num_timesteps)
  got = np.exp(np.asarray(discrete.q_xt_given_xtm1(s, jnp.asarray(log_x), jnp.asarray(t)),
                          np.float64))
  for i, q in enumerate(dense.step_matrices(s)):
    np.testing.assert_allclose(got[i], p_x[i] @ q, rtol=3e-5, atol=1e-7)


def _dense_posterior(s, p_x0, x_t, t, src):
  steps = dense.step_matrices(s)
  size = s.num_classes
  return dense.posterior(p_x0, x_t, dense.product(steps[:src + 1], size),
                         dense.product(steps[src + 1:t + 1], size),
                         dense.product(steps[:t + 1], size))


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("onehot_x0", [True, False])
def test_posterior_is_bayes_rule_on_dense_matrices(name, onehot_x0):
  s = SCHEDULES[name]
  rng = np.random.default_rng(2)
  num_codes, length = s.codebook_size, 7
  t = np.array([0, 1, 5, 11, 11, 6])
  src = t - 1
  x_t = rng.integers(0, num_codes + 1, (t.size, length))
  x_t[:, :2] = [num_codes, 0]
  if name == "uniform":
    x_t = np.minimum(x_t, num_codes - 1)
  if onehot_x0:
    x0 = rng.integers(0, num_codes, (t.size, length))
    log_x0 = np.asarray(discrete.log_onehot(jnp.asarray(x0), num_codes + 1))
    p_x0 = np.eye(num_codes)[x0]
  else:
    log_x0, p_full = _random_log_probs(rng, (t.size, length, num_codes + 1))
    log_x0[..., -1] = discrete.LOG_PROB_MIN
    p_x0 = p_full[..., :-1]
  got = discrete.q_posterior(s, jnp.asarray(log_x0),
                             discrete.log_onehot(jnp.asarray(x_t), num_codes + 1),
                             jnp.asarray(t))
  got = np.exp(np.asarray(got, np.float64))
  for b in range(t.size):
    for n in range(length):
      expected = _dense_posterior(s, p_x0[b, n], x_t[b, n], t[b], src[b])
      np.testing.assert_allclose(got[b, n], expected, rtol=1e-4, atol=1e-6,
                                 err_msg=f"t={t[b]} x_t={x_t[b, n]}")
      np.testing.assert_allclose(got[b, n].sum(), 1.0, rtol=1e-4)


@pytest.mark.parametrize("name", ["official", "cosine"])
def test_skip_step_posterior_matches_dense(name):
  s = SCHEDULES[name]
  rng = np.random.default_rng(3)
  num_codes = s.codebook_size
  t, src = np.array([11, 11, 8, 4, 3]), np.array([-1, 5, 2, 1, 2])
  x_t = rng.integers(0, num_codes + 1, (t.size, 6))
  x_t[:, 0] = num_codes
  log_x0, p_full = _random_log_probs(rng, (t.size, 6, num_codes + 1))
  log_x0[..., -1] = discrete.LOG_PROB_MIN
  got = discrete.q_posterior_tokens(s, jnp.asarray(log_x0), jnp.asarray(x_t),
                                    jnp.asarray(t), jnp.asarray(src))
  got = np.exp(np.asarray(got, np.float64))
  for b in range(t.size):
    for n in range(6):
      expected = _dense_posterior(s, p_full[b, n, :-1], x_t[b, n], t[b], src[b])
      np.testing.assert_allclose(got[b, n], expected, rtol=1e-4, atol=1e-6)


def _diffusers_scheduler(s):
  return diffusers.VQDiffusionScheduler(num_vec_classes=s.num_classes,
                                        num_train_timesteps=s.num_timesteps)


def _floor(x):
  """Entries at or below log(1e-30) are numerical zeros in both codebases."""
  return np.maximum(np.asarray(x), discrete.LOG_ZERO)


@pytest.mark.parametrize("num_timesteps,num_codes", [(100, 32), (100, 2887), (25, 256)])
def test_q_posterior_matches_diffusers(num_timesteps, num_codes):
  s = schedules.mask_and_replace(num_timesteps, num_codes)
  theirs = _diffusers_scheduler(s)
  rng = np.random.default_rng(4)
  batch, length = 3, 64
  logits = rng.normal(size=(batch, length, num_codes)).astype(np.float32) * 3
  log_x0 = discrete.x0_log_probs(jnp.asarray(logits))
  x_t = rng.integers(0, num_codes + 1, (batch, length))
  x_t[:, ::3] = num_codes
  for t in sorted({0, 1, num_timesteps // 2, num_timesteps - 1}):
    ours = discrete.q_posterior_tokens(s, log_x0, jnp.asarray(x_t), t)
    ref = theirs.q_posterior(torch.from_numpy(np.asarray(log_x0[..., :-1])).permute(0, 2, 1),
                             torch.from_numpy(x_t), t)
    ref = np.clip(ref.permute(0, 2, 1).numpy(), -70, 0)
    np.testing.assert_allclose(_floor(ours), _floor(ref), rtol=1e-5, atol=1e-5,
                               err_msg=f"t={t}")
    ours_t = discrete.q_posterior_tokens(s, log_x0, jnp.asarray(x_t), jnp.full((batch,), t))
    np.testing.assert_array_equal(ours, ours_t)


def test_q_xt_given_x0_matches_diffusers_cumulative_transitions():
  s = schedules.mask_and_replace(100, 512)
  theirs = _diffusers_scheduler(s)
  rng = np.random.default_rng(5)
  log_x0, _ = _random_log_probs(rng, (2, 16, 513))
  for t in [-1, 0, 37, 99]:
    ours = discrete.q_xt_given_x0(s, jnp.asarray(log_x0), t)
    ref = theirs.apply_cumulative_transitions(
        torch.from_numpy(log_x0[..., :-1]).permute(0, 2, 1), t).permute(0, 2, 1).numpy()
    np.testing.assert_allclose(_floor(ours), _floor(ref), rtol=1e-5, atol=1e-5)


def test_posterior_jit_and_vmap_agree_with_eager():
  s = SCHEDULES["official"]
  rng = np.random.default_rng(6)
  log_x0 = discrete.x0_log_probs(jnp.asarray(rng.normal(size=(4, 3, 5, 6)), jnp.float32))
  x_t = jnp.asarray(rng.integers(0, 7, (4, 3, 5)))
  t = jnp.asarray(rng.integers(0, 12, (4, 3)))
  fn = jax.jit(jax.vmap(lambda a, b, c: discrete.q_posterior_tokens(s, a, b, c)))
  batched = fn(log_x0, x_t, t)
  for i in range(4):
    np.testing.assert_allclose(batched[i], discrete.q_posterior_tokens(s, log_x0[i], x_t[i], t[i]),
                               rtol=1e-6, atol=1e-6)


def test_p_prev_at_the_last_step_returns_the_x0_distribution():
  s = SCHEDULES["official"]
  rng = np.random.default_rng(7)
  logits = jnp.asarray(rng.normal(size=(2, 9, 6)), jnp.float32)
  x_t = jnp.asarray(rng.integers(0, 6, (2, 9)))
  out = discrete.p_prev(s, logits, x_t, jnp.zeros((2,), jnp.int32))
  np.testing.assert_allclose(out[..., :-1], jax.nn.log_softmax(logits), atol=1e-5)


@pytest.mark.parametrize("name", SCHEDULES)
def test_q_sample_draws_from_q_xt_given_x0(name):
  s = SCHEDULES[name]
  num_codes, draws = s.codebook_size, 40000
  x0 = jnp.full((1, draws), 2, jnp.int32)
  for t in [0, 4, 11]:
    x_t = np.asarray(discrete.q_sample(s, jax.random.key(t), x0, t))
    freq = np.bincount(x_t.ravel(), minlength=num_codes + 1) / draws
    probs = np.exp(np.asarray(discrete.q_xt_given_x0(
        s, discrete.log_onehot(x0[:, :1], num_codes + 1), t), np.float64))[0, 0]
    bound = 5 * np.sqrt(probs * (1 - probs) / draws) + 1e-4
    assert np.all(np.abs(freq - probs) <= bound), (t, freq, probs)


def test_q_sample_is_deterministic_per_key_and_keeps_dtype():
  s = SCHEDULES["official"]
  x0 = jnp.zeros((3, 8), jnp.int32)
  a = discrete.q_sample(s, jax.random.key(0), x0, jnp.array([3, 6, 9]))
  b = discrete.q_sample(s, jax.random.key(0), x0, jnp.array([3, 6, 9]))
  np.testing.assert_array_equal(a, b)
  assert a.dtype == jnp.int32 and a.shape == x0.shape


def test_sample_categorical_draws_each_class_at_its_probability():
  probs = np.array([0.5, 0.0, 0.2, 0.25, 0.05, 0.0], np.float32)
  num_draws = 200_000
  log_probs = jnp.broadcast_to(jnp.log(jnp.asarray(probs)) + 3.0, (num_draws // 100, 100, 6))
  draws = np.asarray(jax.jit(discrete.sample_categorical)(jax.random.key(0), log_probs))
  assert draws.shape == (num_draws // 100, 100)
  frequencies = np.bincount(draws.ravel(), minlength=6) / num_draws
  assert frequencies[probs == 0].sum() == 0
  # Five binomial standard deviations.
  np.testing.assert_allclose(frequencies, probs, atol=5 * np.sqrt(0.25 / num_draws))
  other = np.asarray(discrete.sample_categorical(jax.random.key(1), log_probs))
  assert (other != draws).any()
  np.testing.assert_array_equal(
      np.asarray(discrete.sample_categorical(jax.random.key(0), log_probs)), draws)
