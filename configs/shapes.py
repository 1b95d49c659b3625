"""The embedded default: procedurally generated captioned shapes, 32 px.

  python -m vqdiffusion_jax.main --config=configs/shapes.py --workdir=runs/shapes

Sized to train usefully in minutes on a 2-core CPU: an 8x8-token VQ
tokenizer (f = 4, K = 128), a small trained text encoder over the caption
vocabulary (no CLIP weights needed), and a 4-layer denoiser.
``:runlocal`` shrinks it further (2 steps per stage, for tests).
Override fields on the command line, e.g. ``--config.train.num_steps=500``;
unknown fields are errors.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config; ``arg`` may be "runlocal"."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = common.data("shapes", 32, text_length=24)
  config.mesh = common.mesh()
  config.tokenizer = common.tokenizer(block_out_channels=(64, 128, 128), num_embeddings=128,
                                      embed_dim=32, latent_channels=64, attention_levels=())
  config.tokenizer.model.mid_block_attention = False
  config.tokenizer.loss.perceptual_weight = 0.0  # LPIPS needs user-supplied VGG weights
  config.tokenizer.loss.disc_weight = 0.0
  config.tokenizer.optim.learning_rate = 1e-3
  config.tokenizer.train.global_batch = 32
  config.tokenizer.train.num_steps = 3000
  config.text = common.text("trainable", width=128, length=24)
  config.text.max_vocab = 256
  config.denoiser = common.denoiser(num_layers=4, embed_dim=128, num_heads=4)
  config.diffusion = common.diffusion(num_timesteps=100)
  config.optim = common.optim(1e-3, warmup_steps=200, ema_decay=0.999)
  config.train = common.train(64, 4000, dtype="float32", log_every=50, checkpoint_every=500,
                              sample_every=1000, eval_every=0)
  config.checkpoint = common.checkpoint()
  return common.finish(config, arg)

