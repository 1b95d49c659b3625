"""Evaluates a run: samples per sampler, text faithfulness, reconstruction, FID, CLIP score.

  python -m vqdiffusion_jax.evaluate --workdir runs/shapes \
      [--sampler vqdiffusion/all/3 --sampler purity/16/3] [--num_samples 256] \
      [--inception pt_inception.pth] [--clip clip-vit-b32/] [--out runs/shapes/eval]

A sampler spec is ``name[/steps[/guidance[/truncation]]]``, steps ``all``
meaning every step (or one token per call for reveal samplers). Captions and
reference images come from the run's evaluation split. Measured per sampler:

* on the embedded shapes data, the oracle's text-faithfulness accuracy per
  attribute and all-attributes-correct (``data.oracle``);
* with ``--inception`` (pytorch-fid weights): FID against the evaluation
  images and the quality / diversity scores (``evaluation.image_metrics``);
* with ``--clip`` (a Hugging Face CLIP directory): the mean CLIP score;
* seconds and images/s of sampling.

Also the VQ-VAE's reconstruction PSNR / SSIM on the evaluation images.
Results go to ``OUT/report.json`` and ``OUT/report.md`` with one PNG grid per
sampler; a sampler already evaluated with the same settings is read back, so
re-running continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vqdiffusion_jax import loading, outputs
from vqdiffusion_jax.data import loader, oracle, shapes, sources
from vqdiffusion_jax.evaluation import fid, image_metrics, inception
from vqdiffusion_jax.evaluation.clip_score import clip_score, load_clip
from vqdiffusion_jax.pipeline import Pipeline, make_grid

REPORT_JSON, REPORT_MD = "report.json", "report.md"


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """One sampler setting to evaluate; ``parse`` reads ``name[/steps[/guidance[/trunc]]]``."""

  name: str
  steps: int | None = None
  guidance: float = 1.0
  truncation: float = 1.0

  @classmethod
  def parse(cls, spec: str) -> SamplerSpec:
    parts = spec.strip().split("/")
    if not parts[0] or len(parts) > 4:
      raise ValueError(f"bad sampler spec {spec!r}; expected name[/steps[/guidance[/truncation]]]")
    try:
      steps = None if len(parts) < 2 or parts[1] in ("", "all") else int(parts[1])
      guidance = float(parts[2]) if len(parts) > 2 else 1.0
      truncation = float(parts[3]) if len(parts) > 3 else 1.0
    except ValueError as error:
      raise ValueError(f"bad sampler spec {spec!r}: {error}") from error
    return cls(parts[0], steps, guidance, truncation)

  @property
  def label(self) -> str:
    steps = "all" if self.steps is None else str(self.steps)
    return f"{self.name}_{steps}steps_g{self.guidance:g}_r{self.truncation:g}"

  def options(self) -> dict:
    return {"sampler": self.name, "num_inference_steps": self.steps,
            "guidance_scale": self.guidance, "truncation_rate": self.truncation}


def evaluation_data(config: Any, workdir: str, num_samples: int) -> tuple[list[str], np.ndarray]:
  """(captions, uint8 images) of the first ``num_samples`` evaluation examples."""
  size = int(config.data.image_size)
  source = sources.split_source(config.data, config.data.eval_split, workdir)
  count = min(num_samples, len(source))
  records = [source[i] for i in range(count)]
  captions = [loader.decode_captions(r.get("captions"))[0] for r in records]
  images = np.stack([loader.resize_and_crop(r["image"], size) for r in records])
  return captions, images


def reconstruction_metrics(pipe: Pipeline, images: np.ndarray, batch_size: int = 64,
                           captions: Sequence[str] | None = None) -> dict:
  """Mean PSNR / SSIM (dB, [0, 1] pixels) of the VQ-VAE's encode-decode round trip.

  With shapes ``captions`` also the oracle accuracy of the reconstructions:
  the ceiling that the denoiser's samples can reach through this VQ-VAE.
  """
  vq, variables = pipe.vqvae, pipe.vqvae_variables

  @jax.jit
  def round_trip(x):
    tokens = vq.apply(variables, x * 2.0 - 1.0, method="encode")
    out = jnp.clip((vq.apply(variables, tokens, method="decode") + 1.0) / 2.0, 0.0, 1.0)
    return out, image_metrics.psnr(out, x), image_metrics.ssim(out, x)

  outs, psnrs, ssims = [], [], []
  for start in range(0, len(images), batch_size):
    out, p, s = round_trip(jnp.asarray(images[start:start + batch_size], jnp.float32) / 255.0)
    outs.append(np.asarray(out))
    psnrs.append(np.asarray(p))
    ssims.append(np.asarray(s))
  metrics = {"psnr": float(np.mean(np.concatenate(psnrs))),
             "ssim": float(np.mean(np.concatenate(ssims))), "num_images": int(len(images))}
  if captions is not None and is_shapes_captions(captions):
    metrics["oracle"] = oracle.accuracy(np.concatenate(outs) * 2.0 - 1.0, list(captions))
  return metrics


def sample_all(pipe: Pipeline, captions: Sequence[str], spec: SamplerSpec, *, seed: int,
               batch_size: int) -> tuple[np.ndarray, float]:
  """(images (B, H, W, 3) float in [0, 1], seconds) for every caption, in batches."""
  images, start_time = [], time.perf_counter()
  progress = outputs.Progress(len(captions), name=f"sampling {spec.label}", unit="images")
  for start in range(0, len(captions), batch_size):
    batch = list(captions[start:start + batch_size])
    images.extend(pipe(batch, seed=seed + start, output_type="np", **spec.options()))
    progress.update(min(start + batch_size, len(captions)), None)
  progress.close()
  return np.stack(images), time.perf_counter() - start_time


@dataclasses.dataclass
class FeatureNetworks:
  """Optional networks of user-supplied weights: FID Inception and CLIP."""

  inception: Any = None
  clip: Any = None
  reference_features: np.ndarray | None = None

  @classmethod
  def load(cls, inception_path: str = "", clip_path: str = "",
           reference_images: np.ndarray | None = None) -> FeatureNetworks:
    networks = cls()
    if inception_path:
      module, params = inception.load_inception(inception_path)
      apply = jax.jit(lambda x: module.apply({"params": params}, x))
      networks.inception = apply
      if reference_images is not None:
        networks.reference_features = networks.inception_outputs(reference_images)[0]
    if clip_path:
      networks.clip = load_clip(clip_path)
    return networks

  def inception_outputs(self, images: np.ndarray, batch_size: int = 50):
    pools, logits = [], []
    for start in range(0, len(images), batch_size):
      x = jnp.asarray(images[start:start + batch_size], jnp.float32)
      x = x / 255.0 if images.dtype == np.uint8 else x
      pool, logit = self.inception(x)
      pools.append(np.asarray(pool, np.float64))
      logits.append(np.asarray(logit))
    return np.concatenate(pools), np.concatenate(logits)


def score_samples(images: np.ndarray, captions: Sequence[str], *, oracle_ok: bool,
                  networks: FeatureNetworks | None = None) -> dict:
  """The metrics of generated images (float [0, 1]) for their captions."""
  scores = {}
  if oracle_ok:
    results = oracle.check_batch(np.asarray(images * 255 + 0.5, np.uint8), list(captions))
    scores["oracle"] = oracle.summarize(results)
    scores["oracle_by_objects"] = accuracy_by_object_count(results, captions)
  if networks is not None and networks.inception is not None:
    pool, logits = networks.inception_outputs(images)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits[:, 1:]), axis=-1))
    quality, diversity = image_metrics.inception_quality_diversity(probs)
    scores["quality_score"], scores["diversity_score"] = float(quality), float(diversity)
    if networks.reference_features is not None and len(pool) > 1:
      scores["fid"] = fid.fid_from_features(pool, networks.reference_features)
  if networks is not None and networks.clip is not None:
    image_embeds = networks.clip.embed_images(jnp.asarray(images))
    text_embeds = networks.clip.embed_texts(list(captions))
    scores["clip_score"] = float(np.mean(np.asarray(clip_score(image_embeds, text_embeds))))
  return scores


def accuracy_by_object_count(results: Sequence[dict], captions: Sequence[str]
                             ) -> dict[str, float]:
  """All-attributes oracle accuracy per number of objects a caption names."""
  groups: dict[int, list[bool]] = {}
  for result, caption in zip(results, captions, strict=True):
    groups.setdefault(len(shapes.parse_caption(caption)), []).append(result["all"])
  return {str(count): float(np.mean(hits)) for count, hits in sorted(groups.items())}


def is_shapes_captions(captions: Sequence[str]) -> bool:
  """Whether the oracle can parse every caption (the embedded shapes data)."""
  try:
    return all(shapes.parse_caption(c) for c in captions)
  except ValueError:
    return False


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def evaluate(pipe: Pipeline, captions: Sequence[str], reference_images: np.ndarray,
             specs: Sequence[SamplerSpec], out_dir: str, *, seed: int = 0, batch_size: int = 64,
             grid_size: int = 16, networks: FeatureNetworks | None = None,
             tag: str = "") -> dict:
  """Evaluates every sampler spec and the VQ-VAE; writes JSON, grids and Markdown.

  A sampler whose result file holds the same settings (``tag``, seed, caption
  count) is read back instead of re-sampled.
  """
  os.makedirs(out_dir, exist_ok=True)
  oracle_ok = is_shapes_captions(captions)
  settings = {"tag": tag, "seed": seed, "num_samples": len(captions)}
  report = {"settings": settings,
            "vqvae": reconstruction_metrics(pipe, reference_images, batch_size,
                                                 captions),
            "samplers": {}}
  for spec in specs:
    path = os.path.join(out_dir, f"{spec.label}.json")
    cached = _read_json(path)
    if cached is None or cached.get("settings") != settings:
      images, seconds = sample_all(pipe, captions, spec, seed=seed, batch_size=batch_size)
      cached = {"settings": settings, "spec": dataclasses.asdict(spec), "seconds": seconds,
                "images_per_second": len(captions) / seconds,
                **score_samples(images, captions, oracle_ok=oracle_ok, networks=networks)}
      make_grid(list(images[:grid_size]), columns=int(np.ceil(np.sqrt(grid_size)))).save(
          os.path.join(out_dir, f"{spec.label}.png"))
      outputs.write_json_atomically(path, cached)
    report["samplers"][spec.label] = cached
  report["grid_captions"] = list(captions[:grid_size])
  outputs.write_json_atomically(os.path.join(out_dir, REPORT_JSON), report)
  with open(os.path.join(out_dir, REPORT_MD), "w") as f:
    f.write(markdown_report(report))
  return report


def _ceiling(vqvae_metrics: dict) -> str:
  if "oracle" not in vqvae_metrics:
    return ""
  accuracy = vqvae_metrics["oracle"]
  parts = ", ".join(f"{a} {accuracy[a]:.3f}" for a in shapes.ATTRIBUTES)
  return (" Oracle accuracy of the reconstructions (the samples' ceiling): all attributes "
          f"{accuracy['all']:.3f}, {parts}.")


def markdown_report(report: dict, run_summary: dict | None = None, grids: bool = True) -> str:
  """A one-page Markdown summary of ``evaluate``'s report (with the sample grids)."""
  lines = ["# Evaluation report", ""]
  if run_summary:
    lines += ["## Run", ""] + [f"- {k}: {v}" for k, v in run_summary.items()] + [""]
  tok = report["vqvae"]
  lines += ["## VQ-VAE reconstruction", "",
            f"PSNR {tok['psnr']:.2f} dB, SSIM {tok['ssim']:.4f} on {tok['num_images']} "
            "evaluation images." + _ceiling(tok), "", "## Samplers", ""]
  rows = report["samplers"]
  metric_names = sorted({k for r in rows.values() for k in r
                         if k in ("fid", "clip_score", "quality_score", "diversity_score")})
  header = ["sampler", "steps", "guidance", "truncation"]
  if any("oracle" in r for r in rows.values()):
    header += [f"oracle {a}" for a in (*shapes.ATTRIBUTES, "all")]
  header += metric_names + ["images/s"]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows.values():
    spec = r["spec"]
    cells = [spec["name"], "all" if spec["steps"] is None else str(spec["steps"]),
             f"{spec['guidance']:g}", f"{spec['truncation']:g}"]
    if "oracle" in r:
      cells += [f"{r['oracle'][a]:.3f}" for a in (*shapes.ATTRIBUTES, "all")]
    cells += [f"{r[m]:.3f}" if m in r else "" for m in metric_names]
    cells.append(f"{r['images_per_second']:.2f}")
    lines.append("| " + " | ".join(cells) + " |")
  lines += _by_object_count_table(rows)
  if not grids:
    return "\n".join(lines) + "\n"
  lines += ["", "## Sample grids", "", "Captions of the grid cells, row-major: "
            + "; ".join(f"{i + 1}. {c}" for i, c in enumerate(report.get("grid_captions", []))),
            ""]
  for label in rows:
    lines += [f"### {label}", "", f"![{label}]({label}.png)", ""]
  return "\n".join(lines)


