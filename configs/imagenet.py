"""Class-conditional VQ-Diffusion on ImageNet (24 x 512 denoiser, 16x16 tokens, K = 974).

  python -m vqdiffusion_jax.main --config=configs/imagenet.py --workdir=runs/imagenet \
      --config.data.data_dir=/path/to/tfds --config.vqvae.path=/path/to/converted-vqgan

The data is the ``class_image_folders`` dataset built from ImageNet's class
folders (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``; ``data.image_folders``)
with ``real.prepare("class_image_folders", data_dir=..., manual_dir=...)``.
The denoiser has the official ImageNet sizes (the ``imagenet_learnable``
preset: conv MLP, 32 x 32 position tables, AdaLN class tables with a
learned null class 1000); 10% of the labels train that null class, which the
report's guided samplers read. The official model encodes with the taming
VQGAN f16 (16384 codes remapped to 974): convert it and pass it as
``vqvae.path``, or train a VQ-VAE of these sizes. ``:runlocal`` keeps the
path (class folders, labels in the token cache, label dropout, guided class
sampling) at 32 px with tiny models, for a built ``class_image_folders`` in
``data.data_dir``.
"""

import ml_collections

from vqdiffusion_jax import config_schema as schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config; ``arg`` may be "runlocal"."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = schema.data("class_image_folders", 256, caption_dropout=0.1)
  config.data.eval_split = "validation"
  config.data.random_crop = True
  config.mesh = schema.mesh()
  config.vqvae = schema.vqvae(num_embeddings=974)  # f16: 16 x 16 tokens at 256 px
  config.text = schema.text("trainable")  # unused: the denoiser reads class labels
  config.denoiser = schema.denoiser(num_layers=24, embed_dim=512, num_heads=16,
                                    conditioning="class", num_classes=1000)
  config.denoiser.model.update(mlp_type="conv", position_grid=(32, 32),
                               learnable_null_class=True)
  config.diffusion = schema.diffusion(num_timesteps=100, aux_weight=1e-3)
  # Official: warm-up to 4.5e-4 over 5000 steps, gradients clipped at 0.5, EMA 0.99 every
  # 25 steps (about 0.9996 per step).
  config.optim = schema.optim(4.5e-4, warmup_steps=5000, clip_norm=0.5, ema_decay=0.9996)
  config.train = schema.train(256, 500000, dtype="bfloat16")
  config.checkpoint = schema.checkpoint()
  config.eval = schema.evaluation(("vqdiffusion/all/1", "vqdiffusion/all/3", "purity/16/3"))
  if arg == "runlocal":
    return schema.finish(shrink_for_cpu(config), None)
  return schema.finish(config, arg)


def shrink_for_cpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """32 px, tiny VQ-VAE and denoiser, two steps a stage: a run of minutes on a CPU.

  The data, the denoiser's kind and condition are kept, and the first and last
  sampler, at 3 network calls each.
  """
  config.data.image_size = 32
  config.data.random_crop = False
  config.time_budget = schema.time_budget()
  config.vqvae = schema.vqvae(block_out_channels=(32, 64, 64), num_embeddings=64, embed_dim=16,
                              latent_channels=32, attention_levels=())
  config.vqvae.model.update(norm_num_groups=8, mid_block_attention=False)
  config.vqvae.loss.update(perceptual_weight=0.0, disc_weight=0.0)
  config.vqvae.optim.learning_rate = 1e-3
  config.vqvae.train.update(global_batch=8, num_steps=2)
  config.text = schema.text("trainable", width=32, length=24)
  config.text.max_vocab = 256
  model = config.denoiser.model
  model.update(num_layers=2, embed_dim=32, num_heads=2,
               position_grid=(16, 16) if tuple(model.position_grid) else ())
  config.denoiser.paella = schema.paella((32, 64), blocks_per_level=1, modulation_dim=32)
  config.diffusion.num_timesteps = 10
  config.optim = schema.optim(1e-3, warmup_steps=1, ema_decay=0.99)
  config.train = schema.train(8, 2, dtype="float32", log_every=1, checkpoint_every=1,
                              sample_every=0)
  config.eval.update(num_samples=8, batch_size=8, grid_size=4)
  samplers = config.eval.samplers
  config.eval.samplers = tuple(dict.fromkeys(_fewer_steps(s) for s in (samplers[0], samplers[-1])))
  return config


def _fewer_steps(spec: str) -> str:
  """A sampler spec with 3 network calls: name/3[/guidance...]."""
  parts = spec.split("/")
  return "/".join([parts[0], "3", *parts[2:]])
