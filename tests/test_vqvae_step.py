"""The VQ-VAE's VQGAN train step: loss terms, adaptive weight, delayed GAN."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vqdiffusion_jax import config_schema as schema
from vqdiffusion_jax.models import discriminator as disc_lib
from vqdiffusion_jax.models import quantizer
from vqdiffusion_jax.models.vqgan import VQGAN, VQGANConfig
from vqdiffusion_jax.train import mesh as mesh_lib
from vqdiffusion_jax.train import state as state_lib
from vqdiffusion_jax.train import vqvae_step

MODEL = VQGANConfig(block_out_channels=(16, 32), layers_per_block=1, latent_channels=8,
                    num_embeddings=32, embed_dim=4, norm_num_groups=4,
                    mid_block_attention=False, ema=True)


def _loss_config(disc_weight=0.0, disc_start=0):
  config = schema.vqvae().loss
  config.update({"perceptual_weight": 0.0, "disc_weight": disc_weight,
                 "disc_start": disc_start, "disc_layers": 2, "disc_channels": 8})
  return config


def _images(seed=0, batch=4):
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(-1, 1, (batch, 4, 4, 3)).astype(np.float32)
  return jnp.asarray(coarse.repeat(4, axis=1).repeat(4, axis=2))


def _states(loss_config, gen_opt, disc_opt):
  mesh = mesh_lib.make_mesh(schema.mesh().to_dict(), devices=jax.devices()[:1])
  rules = schema.mesh().rules
  vqgan = VQGAN(MODEL)
  images = _images()
  generator, _ = state_lib.create_state(
      jax.random.key(0), lambda r: vqgan.init(r, images), gen_opt, mesh, rules)
  discriminator, disc_state = None, None
  if loss_config.disc_weight > 0:
    discriminator = disc_lib.NLayerDiscriminator(base_channels=loss_config.disc_channels,
                                                 num_layers=loss_config.disc_layers)
    disc_state, _ = state_lib.create_state(
        jax.random.key(1), lambda r: discriminator.init(r, images), disc_opt, mesh, rules)
  return vqgan, discriminator, vqvae_step.VQVAEState(generator, disc_state)


def test_reconstruction_improves_without_a_discriminator():
  loss_config = _loss_config()
  vqgan, _, state = _states(loss_config, optax.adam(3e-3), None)
  assert state.discriminator is None and "vq_stats" in state.generator.extra
  step = jax.jit(vqvae_step.make_train_step(vqgan, None, loss_config, optax.adam(3e-3)))
  batch = {"image": _images()}
  state, first = step(state, batch, jax.random.key(2))
  for _ in range(40):
    state, metrics = step(state, batch, jax.random.key(2))
  assert metrics["psnr"] > first["psnr"] + 3.0
  assert metrics["nll"] < first["nll"] and bool(metrics["finite"])
  assert float(metrics["d_weight"]) == 0.0 and int(state.generator.step) == 41
  codebook = state.generator.extra[quantizer.STATS]["quantize"]["codebook"]
  assert not np.allclose(codebook, _states(loss_config, optax.adam(3e-3), None)[2]
                         .generator.extra[quantizer.STATS]["quantize"]["codebook"])


def test_adversarial_term_waits_for_disc_start():
  loss_config = _loss_config(disc_weight=0.8, disc_start=3)
  vqgan, disc, state = _states(loss_config, optax.adam(1e-3), optax.adam(1e-3))
  step = jax.jit(vqvae_step.make_train_step(vqgan, disc, loss_config, optax.adam(1e-3),
                                                optax.adam(1e-3)))
  batch = {"image": _images()}
  before = state.discriminator.params
  for i in range(3):
    state, metrics = step(state, batch, jax.random.key(i))
    assert float(metrics["d_weight"]) == 0.0 and float(metrics["d_loss"]) == 0.0
  jax.tree.map(np.testing.assert_array_equal, state.discriminator.params, before)
  state, metrics = step(state, batch, jax.random.key(9))
  assert float(metrics["d_weight"]) > 0 and float(metrics["d_loss"]) > 0
  assert not np.allclose(jax.tree.leaves(state.discriminator.params)[0],
                         jax.tree.leaves(before)[0])


def test_generator_gradient_uses_the_adaptive_weight():
  loss_config = _loss_config(disc_weight=0.8, disc_start=0)
  vqgan, disc, state = _states(loss_config, optax.sgd(1.0), optax.sgd(0.0))
  step = jax.jit(vqvae_step.make_train_step(vqgan, disc, loss_config, optax.sgd(1.0),
                                                optax.sgd(0.0)))
  batch, rng = {"image": _images(3)}, jax.random.key(4)
  new_state, metrics = step(state, batch, rng)
  applied = jax.tree.map(lambda a, b: a - b, state.generator.params, new_state.generator.params)

  g, d = state.generator, state.discriminator
  step_rng = jax.random.fold_in(rng, g.step)

  def parts(params):
    (rec, aux), _ = vqgan.apply({"params": params, **g.extra}, batch["image"], train=True,
                                mutable=["vq_stats"], rngs={quantizer.RESTART_RNG: step_rng})
    nll = jnp.mean(jnp.abs(batch["image"] - rec))
    gan = -jnp.mean(disc.apply({"params": d.params, **d.extra}, rec, train=False))
    return nll + aux["loss"], gan, nll
  grad_main = jax.jit(jax.grad(lambda p: parts(p)[0]))(g.params)
  grad_gan = jax.jit(jax.grad(lambda p: parts(p)[1]))(g.params)
  last = lambda t: t["decoder"]["conv_out"]  # noqa: E731
  norm = lambda t: np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(t)))  # noqa: E731
  weight = 0.8 * np.clip(norm(last(grad_main)) / (norm(last(grad_gan)) + 1e-4), 0, 1e4)
  np.testing.assert_allclose(metrics["d_weight"], weight, rtol=1e-4)
  expected = jax.tree.map(lambda a, b: a + weight * b, grad_main, grad_gan)
  # ``applied`` is params - new_params: float32 cancellation at the params' scale.
  for got, want, param in zip(jax.tree.leaves(applied), jax.tree.leaves(expected),
                              jax.tree.leaves(g.params), strict=True):
    atol = 4 * np.finfo(np.float32).eps * np.abs(param).max() + 1e-6 * np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=atol)


def test_bad_loss_settings_are_errors():
  with pytest.raises(ValueError, match="needs a discriminator"):
    vqvae_step.make_train_step(VQGAN(MODEL), None, _loss_config(disc_weight=1.0),
                                   optax.adam(1e-3))
  config = _loss_config()
  config.rec_loss = "l3"
  vqgan, _, state = _states(config, optax.adam(1e-3), None)
  step = vqvae_step.make_train_step(vqgan, None, config, optax.adam(1e-3))
  with pytest.raises(ValueError, match="unknown rec_loss 'l3'"):
    step(state, {"image": _images()}, jax.random.key(0))


def test_psnr_of_known_error():
  images = jnp.zeros((2, 4, 4, 3))
  np.testing.assert_allclose(vqvae_step.psnr(images, images + 0.2),
                             10 * np.log10(4 / 0.04), rtol=1e-5)
  assert isinstance(_loss_config(), ml_collections.ConfigDict)
