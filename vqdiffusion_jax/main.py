"""Entry point of every run.

  python -m vqdiffusion_jax.main --config=configs/shapes.py --workdir=runs/shapes \
      [--config.diffusion.num_timesteps=50]

It parses flags, checks the config and hands over to the trainer. The
trainer and the main job on the embedded default are still to be built
(issues 4 and 5); until then the command validates the config, prints the
schedule it implies and exits with an error saying so.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from vqdiffusion_jax.diffusion import schedule as schedules

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  schedule = schedules.make(config.diffusion.schedule, config.diffusion.num_timesteps,
                            config.codebook_size)
  print(f"config ok: {config.diffusion.schedule} schedule, T={schedule.num_timesteps}, "
        f"K={schedule.codebook_size}, workdir={_WORKDIR.value}")
  sys.exit("the trainer is not built yet (issues 4 and 5); nothing was trained")


if __name__ == "__main__":
  app.run(main)
