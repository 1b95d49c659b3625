"""The mesh, the optimizer, EMA, the sharded state, and the denoiser step's behaviour."""

import dataclasses
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.test_train_sharding import (
  TINY,
  Setup,
  run_steps,
  single_device_mesh,
  tiny_batch,
  tiny_config,
)
from vqdiffusion_jax import config_schema as schema
from vqdiffusion_jax.diffusion import importance
from vqdiffusion_jax.models.denoiser import Denoiser
from vqdiffusion_jax.train import denoiser_step
from vqdiffusion_jax.train import mesh as mesh_lib
from vqdiffusion_jax.train import state as state_lib

# ---------------------------------------------------------------------------- mesh


@pytest.mark.parametrize("shape, want", [
    ((-1, 2, 1), (4, 2, 1)), ((2, -1, 2), (2, 2, 2)), ((1, 1, -1), (1, 1, 8)),
    ((2, 2, 2), (2, 2, 2))])
def test_make_mesh_fills_the_free_axis(shape, want):
  mesh = mesh_lib.make_mesh(schema.mesh(*shape))
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape.values()) == want
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_on_given_devices():
  mesh = mesh_lib.make_mesh(schema.mesh(-1, 2), devices=jax.devices()[:4])
  assert tuple(mesh.shape.values()) == (2, 2, 1)


@pytest.mark.parametrize("shape, message", [
    ((3, 1, 1), "3 devices but 8"), ((-1, 3, 1), "not divisible"),
    ((-1, -1, 1), "at most one -1"), ((0, 8, 1), "at most one -1"),
    ((4, 4, 1), "16 devices but 8")])
def test_make_mesh_rejects_bad_shapes(shape, message):
  with pytest.raises(ValueError, match=message):
    mesh_lib.make_mesh(schema.mesh(*shape))


def test_dcn_entries_must_be_one_on_one_slice():
  with pytest.raises(ValueError, match="on one slice the dcn entries must be 1"):
    mesh_lib.make_mesh(schema.mesh(-1, 1, 1, dcn_data=2))


@dataclasses.dataclass(frozen=True)
class FakeTpu:
  """Stands in for a TPU device of a multi-slice job (only what mesh_utils reads)."""

  id: int
  slice_index: int
  process_index: int = 0
  platform: str = "cpu"
  device_kind: str = "fake"


