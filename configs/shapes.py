"""The embedded default: procedurally generated captioned shapes, 32 px.

  python -m vqdiffusion_jax.main --config=configs/shapes.py --workdir=runs/shapes

Sized to train usefully in minutes on a 2-core CPU: an 8x8-token patch VQ-VAE
(f = 4, K = 512, L2 reconstruction loss), a small trained text encoder with
rotary positions over the caption vocabulary (no CLIP weights needed), and a
4-layer denoiser with pooled-text AdaLN modulation besides its
cross-attention; then samples with each configured sampler, scores them with
the attribute oracle and writes WORKDIR/report/report.md. The denoiser trains
as many steps as the 20-minute budget holds on the machine at hand
(``time_budget``). ``docs/embedded_default.md`` gives the results and the
studies behind each setting. ``:runlocal`` shrinks it further (2 steps per
stage, for tests). Override fields on the command line, e.g.
``--config.train.num_steps=500``; unknown fields are errors.
"""

import ml_collections

from vqdiffusion_jax import config_schema as schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config; ``arg`` may be "runlocal"."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = schema.data("shapes", 32, text_length=24)
  config.data.in_memory = True  # 20000 images of 32 px: decode each PNG once, not every epoch
  config.mesh = schema.mesh()
  # A patch VQ-VAE (f = 4): far cheaper per image than the convolutional VQGAN.
  config.vqvae = schema.vqvae(block_out_channels=(128,), num_embeddings=512, embed_dim=32,
                              latent_channels=64, attention_levels=())
  config.vqvae.model.patch_size = 4
  config.vqvae.model.mid_block_attention = False
  config.vqvae.loss.perceptual_weight = 0.0  # LPIPS needs user-supplied VGG weights
  config.vqvae.loss.disc_weight = 0.0
  config.vqvae.loss.rec_loss = "l2"  # keeps the rounded edges of small circles
  config.vqvae.optim.update(learning_rate=3e-3, b1=0.9, b2=0.99, warmup_steps=100,
                            decay="cosine", min_lr_ratio=0.05)
  config.vqvae.train.global_batch = 32
  config.vqvae.train.num_steps = 2000
  config.vqvae.train.matmul_dtype = "auto"
  config.vqvae.train.steps_per_call = 10  # one lax.scan per ten steps
  config.text = schema.text("trainable", width=128, length=24)
  config.text.max_vocab = 256
  config.text.num_layers = 2  # four bind better in good runs but fail more often
  config.text.position_encoding = "rotary"  # binds places to objects in two-object captions
  config.denoiser = schema.denoiser(num_layers=4, embed_dim=128, num_heads=4)
  config.denoiser.model.pooled_text = True  # tells which corner, not just corner from edge
  # The official auxiliary weight (5e-4) leaves the x0 term negligible in this budget.
  config.diffusion = schema.diffusion(num_timesteps=100, aux_weight=1.0)
  config.optim = schema.optim(1.5e-3, warmup_steps=100, ema_decay=0.995)
  # More steps raise every guided sampler: train as many as 20 minutes hold here;
  # --config.time_budget.minutes=0 trains train.num_steps instead.
  config.time_budget = schema.time_budget(20.0)
  config.train = schema.train(32, 5000, dtype="float32", log_every=50, checkpoint_every=500,
                              sample_every=0)
  # Scanned, rematerialised blocks (the "minimal" policy keeps the weight products) and
  # bfloat16 matmuls where the machine has bfloat16 units: the fastest step on XLA:CPU.
  config.train.update(scan_layers=True, remat=True, remat_policy="minimal",
                      matmul_dtype="auto", steps_per_call=10)
  config.checkpoint = schema.checkpoint()
  config.eval = schema.evaluation(
      ("vqdiffusion/25/1", "vqdiffusion/25/2", "fewer_tokens/16/2", "purity/32/1.5",
       "purity/32/2"),
      num_samples=256)
  return schema.finish(config, arg)
