"""Several processes, one file system: process 0 writes shared files, the others wait.

``process_zero_first(name)`` runs a block on process 0 first and on every other
process only after it (a barrier named ``name`` between them), so a block that
builds a shared file when it is missing (a dataset, a cache, a vocabulary)
builds it once and the others find it built. On one process it is a plain
block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
from jax.experimental import multihost_utils


def is_main_process() -> bool:
  """Whether this process writes the files every process shares."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name`` (nothing on one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


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
