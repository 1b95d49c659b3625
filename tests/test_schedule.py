"""Schedules: official tables, diffusers parity, dense-matrix consistency."""

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest

from tests import dense
from vqdiffusion_jax.diffusion import schedule as schedules


def _tables(s):
  return {name: np.asarray(getattr(s, name)) for name in (
      "log_at", "log_bt", "log_ct", "log_cumprod_at", "log_cumprod_bt", "log_cumprod_ct")}


@pytest.mark.parametrize("num_timesteps,num_codes,kwargs", [
    (100, 16, {}),
    (100, 2887, {}),
    (10, 4096, {}),
    (50, 64, {"att_1": 0.999, "att_T": 0.01, "ctt_1": 0.001, "ctt_T": 0.9}),
])
def test_tables_match_diffusers(num_timesteps, num_codes, kwargs):
  ours = schedules.mask_and_replace(num_timesteps, num_codes, **kwargs)
  renamed = {"att_1": "alpha_cum_start", "att_T": "alpha_cum_end",
             "ctt_1": "gamma_cum_start", "ctt_T": "gamma_cum_end"}
  theirs = diffusers.VQDiffusionScheduler(
      num_vec_classes=num_codes + 1, num_train_timesteps=num_timesteps,
      **{renamed[k]: v for k, v in kwargs.items()})
  for name, value in _tables(ours).items():
    np.testing.assert_allclose(value, getattr(theirs, name).numpy(), rtol=1e-6, err_msg=name)
  assert ours.log_at.shape == (num_timesteps,)
  assert ours.log_cumprod_at.shape == (num_timesteps + 1,)


def test_official_defaults():
  s = schedules.mask_and_replace(100, 1024)
  abar, bbar, cbar = (np.exp(np.asarray(x[:-1], np.float64)) for x in
                      (s.log_cumprod_at, s.log_cumprod_bt, s.log_cumprod_ct))
  np.testing.assert_allclose(abar + cbar, 0.999999, rtol=1e-6)
  np.testing.assert_allclose(bbar, 1e-6 / 1024, rtol=1e-4)
  np.testing.assert_allclose(abar[[0, -1]], [0.99999, 0.000009], rtol=1e-6)
  np.testing.assert_allclose(cbar[[0, -1]], [0.000009, 0.99999], rtol=1e-6)
  a, b, c = dense.official_parameters(100, 1024)
  np.testing.assert_allclose(np.exp(np.asarray(s.log_at, np.float64)), a, rtol=1e-6)
  np.testing.assert_allclose(np.exp(np.asarray(s.log_ct, np.float64)), c, rtol=1e-6)
  np.testing.assert_allclose(np.exp(np.asarray(s.log_bt, np.float64)), b, rtol=1e-5)
  # Index T is the identity transition used for t = -1.
  assert s.log_cumprod_at[-1] == 0 and s.log_cumprod_ct[-1] == -np.inf
  assert s.log_cumprod_bt[-1] == -np.inf and s.log_1m_cumprod_ct[-1] == 0


ALL_SCHEDULES = [
    schedules.mask_and_replace(12, 5),
    schedules.cosine(12, 5),
    schedules.uniform(12, 5),
    schedules.mask_and_replace(8, 3, att_1=0.9, att_T=0.1, ctt_1=0.05, ctt_T=0.8),
]


@pytest.mark.parametrize("s", ALL_SCHEDULES, ids=["official", "cosine", "uniform", "custom"])
def test_dense_products_match_cumulative_tables(s):
  num_classes = s.num_classes
  steps = dense.step_matrices(s)
  for q in steps:
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-6)
    assert np.all(q >= 0)
  for t in range(s.num_timesteps):
    qbar = dense.product(steps[:t + 1], num_classes)
    cum = schedules.cumulative(s, t)
    expected = dense.transition_matrix(*np.exp([float(cum.log_a), float(cum.log_b),
                                                float(cum.log_c)]), s.codebook_size)
    np.testing.assert_allclose(qbar, expected, rtol=1e-5, atol=1e-7)
  identity = schedules.cumulative(s, -1)
  np.testing.assert_allclose(
      dense.transition_matrix(*np.exp([float(v) for v in identity[:3]]), s.codebook_size),
      np.eye(num_classes))


@pytest.mark.parametrize("s", ALL_SCHEDULES, ids=["official", "cosine", "uniform", "custom"])
def test_multistep_matches_dense_products(s):
  steps = dense.step_matrices(s)
  t = np.minimum(np.array([11, 11, 7, 5, 3, 7]), s.num_timesteps - 1)
  src = np.array([-1, 4, 0, 4, 2, 6])
  trans = schedules.multistep(s, jnp.asarray(t), jnp.asarray(src))
  for i, (ti, si) in enumerate(zip(t, src, strict=True)):
    expected = dense.product(steps[si + 1:ti + 1], s.num_classes)
    got = dense.transition_matrix(*np.exp([float(trans.log_a[i]), float(trans.log_b[i]),
                                           float(trans.log_c[i])]), s.codebook_size)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-7, err_msg=f"{ti}<-{si}")
  one_step = schedules.multistep(s, jnp.asarray(t), jnp.asarray(t - 1))
  np.testing.assert_array_equal(one_step.log_a, s.log_at[t])
  np.testing.assert_array_equal(one_step.log_b, s.log_bt[t])


def test_cosine_and_uniform_shapes():
  cos = schedules.cosine(11, 7)
  cbar = np.exp(np.asarray(cos.log_cumprod_ct[:-1], np.float64))
  expected = 0.000009 + (0.99999 - 0.000009) * np.sin(np.pi / 2 * np.arange(11) / 10)
  np.testing.assert_allclose(cbar, expected, rtol=1e-5)
  uni = schedules.uniform(11, 7)
  assert np.all(np.asarray(uni.log_ct) == -np.inf)
  assert np.all(np.asarray(uni.log_cumprod_ct) == -np.inf)
  assert np.all(np.diff(np.asarray(uni.log_cumprod_at[:-1])) < 0)


def test_bad_schedules_are_rejected():
  with pytest.raises(ValueError, match="unknown schedule 'linear'"):
    schedules.make("linear", 10, 4)
  with pytest.raises(ValueError, match="leaves"):
    schedules.mask_and_replace(10, 4, ctt_1=0.5, ctt_T=0.1)
  with pytest.raises(ValueError, match=">= 2"):
    schedules.mask_and_replace(1, 4)
  assert schedules.make("alpha1", 10, 4).codebook_size == 4
