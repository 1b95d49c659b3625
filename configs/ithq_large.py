"""Improved VQ-Diffusion large on ITHQ (36 x 1408, 32x32 tokens, K = 4096).

  python -m vqdiffusion_jax.main --config=configs/ithq_large.py --workdir=runs/ithq \
      --config.data.data_dir=/path/to/tfds --config.text.clip_path=/path/to/clip-vit-b32 \
      --config.vqvae.path=/path/to/converted-vqvae

Scanned, rematerialised layers and FSDP: plan the mesh first with
``python -m vqdiffusion_jax.plan --config=configs/ithq_large.py --devices=32``.
"""

from configs import cub200
from vqdiffusion_jax import config_schema as schema


def get_config(arg=None):
  config = cub200.base_config("captioned_folder", num_steps=1000000, warmup_lr=1e-4,
                              warmup_steps=7000, global_batch=512)
  config.vqvae = schema.vqvae(block_out_channels=(64, 128, 256, 512), num_embeddings=4096,
                              embed_dim=128, latent_channels=256, attention_levels=(3,))
  config.denoiser = schema.denoiser(num_layers=36, embed_dim=1408, num_heads=16)
  config.mesh = schema.mesh(data=-1, fsdp=8)
  config.train.remat = True
  config.train.scan_layers = True  # one compiled block for the 36 layers
  return schema.finish(config, arg, runlocal_keeps_dtype=True)  # bfloat16 at any size
