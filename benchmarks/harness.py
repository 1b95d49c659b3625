"""What the benchmark scripts share: the machine's name, interleaved timing, jitted samplers.

Import as ``from benchmarks import harness`` with the repository root on
``PYTHONPATH`` (every script's usage line sets it).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping

import jax

from vqdiffusion_jax.diffusion import samplers


def device_name() -> str:
  """The accelerator's kind or, on the CPU backend, the processor model and core count."""
  device = jax.devices()[0]
  if device.platform != "cpu":
    return device.device_kind
  model = "cpu"
  try:
    with open("/proc/cpuinfo") as file:
      model = next((line.split(":", 1)[1].strip() for line in file
                    if line.startswith("model name")), model)
  except OSError:
    pass
  return f"{model}, {os.cpu_count()} cores"


def interleaved(runs: Mapping[str, Callable[[], object]], repeats: int) -> dict[str, float]:
  """Median seconds of each blocking callable, timed in turn (A B A B ...) ``repeats`` times."""
  seconds = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      seconds[name].append(time.perf_counter() - start)
  return {name: statistics.median(times) for name, times in seconds.items()}


def sampler_program(model, schedule, num_tokens: int, config: samplers.SamplerConfig,
                    batch: int, max_batch: int | str | None = "auto") -> Callable:
  """The whole sampler as one jitted program: ``(params, condition, rng) -> (B, N) tokens``.

  ``model`` is a text-conditioned ``VQDiffusionTransformer``; with guidance
  its learnable null text is batched with the condition, and the network runs
  over at most ``max_batch`` sequences per call (``samplers.network_batch``).
  """
  guidance = config.guidance_scale

  def run(params, condition, rng):
    logits = lambda x, t, c: model.apply({"params": params}, x, t, c)  # noqa: E731
    null = model.apply({"params": params}, batch, method="null_text") if guidance != 1 else None
    log_x0 = samplers.conditioned_log_x0(logits, [condition], null, guidance, max_batch=max_batch)
    return samplers.sample(log_x0, schedule, rng, (batch, num_tokens), config)

  return jax.jit(run)
