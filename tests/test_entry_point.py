"""The config files: locked, and shrunk to a CPU by runlocal along their own path."""

import functools
import importlib

import pytest

CONFIGS = ["shapes", "cub200", "coco", "cc", "ithq_large"]


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_are_locked_and_runlocal_shrinks_them(name):
  module = importlib.import_module(f"configs.{name}")
  config, local = module.get_config(), module.get_config("runlocal")
  with pytest.raises(AttributeError):
    config.train.bogus = 1
  assert local.train.num_steps == local.vqvae.train.num_steps == 2
  assert local.data.image_size == 32
  assert local.denoiser.model.num_layers < config.denoiser.model.num_layers
  # Its own path: the same dataset, text, VQ-VAE kind and losses, mesh axes, remat and scan.
  for key in ("data.name", "text.kind", "vqvae.model.patch_size", "vqvae.loss.perceptual_weight",
              "vqvae.loss.disc_weight", "train.remat", "train.scan_layers"):
    get = lambda c: functools.reduce(getattr, key.split("."), c)  # noqa: B023, E731
    assert get(local) == get(config), key
  assert (local.mesh.shape.fsdp > 1) == (config.mesh.shape.fsdp > 1)
  assert local.train.dtype == ("bfloat16" if name == "ithq_large" else "float32")
  assert {s.split("/")[0] for s in local.eval.samplers} == {
      s.split("/")[0] for s in config.eval.samplers}
  with pytest.raises(ValueError, match="unknown config argument"):
    module.get_config("huge")

