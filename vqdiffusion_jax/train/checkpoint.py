"""Checkpoints: async Orbax saves, verified restores, preemption, the resume order.

Layout of a run's workdir::

  WORKDIR/config.json               the config of the run, JSON (process 0 writes it)
  WORKDIR/checkpoints/<step>/       one Orbax step: items ``state`` (the train-state
                                    pytree), ``data`` (data-iterator position, JSON),
                                    ``meta`` (step, per-array fingerprints, JSON) and
                                    ``config`` (JSON) when one was given
  WORKDIR/checkpoints_unusable/     steps found corrupt at restore, moved aside

WORKDIR may be local or a URL (``gs://``): every path goes through
``etils.epath`` and Orbax, never ``os.path``, so a URL is kept as it is.

Atomicity. Orbax writes each step into ``<step>.orbax-checkpoint-tmp`` and, once
every array and item is on disk, writes ``commit_success.txt`` into it and
renames it to ``<step>`` (``AtomicRenameTemporaryPath``, the default on local
and POSIX file systems; on GCS it keeps the name and the commit file alone is the
marker). Old steps are deleted only after the new one is committed. So a kill at
any moment leaves the last committed step restorable; leftover temporary
directories are never listed as steps and are removed when the next
``Checkpointer`` opens the directory (``tests/test_checkpoint.py`` kills a saving
process with SIGKILL to check this).

Verification. A step is used only if it has its commit marker, every item reads
back, and every restored array matches the fingerprint recorded at save time
(two wrapping uint32 sums of the array's bits, one position-weighted; exact
whatever the sharding, computed on device). A step that fails is logged with a
warning naming it and the previous step is tried; never are wrong values returned
silently. Only once an older step has restored are the newer bad ones moved to
``checkpoints_unusable/`` (so that later saves of those step numbers are
possible); nothing is moved or deleted when no step restores, and a read-only
``Checkpointer`` moves nothing. Keep at least two checkpoints (``keep >= 2``) so
there is something to fall back to. On several processes each reads a step on
its own, then they share their outcomes (an all-gather): a step that any process
cannot read is unusable on all, so every process picks the same step, and only
process 0 moves the bad ones while the others wait.

Preemption. ``PreemptionWatcher`` turns SIGTERM (and optionally SIGINT) into a
flag that the loop polls with ``should_stop(step)``; the loop then saves with
``force=True``, waits and exits normally. On several processes all must stop at
the same step, also when only one was signalled: there every poll all-gathers
the flags, so each process polls at every step and stops at the first poll
where any flag is set. (JAX's preemption service is switched off by
``mesh.multihost_initialize``: its sync point is the fastest host's last step
plus one, matched exactly, which steps that advance several at a time skip and
which Orbax's own calls with older step numbers move.)

Typical loop::

  with Checkpointer.for_workdir(workdir, save_interval_steps=1000, keep=3) as ckpt, \\
       PreemptionWatcher() as watcher:
    init_from = (lambda: load_params(cfg.init_from)) if cfg.init_from else None
    state, data_state, origin = resume(ckpt, abstract_state, resume_from=cfg.resume_from,
                                       init_from=init_from, init_state=init_state)
    while step < num_steps:
      state = train_step(state, next(it), rng); step += 1
      ckpt.save(step, state, data_state=it.get_state(), config=config)
      if watcher.should_stop(step):
        ckpt.save(step, state, data_state=it.get_state(), config=config, force=True)
        break
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vqdiffusion_jax import hosts, outputs

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
UNUSABLE_SUFFIX = "_unusable"
CONFIG_NAME = "config.json"
COMMIT_MARKER = ocp.path.atomicity_types.COMMIT_SUCCESS_FILE
TMP_SUFFIX = ocp.path.atomicity_types.TMP_DIR_SUFFIX  # a step being saved: <step><suffix>
STATE, DATA, META, CONFIG = "state", "data", "meta", "config"
ORIGINS = ("workdir", "resume_from", "init_from", "scratch")


class CheckpointError(RuntimeError):
  """No step of a checkpoint directory could be restored."""


class UnusableCheckpointError(RuntimeError):
  """One step is corrupt, partial or uncommitted."""


# ----------------------------------------------------------------------------- fingerprints


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """Two uint32 sums of ``x``'s bits: plain and weighted by (2 * flat index + 1)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  # The flat index built from per-axis iotas avoids a reshape, which could
  # force an all-gather of a sharded array.
  index = jnp.zeros((), jnp.uint32)
  stride = 1
  for axis in reversed(range(bits.ndim)):
    iota = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
    index = index + iota * jnp.uint32(stride % 2**32)
    stride *= bits.shape[axis]
  weighted = bits * (index * jnp.uint32(2) + jnp.uint32(1))
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(weighted, dtype=jnp.uint32)])


