"""Denoiser train-step time with cached CLIP features vs. CLIP run in the step.

  PYTHONPATH=. python benchmarks/cached_text_features.py [--width 64] [--layers 4]
      [--batch 8] [--calls 5] [--rounds 2]

Builds the runlocal shapes config with ``text.kind = "clip"`` and a random
tiny CLIP text tower (Hugging Face layout, 77 positions, ``--width`` wide,
``--layers`` deep), a random VQ-VAE, and the token cache of the shapes train
split with the CLIP features of every caption. Then times the train step as
the loop sees it (``denoiser_stage.seconds_per_step``: the batch read and the
jitted step), once with the batches carrying the cached features and once
with caption ids that the step encodes with CLIP; the two alternate for
``--rounds`` rounds and each figure is the median of its rounds. Prints both
times and their ratio.
"""

import argparse
import pathlib
import statistics
import tempfile

import jax
import jax.numpy as jnp

from configs import shapes
from tests import user_files
from vqdiffusion_jax import build
from vqdiffusion_jax.data import sources, token_cache
from vqdiffusion_jax.train import denoiser_stage, loop
from vqdiffusion_jax.train import mesh as mesh_lib


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--batch", type=int, default=8, help="global batch")
  parser.add_argument("--calls", type=int, default=5, help="timed steps per round")
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args()
  root = pathlib.Path(tempfile.mkdtemp(prefix="cached_text_features_"))
  config = shapes.get_config("runlocal")
  with config.unlocked():
    config.text.kind, config.text.width = "clip", 0  # the width of the CLIP given
    config.text.clip_path = user_files.clip_dir(
        root / "clip", hidden_size=args.width, num_heads=max(1, args.width // 16),
        intermediate_size=4 * args.width, num_layers=args.layers)
    config.train.global_batch = args.batch
  module = build.vqvae_module(config)
  vqvae = build.VQVAE(module, jax.device_get(module.init(jax.random.key(0),
                                                          jnp.zeros((1, 32, 32, 3)))), 32)
  source = sources.split_source(config.data, config.data.train_split, str(root))
  cache = token_cache.TokenCacheSource(loop.build_cache(config, str(root), vqvae, source))
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  trainers = {cached: denoiser_stage.denoiser_trainer(config, str(root / "denoiser"), mesh,
                                                      vqvae, cache, cached_features=cached)
              for cached in (True, False)}
  times = {True: [], False: []}
  for _ in range(args.rounds):
    for cached, trainer in trainers.items():
      times[cached].append(denoiser_stage.seconds_per_step(trainer, calls=args.calls))
  cached, in_step = (statistics.median(times[k]) for k in (True, False))
  print(f"CLIP text tower: width {args.width}, {args.layers} layers, 77 tokens; "
        f"global batch {args.batch}; {jax.device_count()} {jax.devices()[0].platform} devices")
  print(f"step with cached features: {cached * 1e3:8.2f} ms")
  print(f"step running CLIP:         {in_step * 1e3:8.2f} ms")
  print(f"ratio (CLIP in step / cached): {in_step / cached:.2f}")


if __name__ == "__main__":
  main()
