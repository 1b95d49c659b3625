"""Entry point of every run: train every stage, then evaluate and write the report.

  python -m vqdiffusion_jax.main --config=configs/shapes.py --workdir=runs/shapes \
      [--config.train.num_steps=500] [--multihost] [--verbosity=0]

Parses flags (``config_flag``: an unknown ``--config.KEY`` is an error naming
the nearest keys), initialises multi-host JAX when asked (or when the
environment shows several processes), checks the config against the machine
before any stage (``loop.check_run``: a bad value is one line and exit status
2), trains (``train.loop.train``) and writes the report
(``report.write_report``). The console shows one progress line per stage and
warnings; ``--verbosity=0`` (absl's flag) brings back the libraries' INFO logs.
SIGTERM saves the running stage's checkpoint and ends the run there (no
later stage, no report) with exit status 143 (128 + SIGTERM, the shell's
convention), so that `main && next-step` does not go on and a scheduler that
restarts failed jobs restarts it. Re-running the same command resumes where
the run stopped. A SIGTERM outside a stage's step loop (starting up, between
stages) takes effect at the next stage's first step; one after the last
stage's last step is ignored. On several processes a SIGTERM to any one of
them stops all of them at the same step.

A run holds the lock ``WORKDIR/run.lock`` (``workdir_lock``) from before it
touches the workdir until it ends; a run started on a workdir that another
run holds exits at once with status 1 and one line naming that run.
"""

from __future__ import annotations

import sys
from typing import Any

from absl import app, flags, logging

from vqdiffusion_jax import config_flag, extras, outputs, report, workdir_lock
from vqdiffusion_jax.train import checkpoint as ckpt_lib
from vqdiffusion_jax.train import loop, runner
from vqdiffusion_jax.train import mesh as mesh_lib

_CONFIG = config_flag.define("config", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, samples.")
_MULTIHOST = flags.DEFINE_bool("multihost", None,
                               "Call jax.distributed.initialize() (default: detect).")
flags.mark_flags_as_required(["config", "workdir"])

STOPPED_EXIT_STATUS = 143


def train_and_evaluate(config: Any, workdir: str, command: str = "") -> dict:
  """Trains every stage, then (when ``config.eval.samplers`` names any) writes the report.

  Holds the workdir's lock (``workdir_lock.held``) throughout.

  Args:
    config: the experiment config.
    workdir: the run's directory.
    command: the command line, for the report.

  Returns:
    ``loop.train``'s summary, with ``"report"``: the path of ``report.md``.

  Raises:
    runner.StopRequestedError: a stage stopped on SIGTERM (its checkpoint saved).
    workdir_lock.WorkdirBusyError: another run holds the workdir (nothing done).
  """
  with workdir_lock.held(workdir):
    summary = loop.train(config, workdir)
    if config.eval.samplers:
      summary["report"] = report.write_report(config, workdir, summary, command)
  return summary


def check_or_exit(config: Any, workdir: str) -> None:
  """``loop.check_run``; what it finds wrong is one line on stderr and exit status 2."""
  with outputs.bad_input_is_one_line(ValueError, extras.MissingExtraError):
    loop.check_run(config, workdir)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  outputs.quiet_logging(outputs.absl_verbosity())
  outputs.one_line_warnings()
  # Held for the whole run: a SIGTERM outside a stage's loop (starting up,
  # between stages) waits for the next stage's poll instead of killing the
  # process, which on several processes would leave the others hanging.
  with ckpt_lib.PreemptionWatcher():
    mesh_lib.multihost_initialize(force=_MULTIHOST.value)
    command = " ".join(["python -m vqdiffusion_jax.main", *sys.argv[1:]])
    check_or_exit(_CONFIG.value, _WORKDIR.value)
    try:
      summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value, command)
    except runner.StopRequestedError as stop:
      logging.warning("%s", stop)
      raise SystemExit(STOPPED_EXIT_STATUS) from None
    except workdir_lock.WorkdirBusyError as busy:
      raise SystemExit(str(busy)) from None
  print(f"done: {summary}")


if __name__ == "__main__":
  app.run(main)
