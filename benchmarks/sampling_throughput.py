"""Sampling throughput (images/s) of a random-weight denoiser over 16x16 tokens.

  python benchmarks/sampling_throughput.py [--steps 100 25 --batch 1 16 --guidance 1 3
                                            --layers 4 --dim 256 --precision fast float32
                                            --repeats 3 --json out.json]

For every (steps, guidance, batch) setting the whole ``vqdiffusion`` sampler
(``samplers.sample`` over ``samplers.conditioned_log_x0``, every network call
of the loop included) is one jitted program. It is compiled once ahead of
time, then run ``--repeats`` times with ``block_until_ready``; the table gives
the median. Tokens only: no VQ decoding and no text encoding (the condition is
a fixed random (B, 16, 256) array). Guidance > 1 batches the null-text pass
with the conditional one, doubling the network's batch. Runs on the default
JAX backend. ``--precision`` names the denoiser's matmuls as
``Pipeline.from_pretrained`` does ("fast": bfloat16 products where the machine
has bfloat16 units, else float32; "float32"; "bfloat16").
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks import harness
from vqdiffusion_jax.diffusion import samplers
from vqdiffusion_jax.diffusion import schedule as schedules
from vqdiffusion_jax.models import precision as mixed_precision
from vqdiffusion_jax.models.transformer import TransformerConfig, VQDiffusionTransformer

CODEBOOK, GRID, TEXT_LENGTH, TEXT_DIM, TIMESTEPS = 256, (16, 16), 16, 256, 100


def _model(layers: int, dim: int, heads: int, matmul_dtype: str = "float32"):
  config = TransformerConfig(
      codebook_size=CODEBOOK, spatial_size=GRID, num_layers=layers, embed_dim=dim,
      num_heads=heads, condition_dim=TEXT_DIM, condition_length=TEXT_LENGTH,
      num_timesteps=TIMESTEPS, conditioning="text", learnable_null_text=True,
      matmul_dtype=matmul_dtype)
  model = VQDiffusionTransformer(config)
  tokens = jnp.zeros((1, config.num_tokens), jnp.int32)
  condition = jnp.zeros((1, TEXT_LENGTH, TEXT_DIM))
  params = model.init(jax.random.key(0), tokens, jnp.zeros((1,), jnp.int32), condition)["params"]
  return model, params, config.num_tokens


def _measure(model, params, schedule, num_tokens, steps, guidance, batch, repeats) -> dict:
  condition = jax.random.normal(jax.random.key(1), (batch, TEXT_LENGTH, TEXT_DIM))
  rng = jax.random.key(2)
  start = time.perf_counter()
  config = samplers.SamplerConfig(name="vqdiffusion", num_inference_steps=steps,
                                  guidance_scale=guidance)
  compiled = harness.sampler_program(model, schedule, num_tokens, config, batch).lower(
      params, condition, rng).compile()
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, condition, rng))
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  return {"steps": steps, "guidance": guidance, "batch": batch, "seconds_per_batch": seconds,
          "images_per_s": batch / seconds, "compile_s": compile_s, "times": times}


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, nargs="+", default=[100, 25],
                      help="network calls per image (visited diffusion steps)")
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
  parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0],
                      help="classifier-free guidance scales; 1 = off")
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--precision", nargs="+", default=["float32"],
                      choices=mixed_precision.SAMPLING_PRECISIONS,
                      help="the denoiser's matmuls, as Pipeline.from_pretrained's precision")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", help="also write the results to this JSON file")
  args = parser.parse_args()
  if args.repeats < 1:
    parser.error("--repeats must be at least 1")
  return args


def main():
  args = _parse()
  schedule = schedules.mask_and_replace(TIMESTEPS, CODEBOOK)
  header = {"backend": jax.default_backend(), "device": harness.device_name(),
            "layers": args.layers, "dim": args.dim, "heads": args.heads,
            "tokens": f"{GRID[0]}x{GRID[1]}", "codebook": CODEBOOK, "timesteps": TIMESTEPS,
            "repeats": args.repeats}
  print(f"# vqdiffusion sampler throughput on {header['backend']} ({header['device']})")
  print(f"random weights: {args.layers} layers, dim {args.dim}, {args.heads} heads, "
        f"K = {CODEBOOK}, {header['tokens']} tokens, text {TEXT_LENGTH} x {TEXT_DIM}, T = "
        f"{TIMESTEPS}; tokens only (no VQ decoding, no text encoding); median of "
        f"{args.repeats} runs after compiling\n")
  print("| precision | matmuls | steps | guidance | batch | s / batch | images / s | compile s |")
  print("|---|---|------:|---------:|------:|----------:|-----------:|----------:|")
  results = []
  for name in args.precision:
    matmul_dtype = mixed_precision.sampling_matmul_dtype(name)
    model, params, num_tokens = _model(args.layers, args.dim, args.heads, matmul_dtype)
    for steps in args.steps:
      for guidance in args.guidance:
        for batch in args.batch:
          row = {"precision": name, "matmul_dtype": matmul_dtype,
                 **_measure(model, params, schedule, num_tokens, steps, guidance, batch,
                            args.repeats)}
          results.append(row)
          print(f"| {name} | {matmul_dtype} | {steps} | {guidance:g} | {batch} | "
                f"{row['seconds_per_batch']:.3f} | {row['images_per_s']:.2f} | "
                f"{row['compile_s']:.1f} |", flush=True)
  if args.json:
    with open(args.json, "w") as file:
      json.dump({**header, "results": results}, file, indent=1)


if __name__ == "__main__":
  main()
