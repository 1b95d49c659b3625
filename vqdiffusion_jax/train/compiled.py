"""Train steps compiled ahead of their first call: XLA's memory per device, checked.

The step loop (``runner.py``) compiles its first call ahead of time
(``compile_first_call``), shows XLA's per-device memory analysis on the
console (what ``plan.py`` prints before a run) and stops with a clear error
when the program cannot fit the device. The compiled program is the one the loop then runs: JAX
keeps it for the same shapes and shardings, so nothing compiles twice.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping

import jax

GIB = 2 ** 30
MIB = 2 ** 20


def memory_figures(compiled: jax.stages.Compiled) -> dict[str, int]:
  """Per-device bytes of a compiled program.

  Returns:
    ``arguments``, ``outputs``, ``temporaries``, ``aliased`` (donated inputs
    reused as outputs) and ``peak`` = arguments + outputs + temporaries - aliased.
  """
  memory = compiled.memory_analysis()
  out = {"arguments": int(memory.argument_size_in_bytes),
         "outputs": int(memory.output_size_in_bytes),
         "temporaries": int(memory.temp_size_in_bytes),
         "aliased": int(memory.alias_size_in_bytes)}
  out["peak"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
  return out


def _size(num_bytes: float) -> str:
  return f"{num_bytes / GIB:.2f} GiB" if num_bytes >= GIB else f"{num_bytes / MIB:.1f} MiB"


def describe_memory(figures: Mapping[str, int]) -> str:
  """One line: the peak and its parts, per device."""
  return (f"per device: peak {_size(figures['peak'])} (state+batch "
          f"{_size(figures['arguments'])}, temporaries {_size(figures['temporaries'])}, "
          f"outputs {_size(figures['outputs'])}, donated {_size(figures['aliased'])})")


def device_memory_limit(device: jax.Device) -> int | None:
  """Bytes the device can hold, where its runtime reports it (GPU, TPU); None on CPU."""
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001  (backends without memory stats raise various errors)
    return None
  return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


class DoesNotFitError(MemoryError):
  """A train step needs more memory per device than the device has."""


def check_fits(name: str, figures: Mapping[str, int], limit: int | None) -> None:
  """Raises ``DoesNotFitError`` when ``figures["peak"]`` exceeds ``limit`` bytes."""
  if limit is not None and figures["peak"] > limit:
    raise DoesNotFitError(
        f"{name}: the train step needs {_size(figures['peak'])} per device "
        f"({describe_memory(figures)}) but the device holds {_size(limit)}; lower the global "
        "batch, turn on train.remat, or shard the state over an fsdp axis "
        "(python -m vqdiffusion_jax.plan --config=... --devices=N shows the effect)")


def compile_first_call(name: str, lowered: jax.stages.Lowered, *, limit: int | None = None,
                       stream=None) -> dict[str, float]:
  """Compiles the loop's first call ahead of running it, shows and checks its memory.

  Args:
    name: the stage, for the console line and errors.
    lowered: the step lowered for the first call's inputs.
    limit: bytes per device (default: what the first device reports, if anything).
    stream: where the line goes (default stderr); process 0 only.

  Returns:
    ``memory_figures`` of the compiled program, and ``seconds``: the compile time.

  Raises:
    DoesNotFitError: the program needs more than ``limit`` per device.
  """
  start = time.perf_counter()
  compiled = lowered.compile()
  figures = {**memory_figures(compiled), "seconds": time.perf_counter() - start}
  if jax.process_index() == 0:
    stream = sys.stderr if stream is None else stream
    stream.write(f"{name}: train step compiled in {figures['seconds']:.1f} s; "
                 f"{describe_memory(figures)}\n")
    stream.flush()
  if limit is None:
    limit = device_memory_limit(jax.local_devices()[0])
  check_fits(name, figures, limit)
  return figures
