"""The main job's time budget: the planned step count, its file, and resume."""

import json

import pytest

from configs import shapes as shapes_config
from vqdiffusion_jax.main import train_and_evaluate
from vqdiffusion_jax.train import budget, denoiser_stage


def _budget_config(minutes, reserve_steps=0, margin=0.0):
  config = shapes_config.get_config("runlocal")
  with config.unlocked():
    config.time_budget.update(minutes=minutes, reserve_steps=reserve_steps, margin=margin)
    config.eval.samplers = ()
  return config


def test_planned_steps_is_the_fitting_multiple_above_the_minimum():
  # 1000 s, 5% in hand: 950 s at 0.1 s/step = 9500 steps, less 700 reserved = 8800.
  assert budget.planned_steps(1000, 0.1, reserve_steps=700, margin=0.05, multiple=50,
                              minimum=150) == 8800
  assert budget.planned_steps(1000, 0.3, reserve_steps=0, margin=0.0, multiple=50,
                              minimum=150) == 3300  # 3333.3 rounded down to a multiple of 50
  assert budget.planned_steps(10, 0.1, reserve_steps=700, margin=0.05, multiple=50,
                              minimum=150) == 150
  with pytest.raises(ValueError, match="seconds_per_step"):
    budget.planned_steps(10, 0.0, reserve_steps=0, margin=0.0, multiple=1, minimum=1)
  with pytest.raises(ValueError, match="margin"):
    budget.planned_steps(10, 0.1, reserve_steps=0, margin=1.0, multiple=1, minimum=1)


def test_runlocal_and_zero_minutes_turn_the_budget_off():
  assert budget.enabled(shapes_config.get_config())
  assert not budget.enabled(shapes_config.get_config("runlocal"))


def test_two_processes_train_process_zeros_plan(tmp_path):
  from tests.two_process_worker import run_two_processes  # noqa: PLC0415
  outputs = run_two_processes("plan", tmp_path)
  plans = [json.loads(line) for output in outputs for line in output.splitlines()
           if line.startswith('{"process"')]
  assert sorted(p["process"] for p in plans) == [0, 1]
  # Process 0 timed 0.5 s a step with 600 s left: 1200 steps (runlocal logs every step).
  want = {"num_steps": 1200, "seconds_per_step": 0.5, "seconds_left": 600.0,
          "budget_minutes": 10.0}
  assert [p["plan"] for p in plans] == [want, want]
  assert json.loads((tmp_path / budget.PLAN_NAME).read_text()) == want


def test_a_stage_with_checkpoints_but_no_plan_keeps_its_step_count(tmp_path):
  (tmp_path / "checkpoints" / "3").mkdir(parents=True)
  never = lambda: pytest.fail("measured a stage that already trained")  # noqa: E731
  with pytest.warns(UserWarning, match="keeping train.num_steps=2"):
    assert budget.plan_steps(_budget_config(1.0), str(tmp_path), never, never) is None
  assert not (tmp_path / budget.PLAN_NAME).exists()


def test_a_file_that_is_not_a_plan_is_a_clear_error(tmp_path):
  (tmp_path / budget.PLAN_NAME).write_text(json.dumps({"num_steps": "many"}))
  with pytest.raises(ValueError, match="not a step plan"):
    budget.plan_steps(_budget_config(1.0), str(tmp_path), lambda: 1.0, lambda: 1.0)


def test_the_denoiser_trains_the_planned_steps_and_a_rerun_reuses_the_plan(tmp_path, monkeypatch):
  measured = []

  def seconds_per_step(trainer):
    measured.append(real(trainer))
    return 30.0  # so the budget holds a handful of steps

  real = denoiser_stage.seconds_per_step
  monkeypatch.setattr(denoiser_stage, "seconds_per_step", seconds_per_step)
  config = _budget_config(3.0)
  summary = train_and_evaluate(config, str(tmp_path))

  plan = json.loads((tmp_path / "denoiser" / budget.PLAN_NAME).read_text())
  assert len(measured) == 1 and measured[0] > 0
  assert plan["seconds_per_step"] == 30.0 and 0 < plan["seconds_left"] < 180
  minimum = int(config.optim.warmup_steps) + int(config.train.log_every)
  assert plan["num_steps"] == max(int(plan["seconds_left"] / 30.0), minimum)
  assert summary["denoiser_step"] == plan["num_steps"]
  saved = json.loads((tmp_path / "denoiser" / "config.json").read_text())
  assert saved["train"]["num_steps"] == plan["num_steps"]  # the schedule's length

  monkeypatch.setattr(denoiser_stage, "seconds_per_step",
                      lambda trainer: pytest.fail("planned again on resume"))
  assert train_and_evaluate(config, str(tmp_path))["denoiser_step"] == plan["num_steps"]
