"""The config file and the command line that reads it."""

import pathlib
import subprocess
import sys

import pytest

from configs import shapes
from vqdiffusion_jax.diffusion import schedule as schedules

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_shapes_config_is_locked_and_builds_its_schedule():
  config = shapes.get_config()
  with pytest.raises(AttributeError):
    config.diffusion.bogus = 1
  s = schedules.make(config.diffusion.schedule, config.diffusion.num_timesteps,
                     config.codebook_size)
  assert s.num_timesteps == 100 and s.codebook_size == config.codebook_size


def _main(*flags):
  return subprocess.run([sys.executable, "-m", "vqdiffusion_jax.main", *flags],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_main_rejects_unknown_config_keys_by_name(tmp_path):
  run = _main("--config=configs/shapes.py", f"--workdir={tmp_path}",
              "--config.diffusion.bogus=1")
  assert run.returncode != 0
  assert "bogus" in run.stderr


def test_main_checks_the_config_and_says_the_trainer_is_missing(tmp_path):
  run = _main("--config=configs/shapes.py", f"--workdir={tmp_path}",
              "--config.diffusion.num_timesteps=50")
  assert "T=50" in run.stdout
  assert run.returncode == 1 and "not built yet" in run.stderr
  bad = _main("--config=configs/shapes.py", f"--workdir={tmp_path}",
              "--config.diffusion.schedule=linear")
  assert bad.returncode != 0 and "unknown schedule 'linear'" in bad.stderr
