"""Fitting the denoiser's step count to a wall-clock budget for the whole run.

With ``config.time_budget.minutes`` above zero the main job plans the
denoiser's ``train.num_steps`` when that stage first starts. It times a few
calls of the real train step on real batches, takes the time left until the
budget ends (counted from the start of ``train_and_evaluate``), keeps
``margin`` of that time in hand and ``reserve_steps`` step-times for the
checkpoints, the evaluation and the report, and trains as many steps as fit,
a multiple of ``train.log_every``. So a fast machine trains longer and a slow
one still finishes in time.

The plan is written to ``step_plan.json`` in the denoiser's directory before
the first step; a resumed run reads it back, so its learning-rate schedule and
data order are those of the first attempt. A stage that already has
checkpoints but no plan keeps ``train.num_steps``. On several processes every
process times the step (it spans them all) and process 0's plan, the one it
saves, is every process's. To train the same count
and schedule on another machine (not bit for bit across CPUs), pass
``--config.time_budget.minutes=0 --config.train.num_steps=N`` with N from the
plan or the report.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from typing import Any

from etils import epath

from vqdiffusion_jax import hosts, outputs
from vqdiffusion_jax.train import checkpoint as ckpt_lib

PLAN_NAME = "step_plan.json"


def enabled(config: Any) -> bool:
  """Whether the config asks for a time budget (``time_budget.minutes`` > 0)."""
  return float(config.time_budget.minutes) > 0


def planned_steps(seconds_left: float, seconds_per_step: float, *, reserve_steps: int,
                  margin: float, multiple: int, minimum: int) -> int:
  """Steps that fit in ``seconds_left`` at ``seconds_per_step``.

  Args:
    seconds_left: wall time left in the budget.
    seconds_per_step: the measured time of one train step.
    reserve_steps: step-times kept for the work after training.
    margin: the fraction of ``seconds_left`` kept in hand for the machine's drift.
    multiple: the count is rounded down to a multiple of this.
    minimum: the smallest count returned, whatever the budget.

  Returns:
    ``floor((seconds_left * (1 - margin) / seconds_per_step - reserve_steps) / multiple)
    * multiple``, at least ``minimum``.
  """
  if seconds_per_step <= 0:
    raise ValueError(f"seconds_per_step must be positive, got {seconds_per_step}")
  if not 0 <= margin < 1:
    raise ValueError(f"time_budget.margin must be in [0, 1), got {margin}")
  fitting = seconds_left * (1 - margin) / seconds_per_step - reserve_steps
  steps = int(max(fitting, 0) // multiple) * multiple
  return max(steps, minimum)


def read_plan(directory: str | os.PathLike) -> dict | None:
  """The saved plan of a stage directory, or None."""
  path = epath.Path(directory) / PLAN_NAME
  if not path.exists():
    return None
  plan = outputs.read_json(path, remedy="delete it to plan anew")
  if not isinstance(plan, dict) or not isinstance(plan.get("num_steps"), int):
    raise ValueError(f"{path} is not a step plan (no integer num_steps); delete it to plan anew")
  return plan


def _has_checkpoints(directory: str | os.PathLike) -> bool:
  checkpoints = epath.Path(directory) / ckpt_lib.CHECKPOINTS_DIR
  return checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())


def plan_steps(config: Any, directory: str, time_left: Callable[[], float],
               seconds_per_step: Callable[[], float]) -> dict | None:
  """The stage's step plan: read back, or measured and saved now.

  Args:
    config: the run's config, with ``time_budget`` and ``train``.
    directory: the denoiser stage's directory.
    time_left: seconds left in the budget, called after the measurement.
    seconds_per_step: measures the train step (called only when planning).

  Returns:
    ``{"num_steps", "seconds_per_step", "seconds_left", "budget_minutes"}``, or
    None when the stage already has checkpoints but no plan.
  """
  plan = read_plan(directory)
  if plan is not None:
    return plan
  if _has_checkpoints(directory):
    warnings.warn(f"{directory} has checkpoints but no {PLAN_NAME}: keeping "
                  f"train.num_steps={int(config.train.num_steps)}", stacklevel=2)
    return None
  step_seconds = float(seconds_per_step())  # on every process: the step spans them all
  plan = None
  if hosts.is_main_process():
    plan = _new_plan(config, step_seconds, float(time_left()))
    outputs.write_json_atomically(epath.Path(directory) / PLAN_NAME, plan)
  return json.loads(hosts.share_from_process_zero("step_plan", json.dumps(plan)))


def _new_plan(config: Any, step_seconds: float, left: float) -> dict:
  budget, train = config.time_budget, config.train
  minimum = int(config.optim.warmup_steps) + int(train.log_every)
  steps = planned_steps(left, step_seconds, reserve_steps=int(budget.reserve_steps),
                        margin=float(budget.margin), multiple=int(train.log_every),
                        minimum=minimum)
  if steps == minimum:
    warnings.warn(f"{left:.0f} s left of the {float(budget.minutes):g}-minute budget hold "
                  f"fewer than {minimum} denoiser steps; training {minimum} and running over",
                  stacklevel=3)
  return {"num_steps": steps, "seconds_per_step": step_seconds, "seconds_left": left,
          "budget_minutes": float(budget.minutes)}


def with_num_steps(config: Any, num_steps: int) -> Any:
  """A copy of ``config`` with ``train.num_steps`` replaced."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.train.num_steps = int(num_steps)
  return config
