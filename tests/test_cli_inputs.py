"""Bad input to the command lines is one line naming the flag, key or file, and what would do."""

import argparse
import base64
import os
import pathlib
import re
import runpy
import subprocess
import sys
import warnings

import ml_collections
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from configs import shapes
from vqdiffusion_jax import PromptWarning, config_flag, config_schema, extras, main, outputs
from vqdiffusion_jax.convert import __main__ as convert_main
from vqdiffusion_jax.convert import common
from vqdiffusion_jax.evaluation.clip_score import load_clip
from vqdiffusion_jax.train import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
INSTALL_HINT = re.escape("install it with pip install 'vqdiffusion-jax[torch]'")


def _runlocal(**changes):
  config = shapes.get_config("runlocal")
  with config.unlocked():
    for key, value in changes.items():
      section, _, name = key.rpartition(".")
      target = config
      for part in filter(None, section.split(".")):
        target = target[part]
      target[name] = value
  return config


def _package_only_path(tmp_path):
  """A PYTHONPATH holding vqdiffusion_jax and nothing else of the repository, as installed."""
  site = tmp_path / "site"
  site.mkdir()
  (site / "vqdiffusion_jax").symlink_to(ROOT / "vqdiffusion_jax")
  return str(site)


@pytest.mark.parametrize("changes, message", [
    ({"train.global_batch": 12},
     "train.global_batch=12 does not split over the mesh's 8 batch shards (data 8 x fsdp 1) "
     "on 8 devices; pick a multiple of 8, e.g. 8 or 16"),
    ({"vqvae.train.global_batch": 4},
     "vqvae.train.global_batch=4 does not split over the mesh's 8 batch shards (data 8 x fsdp 1)"
     " on 8 devices; pick a multiple of 8, e.g. 8 or 16"),
    ({"mesh.shape.fsdp": 3, "mesh.shape.data": -1},
     "mesh.shape {'data': -1, 'fsdp': 3, 'tensor': 1}: 8 devices are not divisible by the fixed "
     "axes' product 3; pick sizes whose product is one of [1, 2, 4, 8]"),
], ids=["train_batch", "vqvae_batch", "mesh"])
def test_the_mesh_and_global_batches_are_checked_before_any_stage(tmp_path, changes, message):
  config = _runlocal(**changes)
  with pytest.raises(ValueError) as error:
    loop.check_run(config, str(tmp_path / "run"))
  assert str(error.value) == message
  assert not (tmp_path / "run").exists()


def test_a_given_vqvae_leaves_its_training_batch_unchecked(tmp_path):
  config = _runlocal(**{"vqvae.train.global_batch": 3, "vqvae.path": str(tmp_path)})
  assert loop.check_run(config, str(tmp_path)).shape["data"] == 8


def test_main_reports_a_bad_config_in_one_line_before_any_stage(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_:
    main.check_or_exit(_runlocal(**{"train.global_batch": 12}), str(tmp_path / "run"))
  assert exit_.value.code == outputs.BAD_INPUT_EXIT_STATUS == 2
  assert capsys.readouterr().err == (
      "error: train.global_batch=12 does not split over the mesh's 8 batch shards (data 8 x "
      "fsdp 1) on 8 devices; pick a multiple of 8, e.g. 8 or 16\n")
  assert not (tmp_path / "run").exists()


def test_an_unknown_override_names_the_flag_and_the_nearest_keys_of_its_section(tmp_path):
  # A config file from outside the working directory that imports its siblings (cc -> cub200).
  run = subprocess.run(
      [sys.executable, "-m", "vqdiffusion_jax.main",
       f"--config={ROOT / 'configs' / 'cc.py'}:runlocal", f"--workdir={tmp_path / 'run'}",
       "--config.train.bogus=1"],
      cwd=tmp_path, capture_output=True, text=True, timeout=300,
      env={**os.environ, "PYTHONPATH": _package_only_path(tmp_path)})
  assert run.returncode == 1
  assert run.stderr.splitlines()[0] == (
      "FATAL Flags parsing error: --config.train.bogus: train has no key 'bogus'; the nearest "
      "are train.num_steps, train.log_every, train.keep_checkpoints")
  assert "Traceback" not in run.stderr


@pytest.mark.parametrize("override, message", [
    ("trian.global_batch", "--config.trian.global_batch: the config has no key 'trian'; the "
                           "nearest are train, optim, diffusion"),
    ("vqvae.loss.lpips_path", "--config.vqvae.loss.lpips_path: vqvae.loss has no key "
                              "'lpips_path'; the nearest are vqvae.loss.lpips_vgg_path, "
                              "vqvae.loss.lpips_heads_path, vqvae.loss.disc_start"),
    ("seed.value", "--config.seed.value: seed is a value (int), not a section with keys"),
], ids=["section", "key_in_section", "key_under_a_value"])
def test_override_keys_are_checked_against_the_config(override, message):
  argv = ["prog", "--config=configs/shapes.py", "--config.train.num_steps=3",
          f"--config.{override}=1", "--noconfig.train.remat", "--workdir=w"]
  names = config_flag.override_names(argv)
  assert names == ["train.num_steps", override, "train.remat"]
  with pytest.raises(ValueError) as error:
    config_flag.check_overrides(shapes.get_config("runlocal"), names)
  assert str(error.value) == message


def test_a_config_file_loads_from_any_working_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(ROOT))])
  for name in [n for n in sys.modules if n == "configs" or n.startswith("configs.")]:
    monkeypatch.delitem(sys.modules, name)
  config = config_flag.load(ROOT / "configs" / "coco.py", "runlocal")
  assert config.data.name == "mscoco_captions" and config.train.num_steps == 2
  assert str(ROOT) not in sys.path
  with pytest.raises(ValueError, match="unknown config argument 'huge'"):
    config_flag.load(ROOT / "configs" / "coco.py", "huge")
  with pytest.raises(FileNotFoundError, match="no config file .*nope.py"):
    config_flag.load(tmp_path / "nope.py")


