"""The embedded default: procedurally generated captioned shapes, 32 px.

  python -m vqdiffusion_jax.main --config=configs/shapes.py --workdir=runs/shapes

Sized to train usefully in minutes on a 2-core CPU: an 8x8-token patch VQ
tokenizer (f = 4, K = 512, L2 reconstruction loss), a small trained text
encoder with rotary positions over the caption vocabulary (no CLIP weights
needed), and a 4-layer denoiser with pooled-text AdaLN modulation besides its
cross-attention; then samples with each configured sampler, scores them
with the attribute oracle and writes WORKDIR/report/report.md. Decoded images
and token-cache records stay in memory (``data.in_memory``). The denoiser's
and tokenizer's matmuls run in bfloat16 with float32 accumulation where the
machine has bfloat16 units (``matmul_dtype="auto"``: GPUs, TPUs, CPUs with
AMX or AVX512-BF16). The denoiser trains as many steps as the 20 minutes
left after the tokenizer hold on the machine at hand (``time_budget``;
``vqdiffusion_jax/train/budget.py``); its plan is saved and reused on resume.
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
  config.data.in_memory = True  # 20000 images of 32 px: decode each PNG once, not every epoch
  config.mesh = common.mesh()
  # A patch VQ-VAE (f = 4): far cheaper per image than the convolutional VQGAN, so it
  # reaches its reconstruction target in minutes on two CPU cores.
  config.tokenizer = common.tokenizer(block_out_channels=(128,), num_embeddings=512,
                                      embed_dim=32, latent_channels=64, attention_levels=())
  config.tokenizer.model.patch_size = 4
  config.tokenizer.model.mid_block_attention = False
  config.tokenizer.loss.perceptual_weight = 0.0  # LPIPS needs user-supplied VGG weights
  config.tokenizer.loss.disc_weight = 0.0
  # L2 keeps the rounded edges of small circles (L1 squares them off): with it the
  # oracle accepts 96% of reconstructions rather than 88%.
  config.tokenizer.loss.rec_loss = "l2"
  config.tokenizer.optim.update(learning_rate=3e-3, b1=0.9, b2=0.99, warmup_steps=100,
                                decay="cosine", min_lr_ratio=0.05)
  config.tokenizer.train.global_batch = 32
  config.tokenizer.train.num_steps = 2000
  config.tokenizer.train.matmul_dtype = "auto"
  # Ten steps per jitted call (one lax.scan): 52 against 74 ms per step on two cores, the
  # per-call dispatch and XLA:CPU's fresh temporary buffer paid once per ten steps.
  config.tokenizer.train.steps_per_call = 10
  config.text = common.text("trainable", width=128, length=24)
  config.text.max_vocab = 256
  # Two text layers: four bind shapes to objects better in good runs (0.85 against 0.76
  # all-attributes) but fail more often (0.32 to 0.85 over five runs; README).
  config.text.num_layers = 2
  # Rotary positions: with a learned position table some runs never bind a place to its
  # object in two-object captions (half the objects land at the other's place); with
  # relative positions the same seed binds every one (README).
  config.text.position_encoding = "rotary"
  config.denoiser = common.denoiser(num_layers=4, embed_dim=128, num_heads=4)
  # The mean caption feature also modulates every AdaLN: with cross-attention alone the
  # model tells corners from edges within this budget, but not which corner.
  config.denoiser.model.pooled_text = True
  # The official auxiliary weight (5e-4) leaves the x0 term negligible; at 1.0 the denoiser
  # learns colour, size and shape within the few minutes this config has. 2.0 was better
  # on one seed and worse on another (README).
  config.diffusion = common.diffusion(num_timesteps=100, aux_weight=1.0)
  # Peak learning rate 1.5e-3: over two seeds purity sampling scored 0.867-0.875 against
  # 0.828-0.848 at 2e-3, 0.73-0.77 at 3e-3 and 0.83-0.87 at 1e-3 (README).
  config.optim = common.optim(1.5e-3, warmup_steps=100, ema_decay=0.995)
  # More steps raise every guided sampler (6000 by 0.03-0.06 over 4000 on two seeds), so the
  # main job trains as many as its 20-minute budget holds on this machine (``time_budget``;
  # 8350 on a 2-core AMX Xeon, about 4600 on a 2-core AVX512-BF16 EPYC; README). 5000 is
  # the count with ``--config.time_budget.minutes=0``.
  config.time_budget = common.time_budget(20.0)
  config.train = common.train(32, 5000, dtype="float32", log_every=50, checkpoint_every=500,
                              sample_every=0, eval_every=0)
  # Scanned, rematerialised blocks: the train step runs 1.5x faster on XLA:CPU
  # (benchmarks/denoiser_step_layouts.py); the "minimal" policy keeps the weight products
  # (3-9% faster on an AVX2-only EPYC). bfloat16 matmuls where the machine has bfloat16
  # units: 1.4x faster on CPUs with AMX, 20% slower on AVX2-only ones; over two seeds each
  # on the same tokens neither dtype trained the better denoiser (0.64-0.81 all-attributes).
  config.train.update(scan_layers=True, remat=True, remat_policy="minimal",
                      matmul_dtype="auto", steps_per_call=10)
  config.checkpoint = common.checkpoint()
  config.eval = common.evaluation(
      ("vqdiffusion/25/1", "vqdiffusion/25/2", "fewer_tokens/16/2", "purity/32/1.5",
       "purity/32/2"),
      num_samples=256)
  return common.finish(config, arg)

