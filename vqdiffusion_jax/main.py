"""Entry point of every run.

  python -m vqdiffusion_jax.main --config=configs/shapes.py --workdir=runs/shapes \
      [--config.train.num_steps=500] [--multihost]

Parses flags, initialises multi-host JAX when asked (or when the environment
shows several processes), and runs ``train.loop.train_and_evaluate``.
SIGTERM saves the running stage's checkpoint and ends the run there (no
later stage, no report) with exit status 143 (128 + SIGTERM, the shell's
convention), so that `main && next-step` does not go on and a scheduler that
restarts failed jobs restarts it. Re-running the same command resumes where
the run stopped.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from vqdiffusion_jax.train import loop, runner
from vqdiffusion_jax.train import mesh as mesh_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples.")
_MULTIHOST = flags.DEFINE_bool("multihost", None,
                               "Call jax.distributed.initialize() (default: detect).")
flags.mark_flags_as_required(["config", "workdir"])

STOPPED_EXIT_STATUS = 143


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  mesh_lib.multihost_initialize(force=_MULTIHOST.value)
  try:
    summary = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except runner.StopRequestedError as stop:
    logging.warning("%s", stop)
    print(f"stopped: {stop}")
    raise SystemExit(STOPPED_EXIT_STATUS) from None
  logging.info("run finished: %s", summary)
  print(f"done: {summary}")


if __name__ == "__main__":
  app.run(main)