def test_multislice_grid_keeps_ici_axes_inside_slices():
  devices = [FakeTpu(i, slice_index=i // 4) for i in range(8)]
  grid = mesh_lib.device_grid(schema.mesh(-1, 2, 1, dcn_data=2), devices)
  assert grid.shape == (4, 2, 1)  # data = ici 2 x dcn 2
  slices = np.vectorize(lambda d: d.slice_index)(grid)
  np.testing.assert_array_equal(slices[:2], 0)
  np.testing.assert_array_equal(slices[2:], 1)
  with pytest.raises(ValueError, match="asks for 4 slices"):
    mesh_lib.device_grid(schema.mesh(-1, 1, 1, dcn_data=2, dcn_fsdp=2), devices)
  with pytest.raises(ValueError, match="span 2 slices"):
    mesh_lib.device_grid(schema.mesh(-1), devices)


@dataclasses.dataclass(frozen=True)
class FakeGpu:
  """A GPU device of a 2-host job: no slice index, so hosts are the DCN units."""

  id: int
  process_index: int
  platform: str = "cpu"
  device_kind: str = "fake"


def test_multihost_gpu_grid_uses_processes_as_slices():
  devices = [FakeGpu(i, process_index=i % 2) for i in range(8)]
  grid = mesh_lib.device_grid(schema.mesh(1, -1, 1, dcn_data=2), devices)
  assert grid.shape == (2, 4, 1)
  hosts = np.vectorize(lambda d: d.process_index)(grid)
  np.testing.assert_array_equal(hosts, np.arange(2)[:, None, None] * np.ones((1, 4, 1)))
  # Without dcn, one mesh spans both hosts.
  assert mesh_lib.device_grid(schema.mesh(-1), devices).shape == (8, 1, 1)


@pytest.mark.parametrize("environ, want", [
    ({}, False), ({"SLURM_NTASKS": "1"}, False), ({"SLURM_NTASKS": "4"}, True),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),
    ({"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True)])
def test_multihost_initialize_only_when_multiprocess(monkeypatch, environ, want):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(1))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  assert mesh_lib.multihost_initialize(environ=environ) is want
  assert len(calls) == int(want)
  assert mesh_lib.multihost_initialize(force=False, environ=environ) is False
  assert len(calls) == int(want)


def test_fit_spec_drops_axes_that_do_not_divide():
  mesh = mesh_lib.make_mesh(schema.mesh(2, 2, 2))
  spec = jax.sharding.PartitionSpec(("data", "fsdp"), "tensor", "fsdp")
  fitted = mesh_lib.fit_spec(spec, (6, 5, 4), mesh)
  assert fitted == jax.sharding.PartitionSpec("data", None, "fsdp")


def test_a_large_array_replicated_against_its_rules_is_logged(caplog):
  mesh = mesh_lib.make_mesh(schema.mesh(2, 2, 2))
  box = lambda shape: nn.LogicallyPartitioned(  # noqa: E731
      jax.ShapeDtypeStruct(shape, jnp.float32), ("vocab", "embed"))
  tree = {"odd_large": box((5, 2**20)), "odd_small": box((5, 8)), "even_large": box((6, 2**20))}
  shardings = mesh_lib.logical_shardings(tree, mesh, schema.mesh().rules)
  assert shardings["odd_large"].spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert shardings["even_large"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert len(warnings) == 1, warnings  # only the large array whose rows 2 shards cannot split
  assert "odd_large" in warnings[0] and "dimension 0 (5) over tensor" in warnings[0]


# ----------------------------------------------------------------------- optimizer


def _optim(decay="cosine", **overrides):
  config = schema.optim(1e-3, warmup_steps=10, decay=decay)
  config.min_lr_ratio = 0.1
  config.update(overrides)
  return config


@pytest.mark.parametrize("decay, step, factor", [
    ("cosine", 0, 0.1), ("cosine", 4, 0.5), ("cosine", 9, 1.0), ("cosine", 10, 1.0),
    ("cosine", 60, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))),
    ("cosine", 35, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))),
    ("cosine", 110, 0.1), ("cosine", 500, 0.1),
    ("linear", 35, 1 - 0.9 * 0.25), ("linear", 60, 1 - 0.9 * 0.5), ("linear", 110, 0.1),
    ("constant", 3, 0.4), ("constant", 60, 1.0), ("constant", 500, 1.0)])
def test_learning_rate_schedule(decay, step, factor):
  schedule = state_lib.learning_rate_schedule(_optim(decay), num_steps=110)
  np.testing.assert_allclose(float(schedule(step)), 1e-3 * factor, rtol=1e-6)


def test_unknown_decay_is_an_error():
  with pytest.raises(ValueError, match="unknown decay"):
    state_lib.learning_rate_schedule(_optim("exponential"), 10)


def _tiny_params():
  model = Setup().model
  return nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), *Setup().inputs)["params"])


def test_weight_decay_mask_decays_kernels_only():
  mask = flax.traverse_util.flatten_dict(state_lib.decay_mask(_tiny_params()), sep="/")
  decayed = {name for name, value in mask.items() if value}
  assert decayed == {name for name in mask if name.endswith("/kernel")}
  for name in ("null_text", "token_embed/tokens", "token_embed/rows", "token_embed/cols",
               "block_0/self_attn_norm/embedding", "block_0/mlp_norm/scale", "head/bias"):
    assert not mask[name], name
  for name in ("head/kernel", "block_1/cross_attn/query/kernel", "block_0/mlp/fc2/kernel"):
    assert mask[name], name


