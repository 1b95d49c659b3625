"""The end of a run: sample with every configured sampler, evaluate, write the report.

Writes into ``WORKDIR/report/``: ``report.json`` (every figure), ``report.md``
(a one-page summary: the run, tokenizer reconstruction, a table of samplers
with text faithfulness and speed, the targets of the embedded default, and
the sample grids) and one PNG grid per sampler. Samplers already evaluated
at the same denoiser step are read back, so a re-run only fills what is
missing.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from vqdiffusion_jax import evaluate
from vqdiffusion_jax.pipeline import Pipeline
from vqdiffusion_jax.train import budget, denoiser_stage

REPORT_DIR = "report"
# The embedded default's targets: guided all-attribute and per-attribute oracle accuracy, PSNR.
TARGETS = {"oracle_all": 0.8, "oracle_attribute": 0.9, "psnr": 28.0}


def _metric_lines(stage_dir: str) -> list[dict]:
  try:
    with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
      return [json.loads(line) for line in f.read().splitlines()]
  except FileNotFoundError:
    return []


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
  tokenizer_lines = _metric_lines(summary["tokenizer"])
  denoiser_lines = _metric_lines(summary["denoiser"])
  out = {}
  if tokenizer_lines:
    last = tokenizer_lines[-1]
    out["tokenizer"] = (f"{last['step']} steps, final reconstruction loss "
                        f"{last['nll']:.4f}, batch PSNR {last['psnr']:.2f} dB, "
                        f"codebook perplexity {last['perplexity']:.1f}{_pace(tokenizer_lines)}")
  if denoiser_lines:
    last = denoiser_lines[-1]
    out["denoiser"] = (f"{last['step']} steps{_planned(summary['denoiser'])}, final loss "
                       f"{last['loss']:.4f}{_pace(denoiser_lines)}")
  return out


def machine_line(config: Any) -> str:
  """The devices the run used and the matmul dtypes its trainers resolved to."""
  from vqdiffusion_jax.train import loop  # noqa: PLC0415 (loop imports this module)
  devices = jax.devices()
  return (f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), "
          f"{os.cpu_count()} CPU cores; matmuls: tokenizer "
          f"{loop.tokenizer_matmul_dtype(config)}, denoiser "
          f"{denoiser_stage.matmul_dtype(config)}")


def target_lines(report: dict) -> list[str]:
  """Whether the embedded default's targets are met, one line each."""
  rows = [r for r in report["samplers"].values() if "oracle" in r]
  if not rows:
    return []
  guided = [r for r in rows if r["spec"]["guidance"] != 1.0] or rows
  best = max(guided, key=lambda r: r["oracle"]["all"])
  worst_attribute = min(v for k, v in best["oracle"].items() if k != "all")
  psnr = report["tokenizer"]["psnr"]
  gain = evaluate.guidance_gain(report)

  def mark(ok):
    return "met" if ok else "NOT met"

  accuracy = best["oracle"]["all"]
  lines = [
      f"- guided all-attributes accuracy {accuracy:.3f} (target >= {TARGETS['oracle_all']}): "
      f"{mark(accuracy >= TARGETS['oracle_all'])}",
      f"- lowest per-attribute accuracy {worst_attribute:.3f} (target >= "
      f"{TARGETS['oracle_attribute']}): {mark(worst_attribute >= TARGETS['oracle_attribute'])}",
      f"- tokenizer PSNR {psnr:.2f} dB (target >= {TARGETS['psnr']}): "
      f"{mark(psnr >= TARGETS['psnr'])}",
  ]
  if gain is not None:
    lines.append(f"- guidance gain in all-attributes accuracy {gain:+.3f} (target > 0): "
                 f"{mark(gain > 0)}")
  return lines


def write_report(config: Any, workdir: str, summary: dict) -> str:
  """Evaluates the finished run; returns the path of ``report.md``."""
  eval_config = config.eval
  specs = [evaluate.SamplerSpec.parse(s) for s in eval_config.samplers]
  out_dir = os.path.join(workdir, REPORT_DIR)
  pipe = Pipeline.from_pretrained(workdir)
  captions, images = evaluate.evaluation_data(config, workdir, int(eval_config.num_samples))
  networks = evaluate.FeatureNetworks.load(eval_config.inception_path, eval_config.clip_path,
                                           images)
  report = evaluate.evaluate(
      pipe, captions, images, specs, out_dir, seed=int(eval_config.seed),
      batch_size=int(eval_config.batch_size), grid_size=int(eval_config.grid_size),
      networks=networks, tag=f"denoiser step {summary['denoiser_step']}")
  text = evaluate.markdown_report(report, {"machine": machine_line(config),
                                           **run_summary(summary)})
  targets = target_lines(report)
  if targets:
    text += "\n## Targets of the embedded default\n\n" + "\n".join(targets) + "\n"
  path = os.path.join(out_dir, evaluate.REPORT_MD)
  with open(path, "w") as f:
    f.write(text)
  print(text, flush=True)
  return path
