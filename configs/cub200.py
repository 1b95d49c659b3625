"""VQ-Diffusion-B on CUB-200 (19 x 1024 denoiser, 32x32 tokens, K = 2887).

  python -m vqdiffusion_jax.main --config=configs/cub200.py --workdir=runs/cub200 \
      --config.data.data_dir=/path/to/tfds --config.text.clip_path=/path/to/clip-vit-b32 \
      --config.vqvae.path=/path/to/converted-vqvae

Needs the CUB-200 download (built into TFDS on first use from
``--config.data.manual_dir``, or built beforehand into ``data.data_dir``), a
CLIP ViT-B/32 text checkpoint directory, and a converted VQ-VAE or the LPIPS
weights to train one. ``:runlocal`` runs the same path at 32 px with tiny
models and 2 steps a stage, on the same kinds of files (a tiny random CLIP
will do)::

  python -m vqdiffusion_jax.main --config=configs/cub200.py:runlocal --workdir=runs/cub-local \
      --config.data.manual_dir=/path/to/birds --config.text.clip_path=/path/to/clip \
      --config.vqvae.loss.lpips_vgg_path=/path/to/vgg16-397923af.pth \
      --config.vqvae.loss.lpips_heads_path=/path/to/lpips/vgg.pth
"""

import ml_collections

from vqdiffusion_jax import config_schema as schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = base_config("cub200_captions", num_steps=200000, warmup_lr=4.5e-4, warmup_steps=1000)
  return schema.finish(config, arg)


def base_config(dataset: str, *, num_steps: int, warmup_lr: float, warmup_steps: int,
                global_batch: int = 128) -> ml_collections.ConfigDict:
  """The shared base (19 x 1024) text-to-image setup of the official configs."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = schema.data(dataset, 256)
  config.data.random_crop = True
  config.mesh = schema.mesh(data=-1)
  config.vqvae = schema.vqvae()
  config.text = schema.text("clip")
  config.denoiser = schema.denoiser(num_layers=19, embed_dim=1024, num_heads=16)
  config.diffusion = schema.diffusion(num_timesteps=100, aux_weight=5e-4)
  # The official EMA (decay 0.99 every 25 steps) is about 0.9996 per step.
  config.optim = schema.optim(warmup_lr, warmup_steps=warmup_steps, ema_decay=0.9996)
  config.train = schema.train(global_batch, num_steps, dtype="bfloat16")
  config.checkpoint = schema.checkpoint()
  config.eval = schema.evaluation()
  return config

