"""The VQ-VAE's train step: the VQGAN objective of taming / LDM.

Generator loss: ``nll + codebook_weight * L_vq + lambda * f(step) * L_G`` with
``nll = mean|x - x~| (or squared) + perceptual_weight * mean LPIPS(x, x~)``,
``L_G = -mean D(x~)``, ``f(step) = 0`` before ``disc_start`` and 1 after, and
``lambda = disc_weight * ||grad_last(nll)|| / (||grad_last(L_G)|| + 1e-4)``
(clipped to [0, 1e4], taken at the decoder's last layer and not
differentiated). One forward pass is pulled back twice (once for ``nll +
L_vq``, once for ``L_G``) so the adaptive weight costs no extra forward.

Discriminator loss: ``f(step) * hinge(D(x), D(sg(x~)))`` (or the vanilla
softplus loss), with BatchNorm statistics updated on the real and then the
fake batch. Without an adversarial term (``disc_weight == 0``) the
discriminator is not built at all. The LPIPS network is frozen: its params
are a step input, not state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from vqdiffusion_jax.models import discriminator as disc_lib
from vqdiffusion_jax.models import lpips as lpips_lib
from vqdiffusion_jax.models import quantizer
from vqdiffusion_jax.train import state as state_lib
from vqdiffusion_jax.train.state import TrainState

# The decoder's output layer (convolutional VQGAN, patch VQ-VAE), for the adaptive GAN weight.
LAST_LAYERS = ("conv_out", "patch_out")


@struct.dataclass
class VQVAEState:
  """The generator (VQGAN, with its 'vq_stats' in ``extra``) and the discriminator."""

  generator: TrainState
  discriminator: TrainState | None = None


def _last_layer(tree: Mapping[str, Any]) -> Any:
  decoder = tree["decoder"]
  return next(decoder[name] for name in LAST_LAYERS if name in decoder)


def _reconstruction_loss(images: jax.Array, reconstruction: jax.Array, kind: str) -> jax.Array:
  error = images.astype(jnp.float32) - reconstruction
  if kind == "l1":
    return jnp.mean(jnp.abs(error))
  if kind == "l2":
    return jnp.mean(jnp.square(error))
  raise ValueError(f"unknown rec_loss {kind!r}; choose 'l1' or 'l2'")


def psnr(images: jax.Array, reconstruction: jax.Array) -> jax.Array:
  """Mean PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
  mse = jnp.mean(jnp.square(images.astype(jnp.float32) - reconstruction), axis=(1, 2, 3))
  return jnp.mean(10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10)))


