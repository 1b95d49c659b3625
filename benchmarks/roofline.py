"""Model FLOP utilisation of our train step and sampler, and where their time goes.

  PYTHONPATH=. python benchmarks/roofline.py [--size tiny|large] [--grids 8 16 32]
      [--batch 8 32] [--steps 25] [--repeats 3] [--dtype float32|bfloat16|mixed]
      [--remat-policy full|minimal] [--attention auto|materialised|per_head]
      [--no-breakdown] [--json out.json]

``--dtype mixed`` keeps activations float32 and runs every matmul on
bfloat16 operands with float32 accumulation (``matmul_dtype="bfloat16"``).

1. Peak: a large square matmul in the compute dtype (mixed: bfloat16
   operands, float32 product), timed in this run; its 2 n^3 FLOPs per second
   are the machine's peak.
2. For each token grid and batch, with the size's network (``SIZES`` of
   benchmarks/vs_diffusers.py): the train step's model FLOPs from XLA's cost
   analysis of the unrolled, non-rematerialised program (XLA counts a loop
   body once, and recomputation is not model work), over the time of the
   step as we run it (scanned, rematerialised blocks; ``--attention``), against the peak.
   Likewise the guided sampler: S times the FLOPs of its one-step program.
3. Where the time goes, at the first grid and the last batch: the train step
   cut short and timed as separate programs (forward; + loss; + backward),
   against the whole step (the rest is AdamW and the EMA); one block's parts
   (self-attention, cross-attention, MLP, forward and backward) times the
   layer count; and the sampler's network calls against the whole sampler
   (the rest is the posterior, sampling and the loop).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness, vs_diffusers
from vqdiffusion_jax.diffusion import discrete
from vqdiffusion_jax.diffusion import schedule as schedules
from vqdiffusion_jax.models import attention, transformer
from vqdiffusion_jax.models.denoiser import Denoiser

TIMESTEPS = vs_diffusers.TIMESTEPS


DTYPES = ("float32", "bfloat16", "mixed")


def _dtypes(dtype: str) -> tuple[str, str]:
  """(compute dtype, matmul dtype) of a ``--dtype`` choice."""
  return ("float32", "bfloat16") if dtype == "mixed" else (dtype, "float32")


def matmul_peak(dtype: str, repeats: int) -> float:
  """FLOP/s of an n x n matmul, n = 2048 on CPU and 8192 on accelerators."""
  n = 2048 if jax.default_backend() == "cpu" else 8192
  operands = "float32" if dtype == "float32" else "bfloat16"
  product = _dtypes(dtype)[0]
  a = jax.random.normal(jax.random.key(0), (n, n), operands)
  matmul = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=product)).lower(a).compile()
  return 2 * n ** 3 / _seconds(lambda: matmul(a).block_until_ready(), repeats)


def _seconds(run, repeats: int) -> float:
  run()  # warm up
  return harness.interleaved({"run": run}, repeats)["run"]


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list | tuple) else analysis
  return float(analysis["flops"])


def network(size: vs_diffusers.Size, dtype: str, *, scan_layers: bool = False,
            remat: bool = False, remat_policy: str = "full", attention: str = "auto"
            ) -> transformer.VQDiffusionTransformer:
  return transformer.VQDiffusionTransformer(transformer.TransformerConfig(
      codebook_size=size.codebook, spatial_size=(size.grid, size.grid),
      num_layers=size.layers, embed_dim=size.dim, num_heads=size.heads,
      condition_dim=size.text_dim, condition_length=size.text_length,
      num_timesteps=TIMESTEPS, conditioning="text", learnable_null_text=True,
      dtype=_dtypes(dtype)[0], matmul_dtype=_dtypes(dtype)[1], scan_layers=scan_layers,
      remat=remat, remat_policy=remat_policy, attention=attention))


# FLOPs are counted on all heads at once: XLA counts the per-head loop's body once.
_COUNTED = "materialised"


def train_row(size, batch: int, dtype: str, peak: float, repeats: int,
              remat_policy: str = "full", attention: str = "auto") -> dict:
  """Model FLOPs, seconds and MFU of the whole train step."""
  step, state, data, _ = vs_diffusers.train_program(network(size, dtype, attention=_COUNTED),
                                                    size, batch)
  flops = _flops(step.lower(state, data, jax.random.key(2)).compile())
  step, state, data, _ = vs_diffusers.train_program(
      network(size, dtype, scan_layers=True, remat=True, remat_policy=remat_policy,
              attention=attention), size, batch)
  seconds = _seconds(vs_diffusers.blocking_steps(step, state, data), repeats)
  return {"work": "train", "grid": size.grid, "batch": batch, "flops": flops,
          "seconds": seconds, "mfu": flops / seconds / peak}


def _init(module):
  return nn.unbox(jax.jit(Denoiser(module).init)(jax.random.key(0))["params"])


def sample_row(size, batch: int, steps: int, dtype: str, peak: float, repeats: int,
               attention: str = "auto") -> dict:
  """Model FLOPs (S x one step), seconds and MFU of the guided sampler."""
  module = network(size, dtype, attention=attention)
  params = _init(module)
  # One network call per step: XLA would count a lax.map body once.
  one_step, _ = vs_diffusers.guided_sampler(network(size, dtype, attention=_COUNTED), params,
                                            size, batch, 1, max_batch=None)
  flops = steps * _flops(one_step)
  seconds = _seconds(vs_diffusers.our_sample(module, params, size, batch, steps), repeats)
  return {"work": f"sample {steps} steps", "grid": size.grid, "batch": batch, "flops": flops,
          "seconds": seconds, "mfu": flops / seconds / peak}


def train_breakdown(size, batch: int, dtype: str, repeats: int,
                    remat_policy: str = "full") -> dict[str, float]:
  """Seconds of the train step cut short, and of the whole step."""
  module = network(size, dtype, scan_layers=True, remat=True, remat_policy=remat_policy)
  params = _init(module)
  schedule = schedules.mask_and_replace(TIMESTEPS, size.codebook)
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.integers(0, size.codebook, (batch, size.num_tokens)), jnp.int32)
  text = jnp.asarray(rng.normal(size=(batch, size.text_length, size.text_dim)), jnp.float32)
  t = jnp.arange(batch, dtype=jnp.int32) % TIMESTEPS
  x_t = discrete.q_sample(schedule, jax.random.key(1), x0, t)
  pt = jnp.full((batch,), 1.0 / TIMESTEPS)

  def forward(p):
    return jnp.sum(module.apply({"params": p}, x_t, t, text))

  def loss(p):
    logits = module.apply({"params": p}, x_t, t, text)
    return discrete.training_losses(schedule, logits, x0, x_t, t, pt,
                                    aux_weight=vs_diffusers.AUX_WEIGHT)["loss"]

  out = {}
  for name, fn in (("forward", forward), ("forward + loss", loss),
                   ("+ backward", jax.grad(loss))):
    compiled = jax.jit(fn).lower(params).compile()
    out[name] = _seconds(lambda c=compiled: jax.block_until_ready(c(params)), repeats)
  step, state, data, _ = vs_diffusers.train_program(module, size, batch)
  out["+ AdamW, EMA (whole step)"] = _seconds(vs_diffusers.blocking_steps(step, state, data),
                                              repeats)
  return out


def block_parts(size, batch: int, dtype: str, repeats: int) -> dict[str, float]:
  """Seconds of each block sublayer's forward and backward, times the layer count."""
  head_dim = size.dim // size.heads
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, size.num_tokens, size.dim)), jnp.float32)
  text = jnp.asarray(rng.normal(size=(batch, size.text_length, size.text_dim)), jnp.float32)
  compute, matmul = _dtypes(dtype)
  attention = transformer.Attention(size.heads, head_dim, dtype=compute, matmul_dtype=matmul)
  parts = {
      "self-attention": (attention, (x, x)),
      "cross-attention": (attention, (x, text)),
      "MLP": (transformer.Mlp(4, dtype=compute, matmul_dtype=matmul), (x,)),
  }
  out = {}
  for name, (module, inputs) in parts.items():
    params = nn.unbox(module.init(jax.random.key(0), *inputs)["params"])

    def fwd_bwd(p, i, module=module):
      return jax.grad(lambda p, i: jnp.sum(module.apply({"params": p}, *i)),
                      argnums=(0, 1))(p, i)

    compiled = jax.jit(fwd_bwd).lower(params, inputs).compile()
    out[name] = size.layers * _seconds(
        lambda c=compiled, p=params, i=inputs: jax.block_until_ready(c(p, i)), repeats)
  return out


