"""Converts a PyTorch VQ-Diffusion checkpoint into our Orbax directory.

  python -m vqdiffusion_jax.convert SRC --out DIR [--preset coco_learnable] [--raw-weights]

SRC: a diffusers VQDiffusionPipeline directory (denoiser, VQ-VAE, text
encoder, and the schedule of its scheduler/), a diffusers Transformer2DModel
directory, or an official microsoft/VQ-Diffusion ``.pth`` (which needs
``--preset``: the released file's name without ``.pth`` / ``_pretrained``,
e.g. ``coco``, ``coco_learnable``, ``cub200``, ``cc``, ``cc_learnable``,
``ithq``, ``imagenet``, ``imagenet_learnable``, ``ffhq``; see
``transformer.PRESETS``).

An official ``.pth`` becomes a whole sampling directory with its codec's
taming YAML and remap (its weights are in the ``.pth``) and a local CLIP::

  python -m vqdiffusion_jax.convert coco_learnable.pth --preset coco_learnable \
      --vqvae-config taming_f8_8192_openimages.yaml \
      --vqvae-remap taming_vqvae_2887.pt --clip clip-vit-base-patch32 --out coco
"""

import argparse
import sys

from vqdiffusion_jax import extras, loading, outputs
from vqdiffusion_jax.convert import checkpoints
from vqdiffusion_jax.models import transformer


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m vqdiffusion_jax.convert",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("src", help="checkpoint directory or official .pth file")
  parser.add_argument("--out", required=True, help="directory to write")
  parser.add_argument("--preset", choices=sorted(transformer.PRESETS), metavar="NAME",
                      help="sizes of an official .pth, by released file or text size: "
                           f"{', '.join(sorted(transformer.PRESETS))}")
  parser.add_argument("--raw-weights", action="store_true",
                      help="official .pth: take the raw weights instead of the EMA ones")
  parser.add_argument("--allow-pickle", action="store_true",
                      help="official .pth holding Python objects: unpickle them (trusted files)")
  parser.add_argument("--no-null-text", action="store_true",
                      help="official .pth trained without learnable_cf (no empty_text_embed)")
  parser.add_argument("--vqvae", metavar="PATH",
                      help="the VQ-VAE when SRC has none: a codec's PyTorch file (with "
                           "--vqvae-config) or a diffusers VQModel directory; an official "
                           ".pth holds its codec, so --vqvae-config alone takes it from SRC")
  parser.add_argument("--vqvae-config", metavar="YAML",
                      help="the codec's config YAML, e.g. taming_f8_8192_openimages.yaml "
                           "(or ITHQ's config.yaml)")
  parser.add_argument("--vqvae-remap", metavar="PT",
                      help="the codec's official token remap, e.g. taming_vqvae_2887.pt")
  parser.add_argument("--clip", metavar="DIR",
                      help="a Hugging Face CLIP directory (weights and tokenizer) for a text "
                           "model, e.g. a local copy of openai/clip-vit-base-patch32")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  outputs.add_verbosity_argument(parser)
  args = parser.parse_args(argv)
  outputs.quiet_logging(args.verbosity)
  if loading.is_workdir(args.src):
    return outputs.print_error(
        f"{args.src} is a training workdir of the main job, not a PyTorch checkpoint; "
        "Pipeline.from_pretrained and vqdiffusion_jax.sample read it as it is, and "
        "vqdiffusion_jax.export writes it to PyTorch")
  try:
    counts = checkpoints.convert(args.src, args.out, preset=args.preset,
                              use_ema=not args.raw_weights, allow_pickle=args.allow_pickle,
                              overwrite=args.overwrite, vqvae=args.vqvae,
                              vqvae_config=args.vqvae_config, vqvae_remap=args.vqvae_remap,
                              clip_dir=args.clip,
                              **({"learnable_null_text": False} if args.no_null_text else {}))
  except (FileNotFoundError, FileExistsError, ValueError, KeyError,
          extras.MissingExtraError) as error:
    return outputs.print_error(error)
  for name, count in counts.items():
    print(f"{name}: {count:,} parameters")
  print(f"wrote {args.out}")
  missing = checkpoints.missing_for_sampling(args.out)
  if missing:
    print(f"note: {args.out} has no {' and no '.join(missing)} yet, so it cannot sample; "
          "name them with --vqvae-config / --vqvae and --clip")
  return 0


if __name__ == "__main__":
  sys.exit(main())
