"""Several processes, one file system: process 0 writes shared files, the others wait.

``to_host(x)`` gives every process the whole of an array that may span
several processes; ``global_head(batch, count)`` gives every process the
first examples of a global batch of which it holds one block.

``process_zero_first(name)`` runs a block on process 0 first and on every other
process only after it (a barrier named ``name`` between them), so a block that
builds a shared file when it is missing (a dataset, a cache, a vocabulary)
builds it once and the others find it built. On one process it is a plain
block.

``share_from_process_zero(name, value)`` gives every process the string
process 0 passed (a decision only process 0 can make, such as whether it
took the workdir's lock).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Mapping

import jax
import numpy as np
from jax._src import distributed
from jax.experimental import multihost_utils


def is_main_process() -> bool:
  """Whether this process writes the files every process shares."""
  return jax.process_index() == 0


# How long a process waits at a barrier for the others (process 0 may be building a dataset).
BARRIER_TIMEOUT_SECONDS = 6 * 3600
_barriers = itertools.count()
_shares = itertools.count()
# The longest string ``share_from_process_zero`` carries without jax.distributed, in bytes.
SHARE_BYTES = 4096


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name`` (nothing on one process).

  The barrier is JAX's coordination service's, not a collective on the devices,
  so a long wait is no device timeout (CPU collectives give up after 30 s).
  Every process must pass the same barriers in the same order.
  """
  if jax.process_count() == 1:
    return
  client = distributed.global_state.client
  if client is None:  # several processes without jax.distributed: only the devices can tell
    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(f"{name}_{next(_barriers)}", BARRIER_TIMEOUT_SECONDS * 1000)


def share_from_process_zero(name: str, value: str) -> str:
  """Process 0's ``value`` on every process (the others' ``value`` is ignored).

  Through the coordination service's key-value store, so the other processes
  may wait for it as long as at a barrier. Every process must call it with
  the same ``name``, in the same order as the other collective calls.
  """
  if jax.process_count() == 1:
    return value
  client = distributed.global_state.client
  if client is None:  # several processes without jax.distributed: only the devices can tell
    encoded = np.zeros(SHARE_BYTES, np.uint8)
    data = value.encode()[:SHARE_BYTES]
    encoded[:len(data)] = np.frombuffer(data, np.uint8)
    shared = np.asarray(multihost_utils.broadcast_one_to_all(encoded))
    return shared.tobytes().rstrip(b"\0").decode(errors="replace")
  key = f"{name}_{next(_shares)}"
  if is_main_process():
    client.key_value_set(key, "=" + value)  # "=": a value the store takes even when empty
    return value
  return client.blocking_key_value_get(key, BARRIER_TIMEOUT_SECONDS * 1000)[1:]


@contextlib.contextmanager
def process_zero_first(name: str) -> Iterator[None]:
  """Runs the block on process 0, then on the other processes.

  Every process must enter the block, in the same order as the other
  collective calls; a block that raises on process 0 leaves the others
  waiting until JAX's coordination service notices that process 0 is gone.
  """
  if not is_main_process():
    barrier(name)
  yield
  if is_main_process():
    barrier(name)


def to_host(x) -> np.ndarray:
  """The whole of ``x`` (a possibly multi-process ``jax.Array``, or any array) on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def global_head(batch: Mapping[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
  """The first ``count`` examples of the global batch, on every process.

  ``batch`` is this process's block of the global batch (process ``i`` holds
  block ``i``, as the data loader deals them). Each process contributes the
  head of its block; string arrays (captions) travel as padded UTF-8 bytes.
  """
  head = {k: np.asarray(v)[:count] for k, v in batch.items()}
  if jax.process_count() == 1:
    return head
  return {k: _gather_strings(v) if v.dtype.kind in "USO" else
          np.asarray(multihost_utils.process_allgather(v, tiled=True))[:count]
          for k, v in head.items()}


def _gather_strings(strings: np.ndarray) -> np.ndarray:
  """Every process's ``strings`` (1-D, as many on each), concatenated in process order."""
  encoded = [str(s).encode() for s in strings]
  longest = np.asarray(multihost_utils.process_allgather(
      np.asarray([max(map(len, encoded), default=0)], np.int32)))
  width = max(int(longest.max()), 1)
  padded = np.zeros((len(encoded), width), np.uint8)
  for row, data in zip(padded, encoded, strict=True):
    row[:len(data)] = np.frombuffer(data, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(padded, tiled=True))
  return np.asarray([row.tobytes().rstrip(b"\0").decode() for row in rows])
