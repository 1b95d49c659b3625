"""Two denoiser train steps on 8 fake CPU devices equal the single-device steps.

A tiny text-conditioned transformer (K = 16, 4 x 4 tokens, 2 layers, width
32, 2 heads, text 5 x 8, T = 10) trains for two steps on a fixed batch of 8
on one device, then on meshes (data, fsdp, tensor) = (8,1,1), (2,4,1),
(2,2,2), (1,8,1) from the same initial state. Params, EMA params, the
optimizer state and the loss history must agree.

Tolerance: integers exactly; float leaves within ``rtol = 1e-5`` plus
``atol = 1e-5 * (largest magnitude in that part of the state)``. The
absolute term is needed because some gradients are mathematically zero
(attention key biases: softmax ignores a constant shift) and are float32
rounding noise of ~1e-12 that depends on the reduction order; Adam turns
that noise into updates of ~1e-10, different per mesh but negligible
against parameters of size ~1.

Steps compile at XLA's CPU optimisation level 0 (both references and
sharded runs) to keep the file fast; the partitioning is unaffected.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vqdiffusion_jax import config_schema as schema
from vqdiffusion_jax.diffusion import schedule as schedules
from vqdiffusion_jax.models import transformer
from vqdiffusion_jax.models.denoiser import Denoiser
from vqdiffusion_jax.train import denoiser_step
from vqdiffusion_jax.train import mesh as mesh_lib
from vqdiffusion_jax.train import state as state_lib

TINY = transformer.TransformerConfig(
    codebook_size=16, spatial_size=(4, 4), num_layers=2, embed_dim=32, num_heads=2,
    condition_dim=8, condition_length=5, num_timesteps=10)
FAST_COMPILE = {"xla_backend_optimization_level": 0}
RTOL = 1e-5
MESH_SHAPES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 8, 1)]


def tiny_config(learning_rate=1e-3, warmup_steps=2, num_steps=100, importance_sampling=True):
  """Experiment config sections the train step reads."""
  config = ml_collections.ConfigDict({
      "optim": schema.optim(learning_rate, warmup_steps=warmup_steps),
      "train": schema.train(8, num_steps, dtype="float32"),
      "diffusion": schema.diffusion(TINY.num_timesteps),
  })
  config.diffusion.importance_sampling = importance_sampling
  config.optim.ema_decay = 0.5  # so that two steps move the EMA visibly
  return config


def tiny_batch(seed=0, drop=(True, False, False, False, True, False, False, False)):
  """A fixed batch of 8: tokens, text features, caption-dropout flags."""
  rng = np.random.default_rng(seed)
  return {
      "tokens": jnp.asarray(rng.integers(0, TINY.codebook_size, (8, TINY.num_tokens)),
                            jnp.int32),
      "text": jnp.asarray(rng.normal(size=(8, TINY.condition_length, TINY.condition_dim)),
                          jnp.float32),
      "drop_text": jnp.asarray(drop),
  }


class Setup:
  """The model, schedule, optimizer and train step of a tiny config."""

  def __init__(self, config=None, model_config=TINY, text_encoder_fn=None):
    self.config = config or tiny_config()
    self.denoiser = Denoiser(transformer.VQDiffusionTransformer(model_config),
                             frozen_text_encoder=text_encoder_fn)
    self.model = self.denoiser.network
    self.schedule = schedules.make("mask_and_replace", model_config.num_timesteps,
                                   model_config.codebook_size)
    self.optimizer = state_lib.make_optimizer(self.config.optim, self.config.train.num_steps)
    self.step = denoiser_step.make_train_step(
        self.denoiser, self.schedule, self.config, self.config.diffusion, self.optimizer)
    self.inputs = transformer.dummy_inputs(model_config)

  def init_fn(self, rng):
    return self.model.init(rng, *self.inputs)

  def create(self, mesh, rng=None):
    rng = jax.random.key(0) if rng is None else rng
    return state_lib.create_state(rng, self.init_fn, self.optimizer, mesh,
                                  schema.mesh().rules,
                                  history_timesteps=self.model.config.num_timesteps)

  def jit(self, mesh, shardings, **kwargs):
    return denoiser_step.jit_train_step(self.step, mesh, shardings,
                                        mesh_lib.batch_sharding(mesh),
                                        compiler_options=FAST_COMPILE, **kwargs)


def single_device_mesh():
  return mesh_lib.make_mesh(schema.mesh(1, 1, 1), devices=jax.devices()[:1])


def run_steps(step, state, batch, num_steps, rng=None):
  """Runs ``num_steps`` steps; returns the final state and the list of metrics."""
  rng = jax.random.key(1) if rng is None else rng
  history = []
  for _ in range(num_steps):
    state, metrics = step(state, batch, rng)
    history.append(jax.device_get(metrics))
  return state, history


@pytest.fixture(scope="module")
def reference():
  setup = Setup()
  mesh = single_device_mesh()
  state, shardings = setup.create(mesh)
  initial = jax.device_get(state)
  final, metrics = run_steps(setup.jit(mesh, shardings), state, tiny_batch(), 2)
  return setup, initial, jax.device_get(final), metrics


def _assert_tree_close(got, want, name):
  want_leaves = jax.tree.leaves(want)
  assert want_leaves, name
  scale = max(float(np.max(np.abs(leaf), initial=0.0)) for leaf in want_leaves
              if np.issubdtype(np.asarray(leaf).dtype, np.floating))
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], want_leaves,
                          strict=True):
    where = f"{name}{jax.tree_util.keystr(path)}"
    g, w = np.asarray(g), np.asarray(w)
    if np.issubdtype(w.dtype, np.floating):
      np.testing.assert_allclose(g, w, rtol=RTOL, atol=RTOL * scale, err_msg=where)
    else:
      np.testing.assert_array_equal(g, w, err_msg=where)


@pytest.mark.parametrize("shape", MESH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_steps_equal_single_device(reference, shape):
  setup, initial, want, want_metrics = reference
  mesh = mesh_lib.make_mesh(schema.mesh(*shape))
  shardings = state_lib.state_shardings(jax.random.key(0), setup.init_fn, setup.optimizer,
                                        mesh, schema.mesh().rules,
                                        history_timesteps=TINY.num_timesteps)
  state = jax.device_put(initial, shardings)
  batch = jax.device_put(tiny_batch(), mesh_lib.batch_sharding(mesh))
  got, got_metrics = run_steps(setup.jit(mesh, shardings), state, batch, 2)

  assert int(got.step) == 2
  host = jax.device_get(got)
  for part in ("params", "ema_params", "opt_state", "loss_history"):
    _assert_tree_close(getattr(host, part), getattr(want, part), part)
  for got_m, want_m in zip(got_metrics, want_metrics, strict=True):
    for key in ("loss", "vb", "aux", "grad_norm", "param_norm", "learning_rate"):
      np.testing.assert_allclose(got_m[key], want_m[key], rtol=RTOL, err_msg=key)
    assert bool(got_m["finite"])

  data, fsdp, tensor = shape
  # The batch is split over data x fsdp; weights over fsdp (width) and tensor (mlp).
  assert batch["tokens"].addressable_shards[0].data.shape[0] == 8 // (data * fsdp)
  kernel = got.params["block_0"]["mlp"]["fc1"]["kernel"]  # (embed 32, mlp 128)
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (32 // fsdp, 128 // tensor)
  adam = got.opt_state[1][0]
  assert adam.mu["block_0"]["mlp"]["fc1"]["kernel"].sharding == kernel.sharding
  assert got.ema_params["block_0"]["mlp"]["fc1"]["kernel"].sharding == kernel.sharding


def test_reference_moves_and_learns_something(reference):
  _, initial, final, metrics = reference
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), final.params, initial.params)
  assert max(jax.tree.leaves(moved)) > 1e-4
  ema_moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), final.ema_params,
                           initial.ema_params)
  assert max(jax.tree.leaves(ema_moved)) > 1e-4
  assert [float(m["learning_rate"]) for m in metrics] == pytest.approx([5e-4, 1e-3])
  assert int(np.sum(final.loss_history.count)) == 16  # 2 steps x 8 samples
