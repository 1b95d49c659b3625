"""The config schema: every config is complete, and saved configs are completed when read."""

import importlib
import json

import pytest

from vqdiffusion_jax import config_schema as schema

CONFIGS = ["shapes", "cub200", "coco", "cc", "ithq_large"]


def _paths(tree: dict, prefix=()) -> set[tuple[str, ...]]:
  out = set()
  for key, value in tree.items():
    out |= _paths(value, prefix + (key,)) if isinstance(value, dict) else {prefix + (key,)}
  return out


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_every_config_has_every_key_of_the_schema(name, arg):
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  assert _paths(schema.defaults().to_dict()) <= _paths(config.to_dict())
  with pytest.raises(AttributeError):
    config.train.no_such_key = 1  # locked: unknown keys are errors


def test_a_saved_config_gets_todays_defaults_for_what_it_lacks():
  saved = json.loads(json.dumps(importlib.import_module("configs.shapes").get_config().to_dict()))
  del saved["time_budget"]
  del saved["train"]["steps_per_call"]
  del saved["denoiser"]["model"]["pooled_text"]
  saved["train"]["num_steps"] = 1234
  saved["data"]["retired_key"] = "kept"
  config = schema.complete(saved)
  assert config.time_budget.minutes == 0.0  # a budget no older run had
  assert config.train.steps_per_call == 1 and config.denoiser.model.pooled_text is False
  assert config.train.num_steps == 1234 and config.data.retired_key == "kept"
  assert config.denoiser.model.embed_dim == 128  # its own values stay


def test_runlocal_needs_the_files_of_the_path_it_keeps():
  cub = importlib.import_module("configs.cub200").get_config("runlocal")
  with pytest.raises(ValueError, match=r"--config.text.clip_path=DIR.*lpips_vgg_path=FILE"
                                       r".*lpips_heads_path=FILE.*perceptual_weight=0"):
    schema.check_user_paths(cub)
  with cub.unlocked():
    cub.text.clip_path, cub.vqvae.path = "/clip", "/converted"  # no VQ-VAE to train: no LPIPS
  schema.check_user_paths(cub)
  schema.check_user_paths(importlib.import_module("configs.shapes").get_config("runlocal"))
