"""One of two JAX processes on this machine (4 CPU devices each), for the two-process tests.

  python -m tests.two_process_worker --process_id=0 --port=PORT --task=cache --workdir=DIR

Run by the tests, with XLA_FLAGS giving each process 4 devices.
"""

import argparse
import json
import os

import jax
import numpy as np

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/vqdiffusion_jax/jax_cache")))


def build_cache(args) -> None:
  """Builds the token cache of a CLIP run with a VQ-VAE held as global replicated arrays."""
  from tests import test_cached_text_features as case  # noqa: PLC0415
  from vqdiffusion_jax import build  # noqa: PLC0415
  from vqdiffusion_jax.data import sources  # noqa: PLC0415
  from vqdiffusion_jax.train import loop  # noqa: PLC0415
  from vqdiffusion_jax.train import mesh as mesh_lib  # noqa: PLC0415
  config = case._clip_config(args.clip, caption_dropout=0.5)
  vqvae = case._vqvae(config)
  mesh = mesh_lib.make_mesh(config.mesh.to_dict())
  variables = jax.device_put(vqvae.variables, mesh_lib.replicated(mesh))
  source = sources.split_source(config.data, config.data.train_split, args.data)
  cache_dir = loop.build_cache(config, args.workdir,
                               build.VQVAE(vqvae.module, variables, vqvae.image_size), source)
  print(json.dumps({"process": jax.process_index(), "cache": cache_dir}))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--task", choices=["cache"], required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--data", default="")
  parser.add_argument("--clip", default="")
  args = parser.parse_args()
  jax.distributed.initialize(f"localhost:{args.port}", num_processes=2,
                             process_id=args.process_id)
  if (jax.device_count(), jax.local_device_count()) != (8, 4):
    raise SystemExit(f"expected 2 x 4 devices, got {jax.device_count()} "
                     f"({jax.local_device_count()} local)")
  np.set_printoptions(precision=4)
  {"cache": build_cache}[args.task](args)


if __name__ == "__main__":
  main()
