"""VQ-Diffusion-B on MSCOCO captions (19 x 1024, 32x32 tokens, K = 2887).

  python -m vqdiffusion_jax.main --config=configs/coco.py --workdir=runs/coco \
      --config.data.data_dir=/path/to/tfds --config.text.clip_path=/path/to/clip-vit-b32 \
      --config.vqvae.path=/path/to/converted-vqvae
"""

from configs import cub200
from vqdiffusion_jax import config_schema as schema


def get_config(arg=None):
  config = cub200.base_config("mscoco_captions", num_steps=400000, warmup_lr=2e-4,
                              warmup_steps=1000, global_batch=512)
  config.data.eval_split = "validation"
  return schema.finish(config, arg)
