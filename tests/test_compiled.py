"""Train steps compiled ahead of the first call: memory figures, the console line, the fit check."""

import io
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shapes
from vqdiffusion_jax.main import train_and_evaluate
from vqdiffusion_jax.train import compiled, runner
from vqdiffusion_jax.train import mesh as mesh_lib

SIDE = 256
MATRIX_BYTES = SIDE * SIDE * 4


def _lowered_square(donate: bool):
  square = jax.jit(lambda x: x @ x + 1.0, donate_argnums=(0,) if donate else ())
  return square.lower(jnp.ones((SIDE, SIDE), jnp.float32))


@pytest.mark.parametrize("donate", [False, True])
def test_memory_figures_count_arguments_outputs_and_donation(donate):
  figures = compiled.memory_figures(_lowered_square(donate).compile())
  assert figures["arguments"] == figures["outputs"] == MATRIX_BYTES
  assert figures["aliased"] == (MATRIX_BYTES if donate else 0)
  assert figures["peak"] == (figures["arguments"] + figures["outputs"]
                             + figures["temporaries"] - figures["aliased"])


def test_a_step_larger_than_the_device_is_refused_before_it_runs():
  stream = io.StringIO()
  figures = compiled.compile_first_call("toy", _lowered_square(False), limit=10 * MATRIX_BYTES,
                                        stream=stream)
  assert stream.getvalue().startswith("toy: train step compiled in ")
  assert "per device: peak" in stream.getvalue()
  with pytest.raises(compiled.DoesNotFitError, match=r"toy: the train step needs .* holds"):
    compiled.check_fits("toy", figures, figures["peak"] - 1)


def test_sharded_step_lowers_what_it_calls():
  mesh = mesh_lib.make_mesh({"shape": {"data": -1, "fsdp": 1, "tensor": 1}})
  sharding = mesh_lib.batch_sharding(mesh)
  jitted = jax.jit(lambda state, batch, rng, scale: (state + scale * batch["x"].sum(), {}))
  step = runner.ShardedStep(jitted, sharding, (2.0,))
  batch = {"x": np.ones((8, 3), np.float32), "captions": np.array(["a"] * 8)}
  state, _ = step(jnp.zeros(()), batch, jax.random.key(0))
  assert float(state) == 48.0
  lowered = runner.lower_call(step, None, jnp.zeros(()), [batch], jax.random.key(0))
  assert lowered.compile().memory_analysis().argument_size_in_bytes > 0
  assert runner.lower_call(lambda *a: a, None, 0, [batch], None) is None


def _tiny_config():
  config = shapes.get_config("runlocal")
  with config.unlocked():
    config.train.num_steps = 1
    config.vqvae.train.num_steps = 1
    config.eval.samplers = ()
  return config


def test_each_stage_shows_its_compiled_memory(tmp_path, capfd):
  train_and_evaluate(_tiny_config(), str(tmp_path))
  err = capfd.readouterr().err
  for stage in ("vqvae", "denoiser"):
    assert f"{stage}: train step compiled in " in err
  line = next(x for x in err.splitlines() if x.startswith("denoiser: train step compiled"))
  assert "per device: peak" in line and "donated" in line


def test_a_run_whose_step_cannot_fit_stops_before_training(tmp_path, monkeypatch):
  monkeypatch.setattr(compiled, "device_memory_limit", lambda device: 1024)
  with pytest.raises(compiled.DoesNotFitError, match="vqvae: the train step needs"):
    train_and_evaluate(_tiny_config(), str(tmp_path))
  checkpoints = pathlib.Path(tmp_path, "vqvae", "checkpoints")
  assert not checkpoints.exists() or not any(checkpoints.iterdir())
