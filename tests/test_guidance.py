"""Truncation and guidance against diffusers' VQ-Diffusion pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import VQDiffusionPipeline

from vqdiffusion_jax.diffusion import discrete, guidance


def _x0_log_probs(seed, shape=(3, 50, 64), temperature=2.0):
  rng = np.random.default_rng(seed)
  return discrete.x0_log_probs(jnp.asarray(rng.normal(size=shape) * temperature, jnp.float32))


@pytest.mark.parametrize("rate", [0.3, 0.86, 0.99])
def test_truncate_matches_diffusers(rate):
  log_p = _x0_log_probs(0)
  ours = guidance.truncate(log_p, rate)
  class_first = torch.from_numpy(np.array(log_p)).permute(0, 2, 1)
  theirs = VQDiffusionPipeline.truncate(None, class_first, rate).clamp(-70)
  np.testing.assert_array_equal(ours, theirs.permute(0, 2, 1).numpy())
  kept = np.asarray(ours) > -70
  assert np.all(kept.sum(-1) >= 1)
  assert np.all(np.where(kept, np.exp(np.asarray(log_p)), 0).sum(-1) >= min(rate, 0.999) - 1e-3)


def test_truncate_keeps_the_top_class_even_at_rate_zero():
  log_p = _x0_log_probs(1)
  out = np.asarray(guidance.truncate(log_p, 0.0))
  assert np.all((out > -70).sum(-1) == 1)
  np.testing.assert_array_equal(out.argmax(-1), np.asarray(log_p).argmax(-1))


def _truncate_by_sorting(log_p: np.ndarray, rate: float) -> np.ndarray:
  """The official rule, one position at a time: rank, accumulate, cut, keep ties."""
  out = np.full_like(log_p, -70.0)
  for index in np.ndindex(log_p.shape[:-1]):
    row = log_p[index]
    ranked = np.sort(row)[::-1]
    mass_above = np.cumsum(np.exp(ranked.astype(np.float64)))[:-1]
    threshold = ranked[np.sum(mass_above < rate)]
    out[index] = np.where(row >= threshold, row, -70.0)
  return out


@pytest.mark.parametrize("rate", [0.0, 0.5, 0.86, 1.0, 1.5])
def test_truncate_by_bisection_keeps_the_classes_sorting_keeps_ties_included(rate):
  rng = np.random.default_rng(4)
  # Few distinct logits per row, so many classes tie, some at the cut.
  logits = rng.integers(0, 6, size=(4, 40, 33)).astype(np.float32) * 0.7
  logits[0, :, :] = 0.0  # all tied
  log_p = np.asarray(discrete.x0_log_probs(jnp.asarray(logits)))
  ours = np.asarray(jax.jit(guidance.truncate)(jnp.asarray(log_p), rate))
  np.testing.assert_array_equal(ours, _truncate_by_sorting(log_p, rate))
  if 0.0 < rate <= 0.86:
    assert 1 < (ours > -70).sum(-1).min() < log_p.shape[-1]


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0, 5.5])
def test_guide_matches_the_diffusers_combination(scale):
  cond, uncond = _x0_log_probs(2), _x0_log_probs(3)
  ours = jax.jit(guidance.guide)(cond, uncond, scale)
  c = torch.from_numpy(np.array(cond[..., :-1]))
  u = torch.from_numpy(np.array(uncond[..., :-1]))
  theirs = u + scale * (c - u)
  theirs = (theirs - torch.logsumexp(theirs, dim=-1, keepdim=True)).clamp(-70, 0)
  np.testing.assert_allclose(ours[..., :-1], theirs.numpy(), rtol=1e-6, atol=1e-5)
  np.testing.assert_array_equal(ours[..., -1], -70.0)
  if scale == 1.0:
    np.testing.assert_allclose(ours, cond, atol=1e-5)
  if scale == 0.0:
    np.testing.assert_allclose(ours, uncond, atol=1e-5)


def test_purity_is_the_largest_codebook_probability():
  log_p = _x0_log_probs(4)
  np.testing.assert_allclose(guidance.purity(log_p),
                             np.exp(np.asarray(log_p[..., :-1])).max(-1), rtol=1e-6)
  certain = discrete.log_onehot(jnp.array([[2, 0]]), 5).at[..., -1].set(-70.0)
  np.testing.assert_allclose(guidance.purity(certain), 1.0)
