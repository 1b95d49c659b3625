"""Several processes for real: launch/local_multiprocess.sh, two processes of four CPU devices.

A 2-process run stopped by SIGTERM to one process must stop both at one step;
relaunched, it must end with (all but a few elements of) the parameters of one
process with eight devices on the same config. Relaunched again with its newest
denoiser step damaged, both processes must set that step aside, resume from the
one before and end with exactly the parameters they had.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import time

import jax
import numpy as np
import psutil
import pytest
from PIL import Image

from configs import shapes
from vqdiffusion_jax.data import loader
from vqdiffusion_jax.main import train_and_evaluate
from vqdiffusion_jax.train import checkpoint as ckpt_lib
from vqdiffusion_jax.train import mesh as mesh_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launch" / "local_multiprocess.sh"
MESH = {"data": 2, "fsdp": 4}
SAMPLE_EVERY = 2  # each stage's sample grid of its last step
FLAGS = ["--config=configs/shapes.py:runlocal", "--config.eval.samplers=()",
         f"--config.train.sample_every={SAMPLE_EVERY}",
         *(f"--config.mesh.shape.{axis}={size}" for axis, size in MESH.items())]
# The relaunch that finishes the run also writes the report, with one sampler.
REPORT_FLAGS = ['--config.eval.samplers=("vqdiffusion/3/2",)']
TIMEOUT = 900  # seconds for one launch; a loaded 2-core machine compiles slowly


def _env() -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the launcher sets devices
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
             JAX_COMPILATION_CACHE_DIR=str(jax.config.jax_compilation_cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  return env


def _start(workdir, extra_flags=()) -> subprocess.Popen:
  return subprocess.Popen([str(LAUNCHER), "2", *FLAGS, *extra_flags, f"--workdir={workdir}"],
                          cwd=ROOT,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)


def _finish(process: subprocess.Popen) -> str:
  try:
    output, _ = process.communicate(timeout=TIMEOUT)
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signal.SIGKILL)
    output, _ = process.communicate()
    raise AssertionError(f"timed out after {TIMEOUT}s:\n{output[-6000:]}") from None
  return output


def _launch(workdir, want_status: int = 0, extra_flags=()) -> str:
  start = time.monotonic()
  output = _finish(_start(workdir, extra_flags))
  print(f"launch in {workdir.name}: {time.monotonic() - start:.0f}s")
  statuses = re.findall(r"process (\d) exited with status (\d+)", output)
  assert sorted(statuses) == [("0", str(want_status)), ("1", str(want_status))], output[-6000:]
  return output


def _final_arrays(stage_dir) -> tuple[int, dict]:
  with ckpt_lib.Checkpointer(pathlib.Path(stage_dir) / "checkpoints", read_only=True) as ckpt:
    step, arrays, _ = ckpt.restore_arrays()
  return step, arrays


def _max_abs_diff(got: dict, want: dict) -> float:
  assert jax.tree.structure(got) == jax.tree.structure(want)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64)
                                                          - np.asarray(b, np.float64)),
                                                   initial=0.0)), got, want)
  return max(jax.tree.leaves(diffs))


def _damage_newest(stage_dir) -> int:
  """Truncates the biggest array file of the newest step to half; returns that step."""
  checkpoints = pathlib.Path(stage_dir) / "checkpoints"
  newest = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  files = [p for p in (checkpoints / str(newest) / "state").rglob("*") if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  os.truncate(biggest, biggest.stat().st_size // 2)
  return newest


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """The reference: the same config in this process, one process with eight devices."""
  assert jax.device_count() == 8 and jax.process_count() == 1
  config = shapes.get_config("runlocal")
  with config.unlocked():
    config.mesh.shape.update(MESH)
    config.eval.samplers = ()
    config.train.sample_every = SAMPLE_EVERY
  workdir = tmp_path_factory.mktemp("one_process")
  train_and_evaluate(config, str(workdir))
  return workdir


def _assert_all_but_a_few_close(got: dict, want: dict, tol: float = 1e-4, few: float = 1e-3):
  """At most a ``few`` fraction of each array's elements differ by more than ``tol``."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for name, a, b in zip(ckpt_lib._leaf_names(got), jax.tree.leaves(got), jax.tree.leaves(want),
                        strict=True):
    far = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) > tol
    assert far.mean() <= few, f"{name}: {far.sum()} of {far.size} elements differ by > {tol}"


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
  """A 2-process run whose process 1 got SIGTERM before any stage's loop.

  Returns the workdir, the launcher's exit status and output, the newest VQ-VAE
  step saved and whether the denoiser stage started.
  """
  workdir = tmp_path_factory.mktemp("stopped")
  start = time.monotonic()
  process = _start(workdir)
  # Process 0 builds the dataset while process 1 waits for it, outside any stage.
  deadline = time.monotonic() + TIMEOUT
  while not (workdir / "data").is_dir():
    assert process.poll() is None and time.monotonic() < deadline, _finish(process)[-6000:]
    time.sleep(0.1)
  children = {int(child.environ()["JAX_PROCESS_ID"]): child
              for child in psutil.Process(process.pid).children()
              if "JAX_PROCESS_ID" in child.environ()}
  children[1].send_signal(signal.SIGTERM)
  output = _finish(process)
  print(f"stopped by SIGTERM to process 1: {time.monotonic() - start:.0f}s")
  with ckpt_lib.Checkpointer(workdir / "vqvae" / "checkpoints", read_only=True) as ckpt:
    saved = ckpt.latest_step()
  later_stage_started = (workdir / "denoiser").exists()
  return workdir, process.returncode, output, saved, later_stage_started