def make_train_step(vqgan: nn.Module, discriminator: nn.Module | None, loss_config: Any,
                    generator_optimizer: optax.GradientTransformation,
                    discriminator_optimizer: optax.GradientTransformation | None = None,
                    *, ema_decay: float = 0.999) -> Callable:
  """Builds ``train_step(state, batch, rng, lpips_params) -> (state, metrics)``.

  Args:
    vqgan: the VQ-VAE module (an EMA quantizer keeps 'vq_stats').
    discriminator: the PatchGAN, or None when ``loss_config.disc_weight`` is 0.
    loss_config: ``config.vqvae.loss`` (rec_loss, perceptual_weight,
      codebook_weight, disc_weight, disc_start, disc_loss).
    generator_optimizer, discriminator_optimizer: optax transformations.
    ema_decay: decay of the generator's parameter EMA.

  Returns:
    The pure train step; ``batch["image"]`` is (B, H, W, 3) in [-1, 1].
  """
  use_gan = float(loss_config.disc_weight) > 0
  if use_gan and discriminator is None:
    raise ValueError("disc_weight > 0 needs a discriminator")
  perceptual_weight = float(loss_config.perceptual_weight)
  lpips = lpips_lib.LPIPS() if perceptual_weight > 0 else None

  def generator_parts(params, state, images, rng, lpips_params):
    variables = {"params": params, **state.generator.extra}
    (reconstruction, aux), updates = vqgan.apply(
        variables, images, train=True, mutable=list(state.generator.extra),
        rngs={quantizer.RESTART_RNG: rng})
    nll = _reconstruction_loss(images, reconstruction, loss_config.rec_loss)
    perceptual = jnp.zeros(())
    if lpips is not None:
      perceptual = jnp.mean(lpips.apply({"params": lpips_params}, images, reconstruction))
      nll = nll + perceptual_weight * perceptual
    main = nll + float(loss_config.codebook_weight) * aux["loss"]
    gan = jnp.zeros(())
    if use_gan:
      d = state.discriminator
      gan = disc_lib.generator_loss(
          discriminator.apply({"params": d.params, **d.extra}, reconstruction, train=False))
    return (main, gan), (reconstruction, aux, updates, nll, perceptual)

  def generator_update(state, images, rng, lpips_params):
    g = state.generator
    parts = lambda p: generator_parts(p, state, images, rng, lpips_params)  # noqa: E731
    (main, gan), pullback, (reconstruction, aux, updates, nll, perceptual) = jax.vjp(
        parts, g.params, has_aux=True)
    grads = pullback((jnp.ones_like(main), jnp.zeros_like(gan)))[0]
    disc_factor = disc_lib.adopt_weight(1.0, g.step, int(loss_config.disc_start))
    weight = jnp.zeros(())
    if use_gan:
      gan_grads = pullback((jnp.zeros_like(main), jnp.ones_like(gan)))[0]
      weight = disc_factor * disc_lib.adaptive_weight(
          _last_layer(grads), _last_layer(gan_grads), float(loss_config.disc_weight))
      grads = jax.tree.map(lambda a, b: a + weight * b, grads, gan_grads)
    step_updates, opt_state = generator_optimizer.update(grads, g.opt_state, g.params)
    params = optax.apply_updates(g.params, step_updates)
    new_g = g.replace(step=g.step + 1, params=params, opt_state=opt_state, extra=updates,
                      ema_params=state_lib.ema_update(g.ema_params, params, ema_decay))
    metrics = {"loss": main + weight * gan, "nll": nll, "perceptual": perceptual,
               "codebook_loss": aux["loss"], "g_loss": gan, "d_weight": weight,
               "perplexity": aux["perplexity"], "usage": aux["usage"],
               "psnr": psnr(images, reconstruction),
               "grad_norm": state_lib.global_norm(grads)}
    return new_g, reconstruction, disc_factor, metrics

  def discriminator_update(d, images, reconstruction, disc_factor):
    def loss_fn(params):
      real, stats = discriminator.apply({"params": params, **d.extra}, images, train=True,
                                        mutable=["batch_stats"])
      fake, stats = discriminator.apply({"params": params, **stats},
                                        jax.lax.stop_gradient(reconstruction), train=True,
                                        mutable=["batch_stats"])
      loss = disc_factor * disc_lib.discriminator_loss(real, fake, loss_config.disc_loss)
      return loss, (stats, jnp.mean(real), jnp.mean(fake))
    (loss, (stats, real, fake)), grads = jax.value_and_grad(loss_fn, has_aux=True)(d.params)
    step_updates, opt_state = discriminator_optimizer.update(grads, d.opt_state, d.params)
    new_d = d.replace(step=d.step + 1, params=optax.apply_updates(d.params, step_updates),
                      opt_state=opt_state, extra=stats)
    return new_d, {"d_loss": loss, "logits_real": real, "logits_fake": fake}

  def train_step(state: VQVAEState, batch: Mapping[str, jax.Array], rng: jax.Array,
                 lpips_params: Any = None) -> tuple[VQVAEState, dict[str, jax.Array]]:
    images = batch["image"]
    rng = jax.random.fold_in(rng, state.generator.step)
    generator, reconstruction, disc_factor, metrics = generator_update(
        state, images, rng, lpips_params)
    discriminator_state = state.discriminator
    if use_gan:
      discriminator_state, d_metrics = discriminator_update(
          state.discriminator, images, reconstruction, disc_factor)
      metrics |= d_metrics
    metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    return VQVAEState(generator, discriminator_state), metrics

  return train_step
