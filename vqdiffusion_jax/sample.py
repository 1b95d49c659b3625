"""Samples a grid of images from a trained run or a converted checkpoint.

  python -m vqdiffusion_jax.sample --workdir runs/shapes \\
      --prompt "a big red circle in the center" [--prompt ...] \\
      [--num 4 --steps 25 --guidance 3 --sampler purity --truncation 1 --seed 0] \\
      [--batch_size 64 --precision fast] --out grid.png
  python -m vqdiffusion_jax.sample --workdir ckpt/imagenet --class_labels 1 207 --guidance 3
  python -m vqdiffusion_jax.sample --workdir ckpt/ffhq --num_images 16

A text model takes prompts, a class-conditional one ``--class_labels``; each
prompt or label gets ``--num`` images, one grid row each, and the prompts or
labels are written beside the grid (``grid.txt``). An unconditional model
draws ``--num_images`` images in rows of ``--num``.

Every flag and the ``--out`` path (an image extension, a folder that can be
written) are checked before the model is loaded, the prompts before anything
is sampled: an empty prompt or words a trained text encoder never saw warn,
or with ``--unknown_words error`` stop the command. A bad input ends the
command with one ``error:`` line naming it (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from etils import epath

from vqdiffusion_jax import inputs, loading, outputs, values
from vqdiffusion_jax.diffusion.samplers import SAMPLERS
from vqdiffusion_jax.pipeline import Pipeline, make_grid


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m vqdiffusion_jax.sample",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True,
                      help="A training workdir or a converted checkpoint directory.")
  condition = parser.add_mutually_exclusive_group(required=True)
  condition.add_argument("--prompt", action="append", dest="prompts",
                         help="A text prompt (text models); repeat for several.")
  condition.add_argument("--class_labels", type=int, nargs="+",
                         help="Class labels (class-conditional models), e.g. 1 207.")
  condition.add_argument("--num_images", type=int,
                         help="How many images to draw from an unconditional model.")
  parser.add_argument("--num", type=int, default=4,
                      help="Images per prompt or label (unconditional: images per grid row).")
  parser.add_argument("--steps", type=int, default=None,
                      help="Network calls (default: every step).")
  parser.add_argument("--guidance", type=float, default=1.0,
                      help="Classifier-free guidance scale (1 = off).")
  parser.add_argument("--sampler", default="vqdiffusion", choices=SAMPLERS)
  parser.add_argument("--max_reveal_per_call", type=int, default=None,
                      help="The official prior_ps of fewer_tokens_official and purity_official: "
                           "at most this many tokens per network call (default: 1024).")
  parser.add_argument("--truncation", type=float, default=1.0, help="Truncation rate (1 = off).")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--raw-weights", action="store_true",
                      help="Use a workdir's raw params instead of their EMA.")
  parser.add_argument("--batch_size", type=int, default=64,
                      help="Images per sampling call; more are sampled in turns.")
  parser.add_argument("--out", default="samples.png",
                      help="Where to write the grid (an image file: .png, .jpg, ...).")
  inputs.add_precision_argument(parser)
  parser.add_argument("--unknown_words", default="warn", choices=inputs.UNKNOWN_WORDS_MODES,
                      help="What an empty prompt, or a word the trained text encoder never "
                           "saw, does: warn, error (stop before sampling) or ignore.")
  outputs.add_verbosity_argument(parser)
  args = parser.parse_args(argv)
  try:
    check_flags(args)
  except ValueError as error:
    parser.error(str(error))
  return args


def check_flags(args: argparse.Namespace) -> None:
  """A ValueError naming the first flag whose value is not allowed."""
  for name in ("num", "batch_size"):
    values.positive_int(f"--{name}", getattr(args, name))
  values.optional_positive_int("--num_images", args.num_images)
  if args.class_labels is not None:
    for label in args.class_labels:
      values.non_negative_int("--class_labels", label)
  if args.prompts is not None:
    inputs.prompt_list("--prompt", args.prompts)
  values.seed("--seed", args.seed)
  inputs.sampler_options(**_options(args, with_sampler=False), names=FLAG_NAMES)
  inputs.image_output_path("--out", args.out)


# The flag of each Pipeline argument, for messages.
FLAG_NAMES = {"num_inference_steps": "--steps", "guidance_scale": "--guidance",
              "truncation_rate": "--truncation", "max_reveal_per_call": "--max_reveal_per_call"}


def _options(args: argparse.Namespace, with_sampler: bool = True) -> dict:
  options = {"num_inference_steps": args.steps, "guidance_scale": args.guidance,
             "truncation_rate": args.truncation, "max_reveal_per_call": args.max_reveal_per_call}
  return {**options, "sampler": args.sampler} if with_sampler else options


def sample_prompts(pipe: Pipeline, args: argparse.Namespace) -> list:
  """Every prompt's (or label's) ``--num`` images, whole rows per call, with a progress line.

  Each call draws from ``seed + index of its first image``, so a request that
  fits one call gives what ``pipe(..., seed=seed)`` gives.
  """
  name, conditions = (("prompts", args.prompts) if args.prompts is not None
                      else ("class_labels", args.class_labels))
  per_call = max(1, args.batch_size // args.num)
  progress = outputs.Progress(len(conditions) * args.num, name="sampling", unit="images")
  images = []
  for start in range(0, len(conditions), per_call):
    images += pipe(**{name: conditions[start:start + per_call]}, num_images_per_prompt=args.num,
                   seed=args.seed + start * args.num, **_options(args))
    progress.update(len(images))
  progress.close()
  return images


def sample_unconditional(pipe: Pipeline, args: argparse.Namespace) -> list:
  """``--num_images`` images in calls of ``--batch_size``, each from ``seed + its first index``."""
  progress = outputs.Progress(args.num_images, name="sampling", unit="images")
  images = []
  for start in range(0, args.num_images, args.batch_size):
    images += pipe(num_images=min(args.batch_size, args.num_images - start),
                   seed=args.seed + start, **_options(args))
    progress.update(len(images))
  progress.close()
  return images


def main(argv: Sequence[str] | None = None) -> str:
  """The command: ``prepare`` (every check), then ``write_samples``; returns ``--out``."""
  return write_samples(*prepare(argv))


def prepare(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Pipeline]:
  """Checks the flags, loads the model and checks the prompts: every bad input fails here."""
  args = parse_args(argv)
  outputs.quiet_logging(args.verbosity)
  pipe = Pipeline.from_pretrained(args.workdir, use_ema=not args.raw_weights,
                                  precision=args.precision)
  if args.prompts is not None:
    pipe.report_prompts_once(args.prompts, ["--prompt"] * len(args.prompts), args.unknown_words,
                             "--unknown_words")
  return args, pipe


def write_samples(args: argparse.Namespace, pipe: Pipeline) -> str:
  """Samples what the flags ask for and writes the grid (and its rows' text) to ``--out``."""
  unconditional = args.num_images is not None
  images = sample_unconditional(pipe, args) if unconditional else sample_prompts(pipe, args)
  outputs.save_image(args.out, make_grid(images, columns=min(args.num, len(images))))
  if not unconditional:
    rows = args.prompts if args.prompts is not None else args.class_labels
    outputs.write_text(epath.Path(args.out).with_suffix(".txt"), "\n".join(map(str, rows)) + "\n")
  print(f"wrote {len(images)} images to {args.out}")
  return args.out


if __name__ == "__main__":
  outputs.one_line_warnings()
  with outputs.bad_input_is_one_line(*loading.BAD_INPUT_ERRORS):
    job = prepare(sys.argv[1:])
  write_samples(*job)
