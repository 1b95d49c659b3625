"""Two JAX processes on this machine (4 CPU devices each), for the two-process tests.

  python -m tests.two_process_worker --process_id=0 --port=PORT --task=cache --workdir=DIR

``run_two_processes`` starts both (the tests call it); each initializes
``jax.distributed`` on localhost (Gloo collectives) and runs one task.
"""

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_two_processes(task: str, workdir, timeout: float = 600, **flags) -> list[str]:
  """Runs ``task`` in two JAX processes of 4 CPU devices each; returns their outputs."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu"}
  args = [f"--{k}={v}" for k, v in flags.items()]
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tests.two_process_worker", f"--process_id={i}", f"--port={port}",
       f"--task={task}", f"--workdir={workdir}", *args], cwd=ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  failed = [i for i, p in enumerate(procs) if p.returncode]
  assert not failed, "\n".join(f"process {i}: ...{outputs[i][-4000:]}" for i in failed)
  return outputs


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


def sample(args) -> None:
  """Samples, inpaints and encodes with ``--checkpoint``; saves what this process got."""
  from vqdiffusion_jax import Pipeline  # noqa: PLC0415
  pipe = Pipeline.from_pretrained(args.checkpoint)
  np.savez(pathlib.Path(args.workdir) / f"samples_{jax.process_index()}.npz",
           **pipeline_outputs(pipe))


def plan(args) -> None:
  """Plans the denoiser's steps, each process timing its step and its budget differently."""
  from tests.test_budget import _budget_config  # noqa: PLC0415
  from vqdiffusion_jax.train import budget  # noqa: PLC0415
  index = jax.process_index()
  plan = budget.plan_steps(_budget_config(10), args.workdir,
                           time_left=lambda: 600.0 - 100 * index,
                           seconds_per_step=lambda: 0.5 + index)
  print(json.dumps({"process": index, "plan": plan}))


# The two-process sampling test's prompts: 5, not a multiple of the 8 devices.
PROMPTS = ["a cat", "the cat sat", "a dog", "", "cat at the cat"]


def pipeline_outputs(pipe) -> dict[str, np.ndarray]:
  """What ``sample`` compares between one and two processes: samples, inpainting, codes."""
  outputs = {kind: np.stack(pipe(PROMPTS, num_inference_steps=2, seed=3, output_type=kind))
             for kind in ("tokens", "np")}
  size = pipe.image_size
  image = np.random.default_rng(0).uniform(size=(size, size, 3)).astype(np.float32)
  mask = np.zeros((size, size), bool)
  mask[:, size // 2:] = True
  outputs["inpainted"] = np.stack(pipe.inpaint(PROMPTS[:3], image, mask, num_inference_steps=2,
                                               seed=4, output_type="tokens"))
  outputs["encoded"] = pipe.encode_image(image)
  return outputs


def evaluate(args) -> None:
  """Evaluates ``--checkpoint`` on the prompts, writing to ``WORKDIR/out_<process>``."""
  from vqdiffusion_jax import evaluate as evaluate_lib  # noqa: PLC0415
  captions = pathlib.Path(args.workdir) / "captions.txt"
  report = evaluate_lib.main([
      "--checkpoint", args.checkpoint, "--captions", str(captions), "--sampler",
      "vqdiffusion/2/2", "--batch_size", "4", "--clip", args.clip, "--precision", "float32",
      "--out", str(pathlib.Path(args.workdir) / f"out_{jax.process_index()}")])
  row = report["samplers"]["vqdiffusion_2steps_g2_r1"]
  print(json.dumps({"clip_score": row["clip_score"]}))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--task", choices=["cache", "sample", "evaluate", "plan"], required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--data", default="")
  parser.add_argument("--clip", default="")
  parser.add_argument("--checkpoint", default="")
  args = parser.parse_args()
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_compilation_cache_dir", os.environ.get(
      "JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/vqdiffusion_jax/jax_cache")))
  jax.distributed.initialize(f"localhost:{args.port}", num_processes=2,
                             process_id=args.process_id)
  if (jax.device_count(), jax.local_device_count()) != (8, 4):
    raise SystemExit(f"expected 2 x 4 devices, got {jax.device_count()} "
                     f"({jax.local_device_count()} local)")
  np.set_printoptions(precision=4)
  # Gloo gives a peer 30 s to join a new communicator: open it now, while both processes
  # are in step, not after compilations whose times differ on a busy machine.
  multihost_utils.process_allgather(np.zeros(1), tiled=True)
  {"cache": build_cache, "sample": sample, "evaluate": evaluate, "plan": plan}[args.task](args)


if __name__ == "__main__":
  main()
