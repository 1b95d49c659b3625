"""One run per workdir: the lock file ``WORKDIR/run.lock``, held for the whole main job.

``held(workdir)`` takes the lock before the run touches anything else in the
workdir and removes it when the run ends: normally, by an exception, or on
SIGTERM (``main`` turns that into an exception after the stage's save). A
second run on the same workdir gets ``WorkdirBusyError``, whose one-line
message names the holder (host, pid, start time) and what to do; that run
has then created at most the workdir itself.

The file is JSON: ``host``, ``pid``, ``started`` (UTC) and, for a job of
several processes, ``processes`` and ``coordinator`` (JAX's coordinator
address). Only process 0 takes and removes it; the other processes of the
job learn from process 0, through JAX's coordination service, whether it
did, and when it did not they raise the same error.

A lock written on this host by a process that no longer runs is stale: it
is taken over, with a warning naming the run that left it. A lock from
another host cannot be checked, and is refused; the message says to delete
the file when that run is known to have ended. A dead run's pid reused by
another process makes its lock look live: refused the same way.

What is guaranteed. On a local file system the lock is created with
``O_CREAT | O_EXCL``, which is atomic (NFS included): of several runs
starting together exactly one takes a free lock. Taking over a stale lock
re-reads it just before removing it; two runs taking over the same stale
lock can both proceed only if their steps interleave within microseconds.
A URL workdir (``gs://``) has no exclusive create through ``etils.epath``:
the run writes the lock (atomically, by a rename), waits
``URL_SETTLE_SECONDS`` and reads it back, and holds it only if the file is
still its own; two runs starting within that time of each other may both
proceed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator

import jax
from absl import logging
from etils import epath
from jax._src import distributed

from vqdiffusion_jax import hosts, outputs

LOCK_NAME = "run.lock"
# How long a URL workdir's lock must stay ours after writing it before we hold it.
URL_SETTLE_SECONDS = 1.0
# How long a local lock may stay empty or partly written (its owner is writing it).
_UNREADABLE_RETRY_SECONDS = 2.0


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir's lock; the message is one line."""


def lock_path(workdir: str | os.PathLike) -> epath.Path:
  """Where the lock of ``workdir`` lives."""
  return outputs.absolute_path(workdir) / LOCK_NAME


def this_run(job: dict | None = None) -> dict:
  """The lock record of this process: host, pid, start time (and ``job``'s keys)."""
  started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
  return {"host": socket.gethostname(), "pid": os.getpid(), "started": started, **(job or {})}


def describe(record: dict) -> str:
  """``record``'s run in words: pid, host, job, start time."""
  job = ""
  if "processes" in record:
    job = (f" (process 0 of a job of {record['processes']} processes, coordinator "
           f"{record.get('coordinator')})")
  return (f"pid {record.get('pid')} on host {record.get('host')}{job} "
          f"since {record.get('started')}")


def is_stale(record: dict) -> bool:
  """Whether ``record`` is a run of this host whose process no longer runs."""
  pid = record.get("pid")
  if record.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # alive, another user's
    return False
  return False


def acquire(workdir: str | os.PathLike, job: dict | None = None) -> dict:
  """Takes the lock of ``workdir`` (created if needed); returns the record written.

  Args:
    workdir: the run's directory, local or a URL.
    job: extra keys of the record (the job's identity when it has several processes).

  Raises:
    WorkdirBusyError: another run holds the lock, or the lock file is unreadable.
  """
  path = lock_path(workdir)
  path.parent.mkdir(parents=True, exist_ok=True)
  record = this_run(job)
  take = _take_by_write_then_check if outputs.is_url(path) else _take_local
  for _ in range(10):  # a holder may release, or a stale lock be taken over, meanwhile
    if take(path, record):
      return record
    holder = _read(path)
    if holder is None:
      continue
    if not is_stale(holder):
      raise WorkdirBusyError(_busy_message(path, holder))
    if _remove_if_unchanged(path, holder):
      logging.warning("Taking over the lock %s of a run that has ended: %s is no longer "
                      "running.", path, describe(holder))
  raise WorkdirBusyError(f"could not take the lock {path}: it keeps changing; check which "
                         f"runs use the workdir {path.parent}")


