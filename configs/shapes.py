"""The embedded default: procedurally generated captioned shapes.

  python -m vqdiffusion_jax.main --config=configs/shapes.py --workdir=runs/shapes

Override any field from the command line, e.g.
``--config.diffusion.num_timesteps=50``; unknown fields are errors.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config; ``arg`` must be empty (variants come later)."""
  if arg:
    raise ValueError(f"configs/shapes.py takes no argument yet, got {arg!r}")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.diffusion = ml_collections.ConfigDict({
      "schedule": "mask_and_replace",
      "num_timesteps": 100,
      "aux_weight": 5e-4,
      "adaptive_aux": True,
      "mask_weight": (1.0, 1.0),
      "importance_sampling": True,
  })
  config.codebook_size = 256
  config.lock()
  return config
