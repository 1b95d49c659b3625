"""Text in, images out against diffusers' ``VQDiffusionPipeline``: the path users run.

  PYTHONPATH=. python benchmarks/vs_diffusers_pipeline.py [--grids 16 32] [--batch 4 16]
      [--steps 25] [--repeats 3] [--memory] [--json out.json]

For each token grid the script builds one random diffusers pipeline (a CLIP
text tower of 4 layers of 256 over 77 tokens, a ``VQModel`` with K = 256
codes and 4x downsampling, a ``Transformer2DModel`` of 4 layers of 256, the
scheduler over T = 100 and the learned null text), writes it with
``save_pretrained``, converts that directory with ``python -m
vqdiffusion_jax.convert`` and loads the result with
``Pipeline.from_pretrained``, as a user would. Both sides then turn the same
prompts into PIL images: tokenizing, the text tower, the guided sampler
(scale 5, truncation 0.86, ``--steps`` network calls on the prompt and the
null text together) and VQ decoding, timed interleaved after one untimed run
each.

Each side runs in two settings:
  ours     ``precision="fast"`` (the default) and ``precision="float32"``;
  theirs   float32 (the default) and its transformer under ``torch.autocast("cpu",
           bfloat16)`` (``autocast_transformer``).
The table gives images per second of each and two ratios: the defaults'
(ours fast / theirs float32) and the fastest of each side against each other.

``--memory`` also loads and runs each setting once in a fresh process and
reports its peak resident memory (VmHWM), and the part of it above the
resident memory once the pipeline is loaded.

``--profile`` traces ours (fast) and both of diffusers' settings at the first
batch (``limits.our_profile`` / ``their_profile``: op time by kind, the
matmul-only bound against diffusers' fastest), and splits each wall time into
the cost of one network step and the rest (text, decoding, images) from runs
of ``--steps`` and of 1 step.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import diffusers
import torch
import transformers
from diffusers import Transformer2DModel, VQDiffusionScheduler, VQModel
from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
  LearnedClassifierFreeSamplingEmbeddings,
  VQDiffusionPipeline,
)

from benchmarks import harness, limits
from tests.test_clip_text import TOKENIZER
from vqdiffusion_jax import Pipeline

TIMESTEPS = 100
GUIDANCE = 5.0
TRUNCATION = 0.86
CODEBOOK = 256
WIDTH, LAYERS, HEADS = 256, 4, 4
CONTEXT = TOKENIZER.model_max_length
PROMPTS = ["the cat sat on the mat", "a red circle at the top", "three blue squares",
           "the dog ate the cat", "a big green star", "this is the end."]
OURS = ("fast", "float32")
THEIRS = ("float32", "bfloat16")


def diffusers_pipeline(grid: int, seed: int = 0) -> VQDiffusionPipeline:
  """A random diffusers pipeline over ``grid`` x ``grid`` tokens (images 4x as wide)."""
  torch.manual_seed(seed)
  transformer = Transformer2DModel(
      num_attention_heads=HEADS, attention_head_dim=WIDTH // HEADS, num_layers=LAYERS,
      num_vector_embeds=CODEBOOK + 1, sample_size=grid, cross_attention_dim=WIDTH,
      num_embeds_ada_norm=TIMESTEPS, norm_type="ada_norm", activation_fn="geglu-approximate",
      attention_bias=True)
  null_text = LearnedClassifierFreeSamplingEmbeddings(True, hidden_size=WIDTH, length=CONTEXT)
  with torch.no_grad():
    null_text.embeddings.normal_()
  vqvae = VQModel(
      block_out_channels=(64, 128, 128), layers_per_block=1, latent_channels=64,
      num_vq_embeddings=CODEBOOK, vq_embed_dim=64, norm_num_groups=32,
      down_block_types=("DownEncoderBlock2D",) * 2 + ("AttnDownEncoderBlock2D",),
      up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 2)
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
      intermediate_size=4 * WIDTH, vocab_size=len(TOKENIZER), max_position_embeddings=CONTEXT,
      bos_token_id=TOKENIZER.bos_token_id, eos_token_id=TOKENIZER.eos_token_id,
      pad_token_id=TOKENIZER.pad_token_id))
  scheduler = VQDiffusionScheduler(num_vec_classes=CODEBOOK + 1, num_train_timesteps=TIMESTEPS)
  return VQDiffusionPipeline(
      vqvae=vqvae.eval(), text_encoder=text_encoder.eval(), tokenizer=TOKENIZER,
      transformer=transformer.eval(), scheduler=scheduler,
      learned_classifier_free_sampling_embeddings=null_text)


def write_both(grid: int, root: pathlib.Path) -> tuple[str, str]:
  """(the save_pretrained directory, our conversion of it by the command line)."""
  theirs, ours = root / f"diffusers_{grid}", root / f"converted_{grid}"
  diffusers_pipeline(grid).save_pretrained(theirs)
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
  subprocess.run([sys.executable, "-m", "vqdiffusion_jax.convert", str(theirs), "--out",
                  str(ours)], check=True, env=env, capture_output=True)
  return str(theirs), str(ours)


def prompts_of(batch: int) -> list[str]:
  return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


def load(side: str, setting: str, theirs_dir: str, ours_dir: str):
  """The loaded pipeline of one side as a user loads it."""
  if side == "ours":
    return Pipeline.from_pretrained(ours_dir, precision=setting, unknown_words="ignore")
  # VQDiffusionPipeline.from_pretrained cannot resolve this deprecated pipeline's null-text
  # class by name, so each part is loaded from its folder of the saved directory.
  part = lambda name: os.path.join(theirs_dir, name)  # noqa: E731
  pipe = VQDiffusionPipeline(
      vqvae=VQModel.from_pretrained(part("vqvae")).eval(),
      text_encoder=transformers.CLIPTextModel.from_pretrained(part("text_encoder")).eval(),
      tokenizer=transformers.CLIPTokenizer.from_pretrained(part("tokenizer")),
      transformer=Transformer2DModel.from_pretrained(part("transformer")).eval(),
      scheduler=VQDiffusionScheduler.from_pretrained(part("scheduler")),
      learned_classifier_free_sampling_embeddings=(
          LearnedClassifierFreeSamplingEmbeddings.from_pretrained(
              part("learned_classifier_free_sampling_embeddings"))))
  pipe.set_progress_bar_config(disable=True)
  if setting == "bfloat16":
    autocast_transformer(pipe.transformer)
  return pipe


def autocast_transformer(transformer: Transformer2DModel) -> None:
  """Runs ``transformer`` under bfloat16 autocast, handing float32 log-probs back.

  Autocast around the whole pipeline call fails at its last line (numpy has no
  bfloat16), and bfloat16 log-probs would also run diffusers' guidance,
  truncation and scheduler in bfloat16; so only the network is autocast.
  """
  forward = transformer.forward

  def autocast_forward(*args, **kwargs):
    with torch.autocast("cpu", dtype=torch.bfloat16):
      out = forward(*args, **kwargs)
    out.sample = out.sample.float()
    return out

  transformer.forward = autocast_forward


def generate(side: str, setting: str, pipe, batch: int, steps: int):
  """A blocking ``run()``: ``batch`` prompts to PIL images."""
  prompts = prompts_of(batch)
  options = {"num_inference_steps": steps, "guidance_scale": GUIDANCE,
             "truncation_rate": TRUNCATION}
  if side == "ours":
    return lambda: pipe(prompts, seed=0, **options)

  def run():
    with torch.inference_mode():
      return pipe(prompts, generator=torch.Generator().manual_seed(0), **options).images

  return run


def _memory_kib() -> dict[str, int]:
  with open("/proc/self/status") as file:
    fields = dict(line.split(":", 1) for line in file)
  return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def child(args) -> None:
  """``--child SIDE SETTING``: load, run once, print peak memory as JSON."""
  side, setting = args.child
  pipe = load(side, setting, args.theirs_dir, args.ours_dir)
  loaded = _memory_kib()["VmRSS"]
  images = generate(side, setting, pipe, args.batch[0], args.steps)()
  assert len(images) == args.batch[0]
  peak = _memory_kib()["VmHWM"]
  print(json.dumps({"loaded_mib": loaded / 1024, "peak_mib": peak / 1024}))


def peak_memory(side: str, setting: str, dirs: tuple[str, str], batch: int,
                steps: int) -> dict[str, float]:
  command = [sys.executable, __file__, "--child", side, setting, "--theirs-dir", dirs[0],
             "--ours-dir", dirs[1], "--batch", str(batch), "--steps", str(steps)]
  out = subprocess.run(command, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def run_grid(grid: int, args, root: pathlib.Path) -> list[dict]:
  dirs = write_both(grid, root)
  pipes = {("ours", s): load("ours", s, *dirs) for s in OURS}
  pipes.update({("theirs", s): load("theirs", s, *dirs) for s in THEIRS})
  rows = []
  for batch in args.batch:
    runs = {key: generate(*key, pipe, batch, args.steps) for key, pipe in pipes.items()}
    for run in runs.values():
      run()  # compile / warm up
    seconds = harness.interleaved(runs, args.repeats)
    per_s = {f"{side} {setting}": batch / seconds[(side, setting)]
             for side, setting in runs}
    ours_best = max(per_s[f"ours {s}"] for s in OURS)
    theirs_best = max(per_s[f"theirs {s}"] for s in THEIRS)
    row = {"grid": grid, "image_size": 4 * grid, "batch": batch, "images_per_s": per_s,
           "defaults_ratio": per_s["ours fast"] / per_s["theirs float32"],
           "fastest_ratio": ours_best / theirs_best}
    if args.memory:
      row["memory_mib"] = {f"{side} {setting}": peak_memory(side, setting, dirs, batch,
                                                            args.steps)
                           for side, setting in runs}
    rows.append(row)
    cells = " | ".join(f"{per_s[f'{side} {setting}']:.2f}" for side, setting in runs)
    print(f"| {grid} x {grid} | {batch} | {cells} | {row['defaults_ratio']:.2f}x | "
          f"{row['fastest_ratio']:.2f}x |", flush=True)
  if args.profile:
    print("\n| tokens | batch | side | wall ms | ms per step | ms besides steps | op time by "
          "kind |\n|---|---:|---|---:|---:|---:|---|")
    rows[0]["profile"] = profile_rows(grid, args.batch[0], pipes, args.steps, args.repeats)
  return rows


def profile_rows(grid: int, batch: int, pipes: dict, steps: int, calls: int) -> list[dict]:
  """Op time by kind of ours (fast) and diffusers, and each wall time per step and fixed."""
  rows = []
  for side, setting in (("ours", "fast"), ("theirs", "float32"), ("theirs", "bfloat16")):
    profile = limits.our_profile if side == "ours" else limits.their_profile
    pipe = pipes[(side, setting)]
    full = profile(generate(side, setting, pipe, batch, steps), calls)
    one_step = profile(generate(side, setting, pipe, batch, 1), calls)
    per_step = (full["wall_ms"] - one_step["wall_ms"]) / (steps - 1)
    rows.append({"grid": grid, "batch": batch, "side": f"{side} {setting}", **full,
                 "step_ms": per_step, "fixed_ms": one_step["wall_ms"] - per_step})
  theirs_best = min(rows[1:], key=lambda row: row["wall_ms"])
  rows[0]["matmul_bound"] = limits.matmul_bound(rows[0], theirs_best)
  for row in rows:
    shares = ", ".join(f"{kind} {100 * share:.0f}%" for kind, share in row["shares"].items())
    print(f"| {grid} x {grid} | {batch} | {row['side']} | {row['wall_ms']:.0f} | "
          f"{row['step_ms']:.0f} | {row['fixed_ms']:.0f} | {shares} |", flush=True)
  print(f"| {grid} x {grid} | {batch} | ours if all but its matmuls took no time | "
        f"{rows[0]['matmul_bound']:.2f}x diffusers' fastest | | | |", flush=True)
  return rows


def print_memory(rows: list[dict]) -> None:
  print("\npeak resident memory, MiB (above the loaded pipeline)")
  print("| tokens | batch | " + " | ".join(rows[0]["memory_mib"]) + " |")
  print("|---|---:|" + "---:|" * len(rows[0]["memory_mib"]))
  for row in rows:
    cells = " | ".join(f"{m['peak_mib']:.0f} ({m['peak_mib'] - m['loaded_mib']:.0f})"
                       for m in row["memory_mib"].values())
    print(f"| {row['grid']} x {row['grid']} | {row['batch']} | {cells} |")


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--grids", type=int, nargs="+", default=[16, 32],
                      help="token grid sides (images are 4x as wide)")
  parser.add_argument("--batch", type=int, nargs="+", default=[4, 16], help="prompts per call")
  parser.add_argument("--steps", type=int, default=25, help="network calls per image")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--memory", action="store_true",
                      help="also measure each setting's peak memory in a fresh process")
  parser.add_argument("--profile", action="store_true",
                      help="also profile each side at the first batch")
  parser.add_argument("--json", help="also write the rows to this JSON file")
  parser.add_argument("--child", nargs=2, metavar=("SIDE", "SETTING"), help=argparse.SUPPRESS)
  parser.add_argument("--theirs-dir", help=argparse.SUPPRESS)
  parser.add_argument("--ours-dir", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.repeats < 1 or min(args.batch) < 1 or not 2 <= args.steps <= TIMESTEPS:
    parser.error(f"--repeats and --batch must be positive, --steps in [2, {TIMESTEPS}]")
  return args


def main():
  args = _parse()
  diffusers.utils.logging.set_verbosity_error()
  transformers.logging.set_verbosity_error()
  if args.child:
    child(args)
    return
  print(f"# Pipeline vs diffusers {torch.__version__} VQDiffusionPipeline on "
        f"{harness.device_name()}, torch threads {torch.get_num_threads()}")
  print(f"medians of {args.repeats} interleaved runs, images per second; {args.steps} steps, "
        f"guidance {GUIDANCE:g}, truncation {TRUNCATION}; text, sampling and decoding\n")
  print("| tokens | batch | " + " | ".join(f"ours {s}" for s in OURS) + " | "
        + " | ".join(f"diffusers {s}" for s in THEIRS) + " | defaults | fastest |")
  print("|---|---:|" + "---:|" * (len(OURS) + len(THEIRS) + 2))
  with tempfile.TemporaryDirectory() as tmp:
    rows = [row for grid in args.grids for row in run_grid(grid, args, pathlib.Path(tmp))]
  if args.memory:
    print_memory(rows)
  if args.json:
    with open(args.json, "w") as file:
      json.dump({"device": harness.device_name(), "steps": args.steps, "rows": rows}, file,
                indent=1)


if __name__ == "__main__":
  main()
