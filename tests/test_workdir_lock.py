"""The workdir lock: one run per workdir, stale locks taken over, other hosts' locks refused.

The unit tests take and release locks in this process; one test starts a real
holder process and then the main job on the same workdir, which must stop at
once with one line naming the holder; one starts a two-process JAX job
(no training) that must share one lock, taken by process 0, and be refused as
a whole when another run holds the workdir.
"""

import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
from etils import epath

from tests.test_remote_workdir import local_buckets  # noqa: F401  (a fixture)
from vqdiffusion_jax import workdir_lock

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOST = socket.gethostname()


def _dead_pid() -> int:
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def _write_lock(workdir: pathlib.Path, record: dict) -> pathlib.Path:
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / workdir_lock.LOCK_NAME
  path.write_text(json.dumps(record))
  return path


def _snapshot(workdir: pathlib.Path) -> dict:
  return {os.fspath(p.relative_to(workdir)): p.read_bytes() if p.is_file() else None
          for p in sorted(workdir.rglob("*"))}


def test_a_held_lock_refuses_a_second_taker_until_released(tmp_path, caplog):
  record = workdir_lock.acquire(tmp_path / "run")
  path = tmp_path / "run" / "run.lock"
  assert json.loads(path.read_text()) == record
  assert record["host"] == HOST and record["pid"] == os.getpid()
  assert time.strptime(record["started"], "%Y-%m-%d %H:%M:%S UTC")

  with pytest.raises(workdir_lock.WorkdirBusyError) as busy:
    workdir_lock.acquire(tmp_path / "run")
  assert str(busy.value) == (
      f"workdir {tmp_path / 'run'} is in use by the run of pid {os.getpid()} on host {HOST} "
      f"since {record['started']} (lock file {path}): wait for that run to end, or give this "
      "one another --workdir")

  workdir_lock.release(tmp_path / "run", record)
  assert not path.exists()
  again = workdir_lock.acquire(tmp_path / "run")
  # A lock that is no longer this run's stays, with a warning.
  other = {**again, "pid": again["pid"] + 1}
  with caplog.at_level(logging.WARNING):
    workdir_lock.release(tmp_path / "run", other)
  assert json.loads(path.read_text()) == again
  assert f"Leaving the lock {path} in place: it is no longer this run's" in caplog.text


def test_a_stale_lock_of_this_host_is_taken_over_with_a_warning(tmp_path, caplog):
  dead = _dead_pid()
  stale = {"host": HOST, "pid": dead, "started": "2026-01-02 03:04:05 UTC",
           "processes": 2, "coordinator": "localhost:1234"}
  path = _write_lock(tmp_path, stale)
  assert workdir_lock.is_stale(stale)
  with caplog.at_level(logging.WARNING):
    record = workdir_lock.acquire(tmp_path)
  assert json.loads(path.read_text()) == record and record["pid"] == os.getpid()
  assert (f"Taking over the lock {path} of a run that has ended: pid {dead} on host {HOST} "
          "(process 0 of a job of 2 processes, coordinator localhost:1234) since "
          "2026-01-02 03:04:05 UTC is no longer running.") in caplog.text


def test_a_lock_of_another_host_or_an_unreadable_one_is_refused_untouched(tmp_path,
                                                                           monkeypatch):
  elsewhere = {"host": "elsewhere.example", "pid": _dead_pid(), "started": "2026-01-02"}
  path = _write_lock(tmp_path / "a", elsewhere)
  assert not workdir_lock.is_stale(elsewhere)
  with pytest.raises(workdir_lock.WorkdirBusyError) as busy:
    workdir_lock.acquire(tmp_path / "a")
  assert str(busy.value) == (
      f"workdir {tmp_path / 'a'} is locked by the run of pid {elsewhere['pid']} on host "
      f"elsewhere.example since 2026-01-02 (lock file {path}), which this host cannot check: "
      f"if that run has ended, delete {path} and start again")
  assert json.loads(path.read_text()) == elsewhere

  monkeypatch.setattr(workdir_lock, "_UNREADABLE_RETRY_SECONDS", 0.2)
  for text in ("", "{\"host\": ", "[1, 2]"):
    path = tmp_path / "b" / "run.lock"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    with pytest.raises(workdir_lock.WorkdirBusyError,
                       match=rf"lock file {path} is unreadable \(.*\): if no run uses the "
                             rf"workdir {path.parent}, delete it and start again"):
      workdir_lock.acquire(path.parent)
    assert path.read_text() == text