def release(workdir: str | os.PathLike, record: dict) -> None:
  """Removes the lock of ``workdir`` if it is still ``record``'s; warns if another run's."""
  path = lock_path(workdir)
  try:
    holder = _read(path)
  except WorkdirBusyError:
    holder = None
  if holder == record:
    path.unlink(missing_ok=True)
  elif holder is not None:
    logging.warning("Leaving the lock %s in place: it is no longer this run's but that of %s.",
                    path, describe(holder))


@contextlib.contextmanager
def held(workdir: str | os.PathLike) -> Iterator[None]:
  """Holds the lock of ``workdir`` for the block, for every process of the job.

  Process 0 takes it and, after the block (past a barrier when the block ended
  normally), removes it; every process raises ``WorkdirBusyError`` when
  process 0 could not take it. Every process must enter, in the same order as
  the other collective calls.
  """
  record, refusal = None, ""
  if hosts.is_main_process():
    try:
      record = acquire(workdir, _job())
    except WorkdirBusyError as busy:
      refusal = str(busy)
    except Exception as error:
      hosts.share_from_process_zero("workdir_lock", f"process 0 could not take the lock: {error}")
      raise
  refusal = hosts.share_from_process_zero("workdir_lock", refusal)
  if refusal:
    raise WorkdirBusyError(refusal)
  try:
    yield
    hosts.barrier("workdir_lock_release")
  finally:
    if record is not None:
      release(workdir, record)


def _job() -> dict:
  if jax.process_count() == 1:
    return {}
  return {"processes": jax.process_count(),
          "coordinator": distributed.global_state.coordinator_address}


def _busy_message(path: epath.Path, holder: dict) -> str:
  if holder.get("host") == socket.gethostname():
    return (f"workdir {path.parent} is in use by the run of {describe(holder)} (lock file "
            f"{path}): wait for that run to end, or give this one another --workdir")
  return (f"workdir {path.parent} is locked by the run of {describe(holder)} (lock file {path}),"
          f" which this host cannot check: if that run has ended, delete {path} and start again")


def _take_local(path: epath.Path, record: dict) -> bool:
  """Creates ``path`` with ``record`` if it does not exist; whether it did."""
  try:
    fd = os.open(os.fspath(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    json.dump(record, f)
    f.flush()
    os.fsync(f.fileno())
  return True


def _take_by_write_then_check(path: epath.Path, record: dict) -> bool:
  """Writes ``record`` to a free ``path`` and holds it if still its own after a moment."""
  if path.exists():
    return False
  outputs.write_text(path, json.dumps(record))
  time.sleep(URL_SETTLE_SECONDS)
  return _read(path) == record


def _read(path: epath.Path) -> dict | None:
  """The record in ``path``; None when there is no such file (any more).

  Raises:
    WorkdirBusyError: the file stays unreadable (its holder cannot be named).
  """
  deadline = time.monotonic() + _UNREADABLE_RETRY_SECONDS
  while True:
    try:
      record = json.loads(path.read_text())
      if isinstance(record, dict):
        return record
      problem: Exception = ValueError(f"not a JSON object: {record!r}")
    except FileNotFoundError:
      return None
    except ValueError as error:  # empty or partly written, or not JSON
      problem = error
    if time.monotonic() > deadline:
      raise WorkdirBusyError(f"lock file {path} is unreadable ({problem}): if no run uses the "
                             f"workdir {path.parent}, delete it and start again")
    time.sleep(0.1)


def _remove_if_unchanged(path: epath.Path, stale: dict) -> bool:
  """Removes ``path`` if it still holds ``stale``; whether it did."""
  if _read(path) != stale:
    return False
  path.unlink(missing_ok=True)
  return True