@jax.jit
def _fingerprints(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([_leaf_fingerprint(x) for x in leaves])


def _to_host(x: jax.Array) -> np.ndarray:
  """A replicated array's value, also when it spans several processes."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  return np.asarray(x.addressable_data(0))


def fingerprint(tree: Any) -> list[list[int]]:
  """Per-leaf fingerprints of a pytree, independent of how the leaves are sharded.

  Args:
    tree: a pytree of arrays (jax, numpy or Python scalars).

  Returns:
    One ``[sum, weighted_sum]`` pair of uint32 values per leaf, in leaf order.
  """
  leaves = [x if isinstance(x, jax.Array) else jnp.asarray(x) for x in jax.tree.leaves(tree)]
  groups: dict[tuple[int, ...], list[int]] = {}
  for i, x in enumerate(leaves):
    groups.setdefault(tuple(sorted(d.id for d in x.sharding.device_set)), []).append(i)
  out: list[list[int]] = [[]] * len(leaves)
  for indices in groups.values():
    values = _to_host(_fingerprints([leaves[i] for i in indices]))
    for i, value in zip(indices, values.tolist(), strict=True):
      out[i] = value
  return out


def _leaf_names(tree: Any) -> list[str]:
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


# ----------------------------------------------------------------------------- helpers


def _config_dict(config: Any) -> dict:
  """A JSON-ready dict from a dict or an ``ml_collections.ConfigDict``."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return json.loads(json.dumps(config))


def _reason(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


# ----------------------------------------------------------------------------- Checkpointer


class Checkpointer:
  """Async, keep-N, verified checkpoints of a train-state pytree in one directory.

  Generic over the state: any pytree of arrays (a ``flax.struct.dataclass``,
  optax states, dicts). Restores go straight onto the shardings of an abstract
  target, so a run can resume on another mesh or another number of devices.
  """

  def __init__(self, directory: str | os.PathLike, *, save_interval_steps: int = 1,
               keep: int | None = 3, async_save: bool = True, read_only: bool = False,
               verify: bool = True):
    """Opens (and unless ``read_only`` creates) a checkpoint directory.

    Args:
      directory: the checkpoints directory; ``config.json`` goes beside it.
      save_interval_steps: ``save`` writes only at multiples of this (and at
        JAX's preemption sync point) unless forced.
      keep: how many of the latest checkpoints to keep; None keeps all.
      async_save: write in a background thread after copying arrays to host.
      read_only: never write, delete or move anything (for another run's steps).
      verify: check restored arrays against their saved fingerprints.
    """
    path = outputs.absolute_path(directory)
    self.directory = os.fspath(path)
    self.read_only = read_only
    self.verify = verify
    if read_only and not path.is_dir():
      raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
    if read_only:
      outputs.hide_read_only_notice()
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(max(1, save_interval_steps)),
            policies.PreemptionCheckpointingPolicy()]),
        preservation_policy=policies.LatestN(n=keep),
        enable_async_checkpointing=async_save, read_only=read_only, create=not read_only,
        cleanup_tmp_directories=not read_only, save_interval_steps=0 if read_only else 1)
    self._manager = ocp.CheckpointManager(path, options=options)
    self._config_written: dict | None = None

  @classmethod
  def for_workdir(cls, workdir: str | os.PathLike, **kwargs) -> Checkpointer:
    """The checkpointer of a run: ``workdir/checkpoints``; kwargs as ``__init__``."""
    return cls(epath.Path(workdir) / CHECKPOINTS_DIR, **kwargs)

  @property
  def config_path(self) -> str:
    """``config.json`` beside the checkpoints directory."""
    return os.fspath(epath.Path(self.directory).parent / CONFIG_NAME)

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def step_path(self, step: int) -> str:
    """The directory of one committed step."""
    return os.fspath(epath.Path(self.directory) / str(int(step)))

  def all_steps(self) -> list[int]:
    """Steps present on disk (committed by name; restore verifies them), ascending."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def committed_steps(self) -> list[int]:
    """Steps on disk that carry their commit marker, ascending."""
    return [s for s in self.all_steps()
            if (epath.Path(self.step_path(s)) / COMMIT_MARKER).exists()]

  def latest_step(self) -> int | None:
    """The newest step that carries its commit marker, or None."""
    committed = self.committed_steps()
    return committed[-1] if committed else None

  def save(self, step: int, state: Any, *, data_state: dict, config: Any = None,
           force: bool = False) -> bool:
    """Starts an async save of ``state`` at ``step`` if the interval says so.

    Args:
      step: the number of train steps taken so far.
      state: the train-state pytree (arrays may be sharded over any mesh).
      data_state: the data iterator's position, JSON-serialisable.
      config: the run's config (dict or ConfigDict); saved in the step and as
        ``config.json`` beside the checkpoints.
      force: save even off the interval.

    Returns:
      Whether a save was started (False off the interval, or when ``step`` is
      already saved).
    """
    if self.read_only:
      raise PermissionError(f"{self.directory} was opened read-only")
    step = int(step)
    if step in self._manager.all_steps():
      return False
    if not force and not self._manager.should_save(step):
      return False
    meta = {"format": FORMAT_VERSION, "step": step, "fingerprints": fingerprint(state),
            "names": _leaf_names(state)}
    items = {STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(dict(data_state)),
             META: ocp.args.JsonSave(meta)}
    if config is not None:
      config = _config_dict(config)
      items[CONFIG] = ocp.args.JsonSave(config)
      self.write_config(config)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def write_config(self, config: Any) -> None:
    """Writes ``config.json`` beside the checkpoints (process 0, atomically)."""
    config = _config_dict(config)
    if config == self._config_written or self.read_only:
      return
    if jax.process_index() == 0:
      outputs.write_json_atomically(self.config_path, config)
    self._config_written = config

  def read_config(self, step: int | None = None) -> dict:
    """The config saved beside the checkpoints, or inside ``step`` when given.

    Args:
      step: read this step's own copy instead of ``config.json``.

    Returns:
      The config as a dict.
    """
    if step is None:
      return outputs.read_json(self.config_path,
                               remedy=f"each step in {self.directory} holds a copy of it")
    restored = self._manager.restore(int(step), args=ocp.args.Composite(
        **{CONFIG: ocp.args.JsonRestore()}))
    return restored[CONFIG]

  def wait(self) -> None:
    """Blocks until the pending save is committed (raising its error, if any)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and deletions, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict]:
    """Restores a verified step onto ``abstract_state``'s shardings.

    Without ``step``, tries the steps from the newest down and returns the first
    that is committed, reads back and matches its fingerprints; each bad one is
    logged with a warning naming it.

    Args:
      abstract_state: the target: a pytree of ``jax.ShapeDtypeStruct`` with
        ``.sharding`` set (any mesh, any number of devices).
      step: restore exactly this step, with no fallback.

    Returns:
      ``(step, state, data_state)``.

    Raises:
      CheckpointError: no step could be restored; the message lists each step
        tried and why it failed.
    """
    _check_abstract(abstract_state)
    return self._restore_first(lambda _: abstract_state, step)

  def restore_arrays(self, step: int | None = None,
                     device: jax.Device | None = None) -> tuple[int, Any, dict]:
    """Restores a verified step as nested dicts of arrays, without the state's type.

    For reading a run's weights where its optimizer and train-state type are
    of no use (a sampling pipeline): the restore target is the step's own
    metadata, every array lands on one device, and the step is verified and
    chosen as ``restore`` does.

    Args:
      step: restore exactly this step, with no fallback.
      device: where the arrays go; default the host's CPU, so that an
        accelerator never holds the optimizer state only to drop it.

    Returns:
      ``(step, arrays, data_state)``: ``arrays`` mirrors the saved state with
      dicts for its dataclasses (``arrays["params"]``, ``arrays["ema_params"]``).
    """
    sharding = jax.sharding.SingleDeviceSharding(device or _host_device())

    def target(candidate: int) -> Any:
      stored = ocp.StandardCheckpointHandler().metadata(
          epath.Path(self.step_path(candidate)) / STATE)
      return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          stored)

    return self._restore_first(target, step)

  def _restore_first(self, target: Callable[[int], Any],
                     step: int | None) -> tuple[int, Any, dict]:
    """The newest verified step (or exactly ``step``) restored onto ``target(step)``."""
    self.wait()
    if step is not None:
      self._check_step_exists(int(step))
    candidates = [int(step)] if step is not None else self.all_steps()[::-1]
    if not candidates:
      raise CheckpointError(f"no checkpoints in {self.directory}")
    failures: list[tuple[int, str]] = []
    for candidate in candidates:
      state = data_state = meta = None
      try:
        self._check_committed(candidate)
        state, data_state, meta = self._read_step(candidate, target(candidate))
        error = None
      except Exception as failure:  # A step that cannot be read, whatever the cause, is unusable.
        error = failure
      error = _failure_anywhere(error)
      if error is None and self.verify:
        try:  # Collective where arrays span processes; the same verdict on every process.
          _check_fingerprints(state, meta)
        except UnusableCheckpointError as mismatch:
          error = mismatch
      if error is not None:
        failures.append((candidate, _reason(error)))
        logging.warning("checkpoint step %d in %s is unusable (%s)%s", candidate,
                        self.directory, failures[-1][1],
                        "; trying the previous step" if step is None else "")
        continue
      if failures:
        logging.warning("restored step %d of %s instead of unusable step(s) %s", candidate,
                        self.directory, ", ".join(str(s) for s, _ in failures))
        self._set_aside([s for s, _ in failures])
      return candidate, state, data_state
    tried = "\n  ".join(f"step {s}: {why}" for s, why in failures)
    raise CheckpointError(f"no restorable checkpoint in {self.directory}; tried:\n  {tried}")

  def _check_step_exists(self, step: int) -> None:
    """A CheckpointError when no save of ``step`` ever started (a partial one fails its read)."""
    path = epath.Path(self.step_path(step))
    if path.exists() or path.with_name(path.name + TMP_SUFFIX).exists():
      return
    raise CheckpointError(f"step {step} does not exist in {self.directory}; available steps: "
                          f"{self.committed_steps()}")

  def _check_committed(self, step: int) -> None:
    if not (epath.Path(self.step_path(step)) / COMMIT_MARKER).exists():
      raise UnusableCheckpointError(
          f"{self.step_path(step)} has no {COMMIT_MARKER}: its save never committed")

  def _read_step(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """One step's state, data position and metadata, unverified; raises on a bad step.

    Each process reads on its own, with no collective, so that a process that
    fails here cannot leave the others waiting.
    """
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(abstract_state), DATA: ocp.args.JsonRestore(),
        META: ocp.args.JsonRestore()}))
    meta, state = restored[META], restored[STATE]
    if meta.get("format") != FORMAT_VERSION or meta.get("step") != step:
      raise UnusableCheckpointError(f"metadata says format {meta.get('format')}, step "
                                    f"{meta.get('step')}; expected {FORMAT_VERSION}, {step}")
    return state, restored[DATA], meta

  def _set_aside(self, steps: Sequence[int]) -> None:
    """Moves bad steps to ``<directory>_unusable/`` so their numbers can be saved again."""
    if self.read_only:
      return
    if jax.process_index() == 0:
      aside = epath.Path(self.directory + UNUSABLE_SUFFIX)
      aside.mkdir(parents=True, exist_ok=True)
      for step in steps:
        source = epath.Path(self.step_path(step))
        if source.exists():
          target = aside / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}"
          source.replace(target)
          logging.warning("moved unusable checkpoint step %d to %s", step, target)
    hosts.barrier("vqdiffusion_jax_checkpoint_set_aside")
    self._manager.reload()