def test_a_url_workdir_is_locked_by_write_then_check(local_buckets, monkeypatch):  # noqa: F811
  monkeypatch.setattr(workdir_lock, "URL_SETTLE_SECONDS", 0.05)
  on_disk = local_buckets / "bucket" / "run" / "run.lock"
  record = workdir_lock.acquire("gs://bucket/run")
  assert json.loads(on_disk.read_text()) == record
  with pytest.raises(workdir_lock.WorkdirBusyError,
                     match=r"workdir gs://bucket/run is in use by the run of pid"):
    workdir_lock.acquire("gs://bucket/run")
  workdir_lock.release("gs://bucket/run", record)
  assert not on_disk.exists()

  # A rival whose write lands after this run's, within the settling time, wins.
  rival = {"host": HOST, "pid": os.getppid(), "started": "2026-01-02 03:04:05 UTC"}
  write_text = workdir_lock.outputs.write_text

  def overtaken(path, text):
    write_text(path, text)
    write_text(path, json.dumps(rival))

  monkeypatch.setattr(workdir_lock.outputs, "write_text", overtaken)
  with pytest.raises(workdir_lock.WorkdirBusyError,
                     match=rf"in use by the run of pid {os.getppid()} on host"):
    workdir_lock.acquire("gs://bucket/run")
  assert json.loads(on_disk.read_text()) == rival
  assert epath.Path("gs://bucket/run/run.lock").exists()


HOLDER = """
import sys, time
from vqdiffusion_jax import workdir_lock
workdir_lock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def test_the_main_job_on_a_workdir_in_use_stops_at_once_naming_the_holder(tmp_path):
  workdir = tmp_path / "run"
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "held\n"
    (workdir / "vqvae" / "checkpoints").mkdir(parents=True)
    (workdir / "vqvae" / "checkpoints" / "step.orbax-checkpoint-tmp-1").mkdir()
    before = _snapshot(workdir)
    record = json.loads((workdir / "run.lock").read_text())
    start = time.monotonic()
    second = subprocess.run(
        [sys.executable, "-m", "vqdiffusion_jax.main", "--config=configs/shapes.py:runlocal",
         f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300)
    print(f"refused in {time.monotonic() - start:.1f}s")
    assert holder.poll() is None
  finally:
    holder.kill()
    holder.wait()
  assert second.returncode == 1, second.stderr
  assert second.stdout == ""
  assert second.stderr.splitlines() == [
      f"workdir {workdir} is in use by the run of pid {holder.pid} on host {HOST} since "
      f"{record['started']} (lock file {workdir / 'run.lock'}): wait for that run to end, or "
      "give this one another --workdir"]
  assert _snapshot(workdir) == before


TWO_PROCESS_JOB = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, process_id, busy, free = sys.argv[1:]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(process_id))
from vqdiffusion_jax import workdir_lock
try:
  with workdir_lock.held(busy):
    print("entered the busy workdir")
except workdir_lock.WorkdirBusyError as busy_error:
  print(json.dumps({"refused": str(busy_error)}))
with workdir_lock.held(free):
  with open(f"{free}/run.lock") as f:
    print(json.dumps({"lock": json.load(f)}))
"""


def test_the_processes_of_one_job_share_process_zeros_lock_and_its_refusal(tmp_path):
  busy, free = tmp_path / "busy", tmp_path / "free"
  # This test's own process holds the busy workdir: alive, on this host.
  _write_lock(busy, {"host": HOST, "pid": os.getpid(), "started": "2026-01-02 03:04:05 UTC"})
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  start = time.monotonic()
  processes = [subprocess.Popen(
      [sys.executable, "-c", TWO_PROCESS_JOB, str(port), str(i), str(busy), str(free)],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  try:
    outputs = [p.communicate(timeout=300)[0] for p in processes]
  finally:
    for p in processes:
      p.kill()
  print(f"two processes in {time.monotonic() - start:.1f}s")
  assert [p.returncode for p in processes] == [0, 0], outputs
  lines = [[json.loads(line) for line in output.splitlines() if line.startswith("{")]
           for output in outputs]
  refusal = (f"workdir {busy} is in use by the run of pid {os.getpid()} on host {HOST} since "
             f"2026-01-02 03:04:05 UTC (lock file {busy / 'run.lock'}): wait for that run to "
             "end, or give this one another --workdir")
  for i, (refused, held) in enumerate(lines):
    assert refused == {"refused": refusal}, outputs[i]
    # Process 1 entered under process 0's lock, which names the job.
    assert held["lock"]["pid"] == processes[0].pid, outputs[i]
    assert held["lock"]["processes"] == 2
    assert held["lock"]["coordinator"] == f"localhost:{port}"
  assert not (free / "run.lock").exists()
  assert json.loads((busy / "run.lock").read_text())["pid"] == os.getpid()