def test_a_missing_optional_package_names_the_install_extra(tmp_path, monkeypatch, capsys):
  checkpoint = tmp_path / "model.pth"
  torch.save({"w": torch.zeros(2)}, checkpoint)
  weights = tmp_path / "model.safetensors"
  save_file({"w": np.zeros(2, np.float32)}, str(weights))
  monkeypatch.setitem(sys.modules, "torch", None)
  monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
  assert convert_main.main([str(checkpoint), "--preset", "coco",
                            "--out", str(tmp_path / "out")]) == 2
  assert capsys.readouterr().err == (
      f"error: reading the official checkpoint {checkpoint} needs torch, which is not "
      "installed; install it with pip install 'vqdiffusion-jax[torch]'\n")
  with pytest.raises(extras.MissingExtraError, match=f"needs safetensors, .*{INSTALL_HINT}"):
    common.read_weights(weights)
  clip = tmp_path / "clip"
  clip.mkdir()
  (clip / "config.json").write_text("{}")
  monkeypatch.setitem(sys.modules, "transformers", None)
  with pytest.raises(extras.MissingExtraError,
                     match=f"reading the CLIP checkpoint {clip} needs transformers, .*"
                           f"{INSTALL_HINT}"):
    load_clip(clip)
  monkeypatch.delitem(sys.modules, "vqdiffusion_jax.export", raising=False)
  with pytest.raises(SystemExit) as exit_:
    runpy.run_module("vqdiffusion_jax.export", run_name="__main__")
  assert exit_.value.code == ("error: exporting to PyTorch needs torch, which is not installed; "
                              "install it with pip install 'vqdiffusion-jax[torch]'")


def test_a_truncated_safetensors_file_is_named(tmp_path):
  path = tmp_path / "model.safetensors"
  save_file({"w": np.zeros(1000, np.float32)}, str(path))
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(common.ConversionError) as error:
    common.read_weights(path)
  assert str(error.value) == (f"{path}: truncated or not a safetensors file (a safetensors "
                              "header for 4000 bytes of tensors but 3900 bytes follow it)")
  text = tmp_path / "notes.safetensors"
  text.write_text("not weights\n")
  with pytest.raises(common.ConversionError, match=re.escape(
      f"{text}: truncated or not a safetensors file (text of 12 bytes starting 'not weights')")):
    common.read_weights(text)


def _probes(directory: pathlib.Path) -> dict[str, tuple[pathlib.Path, str]]:
  """Files that are not PyTorch checkpoints, and what convert should say they look like."""
  rng = np.random.default_rng(0)
  text, five, noise, truncated = (directory / n for n in ("a.txt", "five", "b64", "cut.pth"))
  text.write_text("hello world\nsecond line\n")
  five.write_bytes(b"hello")
  noise.write_bytes(base64.b64encode(rng.bytes(300)))
  whole = directory / "whole.pth"
  torch.save({"w": torch.zeros(1000)}, whole)
  truncated.write_bytes(whole.read_bytes()[:800])
  (directory / "empty_dir").mkdir()
  (directory / "empty_dir" / "notes.txt").write_text("x")
  return {
      "text": (text, "text of 24 bytes starting 'hello world'"),
      "five bytes": (five, "text of 5 bytes starting 'hello'"),
      "base64": (noise, f"text of 400 bytes starting {noise.read_text()[:40]!r}"),
      "truncated zip": (truncated, "a zip archive that is truncated or damaged"),
  }


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_convert_says_what_a_file_that_is_not_a_checkpoint_looks_like(tmp_path, capsys,
                                                                      allow_pickle):
  expected = ("expected our converted directory, a diffusers VQDiffusionPipeline or "
              "Transformer2DModel directory, or an official VQ-Diffusion .pth file")
  for name, (path, looks) in _probes(tmp_path).items():
    argv = [str(path), "--preset", "coco", "--out", str(tmp_path / "out")]
    assert convert_main.main(argv + ["--allow-pickle"] * allow_pickle) == 2, name
    err = capsys.readouterr().err
    assert err == f"error: {path} is not a PyTorch checkpoint ({looks}); {expected}\n", name
  directory = tmp_path / "empty_dir"
  assert convert_main.main([str(directory), "--out", str(tmp_path / "out")]) == 2
  assert capsys.readouterr().err == (
      f"error: {directory} is not a checkpoint we know (a directory of 1 entries (notes.txt), "
      f"without model_index.json or config.json); {expected}\n")


