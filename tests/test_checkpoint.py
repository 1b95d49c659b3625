"""Checkpoints: exact round trips, keep-N, corruption fallback, other meshes, resume, signals.

The state is a small ``flax.struct.dataclass`` like the trainer's (step, params,
an optax Adam state, EMA params, a loss history). Two tests run this file as a
child process (``python tests/test_checkpoint.py sigterm|sigkill WORKDIR``) that
saves in a loop, then stop it with SIGTERM or kill it with SIGKILL.
"""

import gc
import glob
import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from vqdiffusion_jax.train import checkpoint as ckpt_lib

TX = optax.adam(1e-2)
CONFIG = {"train": {"num_steps": 10, "keep_checkpoints": 2}, "checkpoint": {"resume_from": ""},
          "rules": [["batch", "data"], ["embed", None]]}


@flax.struct.dataclass
class State:
  step: jax.Array
  params: dict
  opt_state: Any
  ema_params: dict
  loss_history: jax.Array


def _params(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {"dense": {"kernel": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=(16,)), jnp.float32)},
          "embed": {"table": jnp.asarray(rng.normal(size=(32, 8)), jnp.bfloat16)}}


def _init_state(params: dict | None = None) -> State:
  params = _params(0) if params is None else params
  return State(step=jnp.int32(0), params=params, opt_state=TX.init(params),
               ema_params=params, loss_history=jnp.zeros((10, 4), jnp.float32))


def _trained_state(seed: int) -> State:
  """A state after one Adam step: every part differs from a fresh one."""
  state = _init_state(_params(seed))
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, state.params)
  updates, opt_state = TX.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  history = jnp.asarray(np.random.default_rng(seed + 100).normal(size=(10, 4)), jnp.float32)
  return State(step=jnp.int32(seed), params=params, opt_state=opt_state,
               ema_params=jax.tree.map(lambda p: p * 0.5, params), loss_history=history)


def _spec(shape: tuple[int, ...], axes: tuple[str, ...], mesh: jax.sharding.Mesh) -> PartitionSpec:
  """Shards each dim over the next mesh axis that divides it."""
  spec, free = [], list(axes)
  for size in shape:
    axis = next((a for a in free if size % mesh.shape[a] == 0 and mesh.shape[a] > 1), None)
    spec.append(axis)
    if axis is not None:
      free.remove(axis)
  return PartitionSpec(*spec)


def _shardings(tree: Any, mesh: jax.sharding.Mesh, axes: tuple[str, ...]) -> Any:
  return jax.tree.map(lambda x: NamedSharding(mesh, _spec(np.shape(x), axes, mesh)), tree)


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      tree, shardings)


def _on_device0(tree: Any) -> Any:
  return _abstract(tree, jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), tree))


def _assert_equal(got: Any, want: Any) -> None:
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _save(ckpt, step, state, **kwargs) -> bool:
  saved = ckpt.save(step, state, data_state={"position": step * 8, "epoch": 0}, **kwargs)
  ckpt.wait()
  return saved


# ----------------------------------------------------------------------------- round trip


def test_round_trip_is_exact(tmp_path):
  state = _trained_state(3)
  with ckpt_lib.Checkpointer.for_workdir(tmp_path, save_interval_steps=5) as ckpt:
    assert ckpt.save(5, state, data_state={"position": 40, "epoch": 1, "seed": [1, 2]},
                     config=CONFIG)
    ckpt.wait()
    assert ckpt.latest_step() == 5
    step, restored, data_state = ckpt.restore(_on_device0(state))
    assert ckpt.read_config(step=5) == CONFIG
    with pytest.raises(ValueError, match="need a .sharding"):
      ckpt.restore(jax.eval_shape(lambda: state))
  assert step == 5
  assert data_state == {"position": 40, "epoch": 1, "seed": [1, 2]}
  _assert_equal(restored, state)
  assert int(restored.opt_state[0].count) == 1
  assert restored.params["embed"]["table"].dtype == jnp.bfloat16
  with open(tmp_path / "config.json") as f:
    assert json.load(f) == CONFIG
  assert os.path.isfile(tmp_path / "checkpoints" / "5" / ckpt_lib.COMMIT_MARKER)


