"""Test setup: 8 fake CPU devices and JAX's persistent compilation cache."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("JAX_COMPILATION_CACHE_DIR",
                   os.path.expanduser("~/.cache/vqdiffusion_jax/jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
  """A finished runlocal shapes run (VQ-VAE, token cache, 4 denoiser steps, report)."""
  from configs import shapes  # noqa: PLC0415
  from vqdiffusion_jax import main  # noqa: PLC0415
  config = shapes.get_config("runlocal")
  with config.unlocked():
    config.train.num_steps = 4
  workdir = tmp_path_factory.mktemp("tiny_run")
  main.train_and_evaluate(config, str(workdir))
  return str(workdir)