def sampler_breakdown(size, batch: int, steps: int, dtype: str,
                      repeats: int) -> dict[str, float]:
  """Seconds of the sampler's S guided network calls, and of the whole sampler."""
  module = network(size, dtype)
  params = _init(module)
  tokens = jnp.full((2 * batch, size.num_tokens), size.codebook, jnp.int32)
  t = jnp.full((2 * batch,), TIMESTEPS - 1, jnp.int32)
  text = jax.random.normal(jax.random.key(1), (2 * batch, size.text_length, size.text_dim))
  call = jax.jit(lambda p: module.apply({"params": p}, tokens, t, text)).lower(params).compile()
  network_s = steps * _seconds(lambda: call(params).block_until_ready(), repeats)
  whole = _seconds(vs_diffusers.our_sample(module, params, size, batch, steps), repeats)
  return {f"{steps} guided network calls": network_s, "whole sampler": whole}


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=sorted(vs_diffusers.SIZES), default="large")
  parser.add_argument("--grids", type=int, nargs="+", default=[8, 16, 32])
  parser.add_argument("--batch", type=int, nargs="+", default=[8, 32])
  parser.add_argument("--steps", type=int, default=25, help="sampler network calls")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", choices=DTYPES,
                      help="compute dtype, or mixed (float32 activations, bfloat16 matmuls); "
                      "default float32 on CPU, bfloat16 elsewhere")
  parser.add_argument("--remat-policy", choices=sorted(transformer.REMAT_POLICIES),
                      default="full", help="what the timed train step's blocks recompute")
  parser.add_argument("--attention", choices=attention.IMPLEMENTATIONS, default="auto",
                      help="the denoiser's attention (auto: per head on CPU from 32x32 tokens)")
  parser.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                      help="skip where the time goes (the rows only)")
  parser.add_argument("--json", help="also write the results to this JSON file")
  args = parser.parse_args()
  if args.repeats < 1:
    parser.error("--repeats must be at least 1")
  if args.dtype is None:
    args.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return args


