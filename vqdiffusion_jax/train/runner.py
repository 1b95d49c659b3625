"""The shared, resumable step loop that every trainer runs.

A stage may run several steps per call (``Stage.steps_per_call``): the loop
stacks that many batches and calls one jitted ``lax.scan`` over them
(``scan_steps``), which saves the per-call dispatch and XLA:CPU's per-call
temporary buffer. Calls end at every log, sample and checkpoint step, so those
see the same steps as with one step per call.

The first call is compiled ahead of running (``compiled.py``): the console
shows its memory per device, and a step that cannot fit the device stops
the stage before it trains.

Every log line also carries the loop's pace over the interval since the last
one (``TIMING_SCALARS``): steps per second, and the fraction of the wall time
the host spent producing input batches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from vqdiffusion_jax import hosts, outputs
from vqdiffusion_jax.train import checkpoint as ckpt_lib
from vqdiffusion_jax.train import compiled
from vqdiffusion_jax.train import metrics as metrics_lib

# Scalars of the loop's pace, logged beside the step's own metrics; they differ run to run.
TIMING_SCALARS = ("steps_per_second", "input_fraction")


def _is_numeric(value) -> bool:
  """Whether a batch entry goes to the device (captions and other strings stay on the host)."""
  return np.asarray(value).dtype.kind in "biuf"


def stack_batches(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Numeric batch arrays stacked along a new leading (step) axis."""
  return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in batches[0]
          if _is_numeric(batches[0][k])}


def scan_steps(step: Callable[..., tuple[Any, dict]]) -> Callable[..., tuple[Any, dict]]:
  """``step(state, batch, rng, *rest)`` -> the same over stacked batches in one program.

  The returned function runs ``step`` once per leading index of ``batches``
  (``lax.scan``) and returns the final state and the last step's metrics.
  Steps draw their randomness from ``fold_in(rng, step)``, so k steps in one
  call compute what k calls do.
  """

  def steps(state, batches, rng, *rest):
    state, metrics = jax.lax.scan(lambda s, b: step(s, b, rng, *rest), state, batches)
    return state, jax.tree.map(lambda m: m[-1], metrics)

  return steps


def call_steps(step_fn: Callable[..., tuple[Any, dict]],
               steps_fn: Callable[..., tuple[Any, dict]] | None, state: Any,
               batches: Sequence[Mapping[str, np.ndarray]], rng: jax.Array) -> tuple[Any, dict]:
  """One call over ``batches``: ``step_fn`` on a single batch, else ``steps_fn`` on them stacked."""
  if len(batches) == 1:
    return step_fn(state, batches[0], rng)
  return steps_fn(state, stack_batches(batches), rng)