def test_weight_decay_applies_to_masked_params_only():
  params = {"dense": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.full((4,), 2.0)},
            "table": {"embedding": jnp.full((5, 3), 2.0)}}
  optimizer = state_lib.make_optimizer(_optim(weight_decay=0.045), num_steps=110)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zeros, optimizer.init(params), params)
  lr = 1e-3 * 0.1  # step 0 of a 10-step warmup
  np.testing.assert_allclose(updates["dense"]["kernel"], -lr * 0.045 * 2.0, rtol=1e-6)
  np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)
  np.testing.assert_array_equal(updates["table"]["embedding"], 0.0)


@pytest.mark.parametrize("clip_norm", [1.0, 0.0])
def test_clipping_bounds_what_adam_sees(clip_norm):
  params = {"a": {"kernel": jnp.zeros((4, 5))}, "b": {"bias": jnp.zeros((7,))}}
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 100.0), params)
  raw_norm = float(optax.tree.norm(grads))
  optimizer = state_lib.make_optimizer(_optim(clip_norm=clip_norm), num_steps=110)
  _, opt_state = optimizer.update(grads, optimizer.init(params), params)
  adam = opt_state[1][0] if clip_norm else opt_state[0]
  first_moment = float(optax.tree.norm(adam.mu))
  want = (1 - 0.9) * (clip_norm if clip_norm else raw_norm)
  np.testing.assert_allclose(first_moment, want, rtol=1e-5)


def test_ema_update_formula():
  ema = {"w": jnp.asarray([1.0, 2.0, -3.0]), "b": jnp.asarray(4.0)}
  params = {"w": jnp.asarray([3.0, 0.0, 1.0]), "b": jnp.asarray(-4.0)}
  got = state_lib.ema_update(ema, params, 0.75)
  np.testing.assert_allclose(got["w"], 0.75 * ema["w"] + 0.25 * params["w"], rtol=1e-7)
  np.testing.assert_allclose(got["b"], 0.75 * 4.0 - 0.25 * 4.0, rtol=1e-7)
  np.testing.assert_array_equal(state_lib.ema_update(ema, params, 0.0)["w"], params["w"])
  np.testing.assert_array_equal(state_lib.ema_update(ema, params, 1.0)["w"], ema["w"])


# ------------------------------------------------------------------------- state


