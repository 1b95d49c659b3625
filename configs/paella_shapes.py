"""Paella's convolutional predictor on the embedded shapes data, 32 px.

  python -m vqdiffusion_jax.main --config=configs/paella_shapes.py --workdir=runs/paella

The shapes experiment (``configs/shapes.py``: patch VQ-VAE, 8x8 tokens, a
small trained text encoder) with Paella's denoiser in place of the
transformer: a U-Net of modulated convolutional blocks
(``models.paella``), trained with Paella's objective (a fraction 1 - abar_t
of the tokens replaced by random ones under the "uniform" schedule, the
label-smoothed cross-entropy of every original token) and sampled by its
renoising sampler ("paella", 8 steps, with and without guidance through the
learnable null text), scored by the attribute oracle. ``:runlocal`` keeps
that path with tiny models and two steps a stage.
"""

import ml_collections

from configs import imagenet
from vqdiffusion_jax import config_schema as schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config; ``arg`` may be "runlocal"."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = schema.data("shapes", 32, text_length=24)
  config.data.in_memory = True
  config.mesh = schema.mesh()
  config.vqvae = schema.vqvae(block_out_channels=(128,), num_embeddings=512, embed_dim=32,
                              latent_channels=64, attention_levels=())
  config.vqvae.model.update(patch_size=4, mid_block_attention=False)
  config.vqvae.loss.update(perceptual_weight=0.0, disc_weight=0.0, rec_loss="l2")
  config.vqvae.optim.update(learning_rate=3e-3, b1=0.9, b2=0.99, warmup_steps=100,
                            decay="cosine", min_lr_ratio=0.05)
  config.vqvae.train.update(global_batch=32, num_steps=2000, matmul_dtype="auto",
                            steps_per_call=10)
  config.text = schema.text("trainable", width=128, length=24)
  config.text.update(max_vocab=256, position_encoding="rotary")
  config.denoiser = schema.denoiser(kind="paella")
  config.denoiser.paella = schema.paella((128, 256), blocks_per_level=2, modulation_dim=128)
  # Paella renoises with random tokens: no [MASK], no variational bound to sample steps by.
  config.diffusion = schema.diffusion(num_timesteps=100)
  config.diffusion.update(schedule="uniform", importance_sampling=False)
  config.optim = schema.optim(1.5e-3, warmup_steps=100, ema_decay=0.995)
  config.time_budget = schema.time_budget(20.0)
  config.train = schema.train(32, 5000, dtype="float32", log_every=50, checkpoint_every=500,
                              sample_every=0)
  config.checkpoint = schema.checkpoint()
  config.eval = schema.evaluation(("paella/8/1", "paella/8/2", "paella/12/2"), num_samples=256)
  if arg == "runlocal":
    config = imagenet.shrink_for_cpu(config)
    config.data.update(num_train=64, num_test=16)
    return schema.finish(config, None)
  return schema.finish(config, arg)