@pytest.fixture(scope="module")
def resumed(stopped):
  """The stopped run relaunched to its end, with its report."""
  workdir = stopped[0]
  output = _launch(workdir, extra_flags=REPORT_FLAGS)
  assert output.count("done: {") == 2, output[-6000:]
  return workdir


def test_sigterm_to_one_process_stops_both_at_one_step(stopped):
  workdir, status, output, saved, later_stage_started = stopped
  assert status == 143, output[-6000:]
  assert sorted(re.findall(r"process (\d) exited with status (\d+)", output)) == [
      ("0", "143"), ("1", "143")], output[-6000:]
  stops = re.findall(r"vqvae stopped at step (\d+) of 2", output)
  assert len(stops) == 2 and len(set(stops)) == 1, output[-6000:]
  assert "stop requested (SIGTERM)" in output, output[-6000:]
  assert "stop requested (by another process)" in output, output[-6000:]
  print(f"both processes saved vqvae step {stops[0]}")
  assert saved == int(stops[0])
  assert not later_stage_started
  assert not (workdir / "run.lock").exists()  # released on the way out


def test_relaunched_two_processes_train_what_one_process_does(one_process, resumed):
  for stage in ("vqvae", "denoiser"):
    want_step, want = _final_arrays(one_process / stage)
    got_step, got = _final_arrays(resumed / stage)
    assert got_step == want_step == 2
    # The same global batches in the same order and the same keys: only the order of the
    # collectives' sums differs (in one process vs. over Gloo), by ~1e-5 after two steps.
    # A different batch or key, or a step skipped or repeated at the resume, moves nearly
    # every element by about the learning rate (1e-3); Adam may move a rare element that
    # far too, where a near-zero gradient changes sign.
    print(f"{stage}: max abs diff to one process {_max_abs_diff(got, want):.3g}")
    _assert_all_but_a_few_close(got, want)
  # Process 0 alone wrote the metrics; no half-built dataset of a lost race remains.
  assert (resumed / "denoiser" / "config.json").exists()
  assert len((resumed / "denoiser" / "metrics.jsonl").read_text().splitlines()) == 2
  assert not list(resumed.rglob("*incomplete*"))
  assert not (resumed / "run.lock").exists()  # process 0's lock, released at the end


def _grid(path) -> np.ndarray:
  return np.asarray(Image.open(path), np.int16)