def _by_object_count_table(rows: dict) -> list[str]:
  counts = sorted({c for r in rows.values() for c in r.get("oracle_by_objects", {})}, key=int)
  if not counts:
    return []
  lines = ["", "All-attributes oracle accuracy by the number of objects in the caption:", "",
           "| sampler | " + " | ".join(f"{c} object{'s' if c != '1' else ''}" for c in counts)
           + " |", "|" + "---|" * (len(counts) + 1)]
  for label, r in rows.items():
    by_count = r.get("oracle_by_objects", {})
    lines.append(f"| {label} | " + " | ".join(
        f"{by_count[c]:.3f}" if c in by_count else "" for c in counts) + " |")
  return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m vqdiffusion_jax.evaluate",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="A training workdir.")
  parser.add_argument("--sampler", action="append", dest="samplers",
                      help="Sampler spec name[/steps[/guidance[/truncation]]]; repeatable "
                           "(default: vqdiffusion/all/1 and vqdiffusion/all/3).")
  parser.add_argument("--num_samples", type=int, default=256,
                      help="Evaluation captions (and reference images).")
  parser.add_argument("--batch_size", type=int, default=64, help="Images per sampling call.")
  parser.add_argument("--seed", type=int, default=0, help="Sampling seed.")
  parser.add_argument("--inception", default="", help="pytorch-fid Inception weights (FID, QS/DS).")
  parser.add_argument("--clip", default="", help="Hugging Face CLIP directory (CLIP score).")
  parser.add_argument("--out", default="", help="Output directory (default WORKDIR/eval).")
  outputs.add_verbosity_argument(parser)
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  outputs.quiet_logging(args.verbosity)
  specs = [SamplerSpec.parse(s) for s in args.samplers or ("vqdiffusion/all/1",
                                                           "vqdiffusion/all/3")]
  pipe = Pipeline.from_pretrained(args.workdir)
  config = loading.run_config(args.workdir)
  captions, images = evaluation_data(config, args.workdir, args.num_samples)
  networks = FeatureNetworks.load(args.inception, args.clip, images)
  report = evaluate(pipe, captions, images, specs, args.out or os.path.join(args.workdir, "eval"),
                    seed=args.seed, batch_size=args.batch_size, networks=networks, tag="cli")
  print(markdown_report(report))
  return report


if __name__ == "__main__":
  main()
