"""Plan a run before renting the hardware: compile its train step ahead of time.

  python -m vqdiffusion_jax.plan --config=configs/ithq_large.py --devices=32 \
      [--config.train.global_batch=512] [--config.mesh.shape.fsdp=8]

The denoiser's train step (the transformer's or Paella's) is lowered and
compiled for ``--devices`` fake CPU devices from abstract inputs (nothing is
allocated) with the config's mesh and sharding rules; the command prints
XLA's per-device memory (the state, batch and temporaries), FLOPs per step,
and how the largest parameters and their optimizer moments are sharded. CPU
compilation stands in for the accelerator's, so memory figures are
indicative (layouts and fusion differ by backend), not a guarantee.
"""

from __future__ import annotations

import functools
import os
import sys


def _force_devices(argv: list[str]) -> None:
  """Asks XLA for enough CPU devices; must run before jax is imported."""
  count = next((a.split("=", 1)[1] for a in argv if a.startswith("--devices=")), "8")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={count}")
  os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
  _force_devices(sys.argv)

from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from vqdiffusion_jax import build, config_flag, outputs  # noqa: E402
from vqdiffusion_jax.models import clip_text  # noqa: E402
from vqdiffusion_jax.models.denoiser import Denoiser  # noqa: E402
from vqdiffusion_jax.models.text_encoder import SPECIAL_TOKENS  # noqa: E402
from vqdiffusion_jax.train import compiled as compiled_lib  # noqa: E402
from vqdiffusion_jax.train import denoiser_step  # noqa: E402
from vqdiffusion_jax.train import mesh as mesh_lib  # noqa: E402
from vqdiffusion_jax.train import state as state_lib  # noqa: E402


def _model(config: Any) -> tuple[Denoiser, Any]:
  """(denoiser, abstract frozen params) as the run would build them, from the config alone.

  A trained text encoder gets the largest vocabulary the config allows; CLIP
  is the ViT-B/32 text tower, its params abstract.
  """
  geometry = {"codebook_size": int(config.vqvae.model.num_embeddings),
              "grid": build.latent_grid(config)}
  if config.text.kind == "trainable":
    vocab_size = int(config.text.max_vocab) + len(SPECIAL_TOKENS)
    return build.denoiser(config, vocab_size=vocab_size, **geometry), None
  clip = clip_text.CLIPTextTransformer()
  frozen = jax.eval_shape(clip.init, jax.random.key(0),
                          jnp.zeros((1, clip.max_positions), jnp.int32))["params"]
  return build.denoiser(config, clip=clip, **geometry), frozen


def _abstract(tree: Any, sharding) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def plan(config: Any, num_devices: int) -> dict:
  """Compiles the denoiser train step for ``num_devices`` devices; returns figures.

  Returns:
    Per-device bytes (``arguments``, ``outputs``, ``temporaries``,
    ``aliased``, ``peak`` = arguments + outputs + temporaries - aliased),
    ``flops`` per step and device, ``params`` (count) and ``shardings`` (the
    largest parameters' PartitionSpecs).
  """
  devices = jax.devices()[:num_devices]
  if len(devices) < num_devices:
    raise ValueError(f"{num_devices} devices asked for, {len(devices)} available; run "
                     "as `python -m vqdiffusion_jax.plan --devices=N`")
  mesh = mesh_lib.make_mesh(config.mesh.to_dict(), devices=devices)
  denoiser, frozen = _model(config)
  grid = build.latent_grid(config)
  schedule = build.schedule(config, denoiser.codebook_size)
  optimizer = state_lib.make_optimizer(config.optim, int(config.train.num_steps))
  importance_sampling = config.diffusion.importance_sampling and not denoiser.resizable
  state = state_lib.abstract_state(
      jax.random.key(0), functools.partial(denoiser.init, grid=grid), optimizer, mesh,
      config.mesh.rules,
      history_timesteps=denoiser.num_timesteps if importance_sampling else None)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  global_batch = int(config.train.global_batch)
  mesh_lib.batch_block(mesh, global_batch, "train.global_batch")
  batch = {"tokens": jnp.zeros((global_batch, grid[0] * grid[1]), jnp.int32),
           "drop_text": jnp.zeros((global_batch,), bool)}
  if denoiser.conditioning == "text":
    batch["text_ids"] = jnp.zeros((global_batch, denoiser.condition_shape()[0]), jnp.int32)
  if denoiser.conditioning == "class":
    batch["label"] = jnp.zeros((global_batch,), jnp.int32)
  batch = _abstract(batch, batch_sharding)
  replicated = mesh_lib.replicated(mesh)
  step = denoiser_step.make_train_step(denoiser, schedule, config, config.diffusion, optimizer,
                                       grid=grid)
  frozen_shardings = None if frozen is None else jax.tree.map(lambda _: replicated, frozen)
  jitted = denoiser_step.jit_train_step(step, mesh, shardings, batch_sharding,
                                        frozen_shardings=frozen_shardings)
  args = (state, batch, jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated))
  if frozen is not None:
    args += (_abstract(frozen, replicated),)
  compiled = jitted.lower(*args).compile()
  return _figures(compiled, state)


def _figures(compiled, state) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  out = compiled_lib.memory_figures(compiled)
  out["flops"] = float(cost.get("flops", 0.0)) if cost else 0.0
  leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
  out["params"] = int(sum(np.prod(leaf.shape) for _, leaf in leaves))
  largest = sorted(leaves, key=lambda kv: -np.prod(kv[1].shape))[:6]
  out["shardings"] = [(jax.tree_util.keystr(path), tuple(leaf.shape), str(leaf.sharding.spec))
                      for path, leaf in largest]
  return out


def report(config: Any, num_devices: int, figures: dict) -> str:
  lines = [f"{num_devices} devices, mesh {dict(config.mesh.shape)}, global batch "
           f"{config.train.global_batch}, dtype {config.train.dtype}, matmuls "
           f"{build.denoiser_matmul_dtype(config)}, "
           f"remat {config.train.remat}, params {figures['params'] / 1e6:.1f}M",
           compiled_lib.describe_memory(figures),
           f"FLOPs per step per device: {figures['flops'] / 1e12:.2f} TFLOP"
           + (" (XLA counts a scanned layer's body once: this is a lower bound)"
              if config.train.scan_layers else ""),
           "largest parameters (sharding of params and their Adam moments):"]
  lines += [f"  {path} {shape} -> {spec}" for path, shape, spec in figures["shardings"]]
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  outputs.quiet_logging(outputs.absl_verbosity())
  config = flags.FLAGS.config
  devices = flags.FLAGS.devices
  # What is wrong with the config against the devices names its keys and values.
  with outputs.bad_input_is_one_line(ValueError):
    figures = plan(config, devices)
  print(report(config, devices, figures))


if __name__ == "__main__":
  config_flag.define("config", "Experiment config file.")
  flags.DEFINE_integer("devices", 8, "Number of devices to plan for.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
