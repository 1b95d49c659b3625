"""What bounds our CPU speed against diffusers: matmul kernels, and where each step's time goes.

  PYTHONPATH=. python benchmarks/limits.py [--size tiny|large] [--train-batch 32]
      [--sample-batch 16] [--steps 25] [--repeats 5] [--precision bfloat16|float32]
      [--their-precision float32|bfloat16] [--json out.json]

1. Kernels: the matmuls of the size's network at the train batch (projection
   D -> D, the MLP D -> 4D -> D, attention scores and values per head), ten
   chained products per timed call on both sides, each in its matmul dtype:
   ours jitted (bfloat16 operands accumulate in float32, as
   ``matmul_dtype="bfloat16"`` runs them), theirs eager PyTorch writing into
   preallocated outputs, so neither side's allocation is timed.
2. Profiles: our train step and guided sampler traced with ``jax.profiler``,
   their train step and sampler with ``torch.profiler``; op time summed by kind
   (matmuls against everything else), with the wall time of the profiled calls,
   and the ratio ours / diffusers would reach if every op but our matmuls
   took no time: the most that faster elementwise code could give.
   XLA:CPU names a fused matmul ``ynn_fusion``; its time includes the norm,
   bias or activation fused into it. Convolutions that YNNPACK runs are
   ``ynn_fusion`` too; "convolution" counts the ones XLA:CPU runs itself.
   On PyTorch's side ``TORCH_MATMULS`` counts its fused CPU attention
   kernels as matmuls, softmax included, and ``TORCH_CONVOLUTIONS`` its
   convolutions.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import pathlib
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import torch

from benchmarks import harness, vs_diffusers

CHAIN = 10  # products per timed kernel call

# XLA:CPU op names (trailing ".N" dropped) by kind; the first pattern that matches wins.
XLA_KINDS = (
    ("matmul", r"^(ynn_fusion|dot|dot_general|onednn_fusion|xnn_fusion)$"),
    ("convolution", r"^(wrapped_)?convolution"),
    ("layout copy", r"(transpose|copy)"),
    ("dtype convert", r"^(wrapped_)?convert"),
    ("loop and buffer init", r"(while|dynamic-update-slice|dynamic-slice|wrapped_broadcast"
                             r"|call|conditional)"),
    ("elementwise and reductions", r"."),
)
TORCH_MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                 "aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}
TORCH_CONVOLUTIONS = {"aten::mkldnn_convolution", "aten::_convolution", "aten::convolution",
                      "aten::_slow_conv2d_forward", "aten::thnn_conv2d"}
_RUNTIME_EVENTS = ("ThunkExecutor", "SlinkyThreadPool", "end: ")


def xla_kind(op_name: str) -> str:
  """The kind of an XLA:CPU thunk, from its HLO name (``XLA_KINDS``)."""
  base = re.sub(r"\.\d+$", "", op_name)
  return next(kind for kind, pattern in XLA_KINDS if re.search(pattern, base))


def kernel_shapes(size: vs_diffusers.Size, batch: int) -> dict[str, tuple]:
  """``name -> (batch dims, m, chain of widths)``: each product maps the last width to the next."""
  tokens = batch * size.num_tokens
  heads = batch * size.heads
  head_dim = size.dim // size.heads
  return {"projection D -> D": ((), tokens, (size.dim, size.dim)),
          "MLP D -> 4D -> D": ((), tokens, (size.dim, 4 * size.dim, size.dim)),
          "attention scores, values": ((heads,), size.num_tokens,
                                       (head_dim, size.num_tokens, head_dim))}


def _kernel_flops(batch_dims, rows, widths) -> float:
  products = sum(a * b for a, b in itertools.pairwise(widths))
  return 2.0 * CHAIN * rows * products * (batch_dims[0] if batch_dims else 1) / (len(widths) - 1)


def our_kernel(batch_dims, rows, widths, dtype):
  """A blocking call of CHAIN jitted products (float32 accumulation for bfloat16 operands)."""
  rng = jax.random.key(0)
  x = jax.random.normal(rng, (*batch_dims, rows, widths[0]), dtype)
  weights = [jax.random.normal(rng, (*batch_dims, a, b), dtype) / a ** 0.5
             for a, b in itertools.pairwise(widths)]

  def chain(x, weights):
    for i in range(CHAIN):
      w = weights[i % len(weights)]
      x = jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(dtype)
    return x

  run = jax.jit(chain)
  return lambda: run(x, weights).block_until_ready()


def their_kernel(batch_dims, rows, widths, dtype):
  """A blocking call of CHAIN eager PyTorch products into preallocated outputs."""
  x = torch.randn((*batch_dims, rows, widths[0]), dtype=dtype)
  weights = [torch.randn((*batch_dims, a, b), dtype=dtype) / a ** 0.5
             for a, b in itertools.pairwise(widths)]
  outs = [[torch.empty((*batch_dims, rows, b), dtype=dtype) for _ in range(2)]
          for b in widths[1:]]  # two per width, so no product writes over its own input

  @torch.no_grad()
  def run():
    y = x
    for i in range(CHAIN):
      k = i % len(weights)
      y = torch.matmul(y, weights[k], out=outs[k][i // len(weights) % 2])
    return y

  return run


def kernel_rows(size, batch: int, precision: str, their_precision: str, repeats: int):
  rows = []
  for name, (batch_dims, m, widths) in kernel_shapes(size, batch).items():
    ours = our_kernel(batch_dims, m, widths, jnp.dtype(precision))
    theirs = their_kernel(batch_dims, m, widths, getattr(torch, their_precision))
    ours(), theirs()
    seconds = harness.interleaved({"ours": ours, "theirs": theirs}, repeats)
    flops = _kernel_flops(batch_dims, m, widths)
    row = {"kernel": name, "ours_gflops": flops / seconds["ours"] / 1e9,
           "theirs_gflops": flops / seconds["theirs"] / 1e9}
    row["ratio"] = row["ours_gflops"] / row["theirs_gflops"]
    rows.append(row)
    print(f"| {name} | {row['ours_gflops']:.0f} | {row['theirs_gflops']:.0f} | "
          f"{row['ratio']:.2f}x |", flush=True)
  return rows


def _shares(seconds_by_kind: dict[str, float], wall: float, calls: int) -> dict:
  total = sum(seconds_by_kind.values())
  return {"wall_ms": 1e3 * wall / calls, "op_ms": 1e3 * total / calls,
          "shares": {kind: s / total for kind, s in sorted(seconds_by_kind.items(),
                                                           key=lambda item: -item[1])}}


def our_profile(run, calls: int) -> dict:
  """Op time of ``calls`` blocking runs of a jitted program, by ``xla_kind``."""
  run()
  with tempfile.TemporaryDirectory() as logdir:
    start = time.perf_counter()
    jax.profiler.start_trace(logdir)
    for _ in range(calls):
      run()
    jax.profiler.stop_trace()
    wall = time.perf_counter() - start
    trace = next(pathlib.Path(logdir).rglob("*.xplane.pb"))
    data = jax.profiler.ProfileData.from_file(str(trace))
  seconds = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if "XLA" not in line.name:
        continue
      for event in line.events:
        if not event.name.startswith(_RUNTIME_EVENTS):
          seconds[xla_kind(event.name)] += event.duration_ns * 1e-9
  return _shares(seconds, wall, calls)


def their_profile(run, calls: int) -> dict:
  """Self CPU time of ``calls`` eager PyTorch runs, matmul kernels against the other ops."""
  run()
  start = time.perf_counter()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
    for _ in range(calls):
      run()
  wall = time.perf_counter() - start
  seconds = collections.Counter()
  for event in profile.key_averages():
    kind = ("matmul" if event.key in TORCH_MATMULS else
            "convolution" if event.key in TORCH_CONVOLUTIONS else "everything else")
    seconds[kind] += event.self_cpu_time_total * 1e-6
  return _shares(seconds, wall, calls)


def _print_profile(work: str, side: str, profile: dict) -> None:
  shares = ", ".join(f"{kind} {100 * share:.0f}%" for kind, share in profile["shares"].items())
  print(f"| {work} | {side} | {profile['wall_ms']:.0f} | {profile['op_ms']:.0f} | {shares} |",
        flush=True)


def profile_rows(size, args) -> list[dict]:
  model, null = vs_diffusers.diffusers_denoiser(size)
  module, params = vs_diffusers.our_denoiser(model, null, size, scan_layers=True, remat=True)
  module = module.clone(config=dataclasses.replace(
      module.config, matmul_dtype=args.precision, remat_policy="minimal"))
  works = {
      f"train, batch {args.train_batch}": (
          vs_diffusers.our_train(module, params, size, args.train_batch),
          vs_diffusers.their_train(model, null, size, args.train_batch, args.their_precision)),
      f"guided sampler, {args.steps} steps, batch {args.sample_batch}": (
          vs_diffusers.our_sample(module, params, size, args.sample_batch, args.steps),
          vs_diffusers.their_sample(model, null, size, args.sample_batch, args.steps,
                                    args.their_precision)),
  }
  rows = []
  for work, (ours, theirs) in works.items():
    profiles = {"ours": our_profile(ours, args.repeats),
                "diffusers": their_profile(theirs, args.repeats)}
    for side, profile in profiles.items():
      _print_profile(work, side, profile)
      rows.append({"work": work, "side": side, **profile})
    rows[-1]["matmul_bound"] = matmul_bound(profiles["ours"], profiles["diffusers"])
    print(f"| {work} | ours / diffusers if all but our matmuls took no time | "
          f"{rows[-1]['matmul_bound']:.2f}x | | |", flush=True)
  return rows


def matmul_bound(ours: dict, theirs: dict) -> float:
  """Our best possible speed ratio if every op but our matmuls were free (Amdahl's bound)."""
  our_matmul_ms = ours["wall_ms"] * ours["shares"].get("matmul", 0.0)
  return theirs["wall_ms"] / our_matmul_ms if our_matmul_ms else float("inf")


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=sorted(vs_diffusers.SIZES), default="tiny")
  parser.add_argument("--train-batch", type=int, default=32)
  parser.add_argument("--sample-batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=25, help="network calls of the sampler")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--precision", choices=vs_diffusers.PRECISIONS, default="bfloat16",
                      help="our matmul dtype")
  parser.add_argument("--their-precision", choices=vs_diffusers.PRECISIONS, default="float32",
                      help="diffusers' matmul dtype (bfloat16 through torch.autocast)")
  parser.add_argument("--json", help="also write the rows to this JSON file")
  args = parser.parse_args()
  if min(args.train_batch, args.sample_batch, args.steps, args.repeats) < 1:
    parser.error("batches, --steps and --repeats must be at least 1")
  return args


def main():
  args = _parse()
  size = vs_diffusers.SIZES[args.size]
  print(f"# what bounds vqdiffusion-jax against torch {torch.__version__} on "
        f"{harness.device_name()}, size {args.size}; matmuls: ours {args.precision}, "
        f"theirs {args.their_precision}\n")
  print(f"| kernel (batch {args.train_batch}, {CHAIN} chained products) | ours GFLOP/s | "
        "PyTorch GFLOP/s | ours / PyTorch |")
  print("|---|---:|---:|---:|")
  kernels = kernel_rows(size, args.train_batch, args.precision, args.their_precision,
                        args.repeats)
  print("\n| work | side | wall ms / call | op ms / call | op time by kind |")
  print("|---|---|---:|---:|---|")
  profiles = profile_rows(size, args)
  if args.json:
    with open(args.json, "w") as file:
      json.dump({"device": harness.device_name(), "size": args.size, "kernels": kernels,
                 "profiles": profiles}, file, indent=1)


if __name__ == "__main__":
  main()
