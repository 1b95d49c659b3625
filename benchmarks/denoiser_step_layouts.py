"""Train-step time of the embedded default's denoiser under four block layouts.

  PYTHONPATH=. python benchmarks/denoiser_step_layouts.py [--batch 32] [--repeats 7]
      [--layouts loop scan scan+remat scan+minimal-remat] [--matmul-dtypes float32 bfloat16]
      [--steps-per-call 1 10] [--weight-grads cotangent_first operand_first]

Builds the denoiser of ``configs/shapes.py`` (4 x 128, 8 x 8 tokens, K = 512,
a 24 x 128 trained text encoder, pooled text) with random weights and times
one full train step (text encoder, forward, loss, backward, AdamW, EMA) with
the blocks as a Python loop, under ``nn.scan``, under ``nn.scan`` with
rematerialisation, and with the "minimal" remat policy (the weight products
kept, the rest recomputed), for each matmul dtype asked for. Timings are interleaved
(A B C A B C ...); the table gives medians, the speed-up over the first row,
and per step the minor page faults and system CPU time (``getrusage``): XLA:CPU
maps its temporary buffer afresh on every call, and the kernel zeroes each
page on first touch. ``--steps-per-call`` also times several steps in one
call (``runner.scan_steps`` over stacked batches, as ``train.steps_per_call``).
``--weight-grads`` times the bfloat16 weight cotangents of the denoiser's
narrowing matmuls (the MLP's second layer) in both orders of
``precision._rhs_cotangent`` (``TransformerConfig.weight_grads``): XLA:CPU
copies the first operand into a transposed layout.

XLA:CPU fuses the backward pass's chain of residual cotangents into every
consumer of it, transposed copies included, so an unrolled stack recomputes
that chain many times; a scanned body bounds it to one block.
"""

import argparse
import dataclasses
import itertools
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import shapes as shapes_config
from vqdiffusion_jax import build
from vqdiffusion_jax.models import precision
from vqdiffusion_jax.models.conditioned import TextConditionedDenoiser
from vqdiffusion_jax.models.denoiser import Denoiser
from vqdiffusion_jax.train import denoiser_step, runner
from vqdiffusion_jax.train import mesh as mesh_lib
from vqdiffusion_jax.train import state as state_lib

# name: (scan_layers, remat, remat_policy)
LAYOUTS = {"loop": (False, False, "full"), "scan": (True, False, "full"),
           "scan+remat": (True, True, "full"), "scan+minimal-remat": (True, True, "minimal")}
VOCAB = 32


def build_step(config, scan_layers: bool, remat: bool, remat_policy: str, batch: int,
               steps_per_call: int = 1, weight_grads: str = "cotangent_first"):
  """(jitted step, state, batch) for one layout; stacked batches for several steps per call."""
  text = config.text
  network = build.denoiser(config, codebook_size=int(config.vqvae.model.num_embeddings),
                           grid=build.latent_grid(config), vocab_size=VOCAB).network
  cfg = dataclasses.replace(network.config, scan_layers=scan_layers, remat=remat,
                            remat_policy=remat_policy, weight_grads=weight_grads)
  denoiser = Denoiser(TextConditionedDenoiser(cfg, network.text_encoder))
  schedule = build.schedule(config, cfg.codebook_size)
  optimizer = state_lib.make_optimizer(config.optim, int(config.train.num_steps))
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  state, _ = state_lib.create_state(
      jax.random.key(0), denoiser.init, optimizer, mesh, config.mesh.rules,
      history_timesteps=cfg.num_timesteps)
  rng = np.random.default_rng(0)
  data = {"tokens": jnp.asarray(rng.integers(0, cfg.codebook_size, (batch, cfg.num_tokens)),
                                jnp.int32),
          "text_ids": jnp.asarray(rng.integers(4, VOCAB, (batch, text.length)), jnp.int32),
          "drop_text": jnp.zeros((batch,), bool)}
  step = denoiser_step.make_train_step(denoiser, schedule, config, config.diffusion, optimizer)
  if steps_per_call > 1:
    step = runner.scan_steps(step)
    data = jax.tree.map(lambda x: jnp.stack([x] * steps_per_call), data)
  return jax.jit(step), state, data


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--steps", type=int, default=5,
                      help="steps per timed repeat (rounded up to whole calls)")
  parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
  parser.add_argument("--matmul-dtypes", nargs="+", choices=precision.MATMUL_DTYPES,
                      default=["float32"])
  parser.add_argument("--steps-per-call", type=int, nargs="+", default=[1])
  parser.add_argument("--weight-grads", nargs="+", choices=precision.WEIGHT_GRAD_ORDERS,
                      default=["cotangent_first"])
  args = parser.parse_args()
  key = jax.random.key(1)
  runs = {}
  for matmul_dtype in args.matmul_dtypes:
    config = shapes_config.get_config()
    with config.unlocked():
      config.train.matmul_dtype = matmul_dtype
    for layout, per_call, order in itertools.product(args.layouts, args.steps_per_call,
                                                     args.weight_grads):
      step, state, data = build_step(config, *LAYOUTS[layout], args.batch, per_call, order)
      jax.block_until_ready(step(state, data, key))  # compile
      name = (f"{layout}, {matmul_dtype}" + (f", {per_call} per call" if per_call > 1 else "")
              + (f", {order}" if len(args.weight_grads) > 1 else ""))
      runs[name] = (step, state, data, per_call)
  seconds = {name: [] for name in runs}
  faults = {name: [] for name in runs}
  system = {name: [] for name in runs}
  for _ in range(args.repeats):
    for name, (step, state, data, per_call) in runs.items():
      calls = -(-args.steps // per_call)
      before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
      for _ in range(calls):
        out = step(state, data, key)
      jax.block_until_ready(out)
      steps = calls * per_call
      seconds[name].append((time.perf_counter() - start) / steps)
      after = resource.getrusage(resource.RUSAGE_SELF)
      faults[name].append((after.ru_minflt - before.ru_minflt) / steps)
      system[name].append((after.ru_stime - before.ru_stime) / steps)
  base = statistics.median(next(iter(seconds.values())))
  print(f"denoiser train step, batch {args.batch}, {jax.devices()[0].platform}")
  print("| layout, matmuls | ms / step (median) | samples/s | speed-up | page faults / step "
        "| system CPU ms / step |")
  print("|---|---|---|---|---|---|")
  for name, times in seconds.items():
    median = statistics.median(times)
    fault_count, system_ms = statistics.median(faults[name]), 1000 * statistics.median(system[name])
    print(f"| {name} | {1000 * median:.1f} | {args.batch / median:.1f} | {base / median:.2f}x "
          f"| {fault_count:.0f} | {system_ms:.0f} |")


if __name__ == "__main__":
  main()
