"""The training loss: official definition (torch reference), properties, memory."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests import torch_reference
from vqdiffusion_jax.diffusion import discrete
from vqdiffusion_jax.diffusion import schedule as schedules

training_losses = jax.jit(discrete.training_losses, static_argnames=(
    "aux_weight", "adaptive_aux", "mask_weight", "max_chunk_elements"))

def _batch(num_timesteps, num_codes, batch=6, length=24, seed=0, one_t=None):
  rng = np.random.default_rng(seed)
  s = schedules.mask_and_replace(num_timesteps, num_codes)
  x0 = rng.integers(0, num_codes, (batch, length))
  t = rng.integers(0, num_timesteps, (batch,))
  t[:2] = [0, num_timesteps - 1]
  if one_t is not None:  # diffusers' AdaLayerNorm takes one t per batch
    t[:] = one_t
  x_t = np.array(discrete.q_sample(s, jax.random.key(seed), jnp.asarray(x0), jnp.asarray(t)),
               np.int64)
  logits = (rng.normal(size=(batch, length, num_codes)) * 2).astype(np.float32)
  pt = rng.uniform(0.005, 0.02, (batch,)).astype(np.float32)
  return s, logits, x0, x_t, t, pt


@pytest.mark.parametrize("num_timesteps,num_codes,mask_weight,one_t", [
    (100, 32, (1.0, 1.0), None),
    (100, 300, (2.0, 0.5), None),
    (20, 64, (1.0, 0.1), None),
    (100, 32, (1.0, 1.0), 37),
])
def test_loss_and_gradient_match_the_official_definition(num_timesteps, num_codes, mask_weight,
                                                          one_t):
  s, logits, x0, x_t, t, pt = _batch(num_timesteps, num_codes, one_t=one_t)
  aux_weight = 5e-4

  def ours(z):
    out = training_losses(s, z, jnp.asarray(x0), jnp.asarray(x_t), jnp.asarray(t),
                                   jnp.asarray(pt), aux_weight=aux_weight,
                                   mask_weight=mask_weight)
    return out["loss"], out
  (loss, out), grad = jax.jit(jax.value_and_grad(ours, has_aux=True))(jnp.asarray(logits))

  scheduler = diffusers.VQDiffusionScheduler(num_vec_classes=num_codes + 1,
                                             num_train_timesteps=num_timesteps)
  logits_t = torch.tensor(logits, requires_grad=True)
  ref_loss, ref_vb, ref_aux = torch_reference.training_loss(
      scheduler, logits_t, torch.from_numpy(x0), torch.from_numpy(x_t), torch.from_numpy(t),
      torch.from_numpy(pt), aux_weight=aux_weight, mask_weight=mask_weight)
  ref_loss.backward()

  np.testing.assert_allclose(out["vb"], ref_vb.detach().numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["aux"], ref_aux.detach().numpy(), rtol=1e-5, atol=1e-5)
  literal_vb, literal_aux = discrete.loss_terms(
      s, discrete.x0_log_probs(jnp.asarray(logits)), jnp.asarray(x0), jnp.asarray(x_t),
      jnp.asarray(t), mask_weight)
  np.testing.assert_allclose(literal_vb, ref_vb.detach().numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(literal_aux, ref_aux.detach().numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, ref_loss.item(), rtol=1e-5)
  ref_grad = logits_t.grad.numpy()
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=2e-5 * np.abs(ref_grad).max())


def test_loss_is_nonnegative_and_finite():
  s, logits, x0, x_t, t, pt = _batch(100, 50, batch=16, seed=1)
  out = training_losses(s, jnp.asarray(logits), jnp.asarray(x0), jnp.asarray(x_t),
                        jnp.asarray(t), jnp.asarray(pt), aux_weight=5e-4)
  assert np.all(np.asarray(out["vb"]) >= -1e-5)
  assert np.all(np.asarray(out["aux"]) >= -1e-5)
  assert np.isfinite(out["loss"]) and out["loss"] > 0


@pytest.mark.parametrize("name", ["mask_and_replace", "cosine", "uniform"])
def test_loss_vanishes_when_the_model_predicts_the_truth(name):
  num_codes = 40
  s = schedules.make(name, 30, num_codes)
  rng = np.random.default_rng(2)
  x0 = jnp.asarray(rng.integers(0, num_codes, (8, 20)))
  t = jnp.arange(0, 30, 4)[:8]
  x_t = discrete.q_sample(s, jax.random.key(0), x0, t)
  perfect = 200.0 * jax.nn.one_hot(x0, num_codes)
  out = training_losses(s, perfect, x0, x_t, t, jnp.full((8,), 1 / 30), aux_weight=1.0)
  np.testing.assert_allclose(out["vb"], 0.0, atol=1e-5)
  np.testing.assert_allclose(out["aux"], 0.0, atol=1e-5)
  wrong = 200.0 * jax.nn.one_hot((x0 + 1) % num_codes, num_codes)
  bad = training_losses(s, wrong, x0, x_t, t, jnp.full((8,), 1 / 30))
  assert np.all(np.asarray(bad["vb"]) > 1e-3)


def test_auxiliary_weighting_and_normalisation():
  s, logits, x0, x_t, t, pt = _batch(100, 32, batch=5, length=12, seed=3)
  args = (s, jnp.asarray(logits), jnp.asarray(x0), jnp.asarray(x_t), jnp.asarray(t),
          jnp.asarray(pt))
  plain = training_losses(*args)
  adaptive = training_losses(*args, aux_weight=0.1)
  flat = training_losses(*args, aux_weight=0.1, adaptive_aux=False)
  vb, aux = np.asarray(plain["vb"], np.float64), np.asarray(adaptive["aux"], np.float64)
  num = 5 * 12
  np.testing.assert_allclose(plain["loss"], np.sum(vb / pt) / num, rtol=1e-6)
  scale = (1 - t / 100) + 1
  np.testing.assert_allclose(adaptive["loss"], np.sum((vb + scale * 0.1 * aux) / pt) / num,
                             rtol=1e-6)
  np.testing.assert_allclose(flat["loss"], np.sum((vb + 0.1 * aux) / pt) / num, rtol=1e-6)


@pytest.mark.parametrize("name", ["mask_and_replace", "cosine", "uniform"])
def test_fused_loss_matches_the_literal_posteriors_chunked_or_not(name):
  num_codes, batch, length = 48, 4, 30
  s = schedules.make(name, 40, num_codes)
  rng = np.random.default_rng(4)
  x0 = jnp.asarray(rng.integers(0, num_codes, (batch, length)))
  t = jnp.asarray([0, 1, 17, 39])
  x_t = discrete.q_sample(s, jax.random.key(4), x0, t)
  logits = jnp.asarray(rng.normal(size=(batch, length, num_codes)) * 4, jnp.float32)
  pt = jnp.full((batch,), 1 / 40)

  def literal(z):
    vb, aux = discrete.loss_terms(s, discrete.x0_log_probs(z), x0, x_t, t, (1.5, 0.5))
    return jnp.sum(vb / pt + ((1 - t / 40) + 1) * 0.1 * aux / pt) / (batch * length)

  def fused(z, chunk_elements):
    return training_losses(s, z, x0, x_t, t, pt, aux_weight=0.1, mask_weight=(1.5, 0.5),
                           max_chunk_elements=chunk_elements)["loss"]
  want, want_grad = jax.jit(jax.value_and_grad(literal))(logits)
  for chunk_elements in (1 << 20, batch * 5 * num_codes):
    got, got_grad = jax.jit(jax.value_and_grad(fused), static_argnums=1)(logits, chunk_elements)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4,
                               atol=1e-6 * np.abs(want_grad).max())


def _loss_grad_memory(batch, length, num_codes, chunk_elements):
  s = schedules.mask_and_replace(100, num_codes)

  def loss(logits, x0, x_t, t, pt):
    return discrete.training_losses(s, logits, x0, x_t, t, pt, aux_weight=5e-4,
                                    max_chunk_elements=chunk_elements)["loss"]
  ints = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  compiled = jax.jit(jax.value_and_grad(loss)).lower(
      jax.ShapeDtypeStruct((batch, length, num_codes), jnp.float32), ints, ints,
      jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.float32)
  ).compile()
  return compiled.memory_analysis()


def test_loss_and_gradient_hold_under_one_full_size_temporary():
  batch, length, num_codes = 2, 256, 1024
  one_tensor = batch * length * (num_codes + 1) * 4
  memory = _loss_grad_memory(batch, length, num_codes, chunk_elements=batch * 32 * num_codes)
  assert memory.temp_size_in_bytes <= 1.0 * one_tensor
  assert memory.output_size_in_bytes <= 1.01 * one_tensor  # the gradient itself



def test_loss_and_gradient_vmap_over_microbatches():
  s, logits, x0, x_t, t, pt = _batch(100, 32, batch=6, length=16, seed=6)
  stacked = [jnp.asarray(a).reshape((2, 3) + a.shape[1:]) for a in (logits, x0, x_t, t, pt)]

  def loss(z, x0, x_t, t, pt):
    return discrete.training_losses(s, z, x0, x_t, t, pt, aux_weight=5e-4,
                                    max_chunk_elements=3 * 4 * 32)["loss"]
  grad_fn = jax.value_and_grad(loss)
  losses, grads = jax.jit(jax.vmap(grad_fn))(*stacked)
  for i in range(2):
    want, want_grad = jax.jit(grad_fn)(*(a[i] for a in stacked))
    np.testing.assert_allclose(losses[i], want, rtol=1e-6)
    np.testing.assert_allclose(grads[i], want_grad, rtol=1e-5, atol=1e-9)