def test_keep_n_save_interval_and_force(tmp_path):
  state = _init_state()
  with ckpt_lib.Checkpointer.for_workdir(tmp_path, save_interval_steps=3, keep=2) as ckpt:
    saved = [s for s in range(1, 11) if _save(ckpt, s, state.replace(step=jnp.int32(s)))]
    assert saved == [3, 6, 9]
    assert ckpt.all_steps() == [6, 9]
    assert _save(ckpt, 10, state, force=True)
    assert not _save(ckpt, 10, state, force=True), "a step is saved once"
    assert ckpt.all_steps() == [9, 10]
    assert sorted(os.listdir(ckpt.directory)) == ["10", "9"]


# ----------------------------------------------------------------------------- corruption


def _largest_file(step_dir: str) -> str:
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
           if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def _corrupt(step_dir: str, how: str) -> None:
  if how == "delete":
    os.remove(_largest_file(step_dir))
  elif how == "truncate":
    path = _largest_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)
  elif how == "uncommitted":
    os.remove(os.path.join(step_dir, ckpt_lib.COMMIT_MARKER))
  elif how == "foreign_state":
    # Well-formed arrays from another step: only the fingerprints can tell.
    other = os.path.join(os.path.dirname(step_dir), "1", "state")
    os.rename(os.path.join(step_dir, "state"), os.path.join(step_dir, "state.old"))
    subprocess.run(["cp", "-r", other, os.path.join(step_dir, "state")], check=True)


def _big_state(seed: int) -> State:
  """Large enough for incompressible arrays to live in their own data files."""
  state = _trained_state(seed)
  noise = np.random.default_rng(seed).normal(size=(64, 256)).astype(np.float32)
  return state.replace(loss_history=jnp.asarray(noise))


@pytest.fixture
def failed_reads():
  """Collects the coroutines Orbax abandons after a failed read, inside the test."""
  yield
  gc.collect()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["delete", "truncate", "uncommitted", "foreign_state"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog, failed_reads, how):
  states = {1: _big_state(1), 2: _big_state(2)}
  with ckpt_lib.Checkpointer.for_workdir(tmp_path, keep=3) as ckpt:
    for step, state in states.items():
      _save(ckpt, step, state)
    _corrupt(ckpt.step_path(2), how)
    with caplog.at_level(logging.WARNING):
      step, restored, data_state = ckpt.restore(_on_device0(states[1]))
    assert step == 1 and data_state["position"] == 8
    _assert_equal(restored, states[1])
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    why = {"uncommitted": "commit_success.txt", "foreign_state": "fingerprints"}.get(how, "")
    assert any(f"step 2 in {ckpt.directory}" in m and why in m for m in warnings), warnings
    assert ckpt.all_steps() == [1], "the bad step is set aside"
    assert len(os.listdir(ckpt.directory + ckpt_lib.UNUSABLE_SUFFIX)) == 1
    assert _save(ckpt, 2, states[2]), "its step number can be saved again"
    assert ckpt.restore(_on_device0(states[2]))[0] == 2