def to_global(batch: Mapping[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Host-local numeric batch arrays -> global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items() if _is_numeric(v)}


@dataclasses.dataclass(frozen=True)
class ShardedStep:
  """``jitted(state, global_batch, rng, *frozen)`` called as ``step(state, local_batch, rng)``.

  Attributes:
    jitted: the ``jax.jit``-wrapped step.
    batch_sharding: where the global batch lives (``mesh.batch_sharding``).
    frozen: inputs given to every call after the rng (a frozen network's params).
  """

  jitted: Any
  batch_sharding: Any
  frozen: tuple = ()

  def _args(self, state, batch, rng) -> tuple:
    return (state, to_global(batch, self.batch_sharding), rng, *self.frozen)

  def __call__(self, state, batch, rng):
    return self.jitted(*self._args(state, batch, rng))

  def lower(self, state, batch, rng) -> jax.stages.Lowered:
    """The step lowered for these inputs' shapes and shardings (nothing runs)."""
    return self.jitted.lower(*self._args(state, batch, rng))


def lower_call(step_fn: Callable[..., Any], steps_fn: Callable[..., Any] | None, state: Any,
               batches: Sequence[Mapping[str, np.ndarray]],
               rng: jax.Array) -> jax.stages.Lowered | None:
  """``call_steps``'s program lowered for these inputs; None when it is not a ``ShardedStep``."""
  fn, batch = ((step_fn, batches[0]) if len(batches) == 1
               else (steps_fn, stack_batches(batches)))
  return fn.lower(state, batch, rng) if isinstance(fn, ShardedStep) else None


# How many examples of a batch ``Stage.on_sample`` gets: the rows of a sample grid.
SAMPLE_EXAMPLES = 8


@dataclasses.dataclass
class Stage:
  """What the shared loop needs to know about one trainer."""

  directory: str
  num_steps: int
  abstract_state: Any
  init_state: Callable[..., Any]
  step_fn: Callable[[Any, dict, jax.Array], tuple[Any, dict]]
  batches: Callable[[], Iterator[dict]]
  step_of: Callable[[Any], jax.Array]
  init_from: Callable[[], Any] | None = None
  resume_from: str = ""
  # Called every ``train.sample_every`` steps, on every process alike, with the first
  # ``SAMPLE_EXAMPLES`` examples of the step's global batch (``hosts.global_head``).
  on_sample: Callable[[int, Any, dict, metrics_lib.MetricWriter], None] | None = None
  steps_fn: Callable[[Any, dict, jax.Array], tuple[Any, dict]] | None = None  # stacked batches
  steps_per_call: int = 1


class StopRequestedError(Exception):
  """A stage stopped early on SIGTERM or preemption, its checkpoint saved."""

  def __init__(self, directory: str, step: int, num_steps: int):
    super().__init__(f"{directory} stopped at step {step} of {num_steps}, checkpoint saved; "
                     "re-run the same command to resume")
    self.directory, self.step, self.num_steps = directory, step, num_steps


def run_stage(config: Any, stage: Stage) -> Any:
  """The shared, resumable step loop of every trainer.

  Resume order is the stage directory's checkpoint, ``stage.resume_from``,
  ``stage.init_from``, scratch. The data iterator's position is
  saved with every checkpoint, so a resumed run sees exactly the batches an
  uninterrupted run would have seen.

  Returns:
    The final state.

  Raises:
    StopRequestedError: on SIGTERM or preemption, after the checkpoint of the
      step reached is saved.
  """
  checkpointer = ckpt_lib.Checkpointer.for_workdir(
      stage.directory, save_interval_steps=int(config.train.checkpoint_every),
      keep=max(2, int(config.train.keep_checkpoints)))
  # Closing waits for the save in flight, so an exception (a crash in the step,
  # a NaN loss, Ctrl-C in a notebook) still commits the last checkpoint
  # started, and a re-run in the same process never races its writer.
  with (checkpointer, ckpt_lib.PreemptionWatcher() as watcher,
        contextlib.closing(metrics_lib.MetricWriter(stage.directory)) as writer):
    state, step, preempted = _train(config, stage, checkpointer, watcher, writer)
  if preempted:
    raise StopRequestedError(stage.directory, step, stage.num_steps)
  return state


def _train(config: Any, stage: Stage, checkpointer: ckpt_lib.Checkpointer,
           watcher: ckpt_lib.PreemptionWatcher,
           writer: metrics_lib.MetricWriter) -> tuple[Any, int, bool]:
  """Resumes and runs ``stage``; returns the state, its step and whether it was preempted."""
  train = config.train
  state, data_state, origin = ckpt_lib.resume(
      checkpointer, stage.abstract_state, init_from=stage.init_from,
      init_state=stage.init_state, resume_from=stage.resume_from)
  iterator = stage.batches()
  if data_state.get("iterator"):
    iterator.set_state(data_state["iterator"])
  step = int(jax.device_get(stage.step_of(state)))
  writer.resume_at(step)
  rng = jax.random.key(int(config.seed))
  config_json = config.to_dict()
  preempted = False
  pace = Pace(step)
  name = os.path.basename(stage.directory)
  progress = outputs.Progress(stage.num_steps, step, name=name)
  first_call = True
  with contextlib.closing(progress):
    while step < stage.num_steps and not preempted:
      with pace.reading():
        batches = [next(iterator) for _ in range(steps_this_call(step, stage, train))]
      if first_call:
        lowered = lower_call(stage.step_fn, stage.steps_fn, state, batches, rng)
        if lowered is not None:
          compiled.compile_first_call(name, lowered)
        first_call = False
      state, metrics = call_steps(stage.step_fn, stage.steps_fn, state, batches, rng)
      step, batch = step + len(batches), batches[-1]
      if stage.on_sample is not None and _due(step, train.sample_every, stage.num_steps):
        stage.on_sample(step, state, hosts.global_head(batch, SAMPLE_EXAMPLES), writer)
      if _due(step, train.log_every, stage.num_steps):
        scalars = {k: v for k, v in jax.device_get(metrics).items() if k != "finite"}
        metrics_lib.check_finite(step, scalars)
        writer.write_scalars(step, {**scalars, **pace.lap(step)})
        progress.update(step, {k: scalars[k] for k in ("loss",) if k in scalars})
      data_state = {"iterator": iterator.get_state(), "origin": origin}
      preempted = watcher.should_stop(step)
      checkpointer.save(step, state, data_state=data_state, config=config_json,
                        force=preempted or step == stage.num_steps)
  return state, step, preempted


class Pace:
  """The loop's steps per second and input share of the wall time, lap by lap."""

  def __init__(self, step: int, clock: Callable[[], float] = time.perf_counter):
    """Starts the first lap at ``step``; ``clock`` gives seconds."""
    self._clock = clock
    self._step, self._start, self._input = step, clock(), 0.0

  @contextlib.contextmanager
  def reading(self):
    """Counts the time inside the block as input time."""
    start = self._clock()
    try:
      yield
    finally:
      self._input += self._clock() - start

  def lap(self, step: int) -> dict[str, float]:
    """``TIMING_SCALARS`` since the last lap (or the start), and a new lap from ``step``."""
    now = self._clock()
    wall = max(now - self._start, 1e-9)
    out = {"steps_per_second": (step - self._step) / wall, "input_fraction": self._input / wall}
    self._step, self._start, self._input = step, now, 0.0
    return out


def steps_this_call(step: int, stage: Stage, train: Any) -> int:
  """Steps the next call runs: ``stage.steps_per_call``, ending at the next periodic step."""
  if stage.steps_per_call < 1:
    raise ValueError(f"steps_per_call must be at least 1, got {stage.steps_per_call}")
  if int(train.log_every) < 1:
    raise ValueError(f"train.log_every must be at least 1, got {train.log_every}")
  if stage.steps_per_call > 1 and stage.steps_fn is None:
    raise ValueError(f"{stage.directory}: steps_per_call > 1 needs a steps_fn")
  stops = [stage.num_steps]
  sample_every = train.sample_every if stage.on_sample is not None else 0
  for every in (train.log_every, train.checkpoint_every, sample_every):
    if int(every) > 0:
      stops.append((step // int(every) + 1) * int(every))
  return max(1, min(stage.steps_per_call, min(stops) - step))


def _due(step: int, every: int, last: int) -> bool:
  """Whether a periodic action (every ``every`` steps, and at the end) runs now."""
  return int(every) > 0 and (step % int(every) == 0 or step == last)
