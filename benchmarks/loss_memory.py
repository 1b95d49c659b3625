"""Memory of the training loss and its gradient, from XLA's memory analysis.

  python benchmarks/loss_memory.py [--batch 8 --length 1024 --codes 4096]

Compiles (without running) ``value_and_grad`` of the loss with respect to the
logits, for the fused loss and for the literal one that builds the
posteriors as (B, N, K + 1) arrays, and prints the temporaries XLA allocates
in units of one (B, N, K + 1) float32 tensor.
"""

import argparse

import jax
import jax.numpy as jnp

from vqdiffusion_jax.diffusion import discrete
from vqdiffusion_jax.diffusion import schedule as schedules


def _literal_loss(s, logits, x0, x_t, t, pt):
  vb, aux = discrete.loss_terms(s, discrete.x0_log_probs(logits), x0, x_t, t)
  scale = (1.0 - t / s.num_timesteps) + 1.0
  return jnp.sum(vb / pt + scale * 5e-4 * aux / pt) / x0.size


def _fused_loss(s, logits, x0, x_t, t, pt):
  return discrete.training_losses(s, logits, x0, x_t, t, pt, aux_weight=5e-4)["loss"]


def _memory(loss, batch, length, codes):
  s = schedules.mask_and_replace(100, codes)
  ints = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  compiled = jax.jit(jax.value_and_grad(lambda z, *a: loss(s, z, *a))).lower(
      jax.ShapeDtypeStruct((batch, length, codes), jnp.float32), ints, ints,
      jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.float32)
  ).compile()
  return compiled.memory_analysis()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=1024)
  parser.add_argument("--codes", type=int, default=4096)
  args = parser.parse_args()
  one = args.batch * args.length * (args.codes + 1) * 4
  print(f"B={args.batch} N={args.length} K={args.codes} on {jax.devices()[0].platform}; "
        f"one (B, N, K+1) float32 tensor = {one / 2**20:.1f} MiB")
  print(f"{'loss':<8} {'temporaries MiB':>16} {'x tensor':>9} {'gradient MiB':>13}")
  for name, loss in (("fused", _fused_loss), ("literal", _literal_loss)):
    m = _memory(loss, args.batch, args.length, args.codes)
    print(f"{name:<8} {m.temp_size_in_bytes / 2**20:>16.1f} {m.temp_size_in_bytes / one:>9.2f} "
          f"{m.output_size_in_bytes / 2**20:>13.1f}")


if __name__ == "__main__":
  main()