def test_create_state_is_sharded_from_birth():
  setup = Setup()
  mesh = mesh_lib.make_mesh(schema.mesh(2, 2, 2))
  traced = []

  def init_fn(rng):
    traced.append(isinstance(rng, jax.core.Tracer))
    return setup.init_fn(rng)

  state, shardings = state_lib.create_state(
      jax.random.key(0), init_fn, setup.optimizer, mesh, schema.mesh().rules,
      history_timesteps=TINY.num_timesteps)
  # The init only ever ran traced (eval_shape, then inside jit), never eagerly.
  assert traced and all(traced)
  abstract = state_lib.abstract_state(jax.random.key(0), setup.init_fn, setup.optimizer, mesh,
                                      schema.mesh().rules,
                                      history_timesteps=TINY.num_timesteps)
  jax.tree.map(lambda leaf, sharding, target: (
      _assert_same(leaf.sharding, sharding), _assert_same(target.sharding, sharding),
      _assert_same(leaf.shape, target.shape), _assert_same(leaf.dtype, target.dtype)),
      state, shardings, abstract)
  kernel = state.params["block_0"]["mlp"]["fc1"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (16, 64)
  assert state.opt_state[1][0].mu["block_0"]["mlp"]["fc1"]["kernel"].sharding == kernel.sharding
  assert int(state.step) == 0 and state.extra == {}
  np.testing.assert_array_equal(state.loss_history.count, np.zeros(TINY.num_timesteps))
  jax.tree.map(np.testing.assert_array_equal, state.ema_params, state.params)


def _assert_same(a, b):
  assert a == b, (a, b)


class _WithStats(nn.Module):
  """A layer with a non-trainable collection, like the quantizer's vq_stats."""

  @nn.compact
  def __call__(self, x):
    counts = self.variable("vq_stats", "counts", jnp.zeros, (4,))
    counts.value = counts.value + 1
    return nn.Dense(4)(x)


def test_extra_collections_go_to_extra():
  module = _WithStats()
  state, shardings = state_lib.create_state(
      jax.random.key(0), lambda r: module.init(r, jnp.zeros((1, 3))),
      state_lib.make_optimizer(_optim(), 10), single_device_mesh(), schema.mesh().rules)
  assert set(state.extra) == {"vq_stats"}
  assert state.extra["vq_stats"]["counts"].shape == (4,)
  assert "vq_stats" not in state.params and state.loss_history is None
  assert shardings.extra["vq_stats"]["counts"].spec == jax.sharding.PartitionSpec()


# ----------------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def single():
  """A jitted step on one device and a function giving fresh states."""
  setup = Setup(tiny_config(learning_rate=3e-3, warmup_steps=1, importance_sampling=False))
  mesh = single_device_mesh()
  state, shardings = setup.create(mesh)
  initial = jax.device_get(state)
  return setup, setup.jit(mesh, shardings), lambda: jax.device_put(initial, shardings)


def _evaluate(step, state, batch, keys):
  """Mean loss and masked accuracy of ``state`` at fixed noise draws.

  The step reports both for the state it is given, before updating; step 0
  and a fixed key pin t and x_t.
  """
  results = []
  for key in keys:
    fixed = jax.tree.map(jnp.copy, state.replace(step=jnp.zeros((), jnp.int32)))
    metrics = step(fixed, batch, key)[1]
    results.append((float(metrics["loss"]), float(metrics["accuracy"])))
  return np.mean(results, axis=0)


def test_training_overfits_a_fixed_batch(single):
  _, step, fresh = single
  batch = tiny_batch()
  keys = [jax.random.key(k) for k in (11, 12, 13, 14)]
  state = fresh()
  loss_before, accuracy_before = _evaluate(step, state, batch, keys)
  state, metrics = run_steps(step, state, batch, 20)
  loss_after, accuracy_after = _evaluate(step, state, batch, keys)
  assert all(bool(m["finite"]) for m in metrics)
  assert loss_after < 0.9 * loss_before, (loss_before, loss_after)
  assert accuracy_after > accuracy_before


def test_bfloat16_remat_scanned_model_trains_sharded():
  config = dataclasses.replace(TINY, dtype=jnp.bfloat16, remat=True, scan_layers=True)
  setup = Setup(model_config=config)
  mesh = mesh_lib.make_mesh(schema.mesh(2, 2, 2))
  state, shardings = setup.create(mesh)
  kernel_sharding = shardings.params["blocks"]["mlp"]["fc1"]["kernel"]
  assert kernel_sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  batch = jax.device_put(tiny_batch(), mesh_lib.batch_sharding(mesh))
  state, metrics = run_steps(setup.jit(mesh, shardings), state, batch, 2)
  assert all(bool(m["finite"]) and m["grad_norm"] > 0 for m in metrics)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))


def _null_text_moves(step, state, drop):
  before = np.asarray(state.params["null_text"])
  state, _ = step(state, tiny_batch(drop=drop), jax.random.key(5))
  mu = np.asarray(state.opt_state[1][0].mu["null_text"])
  return np.max(np.abs(np.asarray(state.params["null_text"]) - before)), np.max(np.abs(mu))


def test_null_text_gets_gradient_only_from_dropped_rows(single):
  _, step, fresh = single
  moved, moment = _null_text_moves(step, fresh(), (False,) * 8)
  assert moved == 0.0 and moment == 0.0
  moved, moment = _null_text_moves(step, fresh(), (False, True) + (False,) * 6)
  assert moved > 1e-4 and moment > 0.0