def test_two_processes_draw_the_sample_grids_of_one(one_process, resumed):
  """Each grid shows the first 8 examples of the global batch, not one process's block."""
  name = f"{SAMPLE_EVERY:08d}"
  got, want = (_grid(run / "vqvae" / "samples" / f"reconstructions_{name}.png")
               for run in (resumed, one_process))
  assert got.shape == want.shape
  assert np.abs(got - want).max() <= 1  # parameters equal to ~1e-6
  got_text, want_text = ((run / "denoiser" / "samples" / f"samples_{name}.txt").read_text()
                         for run in (resumed, one_process))
  assert got_text == want_text and len(want_text.splitlines()) == 8
  got, want = (_grid(run / "denoiser" / "samples" / f"samples_{name}.png")
               for run in (resumed, one_process))
  assert got.shape == want.shape
  # The same conditions and noise; a token whose logits are ~1e-5 apart may still flip.
  assert (np.abs(got - want) > 2).mean() < 0.02


def test_two_processes_write_one_report(resumed):
  report = json.loads((resumed / "report" / "report.json").read_text())
  assert list(report["samplers"]) == ["vqdiffusion_3steps_g2_r1"]
  row = report["samplers"]["vqdiffusion_3steps_g2_r1"]
  assert row["settings"]["num_samples"] == 8 and 0 <= row["oracle"]["all"] <= 1
  assert (resumed / "report" / "report.md").is_file()


def test_a_damaged_newest_step_is_set_aside_and_both_resume_exactly_from_the_one_before(
    resumed):
  finished = {stage: _final_arrays(resumed / stage) for stage in ("vqvae", "denoiser")}
  damaged = _damage_newest(resumed / "denoiser")
  output = _launch(resumed)
  # Each process finds the step unusable and restores the one before; process 0 moves it.
  assert len(re.findall(rf"checkpoint step {damaged} in \S+ is unusable", output)) == 2, output
  assert len(re.findall(rf"restored step {damaged - 1} of ", output)) == 2, output
  aside = resumed / "denoiser" / "checkpoints_unusable"
  assert [p.name.split(".")[0] for p in aside.iterdir()] == [str(damaged)]
  assert len(re.findall(rf"moved unusable checkpoint step {damaged} to ", output)) == 1, output
  for stage, (want_step, want) in finished.items():
    got_step, got = _final_arrays(resumed / stage)
    assert got_step == want_step
    jax.tree.map(np.testing.assert_array_equal, got, want)
  print(f"set aside denoiser step {damaged}, both resumed from step {damaged - 1}")


def test_a_process_count_that_does_not_divide_the_batch_is_an_error():
  with pytest.raises(ValueError, match="global batch 10 is not a positive multiple of the 4"):
    loader.per_host_batch(10, 4)
  mesh = mesh_lib.make_mesh({"shape": MESH})
  with pytest.raises(ValueError, match=r"train.global_batch=12 does not split over the mesh's "
                                       r"8 batch shards \(data 2 x fsdp 4\)"):
    mesh_lib.batch_block(mesh, 12, "train.global_batch")
  assert mesh_lib.batch_block(mesh, 16) == (0, 1)


def test_a_mesh_that_does_not_divide_the_devices_is_an_error():
  with pytest.raises(ValueError, match=r"has 6 devices but 8 are available"):
    mesh_lib.make_mesh({"shape": {"data": 2, "fsdp": 3}})
  with pytest.raises(ValueError, match="8 devices are not divisible by the fixed axes' product 3"):
    mesh_lib.make_mesh({"shape": {"data": -1, "fsdp": 3}})


def test_process_arguments_come_from_the_environment():
  assert mesh_lib.explicit_process_arguments({}) == {}
  assert mesh_lib.explicit_process_arguments(
      {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}) == {"num_processes": 2, "process_id": 1}
  with pytest.raises(ValueError, match="set both JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
    mesh_lib.explicit_process_arguments({"JAX_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='x' is not a non-negative integer"):
    mesh_lib.explicit_process_arguments({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "x"})


def test_launcher_rejects_a_process_count_that_does_not_divide_the_devices():
  result = subprocess.run([str(LAUNCHER), "3", *FLAGS], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 2
  assert "NUM_PROCESSES=3 must be a positive divisor of TOTAL_DEVICES=8" in result.stderr
