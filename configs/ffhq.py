"""Unconditional VQ-Diffusion on FFHQ faces (20 x 512 denoiser, 16x16 tokens, K = 1024).

  python -m vqdiffusion_jax.main --config=configs/ffhq.py --workdir=runs/ffhq \
      --config.data.data_dir=/path/to/tfds --config.vqvae.path=/path/to/converted-vqgan

The data is the ``plain_image_folder`` dataset built from the FFHQ images
(``00000/00000.png``, ...; ``data.image_folders``) with
``real.prepare("plain_image_folder", data_dir=..., manual_dir=...)``: 5% of
the images, by path hash, are the ``test`` split the report compares with.
The denoiser has the official FFHQ sizes (the ``ffhq`` preset: no condition,
conv MLP, 32 x 32 position tables); the report samples it without prompts or
guidance. The official model encodes with the taming VQGAN f16 of 1024 codes
trained on FFHQ: convert it and pass it as ``vqvae.path``, or train a VQ-VAE
of these sizes. ``:runlocal`` keeps the path (a plain image folder,
unconditional training and sampling) at 32 px with tiny models, for a built
``plain_image_folder`` in ``data.data_dir``.
"""

import ml_collections

from configs import imagenet
from vqdiffusion_jax import config_schema as schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config; ``arg`` may be "runlocal"."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = schema.data("plain_image_folder", 256, caption_dropout=0.0)
  config.mesh = schema.mesh()
  config.vqvae = schema.vqvae(num_embeddings=1024)  # f16: 16 x 16 tokens at 256 px
  config.text = schema.text("trainable")  # unused: the denoiser reads no condition
  config.denoiser = schema.denoiser(num_layers=20, embed_dim=512, num_heads=16,
                                    conditioning="none")
  config.denoiser.model.update(mlp_type="conv", position_grid=(32, 32))
  config.diffusion = schema.diffusion(num_timesteps=100, aux_weight=1e-3)
  # Official: warm-up to 4.5e-4 over 2000 steps, gradients clipped at 0.5, EMA 0.99 every
  # 10 steps (about 0.999 per step).
  config.optim = schema.optim(4.5e-4, warmup_steps=2000, clip_norm=0.5, ema_decay=0.999)
  config.train = schema.train(256, 300000, dtype="bfloat16")
  config.checkpoint = schema.checkpoint()
  config.eval = schema.evaluation(("vqdiffusion/all/1", "vqdiffusion/25/1", "purity/16/1"))
  if arg == "runlocal":
    return schema.finish(imagenet.shrink_for_cpu(config), None)
  return schema.finish(config, arg)
