"""The training run end to end on the runlocal configs: stages, resume, SIGTERM."""

import importlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import user_files
from vqdiffusion_jax import build
from vqdiffusion_jax.convert import checkpoints
from vqdiffusion_jax.main import train_and_evaluate
from vqdiffusion_jax.models import transformer
from vqdiffusion_jax.train import checkpoint as ckpt_lib
from vqdiffusion_jax.train import runner

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ["shapes", "cub200", "coco", "cc", "ithq_large"]
CLIP_WIDTH, OFFICIAL_CLIP_WIDTH = 32, 512


def _config(name, **train):
  """A runlocal config with these train settings and no evaluation samplers (training tests)."""
  config = importlib.import_module(f"configs.{name}").get_config("runlocal")
  with config.unlocked():
    config.train.update(train)
    config.eval.samplers = ()
  return config


def _metrics(stage_dir):
  lines = pathlib.Path(stage_dir, "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


def _untimed(metrics):
  """A metrics line without the loop's pace, which differs from run to run."""
  return {k: v for k, v in metrics.items() if k not in runner.TIMING_SCALARS}


@pytest.fixture(scope="module")
def user(tmp_path_factory):
  """The files a user hands the text-to-image configs: CLIP, LPIPS, downloads, a VQ-VAE."""
  root = tmp_path_factory.mktemp("user")
  vgg, heads = user_files.lpips_files(root / "lpips")
  # COCO's: as wide as CLIP ViT-B/32, which the official model's null text is made for.
  wide_clip = user_files.clip_dir(root / "clip512", hidden_size=OFFICIAL_CLIP_WIDTH,
                                  num_heads=8, intermediate_size=64)
  coco = _runlocal("coco", {})
  sizes = transformer.TransformerConfig(
      codebook_size=user_files.VQGAN_CODES, spatial_size=(8, 8),
      num_layers=coco.denoiser.model.num_layers, embed_dim=coco.denoiser.model.embed_dim,
      num_heads=coco.denoiser.model.num_heads, condition_dim=OFFICIAL_CLIP_WIDTH,
      num_timesteps=coco.diffusion.num_timesteps)
  return {"clip": user_files.clip_dir(root / "clip"), "lpips_vgg": vgg, "lpips_heads": heads,
          "vqvae": user_files.converted_vqvae(root / "vqvae"), "wide_clip": wide_clip,
          "official": user_files.converted_official(root / "official", wide_clip, sizes),
          "cub": str(user_files.cub_download(root / "cub")),
          "coco": str(user_files.coco_download(root / "coco")),
          "cc": str(user_files.cc_download(root / "cc")),
          "folder": str(user_files.folder_download(root / "folder"))}


def _overrides(name, user):
  """The command-line overrides a user gives each config: the files it reads."""
  text = {"text.clip_path": user["clip"]}
  lpips = {"vqvae.loss.lpips_vgg_path": user["lpips_vgg"],
           "vqvae.loss.lpips_heads_path": user["lpips_heads"]}
  return {
      "shapes": {},
      "cub200": {**text, **lpips, "data.manual_dir": user["cub"]},
      "coco": {"text.clip_path": user["wide_clip"], "data.manual_dir": user["coco"],
               "vqvae.path": user["official"], "checkpoint.init_from": user["official"]},
      "cc": {**text, "data.manual_dir": user["cc"], "vqvae.path": user["vqvae"]},
      "ithq_large": {**text, "data.manual_dir": user["folder"], "vqvae.path": user["vqvae"]},
  }[name]


def _runlocal(name, overrides):
  config = importlib.import_module(f"configs.{name}").get_config("runlocal")
  with config.unlocked():
    for key, value in overrides.items():
      section, *rest = key.split(".")
      target = config[section]
      for part in rest[:-1]:
        target = target[part]
      target[rest[-1]] = value
  return config


@pytest.mark.parametrize("name", CONFIGS)
def test_each_config_runs_its_own_path_in_its_runlocal_form(name, user, tmp_path):
  config = _runlocal(name, {**_overrides(name, user), "train.sample_every": 2})
  summary = train_and_evaluate(config, str(tmp_path))
  assert summary["denoiser_step"] == 2
  captions = (tmp_path / "denoiser" / "samples" / "samples_00000002.txt").read_text()
  assert (tmp_path / "denoiser" / "samples" / "samples_00000002.png").exists()
  assert len(captions.splitlines()) == 8
  assert [m["step"] for m in _metrics(tmp_path / "denoiser")] == [1, 2]
  for stage in ("vqvae", "denoiser"):
    lines = _metrics(tmp_path / stage) if (tmp_path / stage / "metrics.jsonl").exists() else []
    assert all(all(v == v for v in m.values()) for m in lines)
    assert all(0 <= m["input_fraction"] <= 1 and m["steps_per_second"] > 0 for m in lines)
  assert (tmp_path / "token_cache" / "metadata.json").exists()
  assert (tmp_path / "report" / "report.md").exists()
  PATHS[name](config, tmp_path)


def _trained_vqvae(config, workdir, *, gan):
  metrics = _metrics(workdir / "vqvae")
  assert [m["step"] for m in metrics] == [1, 2]
  assert (workdir / "vqvae" / "samples" / "reconstructions_00000002.png").exists()
  last = metrics[-1]
  assert ("d_loss" in last) == gan, sorted(last)  # the PatchGAN discriminator trained
  assert (last["perceptual"] > 0) == gan and (last["g_loss"] != 0) == gan, last


def _converted_vqvae(config, workdir):
  assert not (workdir / "vqvae" / "metrics.jsonl").exists()
  module, _ = checkpoints.load_vqvae(config.vqvae.path)
  assert module.config.vocabulary_size == user_files.VQGAN_CODES
  cache = json.loads((workdir / "token_cache" / "metadata.json").read_text())
  assert cache["codebook_size"] == user_files.VQGAN_CODES


def _clip_text(config, workdir, dataset, width=CLIP_WIDTH):
  """The denoiser reads CLIP features of the user's CLIP width; the data is the dataset built."""
  assert config.text.kind == "clip"
  state, _ = _saved(workdir / "denoiser", 2)
  null_text = [leaf for path, leaf in _leaves(state["params"]) if path.endswith("null_text")]
  assert [leaf.shape for leaf in null_text] == [(77, width)]
  assert (workdir / "data" / dataset).is_dir()


def _leaves(tree, prefix=""):
  if isinstance(tree, dict):
    for key, value in tree.items():
      yield from _leaves(value, f"{prefix}/{key}")
  else:
    yield prefix, np.asarray(tree)


def _shapes(config, workdir):
  _trained_vqvae(config, workdir, gan=False)
  assert config.vqvae.model.patch_size and config.text.kind == "trainable"
  assert (workdir / "denoiser" / build.VOCABULARY_FILE).exists()


def _cub200(config, workdir):
  _trained_vqvae(config, workdir, gan=True)
  _clip_text(config, workdir, "cub200_captions")
  assert {tuple(s["shape"]) for s in _shardings(workdir / "denoiser", 2)} == {(8, 1, 1)}


def _coco(config, workdir):
  _converted_vqvae(config, workdir)
  _clip_text(config, workdir, "mscoco_captions", width=OFFICIAL_CLIP_WIDTH)
  assert _saved(workdir / "denoiser", 1)[1]["origin"] == "init_from"


def _cc(config, workdir):
  _converted_vqvae(config, workdir)
  _clip_text(config, workdir, "conceptual_captions")


def _ithq_large(config, workdir):
  _converted_vqvae(config, workdir)
  _clip_text(config, workdir, "captioned_folder")
  shardings = _shardings(workdir / "denoiser", 2)
  assert {tuple(s["shape"]) for s in shardings} == {(2, 4, 1)}  # data 2 x fsdp 4
  assert any("fsdp" in s["partition_spec"] for s in shardings)
  state, _ = _saved(workdir / "denoiser", 2)
  blocks = [path for path, _ in _leaves(state["params"]) if "block" in path]
  assert blocks and not any("block_0" in path for path in blocks), blocks[:3]  # scanned


def _shardings(stage_dir, step):
  """The mesh and partition spec of every array of a saved state, as Orbax records them."""
  path = pathlib.Path(stage_dir, "checkpoints", str(step), "state", "_sharding")
  return [json.loads(value) for value in json.loads(path.read_text()).values()]


PATHS = {"shapes": _shapes, "cub200": _cub200, "coco": _coco, "cc": _cc,
         "ithq_large": _ithq_large}


def test_resume_after_a_crash_continues_exactly(tiny_workdir, tmp_path, monkeypatch):
  # The straight run: tiny_workdir, the shared runlocal shapes run of 4 denoiser steps.
  straight, resumed = pathlib.Path(tiny_workdir), tmp_path / "resumed"
  config = _config("shapes", num_steps=4)

  real_run_stage = runner.run_stage

  def crash_after_two(config, stage):
    if not stage.directory.endswith("denoiser"):
      return real_run_stage(config, stage)
    step_fn, calls = stage.step_fn, []

    def crashing(*args):
      if len(calls) == 2:
        raise KeyboardInterrupt("simulated crash")
      calls.append(1)
      return step_fn(*args)
    stage.step_fn = crashing
    return real_run_stage(config, stage)

  monkeypatch.setattr(runner, "run_stage", crash_after_two)
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(config, str(resumed))
  # The save of step 2 was in flight; the stage waited for it before raising.
  checkpoints = resumed / "denoiser" / "checkpoints"
  assert sorted(p.name for p in checkpoints.iterdir()) == ["1", "2"]
  assert (checkpoints / "2" / ckpt_lib.COMMIT_MARKER).exists()
  monkeypatch.setattr(runner, "run_stage", real_run_stage)
  with (resumed / "denoiser" / "metrics.jsonl").open("a") as f:
    f.write('{"step": 3, "loss": -1.0}\n')  # as logged by a run killed before its checkpoint 3
  assert train_and_evaluate(config, str(resumed))["denoiser_step"] == 4

  want = {m["step"]: m for m in _metrics(straight / "denoiser")}
  got = {m["step"]: m for m in _metrics(resumed / "denoiser")}
  assert [m["step"] for m in _metrics(resumed / "denoiser")] == [1, 2, 3, 4]
  for step in (3, 4):  # same state, same batch, same key: identical to the last bit
    assert _untimed(got[step]) == _untimed(want[step]), step
  # The saved final states (params, EMA, Adam moments, loss history) and data positions.
  want_state, want_data = _saved(straight / "denoiser", 4)
  got_state, got_data = _saved(resumed / "denoiser", 4)
  assert got_data["iterator"] == want_data["iterator"]
  assert jax.tree.structure(got_state) == jax.tree.structure(want_state)
  jax.tree.map(np.testing.assert_array_equal, got_state, want_state)


def test_several_steps_per_call_train_what_one_step_per_call_does(tmp_path):
  runs = {}
  for per_call in (1, 3):
    config = _config("shapes", num_steps=5, log_every=2, checkpoint_every=4,
                     steps_per_call=per_call)
    with config.unlocked():
      config.vqvae.train.update(num_steps=5, steps_per_call=per_call)
      config.data.num_workers = 2 if per_call == 3 else 0  # reader threads change no batch
    train_and_evaluate(config, str(tmp_path / str(per_call)))
    runs[per_call] = tmp_path / str(per_call)
  for stage in ("vqvae", "denoiser"):
    one, many = (_metrics(runs[k] / stage) for k in (1, 3))
    assert [m["step"] for m in many] == [2, 4, 5] == [m["step"] for m in one]
    for got, want in zip(many, one, strict=True):
      got, want = _untimed(got), _untimed(want)
      # atol: a tokenizer metric near 2e-3 moved by 3e-8 (scan order) on an AMX Xeon.
      np.testing.assert_allclose([got[k] for k in sorted(want)], [want[k] for k in sorted(want)],
                                 rtol=1e-5, atol=1e-7, err_msg=f"{stage} step {want['step']}")
    assert _steps(runs[3] / stage) == _steps(runs[1] / stage) == [4, 5]
    want_state, want_data = _saved(runs[1] / stage, 5)
    got_state, got_data = _saved(runs[3] / stage, 5)
    assert got_data["iterator"] == want_data["iterator"]
    # The scanned program sums in another order (params differ by ~1e-5, and Adam may turn
    # a near-zero gradient's sign, moving a rare element by up to the learning rate); a
    # skipped or repeated step would move most elements by up to the learning rate, 1e-3.
    jax.tree.map(_all_but_a_few_close, got_state, want_state)


def _all_but_a_few_close(got, want, tol=1e-4, few=1e-3):
  """At most a ``few`` fraction of elements differ by more than ``tol`` (relative and absolute)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  far = np.abs(got - want) > tol + tol * np.abs(want)
  assert far.mean() <= few, f"{far.sum()} of {far.size} elements differ by more than {tol}"


def test_pace_is_steps_and_input_share_per_lap():
  now = [100.0]
  pace = runner.Pace(10, clock=lambda: now[0])
  with pace.reading():
    now[0] += 0.5
  now[0] += 1.5
  assert pace.lap(30) == {"steps_per_second": 10.0, "input_fraction": 0.25}
  with pace.reading():
    now[0] += 1.0
  now[0] += 3.0
  assert pace.lap(34) == {"steps_per_second": 1.0, "input_fraction": 0.25}


@pytest.mark.parametrize("step, per_call, sample_every, want", [
    (0, 10, 0, 5),      # ends at the first log step (every 5)
    (6, 10, 0, 2),      # ends at the checkpoint step (every 8) before the log at 10
    (10, 3, 0, 3),      # no periodic step within the next 3
    (0, 1, 0, 1),
    (0, 10, 1, 1),      # samples every step
    (16, 10, 0, 3),     # ends at the last step, 19
])
def test_calls_end_at_every_periodic_step(step, per_call, sample_every, want):
  train = _config("shapes", log_every=5, checkpoint_every=8, sample_every=sample_every).train
  stage = runner.Stage(directory="d", num_steps=19, abstract_state=None, init_state=None,
                       step_fn=None, batches=None, step_of=None, steps_fn=lambda *a: None,
                       steps_per_call=per_call, on_sample=lambda *a: None)
  assert runner.steps_this_call(step, stage, train) == want


def test_bad_steps_per_call_or_log_every_is_an_error():
  train = _config("shapes").train
  make = lambda per_call, steps_fn: runner.Stage(  # noqa: E731
      directory="d", num_steps=20, abstract_state=None, init_state=None, step_fn=None,
      batches=None, step_of=None, steps_fn=steps_fn, steps_per_call=per_call)
  with pytest.raises(ValueError, match="at least 1"):
    runner.steps_this_call(0, make(0, lambda *a: None), train)
  with pytest.raises(ValueError, match="needs a steps_fn"):
    runner.steps_this_call(0, make(4, None), train)
  with pytest.raises(ValueError, match="log_every must be at least 1"):
    runner.steps_this_call(0, make(4, lambda *a: None), _config("shapes", log_every=0).train)


def test_stacked_batches_drop_strings_and_keep_order():
  batches = [{"tokens": np.full((2, 3), i), "captions": np.array(["a", "b"])} for i in range(4)]
  stacked = runner.stack_batches(batches)
  assert list(stacked) == ["tokens"] and stacked["tokens"].shape == (4, 2, 3)
  np.testing.assert_array_equal(stacked["tokens"][:, 0, 0], [0, 1, 2, 3])


def _saved(stage_dir, step):
  step_dir = pathlib.Path(stage_dir, "checkpoints", str(step))
  state = ocp.StandardCheckpointer().restore(str(step_dir / "state"))
  data = json.loads((step_dir / "data" / "metadata").read_text())
  return state, data


def test_rerunning_a_finished_run_trains_nothing_more(tiny_workdir, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(tiny_workdir, workdir)
  before = {s: _metrics(workdir / s) for s in ("vqvae", "denoiser")}
  assert train_and_evaluate(_config("shapes", num_steps=4), str(workdir))["denoiser_step"] == 4
  assert {s: _metrics(workdir / s) for s in ("vqvae", "denoiser")} == before


def _steps(directory):
  path = pathlib.Path(directory, "checkpoints")
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.exists() else []


def test_sigterm_mid_run_saves_a_restorable_checkpoint(tiny_workdir, tmp_path):
  # The denoiser goes on from a finished 4-step run (the VQ-VAE and token cache done).
  workdir = tmp_path / "run"
  shutil.copytree(tiny_workdir, workdir)
  shutil.rmtree(workdir / "report")
  command = [sys.executable, "-m", "vqdiffusion_jax.main", "--config=configs/shapes.py:runlocal",
             f"--workdir={workdir}", "--config.eval.samplers=()",
             "--config.train.num_steps=400", "--config.train.checkpoint_every=1000"]
  verbose = command + ["--verbosity=0"]  # the libraries' INFO logs on
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  process = subprocess.Popen(verbose, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while len(_metrics(workdir / "denoiser")) <= 4 and time.time() < deadline:
    time.sleep(0.2)  # until the run has logged a step past the 4 it resumed from
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=240)
  assert process.returncode == 143, output[-2000:]  # 128 + SIGTERM: the run did not finish
  saved = _steps(workdir / "denoiser")
  assert saved and 4 < saved[-1] < 400, saved
  assert f"stopped at step {saved[-1]} of 400" in output, output[-2000:]
  assert not (workdir / "report").exists()
  assert not (workdir / "run.lock").exists()  # released on the way out
  assert re.search(r"^I\d{4} ", output, re.MULTILINE), output[-2000:]
  resumed = subprocess.run(command[:-2] + ["--config.train.num_steps=" + str(saved[-1] + 2)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  # By default the console shows the stages' progress and warnings, no INFO logs.
  assert not re.search(r"^I\d{4} ", resumed.stderr + resumed.stdout, re.MULTILINE)
  assert re.search(rf"^denoiser \[#+\] {saved[-1] + 2}/{saved[-1] + 2} ", resumed.stderr,
                   re.MULTILINE), resumed.stderr[-2000:]
  assert _steps(workdir / "denoiser")[-1] == saved[-1] + 2