def _share_table(title: str, seconds: dict[str, float], total: float) -> None:
  print(f"\n{title}\n\n| part | ms | share of whole |\n|---|---:|---:|")
  for name, value in seconds.items():
    print(f"| {name} | {1000 * value:.1f} | {value / total:.0%} |")


def main():
  args = _parse()
  base = vs_diffusers.SIZES[args.size]
  peak = matmul_peak(args.dtype, args.repeats)
  print(f"# roofline on {jax.default_backend()} ({harness.device_name()}), size {args.size} "
        f"({base.layers} layers, dim {base.dim}, K = {base.codebook}), {args.dtype}, "
        f"remat {args.remat_policy}, attention {args.attention}")
  print(f"measured matmul peak: {peak / 1e9:.1f} GFLOP/s\n")
  print("| work | tokens | batch | GFLOP / step | ms / step | GFLOP/s | MFU |")
  print("|---|---|---:|---:|---:|---:|---:|")
  rows = []
  for grid in args.grids:
    size = dataclasses.replace(base, grid=grid)
    for batch in args.batch:
      for row in (train_row(size, batch, args.dtype, peak, args.repeats, args.remat_policy,
                            args.attention),
                  sample_row(size, batch, args.steps, args.dtype, peak, args.repeats,
                             args.attention)):
        rows.append(row)
        print(f"| {row['work']} | {grid}x{grid} | {batch} | {row['flops'] / 1e9:.1f} | "
              f"{1000 * row['seconds']:.1f} | {row['flops'] / row['seconds'] / 1e9:.1f} | "
              f"{row['mfu']:.1%} |", flush=True)
  breakdown = _breakdown(args, base) if args.breakdown else {}
  if args.json:
    with open(args.json, "w") as file:
      json.dump({"device": harness.device_name(), "peak_flops": peak, "rows": rows,
                 **breakdown}, file, indent=1)


def _breakdown(args, base) -> dict:
  """Where the time goes, at the first grid and the last batch: printed and returned."""
  size = dataclasses.replace(base, grid=args.grids[0])
  batch = args.batch[-1]
  train = train_breakdown(size, batch, args.dtype, args.repeats, args.remat_policy)
  whole = train["+ AdamW, EMA (whole step)"]
  _share_table(f"train step, {size.grid}x{size.grid} tokens, batch {batch}: cumulative",
               train, whole)
  parts = block_parts(size, batch, args.dtype, args.repeats)
  _share_table(f"block sublayers x {size.layers} layers, forward + backward, each alone",
               parts, whole)
  sampler = sampler_breakdown(size, batch, args.steps, args.dtype, args.repeats)
  _share_table(f"guided sampler, {args.steps} steps, batch {batch}", sampler,
               sampler["whole sampler"])
  return {"train_breakdown": train, "block_parts": parts, "sampler": sampler}


if __name__ == "__main__":
  main()
