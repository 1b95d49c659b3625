"""Vector quantizer: nearest code, straight-through, losses, EMA codebook, restarts, diffusers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.vae import VectorQuantizer as TorchVectorQuantizer

from tests.helpers import assert_logically_partitioned
from vqdiffusion_jax.models import quantizer
from vqdiffusion_jax.models.quantizer import VectorQuantizer

K, D = 16, 4


def _plain(codebook, **kwargs):
  module = VectorQuantizer(K, D, ema=False, **kwargs)
  return module, {"params": {"codebook": jnp.asarray(codebook)}}


def _ema(codebook, cluster_size, embed_avg, **kwargs):
  module = VectorQuantizer(K, D, ema=True, **kwargs)
  stats = {"codebook": jnp.asarray(codebook), "cluster_size": jnp.asarray(cluster_size),
           "embed_avg": jnp.asarray(embed_avg)}
  return module, {"vq_stats": stats}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _train_step(module, variables, z, restart_seed=0):
  return module.apply(variables, z, train=True, mutable=["vq_stats"],
                      rngs={"vq_restart": jax.random.key(restart_seed)})


@functools.partial(jax.jit, static_argnums=(0,))
def _forward(module, variables, z):
  return module.apply(variables, z)


def _numpy_ema(cluster_size, embed_avg, z, tokens, decay=0.99, eps=1e-5):
  counts = np.bincount(tokens, minlength=K).astype(np.float64)
  sums = np.zeros((K, D))
  np.add.at(sums, tokens, z)
  cluster_size = decay * cluster_size + (1 - decay) * counts
  embed_avg = decay * embed_avg + (1 - decay) * sums
  n = cluster_size.sum()
  smoothed = (cluster_size + eps) / (n + K * eps) * n
  return cluster_size, embed_avg, embed_avg / smoothed[:, None]


def test_nearest_code_matches_brute_force():
  rng = np.random.default_rng(0)
  codebook = rng.normal(size=(K, D)).astype(np.float32)
  z = rng.normal(size=(3, 5, 7, D)).astype(np.float32)
  module, variables = _plain(codebook)
  z_q, aux = _forward(module, variables, jnp.asarray(z))
  brute = np.argmin(((z[..., None, :] - codebook) ** 2).sum(-1), axis=-1)
  np.testing.assert_array_equal(np.asarray(aux["tokens"]), brute)
  assert aux["tokens"].dtype == jnp.int32
  np.testing.assert_allclose(np.asarray(z_q), codebook[brute], atol=1e-6)
  looked_up = module.apply(variables, aux["tokens"], method="lookup")
  np.testing.assert_array_equal(np.asarray(looked_up), codebook[brute])


def test_straight_through_gradient_is_identity():
  rng = np.random.default_rng(1)
  module, variables = _plain(rng.normal(size=(K, D)).astype(np.float32))
  z = jnp.asarray(rng.normal(size=(2, 3, D)).astype(np.float32))
  jacobian = jax.jit(jax.jacobian(lambda z: module.apply(variables, z)[0]))(z)
  np.testing.assert_array_equal(np.asarray(jacobian).reshape(z.size, z.size), np.eye(z.size))


def test_commitment_loss_value_and_gradient():
  rng = np.random.default_rng(2)
  codebook = rng.normal(size=(K, D)).astype(np.float32)
  z = rng.normal(size=(2, 6, D)).astype(np.float32)
  module, variables = _ema(codebook, np.ones(K, np.float32), codebook, beta=0.25)
  loss_fn = lambda z: module.apply(variables, z)[1]["commitment_loss"]
  loss, grad = jax.jit(jax.value_and_grad(loss_fn))(jnp.asarray(z))
  nearest = codebook[np.argmin(((z[..., None, :] - codebook) ** 2).sum(-1), axis=-1)]
  np.testing.assert_allclose(float(loss), 0.25 * np.mean((z - nearest) ** 2), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), 0.25 * 2 * (z - nearest) / z.size, rtol=1e-5,
                             atol=1e-8)


def test_ema_update_matches_numpy_formulas():
  rng = np.random.default_rng(3)
  codebook = rng.normal(size=(K, D)).astype(np.float32)
  cluster_size = rng.uniform(2.0, 5.0, size=K).astype(np.float32)
  embed_avg = (codebook * cluster_size[:, None]).astype(np.float32)
  z = rng.normal(size=(4, 5, D)).astype(np.float32)
  module, variables = _ema(codebook, cluster_size, embed_avg, dead_code_threshold=0.0)
  (z_q, aux), new = _train_step(module, variables, jnp.asarray(z))
  tokens = np.asarray(aux["tokens"]).reshape(-1)
  expected = _numpy_ema(cluster_size.astype(np.float64), embed_avg.astype(np.float64),
                        z.reshape(-1, D).astype(np.float64), tokens)
  for name, value in zip(("cluster_size", "embed_avg", "codebook"), expected, strict=True):
    np.testing.assert_allclose(np.asarray(new["vq_stats"][name]), value, rtol=2e-5, atol=1e-6,
                               err_msg=name)
  # The output is quantized with the codebook from before the update.
  np.testing.assert_allclose(np.asarray(z_q).reshape(-1, D), codebook[tokens], atol=1e-6)


def test_statistics_change_only_in_training():
  rng = np.random.default_rng(4)
  codebook = rng.normal(size=(K, D)).astype(np.float32)
  module, variables = _ema(codebook, np.ones(K, np.float32), codebook)
  z = jnp.asarray(rng.normal(size=(2, 8, D)).astype(np.float32))
  _, unchanged = jax.jit(lambda v, z: module.apply(v, z, train=False, mutable=["vq_stats"]))(
      variables, z)
  _, changed = _train_step(module, variables, z)
  for name, value in variables["vq_stats"].items():
    np.testing.assert_array_equal(np.asarray(unchanged["vq_stats"][name]), np.asarray(value))
  assert not np.allclose(np.asarray(changed["vq_stats"]["embed_avg"]), codebook)


def test_dead_code_restart_replaces_exactly_the_dead_codes():
  rng = np.random.default_rng(5)
  codebook = rng.normal(size=(K, D)).astype(np.float32)
  cluster_size = np.full(K, 4.0, np.float32)
  dead = np.zeros(K, bool)
  dead[[2, 7, 11]] = True
  cluster_size[dead] = 0.5  # below the threshold of 1 even after the EMA step
  far_codebook = codebook.copy()
  far_codebook[dead] += 100.0  # never nearest, so no batch vector feeds them
  embed_avg = far_codebook * cluster_size[:, None]
  z = rng.normal(size=(2, 10, D)).astype(np.float32)
  module, variables = _ema(far_codebook, cluster_size, embed_avg, dead_code_threshold=1.0)
  (_, aux), new = _train_step(module, variables, jnp.asarray(z), 7)
  stats = {k: np.asarray(v) for k, v in new["vq_stats"].items()}
  tokens = np.asarray(aux["tokens"]).reshape(-1)
  assert not np.isin(np.flatnonzero(dead), tokens).any()
  flat_z = z.reshape(-1, D)
  for k in np.flatnonzero(dead):
    matches = np.flatnonzero(np.all(flat_z == stats["codebook"][k], axis=1))
    assert matches.size == 1, f"restarted code {k} is not a batch vector"
  restarted_rows = {tuple(stats["codebook"][k]) for k in np.flatnonzero(dead)}
  assert len(restarted_rows) == dead.sum(), "restarted codes should get distinct vectors"
  np.testing.assert_array_equal(stats["embed_avg"][dead], stats["codebook"][dead])
  np.testing.assert_array_equal(stats["cluster_size"][dead], 1.0)
  live = _numpy_ema(cluster_size.astype(np.float64), embed_avg.astype(np.float64),
                    flat_z.astype(np.float64), tokens)
  np.testing.assert_allclose(stats["codebook"][~dead], live[2][~dead], rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(stats["cluster_size"][~dead], live[0][~dead], rtol=1e-6)
  (_, _), again = _train_step(module, variables, jnp.asarray(z), 7)
  np.testing.assert_array_equal(np.asarray(again["vq_stats"]["codebook"]), stats["codebook"])


def test_perplexity_and_usage():
  uniform = jnp.tile(jnp.arange(K), 3)
  stats = quantizer.codebook_statistics(uniform, K)
  np.testing.assert_allclose(float(stats["perplexity"]), K, rtol=1e-5)
  assert float(stats["usage"]) == 1.0
  collapsed = quantizer.codebook_statistics(jnp.full((5, 5), 3), K)
  np.testing.assert_allclose(float(collapsed["perplexity"]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(collapsed["usage"]), 1.0 / K)
  half = quantizer.codebook_statistics(jnp.arange(K // 2), K)
  np.testing.assert_allclose(float(half["perplexity"]), K / 2, rtol=1e-5)
  np.testing.assert_allclose(float(half["usage"]), 0.5)


@pytest.mark.parametrize("ema", [False, True])
def test_logical_axes_and_bf16_keeps_float32_variables(ema):
  module = VectorQuantizer(K, D, ema=ema, dtype=jnp.bfloat16)
  z = jnp.asarray(np.random.default_rng(6).normal(size=(2, 3, D)), jnp.bfloat16)
  variables = jax.jit(module.init)(jax.random.key(0), z)
  collection = "vq_stats" if ema else "params"
  assert set(variables) == {collection}
  assert_logically_partitioned(variables[collection])
  leaves = jax.tree.leaves(variables)
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)
  z_q, aux = _forward(module, variables, z)
  assert z_q.dtype == jnp.bfloat16
  assert aux["loss"].dtype == jnp.float32
  codebook = np.asarray(module.apply(variables, method="codebook"))
  z32 = np.asarray(z, np.float32)
  brute = np.argmin(((z32[..., None, :] - codebook) ** 2).sum(-1), axis=-1)
  np.testing.assert_array_equal(np.asarray(aux["tokens"]), brute)


@pytest.mark.parametrize("legacy", [True, False])
def test_plain_mode_matches_diffusers_vector_quantizer(legacy):
  torch.manual_seed(0)
  theirs = TorchVectorQuantizer(K, D, beta=0.25, legacy=legacy)
  with torch.no_grad():
    theirs.embedding.weight.normal_()
  z = torch.randn(2, D, 4, 5, requires_grad=True)
  z_q, loss, (_, _, indices) = theirs(z)
  module, variables = _plain(theirs.embedding.weight.detach().numpy(), legacy=legacy)
  z_nhwc = jnp.asarray(z.detach().permute(0, 2, 3, 1).numpy())
  ours, aux = _forward(module, variables, z_nhwc)
  np.testing.assert_array_equal(np.asarray(aux["tokens"]).reshape(-1), indices.numpy())
  np.testing.assert_allclose(np.asarray(ours), z_q.detach().permute(0, 2, 3, 1).numpy(),
                             atol=1e-6)
  np.testing.assert_allclose(float(aux["loss"]), loss.item(), rtol=1e-5)
  loss.backward()
  codebook_grad = jax.jit(jax.grad(
      lambda p: module.apply({"params": p}, z_nhwc)[1]["loss"]))(variables["params"])
  np.testing.assert_allclose(np.asarray(codebook_grad["codebook"]),
                             theirs.embedding.weight.grad.numpy(), rtol=1e-5, atol=1e-7)
