"""The end of a run: sample with every configured sampler, evaluate, write the report.

Writes into ``WORKDIR/report/``: ``report.json`` (every figure), ``report.md``
(a one-page summary: the command and machine, the training stages, the
VQ-VAE's reconstruction, a table of samplers with text faithfulness and
speed, the sample grids, and the config) and one PNG grid per sampler.
Samplers already evaluated at the same denoiser step are read back, so a
re-run only fills what is missing.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from etils import epath

from vqdiffusion_jax import build, evaluate, loading, outputs
from vqdiffusion_jax.pipeline import Pipeline
from vqdiffusion_jax.train import budget
from vqdiffusion_jax.train import metrics as metrics_lib


def _metric_lines(stage_dir: str) -> list[dict]:
  """The stage's logged records, the last one of each step, in step order."""
  records = metrics_lib.read_records(epath.Path(stage_dir) / metrics_lib.METRICS_FILE)
  return metrics_lib.latest_per_step(records)


def _pace(lines: list[dict]) -> str:
  """The stage's median steps per second and input share over its logged intervals."""
  rates = [m["steps_per_second"] for m in lines if "steps_per_second" in m]
  shares = [m["input_fraction"] for m in lines if "input_fraction" in m]
  if not rates:
    return ""
  return (f", {np.median(rates):.2f} steps/s, input batches {100 * np.median(shares):.1f}% "
          "of the loop's time")


def _planned(stage_dir: str) -> str:
  """How the stage's step count was planned from the time budget, if it was."""
  plan = budget.read_plan(stage_dir)
  if plan is None:
    return ""
  return (f" (planned to fit the {plan['budget_minutes']:g}-minute budget: "
          f"{plan['seconds_left']:.0f} s left at {1000 * plan['seconds_per_step']:.0f} ms "
          "per step)")


def run_summary(summary: dict) -> dict:
  """The figures of the training stages shown at the top of the report."""
  vqvae_lines = _metric_lines(summary["vqvae"])
  denoiser_lines = _metric_lines(summary["denoiser"])
  out = {}
  if vqvae_lines:
    last = vqvae_lines[-1]
    out["VQ-VAE"] = (f"{last['step']} steps, final reconstruction loss "
                     f"{last['nll']:.4f}, batch PSNR {last['psnr']:.2f} dB, "
                     f"codebook perplexity {last['perplexity']:.1f}{_pace(vqvae_lines)}")
  if denoiser_lines:
    last = denoiser_lines[-1]
    out["denoiser"] = (f"{last['step']} steps{_planned(summary['denoiser'])}, final loss "
                       f"{last['loss']:.4f}{_pace(denoiser_lines)}")
  return out


def machine_line(config: Any) -> str:
  """The devices the run used and the matmul dtypes its trainers resolved to."""
  devices = jax.devices()
  return (f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), "
          f"{os.cpu_count()} CPU cores; matmuls: VQ-VAE {build.vqvae_matmul_dtype(config)}, "
          f"denoiser {build.denoiser_matmul_dtype(config)}")


def config_section(config: Any) -> list[str]:
  """The run's config as a collapsed JSON block."""
  text = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
  return ["## Config", "", "<details><summary>The config of the run</summary>", "",
          "```json", text, "```", "", "</details>", ""]


def write_report(config: Any, workdir: str, summary: dict, command: str = "") -> str:
  """Evaluates the finished run; returns the path of ``report.md``.

  Args:
    config: the run's config.
    workdir: the run's directory.
    summary: ``loop.train``'s summary of the stages.
    command: the command line that ran it, shown at the top.
  """
  eval_config = config.eval
  specs = [evaluate.SamplerSpec.parse(s) for s in eval_config.samplers]
  out_dir = epath.Path(workdir) / loading.REPORT_DIR
  # The report samples with the matmul dtype the run trained with, whatever this machine has.
  pipe = Pipeline.from_pretrained(workdir, precision=build.denoiser_matmul_dtype(config))
  captions, images = evaluate.evaluation_data(config, workdir, int(eval_config.num_samples))
  evaluate.report_captions(pipe, captions, "warn", None)
  networks = evaluate.FeatureNetworks.load(eval_config.inception_path, eval_config.clip_path,
                                           images)
  report = evaluate.evaluate(
      pipe, captions, images, specs, out_dir, seed=int(eval_config.seed),
      batch_size=int(eval_config.batch_size), grid_size=int(eval_config.grid_size),
      networks=networks, tag=f"denoiser step {summary['denoiser_step']}")
  run = {"command": f"`{command}`"} if command else {}
  run |= {"machine": machine_line(config), **run_summary(summary)}
  text = evaluate.markdown_report(report, run) + "\n" + "\n".join(config_section(config))
  path = out_dir / evaluate.REPORT_MD
  outputs.write_text(path, text)
  print(evaluate.markdown_report(report, run, grids=False), flush=True)
  return os.fspath(path)
