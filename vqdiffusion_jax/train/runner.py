"""The shared, resumable step loop that every trainer runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from vqdiffusion_jax.train import checkpoint as ckpt_lib
from vqdiffusion_jax.train import metrics as metrics_lib


def to_global(batch: Mapping[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Host-local numeric batch arrays -> global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}


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
  on_sample: Callable[[int, Any, dict, metrics_lib.MetricWriter], None] | None = None


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
  train = config.train
  checkpointer = ckpt_lib.Checkpointer.for_workdir(
      stage.directory, save_interval_steps=int(train.checkpoint_every),
      keep=max(2, int(train.keep_checkpoints)))
  state, data_state, origin = ckpt_lib.resume(
      checkpointer, stage.abstract_state, init_from=stage.init_from,
      init_state=stage.init_state, resume_from=stage.resume_from)
  iterator = stage.batches()
  if data_state.get("iterator"):
    iterator.set_state(data_state["iterator"])
  step = int(jax.device_get(stage.step_of(state)))
  writer = metrics_lib.MetricWriter(stage.directory)
  progress = metrics_lib.Progress(stage.num_steps, step)
  rng = jax.random.key(int(config.seed))
  config_json = config.to_dict()
  preempted = False
  with ckpt_lib.PreemptionWatcher() as watcher:
    while step < stage.num_steps:
      batch = next(iterator)
      state, metrics = stage.step_fn(state, batch, rng)
      step += 1
      if stage.on_sample is not None and _due(step, train.sample_every, stage.num_steps):
        stage.on_sample(step, state, batch, writer)
      if step % int(train.log_every) == 0 or step == stage.num_steps:
        scalars = {k: v for k, v in jax.device_get(metrics).items() if k != "finite"}
        metrics_lib.check_finite(step, scalars)
        writer.write_scalars(step, scalars)
        progress.update(step, {k: scalars[k] for k in ("loss",) if k in scalars})
      data_state = {"iterator": iterator.get_state(), "origin": origin}
      preempted = watcher.should_stop(step)
      checkpointer.save(step, state, data_state=data_state, config=config_json,
                        force=preempted or step == stage.num_steps)
      if preempted:
        break
  progress.close()
  checkpointer.wait()
  checkpointer.close()
  writer.close()
  if preempted:
    raise StopRequestedError(stage.directory, step, stage.num_steps)
  return state


def _due(step: int, every: int, last: int) -> bool:
  """Whether a periodic action (every ``every`` steps, and at the end) runs now."""
  return int(every) > 0 and (step % int(every) == 0 or step == last)