def test_class_conditioning_drops_to_the_null_class():
  model = Setup(model_config=dataclasses.replace(TINY, conditioning="class", num_classes=7)).model
  batch = {"label": jnp.asarray([1, 2, 3, 4]), "drop_text": jnp.asarray([True, False] * 2)}
  labels = denoiser_step.condition_input(Denoiser(model), {}, batch, None)
  np.testing.assert_array_equal(labels, [7, 2, 7, 4])


def test_dropped_rows_read_the_null_text():
  setup = Setup()
  params = nn.meta.unbox(setup.init_fn(jax.random.key(0))["params"])
  batch = tiny_batch(drop=(True, False) * 4)
  condition = denoiser_step.condition_input(setup.denoiser, params, batch, batch["text"])
  np.testing.assert_array_equal(condition[0::2], np.broadcast_to(params["null_text"],
                                                                 (4, 5, 8)))
  np.testing.assert_array_equal(condition[1::2], batch["text"][1::2])


def test_frozen_text_encoder_path(single):
  table = jnp.asarray(np.random.default_rng(3).normal(size=(11, TINY.condition_dim)),
                      jnp.float32)

  def encode(frozen, ids):
    return frozen["table"][ids]

  setup, step, fresh = single
  with_encoder = Setup(setup.config, text_encoder_fn=encode)
  mesh = single_device_mesh()
  _, shardings = with_encoder.create(mesh)
  encoder_step = with_encoder.jit(mesh, shardings, frozen_shardings=mesh_lib.replicated(mesh))
  ids = jnp.asarray(np.random.default_rng(4).integers(0, 11, (8, TINY.condition_length)))
  batch = tiny_batch()
  by_ids = {"tokens": batch["tokens"], "text_ids": ids, "drop_text": batch["drop_text"]}
  got, got_metrics = encoder_step(fresh(), by_ids, jax.random.key(2), {"table": table})
  want, want_metrics = step(fresh(), {**batch, "text": table[ids]}, jax.random.key(2))
  np.testing.assert_allclose(got_metrics["loss"], want_metrics["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               got.params, want.params)
  # The encoder's table is an input, not state: nothing in the state has its shape.
  assert all(leaf.shape != table.shape for leaf in jax.tree.leaves(got))


def test_nan_features_make_the_step_non_finite(single):
  _, step, fresh = single
  batch = tiny_batch()
  batch["text"] = batch["text"].at[3, 2, 1].set(jnp.nan)
  _, metrics = step(fresh(), batch, jax.random.key(0))
  assert not bool(metrics["finite"])
  _, metrics = step(fresh(), tiny_batch(), jax.random.key(0))
  assert bool(metrics["finite"])


def test_timestep_sampling_uniform_or_importance():
  history = importance.LossHistory(
      lt2=jnp.zeros((10,), jnp.float32).at[7].set(1e6),
      count=jnp.full((10,), 20, jnp.int32))
  t, pt = denoiser_step.sample_timesteps(jax.random.key(0), history, 256, 10, True)
  assert np.mean(np.asarray(t) == 7) > 0.9
  np.testing.assert_allclose(pt, importance.timestep_probs(history)[t])
  t, pt = denoiser_step.sample_timesteps(jax.random.key(0), history, 256, 10, False)
  assert len(np.unique(np.asarray(t))) == 10
  np.testing.assert_allclose(pt, 0.1)
  with pytest.raises(ValueError, match="loss history"):
    denoiser_step.sample_timesteps(jax.random.key(0), None, 8, 10, True)


def test_masked_accuracy_counts_masked_positions_only():
  logits = jax.nn.one_hot(jnp.asarray([[0, 1, 2, 3]]), 4) * 5.0
  x0 = jnp.asarray([[0, 1, 0, 3]])
  x_t = jnp.asarray([[4, 4, 4, 2]])  # [MASK] = 4 at the first three positions
  np.testing.assert_allclose(denoiser_step.masked_accuracy(logits, x0, x_t, 4), 2 / 3)
  assert float(denoiser_step.masked_accuracy(logits, x0, x0, 4)) == 0.0