def _failure_anywhere(error: BaseException | None) -> BaseException | None:
  """This process's error, or one naming the processes that failed; the same verdict on all.

  Every process calls it at the same point with its own outcome (None: success),
  so a step that one process cannot read is unusable on every process.
  """
  if jax.process_count() == 1:
    return error
  failed = multihost_utils.process_allgather(np.array(error is not None))
  if error is None and np.any(failed):
    return UnusableCheckpointError(f"process(es) {np.flatnonzero(failed).tolist()} could not "
                                   "read it")
  return error


def _check_abstract(abstract_state: Any) -> None:
  """Raises ValueError unless every leaf says where it goes (``.sharding``)."""
  leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
  missing = [jax.tree_util.keystr(path) for path, leaf in leaves
             if getattr(leaf, "sharding", None) is None]
  if missing:
    raise ValueError(f"abstract_state leaves need a .sharding to restore onto: "
                     f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")


def _check_fingerprints(state: Any, meta: dict) -> None:
  """Raises UnusableCheckpointError naming the arrays whose bits changed.

  Arrays are matched to their recorded fingerprints by their path in the
  saved tree (``.params['w']`` and ``['params']['w']`` are the same array), so a
  state restored as plain dicts is checked as well as one of the saved type.
  """
  saved, names = meta.get("fingerprints"), meta.get("names") or []
  got, got_names = fingerprint(state), _leaf_names(state)
  if saved is None or len(saved) != len(got):
    raise UnusableCheckpointError(f"{len(got)} arrays restored, fingerprints recorded for "
                                  f"{None if saved is None else len(saved)}")
  if len(names) == len(saved):
    recorded = {_path_key(name): list(value) for name, value in zip(names, saved, strict=True)}
    expected = [recorded.get(_path_key(name)) for name in got_names]
  else:
    expected = [list(value) for value in saved]
  bad = [name for name, want, have in zip(got_names, expected, got, strict=True)
         if want != list(have)]
  if bad:
    raise UnusableCheckpointError(f"{len(bad)} array(s) differ from their saved fingerprints: "
                                  f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")


_PATH_PART = re.compile(r"\.(\w+)|\['([^']*)'\]|\[(\d+)\]")


def _path_key(name: str) -> tuple[str, ...]:
  """A leaf's path as its keys: ``.opt_state[0].mu['w']`` -> ("opt_state", "0", "mu", "w")."""
  return tuple(next(g for g in match.groups() if g is not None)
               for match in _PATH_PART.finditer(name))


def _host_device() -> jax.Device:
  """The host's CPU device, or the default device where JAX runs without a CPU backend."""
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:
    return jax.local_devices()[0]


# ----------------------------------------------------------------------------- resume order


def resolve_run(path: str | os.PathLike) -> tuple[str, int | None]:
  """Where another run's checkpoints are: a workdir, its checkpoints dir, or one step.

  Args:
    path: ``RUN`` (with ``RUN/checkpoints``), ``RUN/checkpoints`` or
      ``RUN/checkpoints/<step>``.

  Returns:
    ``(checkpoints_directory, step or None for the latest)``.
  """
  path = outputs.absolute_path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"resume_from={path} does not exist")
  if (path / CHECKPOINTS_DIR).is_dir():
    return os.fspath(path / CHECKPOINTS_DIR), None
  if path.name.isdigit() and (path / STATE).is_dir():
    return os.fspath(path.parent), int(path.name)
  return os.fspath(path), None


def resume(checkpointer: Checkpointer, abstract_state: Any, *, resume_from: str = "",
           init_from: Callable[[], Any] | None = None,
           init_state: Callable[..., Any]) -> tuple[Any, dict, str]:
  """The state to start from, in the house order.

  1. the workdir's own latest good checkpoint (present steps that are all bad
     are an error, never a silent restart);
  2. else ``resume_from``: another run's checkpoint (state and data position);
  3. else ``init_from``: params only (e.g. converted PyTorch weights), with a
     fresh step, optimizer and EMA built by ``init_state(params)``;
  4. else ``init_state()`` from scratch.

  Args:
    checkpointer: this run's checkpointer.
    abstract_state: the restore target (ShapeDtypeStructs with shardings).
    resume_from: another run's workdir, checkpoints dir or step dir, or "".
    init_from: a callable returning params, or None.
    init_state: builds a fresh state; called with no argument from scratch and
      with the params when ``init_from`` is used.

  Returns:
    ``(state, data_state, origin)``: ``data_state`` is ``{}`` for a fresh start
    and ``origin`` is one of ``ORIGINS``.
  """
  if checkpointer.all_steps():
    step, state, data_state = checkpointer.restore(abstract_state)
    logging.info("resuming from step %d of %s", step, checkpointer.directory)
    return state, data_state, "workdir"
  if resume_from:
    directory, wanted = resolve_run(resume_from)
    other = Checkpointer(directory, read_only=True, verify=checkpointer.verify)
    try:
      step, state, data_state = other.restore(abstract_state, step=wanted)
    finally:
      other.close()
    logging.info("resuming from step %d of %s (resume_from)", step, directory)
    return state, data_state, "resume_from"
  if init_from is not None:
    logging.info("initialising params from init_from; fresh optimizer and step")
    return init_state(init_from()), {}, "init_from"
  logging.info("starting from scratch")
  return init_state(), {}, "scratch"


# ----------------------------------------------------------------------------- preemption


class PreemptionWatcher:
  """Turns SIGTERM (optionally SIGINT) into a flag the training loop polls.

  A second signal of the same kind restores the previous handler and re-raises
  it, so an impatient operator still gets an immediate stop (the last committed
  checkpoint stays restorable). Handlers can only be installed from the main
  thread.

  Watchers nest: one installed while another watches the same signal shares
  its flag both ways, so an outer watcher held for the whole program (as
  ``main`` does) keeps a signal that arrives between two stages' watchers, or
  after a stage's last poll, for the next stage's polls; without it that
  signal would kill the process outright.
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
    """Prepares a watcher.

    Args:
      signals: the signals that request a stop.
    """
    self.signals = tuple(signals)
    self._received: int | None = None
    self._previous: dict[int, Any] = {}
    self._outer: PreemptionWatcher | None = None

  @property
  def received(self) -> int | None:
    """The signal that requested the stop (this watcher's or an outer one's), or None."""
    if self._received is None and self._outer is not None:
      return self._outer.received
    return self._received

  def install(self) -> PreemptionWatcher:
    """Installs the handlers."""
    for signum in self.signals:
      if signum not in self._previous:
        previous = signal.signal(signum, self._handle)
        self._previous[signum] = previous
        if isinstance(getattr(previous, "__self__", None), PreemptionWatcher):
          self._outer = previous.__self__
    return self

  def uninstall(self) -> None:
    """Restores the handlers that were there before ``install``."""
    for signum, previous in self._previous.items():
      signal.signal(signum, _python_handler(previous))
    self._previous.clear()
    self._outer = None

  def __enter__(self) -> PreemptionWatcher:
    return self.install()

  def __exit__(self, *exc_info) -> None:
    self.uninstall()

  def _handle(self, signum: int, frame: Any) -> None:
    if self.received == signum:
      signal.signal(signum, _python_handler(self._previous.pop(signum, signal.SIG_DFL)))
      signal.raise_signal(signum)
      return
    self._received = signum
    if self._outer is not None and self._outer.received is None:
      self._outer._handle(signum, frame)

  def should_stop(self, step: int) -> bool:
    """Whether the loop should save now and exit; call it at every step, on every process.

    Args:
      step: the current step (the same on every process), for the log.

    Returns:
      True once a stop was requested; on several processes, True on all of
      them at the same call as soon as any one received a signal.
    """
    stop = self.received is not None
    if jax.process_count() > 1:
      stop = bool(np.any(multihost_utils.process_allgather(np.array(stop))))
    if stop:
      logging.warning("stop requested (%s) at step %d: saving and exiting",
                      signal.Signals(self.received).name if self.received else
                      "by another process", step)
    return stop


def _python_handler(handler: Any) -> Any:
  """A handler ``signal.signal`` accepts: one installed outside Python reads as None."""
  return signal.SIG_DFL if handler is None else handler