def _by_path(tree: Any) -> dict:
  """Leaves by their path's keys, whatever containers hold them (dataclass, tuple or dict)."""
  return {ckpt_lib._path_key(jax.tree_util.keystr(path)): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", [None, "foreign_state", "truncate"])
def test_arrays_restore_without_the_state_type_and_are_verified(tmp_path, failed_reads, how):
  states = {1: _big_state(1), 2: _big_state(2)}
  with ckpt_lib.Checkpointer.for_workdir(tmp_path, keep=3) as ckpt:
    for step, state in states.items():
      _save(ckpt, step, state)
    if how:
      _corrupt(ckpt.step_path(2), how)
  with ckpt_lib.Checkpointer.for_workdir(tmp_path, read_only=True) as reader:
    step, arrays, data_state = reader.restore_arrays()
  want = 1 if how else 2
  assert step == want and data_state["position"] == 8 * want
  assert isinstance(arrays, dict) and isinstance(arrays["opt_state"][0], dict)
  got, expected = _by_path(arrays), _by_path(states[want])
  assert sorted(got) == sorted(expected)
  for path, leaf in expected.items():
    assert got[path].dtype == leaf.dtype, path
    np.testing.assert_array_equal(got[path], leaf, err_msg=str(path))
  assert all(list(x.devices())[0].platform == "cpu" for x in jax.tree.leaves(arrays))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_all_corrupt_is_an_error_naming_what_was_tried(tmp_path, failed_reads):
  state = _big_state(1)
  with ckpt_lib.Checkpointer.for_workdir(tmp_path) as ckpt:
    _save(ckpt, 1, state)
    _save(ckpt, 2, state)
    _corrupt(ckpt.step_path(1), "truncate")
    _corrupt(ckpt.step_path(2), "uncommitted")
    with pytest.raises(ckpt_lib.CheckpointError) as error:
      ckpt.restore(_on_device0(state))
    message = str(error.value)
    assert ckpt.directory in message and "step 1:" in message and "step 2:" in message
    assert ckpt.all_steps() == [1, 2], "nothing is moved when nothing restores"
  with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoints in"):
    ckpt_lib.Checkpointer(tmp_path / "empty").restore(_on_device0(state))


# ----------------------------------------------------------------------------- other meshes


def test_restore_onto_other_meshes(tmp_path):
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  auto = jax.sharding.AxisType.Auto
  mesh24 = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(auto, auto))
  state = _trained_state(7)
  saved_shardings = _shardings(state, mesh24, ("fsdp", "data"))
  sharded = jax.device_put(state, saved_shardings)
  assert sharded.params["dense"]["kernel"].sharding.spec == PartitionSpec("fsdp", "data")
  with ckpt_lib.Checkpointer.for_workdir(tmp_path) as ckpt:
    _save(ckpt, 4, sharded)

    _, one, _ = ckpt.restore(_on_device0(state))
    _assert_equal(one, state)
    assert all(x.sharding == SingleDeviceSharding(jax.devices()[0]) for x in jax.tree.leaves(one))

    mesh81 = jax.make_mesh((8, 1), ("fsdp", "tensor"), axis_types=(auto, auto))
    with jax.set_mesh(mesh81):
      wanted = _shardings(state, mesh81, ("fsdp",))
      _, other, _ = ckpt.restore(_abstract(state, wanted))
    _assert_equal(other, state)
    for got, want in zip(jax.tree.leaves(other), jax.tree.leaves(wanted), strict=True):
      assert got.sharding == want
    assert other.params["embed"]["table"].sharding.spec == PartitionSpec("fsdp", None)


def test_fingerprint_ignores_sharding_and_sees_one_bit():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8)), jnp.float32)
  sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
  assert ckpt_lib.fingerprint([x]) == ckpt_lib.fingerprint([sharded])
  flipped = np.asarray(x).copy().view(np.uint32)
  flipped[5, 3] ^= 1 << 7
  assert ckpt_lib.fingerprint([flipped.view(np.float32)]) != ckpt_lib.fingerprint([x])
  swapped = np.asarray(x)[::-1]
  assert ckpt_lib.fingerprint([swapped]) != ckpt_lib.fingerprint([x])


# ----------------------------------------------------------------------------- resume order


def test_resume_order(tmp_path):
  abstract = _on_device0(_init_state())
  other_run, own_run = tmp_path / "other", tmp_path / "own"
  converted = _params(9)

  def resume(workdir, **kwargs):
    with ckpt_lib.Checkpointer.for_workdir(workdir) as ckpt:
      return ckpt_lib.resume(ckpt, abstract, init_state=_init_state, **kwargs)

  state, data_state, origin = resume(tmp_path / "a")
  assert origin == "scratch" and data_state == {}
  _assert_equal(state, _init_state())

  state, data_state, origin = resume(tmp_path / "b", init_from=lambda: converted)
  assert origin == "init_from" and data_state == {} and int(state.step) == 0
  _assert_equal(state.params, converted)
  _assert_equal(state.opt_state, TX.init(converted))
  _assert_equal(state.ema_params, converted)

  with ckpt_lib.Checkpointer.for_workdir(other_run) as ckpt:
    _save(ckpt, 5, _trained_state(5))
  for resume_from in (other_run, other_run / "checkpoints", other_run / "checkpoints" / "5"):
    state, data_state, origin = resume(tmp_path / "c", resume_from=str(resume_from),
                                       init_from=lambda: converted)
    assert origin == "resume_from" and data_state["position"] == 40
    _assert_equal(state, _trained_state(5))
  assert not os.path.exists(tmp_path / "c" / "checkpoints" / "5"), "nothing saved by resume"

  with ckpt_lib.Checkpointer.for_workdir(own_run) as ckpt:
    _save(ckpt, 3, _trained_state(3))
  state, data_state, origin = resume(own_run, resume_from=str(other_run),
                                     init_from=lambda: converted)
  assert origin == "workdir" and data_state["position"] == 24
  _assert_equal(state, _trained_state(3))

  _corrupt(str(own_run / "checkpoints" / "3"), "uncommitted")
  with pytest.raises(ckpt_lib.CheckpointError, match="step 3"):
    resume(own_run, resume_from=str(other_run))


