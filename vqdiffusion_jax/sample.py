"""Samples a grid of images from a trained run or a converted checkpoint.

  python -m vqdiffusion_jax.sample --workdir runs/shapes \\
      --prompt "a big red circle in the center" [--prompt ...] \\
      [--num 4 --steps 25 --guidance 3 --sampler purity --truncation 1 --seed 0] \\
      [--batch_size 64] --out grid.png

Each prompt gets ``--num`` images, one grid row per prompt; the prompts are
written beside the grid (``grid.txt``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from vqdiffusion_jax import outputs
from vqdiffusion_jax.diffusion.samplers import SAMPLERS
from vqdiffusion_jax.pipeline import Pipeline, make_grid


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m vqdiffusion_jax.sample",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True,
                      help="A training workdir or a converted checkpoint directory.")
  parser.add_argument("--prompt", action="append", required=True, dest="prompts",
                      help="A text prompt; repeat for several.")
  parser.add_argument("--num", type=int, default=4, help="Images per prompt.")
  parser.add_argument("--steps", type=int, default=None,
                      help="Network calls (default: every step).")
  parser.add_argument("--guidance", type=float, default=1.0,
                      help="Classifier-free guidance scale (1 = off).")
  parser.add_argument("--sampler", default="vqdiffusion", choices=SAMPLERS)
  parser.add_argument("--truncation", type=float, default=1.0, help="Truncation rate (1 = off).")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--raw-weights", action="store_true",
                      help="Use a workdir's raw params instead of their EMA.")
  parser.add_argument("--batch_size", type=int, default=64,
                      help="Images per sampling call; more prompts are sampled in turns.")
  parser.add_argument("--out", default="samples.png", help="Where to write the PNG grid.")
  outputs.add_verbosity_argument(parser)
  args = parser.parse_args(argv)
  for name in ("num", "batch_size"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
  return args


def sample_prompts(pipe: Pipeline, args: argparse.Namespace) -> list:
  """Every prompt's ``--num`` images, whole prompts per call, with a progress line.

  Each call draws from ``seed + index of its first image``, so a request that
  fits one call gives what ``pipe(..., seed=seed)`` gives.
  """
  per_call = max(1, args.batch_size // args.num)
  total = len(args.prompts) * args.num
  progress = outputs.Progress(total, name="sampling", unit="images")
  images = []
  for start in range(0, len(args.prompts), per_call):
    images += pipe(args.prompts[start:start + per_call], num_images_per_prompt=args.num,
                   num_inference_steps=args.steps, guidance_scale=args.guidance,
                   truncation_rate=args.truncation, sampler=args.sampler,
                   seed=args.seed + start * args.num)
    progress.update(len(images))
  progress.close()
  return images


def main(argv: Sequence[str] | None = None) -> str:
  args = parse_args(argv)
  outputs.quiet_logging(args.verbosity)
  pipe = Pipeline.from_pretrained(args.workdir, use_ema=not args.raw_weights)
  images = sample_prompts(pipe, args)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  make_grid(images, columns=args.num).save(args.out)
  with open(os.path.splitext(args.out)[0] + ".txt", "w") as f:
    f.write("\n".join(args.prompts) + "\n")
  print(f"wrote {len(images)} images to {args.out}")
  return args.out


if __name__ == "__main__":
  main()
