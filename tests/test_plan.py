"""Ahead-of-time planning on 8 fake devices: memory, FLOPs, sharding."""

import pytest

from configs import shapes
from vqdiffusion_jax import plan


def _config(data, fsdp):
  config = shapes.get_config("runlocal")
  with config.unlocked():
    config.mesh.shape.update({"data": data, "fsdp": fsdp, "tensor": 1})
    config.denoiser.model.embed_dim = 64
  return config


def test_fsdp_shards_the_state_and_the_report_says_so():
  replicated = plan.plan(_config(8, 1), 8)
  sharded = plan.plan(_config(1, 8), 8)
  assert replicated["params"] == sharded["params"] > 0
  assert sharded["flops"] > 0 and replicated["flops"] > 0
  # Parameters and Adam moments split 8 ways: the per-device state shrinks a lot.
  assert sharded["arguments"] < 0.5 * replicated["arguments"]
  assert any("fsdp" in spec for _, _, spec in sharded["shardings"])
  text = plan.report(_config(1, 8), 8, sharded)
  assert "per device: peak" in text and "TFLOP" in text


def test_asking_for_more_devices_than_exist_is_a_clear_error():
  with pytest.raises(ValueError, match="16 devices asked for"):
    plan.plan(_config(-1, 1), 16)