def test_only_a_checkpoint_holding_python_objects_suggests_allow_pickle(tmp_path, capsys):
  path = tmp_path / "official.pth"
  torch.save({"model": {"w": torch.ones(3)}, "args": argparse.Namespace(lr=0.1)}, path)
  assert convert_main.main([str(path), "--preset", "coco", "--out", str(tmp_path / "o")]) == 2
  assert capsys.readouterr().err == (
      f"error: {path} holds Python objects besides tensors (argparse.Namespace); if you trust "
      "the file, load it with allow_pickle=True (--allow-pickle)\n")
  loaded = common.load_torch_checkpoint(path, "official checkpoint", allow_pickle=True)
  assert loaded["args"].lr == 0.1 and loaded["model"]["w"].tolist() == [1.0, 1.0, 1.0]


def test_convert_tells_a_training_workdir_from_a_checkpoint(tiny_workdir, tmp_path, capsys):
  assert convert_main.main([tiny_workdir, "--out", str(tmp_path / "out")]) == 2
  assert capsys.readouterr().err == (
      f"error: {tiny_workdir} is a training workdir of the main job, not a PyTorch checkpoint; "
      "Pipeline.from_pretrained and vqdiffusion_jax.sample read it as it is, and "
      "vqdiffusion_jax.export writes it to PyTorch\n")


def test_a_config_file_with_a_key_no_section_has_is_refused():
  values = shapes.get_config().to_dict()
  values["train"]["global_bach"] = 64
  with pytest.raises(ValueError) as error:
    config_schema.finish(ml_collections.ConfigDict(values), None)
  assert str(error.value) == ("unknown config keys: train.global_bach (nearest: "
                              "train.global_batch, train.log_every, train.sample_every)")


def _run_command(module: str, argv: list[str], monkeypatch) -> int:
  """``python -m module *argv`` in this process; returns its exit status."""
  monkeypatch.delitem(sys.modules, module, raising=False)
  monkeypatch.setattr(sys, "argv", [module, *argv])
  monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
  with pytest.raises(SystemExit) as exit_:
    runpy.run_module(module, run_name="__main__")
  return exit_.value.code


@pytest.mark.parametrize("module, argv, message", [
    ("vqdiffusion_jax.evaluate", ["--checkpoint", "{workdir}", "--num_samples", "0"],
     "--num_samples must be a positive integer, got 0"),
    ("vqdiffusion_jax.evaluate", ["--checkpoint", "{tmp}/nowhere"],
     "--checkpoint {tmp}/nowhere: no such file or directory"),
    ("vqdiffusion_jax.evaluate", ["--checkpoint", "{workdir}", "--sampler", "purity/2.5"],
     "bad sampler spec 'purity/2.5': steps must be a positive integer or 'all', got '2.5'"),
    ("vqdiffusion_jax.sample", ["--workdir", "{tmp}/nowhere", "--prompt", "a"],
     "no checkpoint at {tmp}/nowhere"),
    ("vqdiffusion_jax.sample", ["--workdir", "{workdir}", "--prompt", "a purple hexagon",
                                "--unknown_words", "error", "--out", "{tmp}/grid.png"],
     "--prompt = 'a purple hexagon' has words the text encoder never saw in training: 'purple', "
     "'hexagon' (read as [UNK]; the image will not follow them) (--unknown_words=warn samples "
     "them anyway)"),
])
def test_sample_and_evaluate_report_a_bad_input_in_one_line(module, argv, message, tiny_workdir,
                                                           tmp_path, monkeypatch, capsys):
  fill = lambda text: text.format(workdir=tiny_workdir, tmp=tmp_path)  # noqa: E731
  assert _run_command(module, [fill(a) for a in argv], monkeypatch) == 2
  assert capsys.readouterr().err == f"error: {fill(message)}\n"
  assert not (tmp_path / "grid.png").exists()


def test_command_warnings_are_one_line_without_the_source(monkeypatch):
  monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
  outputs.one_line_warnings()
  assert warnings.formatwarning(PromptWarning("x has no words"), PromptWarning, "sample.py",
                                139, "pipe.report_prompts_once(...)") == (
      "PromptWarning: x has no words\n")


def test_only_the_named_errors_become_one_line(capsys):
  with pytest.raises(SystemExit) as exit_, outputs.bad_input_is_one_line(KeyError):
    raise KeyError("no key 'x'")
  assert exit_.value.code == 2 and capsys.readouterr().err == "error: no key 'x'\n"
  with pytest.raises(RuntimeError, match="internal"), outputs.bad_input_is_one_line(ValueError):
    raise RuntimeError("internal")