def test_resume_from_missing_directory_is_an_error(tmp_path):
  with ckpt_lib.Checkpointer.for_workdir(tmp_path / "run") as ckpt, \
      pytest.raises(FileNotFoundError, match="nowhere"):
    ckpt_lib.resume(ckpt, _on_device0(_init_state()), resume_from=str(tmp_path / "nowhere"),
                    init_state=_init_state)


# ----------------------------------------------------------------------------- signals


def _child_env() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                       env.get("PYTHONPATH", "")])
  return env


def _start_child(mode: str, workdir) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), mode, str(workdir)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=_child_env())


def _wait_for(predicate, child: subprocess.Popen, timeout: float = 120.0) -> None:
  deadline = time.monotonic() + timeout
  while not predicate():
    if child.poll() is not None:
      raise AssertionError(f"child exited early ({child.returncode}): {child.stderr.read()}")
    assert time.monotonic() < deadline, "timed out waiting for the child"
    time.sleep(0.01)


def _committed_steps(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.exists(os.path.join(directory, n, "commit_success.txt")))


def _filled(step: int) -> State:
  """Every array equal to the step: a mixed-up restore cannot pass for a good one."""
  return jax.tree.map(lambda x: jnp.full_like(x, step), _init_state())


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
  child = _start_child("sigterm", tmp_path)
  directory = str(tmp_path / "checkpoints")
  try:
    _wait_for(lambda: _committed_steps(directory), child)
    seen = _committed_steps(directory)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=120)
  finally:
    child.kill()
  assert child.returncode == 0, err
  final = int(out.split("final")[-1])
  assert final >= seen[-1]
  with ckpt_lib.Checkpointer(directory) as ckpt:
    assert ckpt.latest_step() == final
    step, state, data_state = ckpt.restore(_on_device0(_init_state()))
  assert step == final and data_state == {"position": final}
  _assert_equal(state, _filled(final))


def test_watcher_flags_the_first_signal_and_passes_on_the_second():
  calls = []
  previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
  try:
    with ckpt_lib.PreemptionWatcher(signals=(signal.SIGUSR1,)) as watcher:
      assert not watcher.should_stop(1)
      signal.raise_signal(signal.SIGUSR1)
      assert watcher.should_stop(2) and watcher.received == signal.SIGUSR1 and not calls
      signal.raise_signal(signal.SIGUSR1)
      assert calls == [signal.SIGUSR1], "a second signal goes to the previous handler"
    signal.raise_signal(signal.SIGUSR1)
    assert calls == [signal.SIGUSR1] * 2, "uninstall restores the previous handler"
  finally:
    signal.signal(signal.SIGUSR1, previous)


def test_a_nested_watcher_shares_its_flag_with_the_outer_one():
  with ckpt_lib.PreemptionWatcher(signals=(signal.SIGUSR1,)) as outer:
    signal.raise_signal(signal.SIGUSR1)  # between two stages' watchers
    with ckpt_lib.PreemptionWatcher(signals=(signal.SIGUSR1,)) as inner:
      assert inner.should_stop(1) and inner.received == signal.SIGUSR1
    with ckpt_lib.PreemptionWatcher(signals=(signal.SIGUSR1,)) as later:
      assert later.should_stop(1), "the flag outlives the stage that polled it"
  with ckpt_lib.PreemptionWatcher(signals=(signal.SIGUSR1,)) as outer:
    with ckpt_lib.PreemptionWatcher(signals=(signal.SIGUSR1,)) as inner:
      assert not inner.should_stop(1)
      signal.raise_signal(signal.SIGUSR1)  # inside a stage, after its last poll
    assert outer.received == signal.SIGUSR1
    with ckpt_lib.PreemptionWatcher(signals=(signal.SIGUSR1,)) as later:
      assert later.should_stop(2)
  assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_a_second_signal_through_nested_watchers_reaches_the_first_handler():
  calls = []
  previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
  try:
    with ckpt_lib.PreemptionWatcher(signals=(signal.SIGUSR1,)):
      signal.raise_signal(signal.SIGUSR1)
      with ckpt_lib.PreemptionWatcher(signals=(signal.SIGUSR1,)):
        assert not calls
        signal.raise_signal(signal.SIGUSR1)
        assert calls == [signal.SIGUSR1]
  finally:
    signal.signal(signal.SIGUSR1, previous)


def _big_filled(step: int) -> dict:
  """About 8 MB of incompressible int32: fixed noise plus the step."""
  noise = np.random.default_rng(0).integers(0, 2**20, size=(8, 512, 512), dtype=np.int32)
  return {f"w{i}": noise[i] + np.int32(step) for i in range(8)}


def _kill_while_saving(workdir, delay: float) -> tuple[list[int], str]:
  """Starts a child, SIGKILLs it ``delay`` s into a save after its first new commit."""
  directory = os.path.join(workdir, "checkpoints")
  before = _committed_steps(directory)
  temporary = lambda: glob.glob(os.path.join(directory, "*.orbax-checkpoint-tmp*"))
  child = _start_child("sigkill", workdir)
  try:
    _wait_for(lambda: _committed_steps(directory)[-1:] > before[-1:] and temporary(), child)
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    out, _ = child.communicate(timeout=60)
  finally:
    child.kill()
  assert child.returncode == -signal.SIGKILL
  return _committed_steps(directory), out


def test_sigkill_while_saving_leaves_a_committed_step(tmp_path):
  directory = str(tmp_path / "checkpoints")
  temporary = lambda: glob.glob(os.path.join(directory, "*.orbax-checkpoint-tmp*"))
  first, out = _kill_while_saving(tmp_path, delay=0.0)
  assert "origin scratch" in out
  assert temporary(), "killed inside a save"
  second, out = _kill_while_saving(tmp_path, delay=0.1)
  assert f"origin workdir {first[-1]}" in out, "the second child resumed the first's step"
  assert second[-1] > first[-1]
  with ckpt_lib.Checkpointer(directory) as ckpt:
    step, state, data_state = ckpt.restore(_on_device0(_big_filled(0)))
    deadline = time.monotonic() + 30
    while temporary() and time.monotonic() < deadline:
      time.sleep(0.05)
    assert not temporary(), "opening the directory removes unfinished saves"
  assert step == second[-1] and data_state == {"position": step}
  noise = _big_filled(0)
  for name, value in state.items():
    np.testing.assert_array_equal(np.asarray(value) - noise[name], step, err_msg=name)


def _child(mode: str, workdir: str) -> None:
  """The looping trainer the signal tests stop: resumes, saves, polls the watcher."""
  every = 3 if mode == "sigterm" else 1
  make = _filled if mode == "sigterm" else _big_filled
  ckpt = ckpt_lib.Checkpointer.for_workdir(workdir, save_interval_steps=every, keep=2)
  _, data_state, origin = ckpt_lib.resume(ckpt, _on_device0(make(0)), init_state=lambda: make(0))
  step = data_state.get("position", 0)
  print(f"origin {origin} {step}", flush=True)
  deadline = time.monotonic() + 120
  with ckpt_lib.PreemptionWatcher() as watcher:
    while time.monotonic() < deadline:
      step += 1
      state = jax.device_put(make(step))
      ckpt.save(step, state, data_state={"position": step})
      if watcher.should_stop(step):
        ckpt.save(step, state, data_state={"position": step}, force=True)
        ckpt.close()
        print(f"final {step}", flush=True)
        return
      time.sleep(0.02)
  sys.exit("never stopped")


if __name__ == "__main__":
  _child(sys.argv[1], sys.argv[2])
