"""Evaluates a checkpoint: samples per sampler, FID, IS, CLIP score, text faithfulness.

  python -m vqdiffusion_jax.evaluate --checkpoint runs/shapes \
      [--sampler vqdiffusion/all/1 --sampler purity/16/3] [--num_samples 256] \
      [--inception pt_inception.pth] [--clip clip-vit-b32/] [--out runs/shapes/eval]

  python -m vqdiffusion_jax.evaluate --checkpoint converted/ --dataset mscoco_captions \
      --split validation --data_dir ~/tensorflow_datasets --num_samples 30000 \
      --inception pt_inception.pth --reference_stats coco_val_256.npz --clip clip-vit-b32/ \
      --out eval_coco

``--checkpoint`` (also ``--workdir``) is a training workdir, a converted
directory (``python -m vqdiffusion_jax.convert``) or a diffusers
``VQDiffusionPipeline`` directory. A workdir's captions and real images are
its evaluation split; for any checkpoint ``--dataset`` names a split of a
built dataset (shapes or TFDS) and ``--captions`` a file of prompts, one a
line. A class-conditional model samples the evaluation split's labels (one
sample each, guided through its null class), an unconditional one as many
images as the split gives real ones; the "captions" below are then those
labels, or None. A sampler spec is ``name[/steps[/guidance[/truncation]]]``, steps
``all`` meaning every step (or one token per call for reveal samplers).
The flags are checked before anything is loaded; captions that are empty or
have words a trained text encoder never saw are reported once, before
sampling (a warning, or with ``--unknown_words error`` an error). From the
command line a bad input ends the command with one ``error:`` line (exit
status 2).
Measured per sampler:

* on the embedded shapes data, the oracle's text-faithfulness accuracy per
  attribute and all-attributes-correct (``data.oracle``);
* with ``--inception`` (pytorch-fid weights): FID against the real images (or
  the precomputed ``--reference_stats``), the Inception Score (mean and std
  over 10 splits) and its quality / diversity factors
  (``evaluation.image_metrics``);
* with ``--clip`` (a Hugging Face CLIP directory): the mean CLIP score;
* seconds and images/s of sampling.

Also the VQ-VAE's reconstruction PSNR / SSIM on the real images.

Everything is streamed: each batch of samples is generated, quantised to
uint8 as a saved PNG would be, scored (Inception pool features into float64
running mean / covariance sums, per-split Inception Score sums, CLIP score
sums, oracle results) and dropped; only the first ``grid_size`` images are
kept, for the preview grid. The real images are read, reconstructed and
featurised batch by batch in the same way, so 30,000 samples cost the memory
of one batch. ``--save_reference_stats`` writes the real side's statistics as
pytorch-fid does (``mu``, ``sigma`` in an ``.npz``), for ``--reference_stats``.

Results go to ``OUT/report.json`` and ``OUT/report.md`` with one PNG grid per
sampler; a sampler already evaluated with the same settings is read back, so
re-running continues where it stopped. With several JAX processes (hosts)
every process runs the same command: each batch is sampled over the devices
of all of them (``Pipeline``), every process scores all the images, and
process 0 writes the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from vqdiffusion_jax import inputs, loading, outputs, values
from vqdiffusion_jax.convert import converted
from vqdiffusion_jax.data import loader, oracle, shapes, sources
from vqdiffusion_jax.evaluation import fid, image_metrics, inception
from vqdiffusion_jax.evaluation.clip_score import CLIPEmbedder, clip_score, load_clip
from vqdiffusion_jax.pipeline import Pipeline, make_grid

REPORT_JSON, REPORT_MD = "report.json", "report.md"
SPEC_FIELDS = {"num_inference_steps": "steps", "guidance_scale": "guidance",
               "truncation_rate": "truncation"}
DIFFUSERS_INDEX = "model_index.json"
METRIC_COLUMNS = {"fid": "FID", "inception_score": "IS", "clip_score": "CLIP score",
                  "quality_score": "QS", "diversity_score": "DS"}


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
      steps = None if len(parts) < 2 or parts[1] in ("", "all") else _spec_field(
          "steps", parts[1], int, "a positive integer or 'all'")
      guidance = _spec_field("guidance", parts[2], float, "a finite number >= 0") if (
          len(parts) > 2) else 1.0
      truncation = _spec_field("truncation", parts[3], float, "a finite number in (0, 1]") if (
          len(parts) > 3) else 1.0
      inputs.sampler_options(num_inference_steps=steps, guidance_scale=guidance,
                             truncation_rate=truncation, names=SPEC_FIELDS)
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


def _spec_field(name: str, text: str, kind: type, allowed: str):
  try:
    return kind(text)
  except ValueError:
    raise ValueError(f"{name} must be {allowed}, got {text!r}") from None


# --------------------------------------------------------------------------- inputs


def report_captions(pipe: Pipeline, captions: Sequence, mode: str, option: str | None) -> None:
  """Reports the unreadable captions once, per ``mode`` (``Pipeline.report_prompts_once``)."""
  pipe.report_prompts_once(captions, [f"captions[{i}]" for i in range(len(captions))], mode,
                           option)


def checkpoint_kind(path: str) -> str:
  """``"workdir"``, ``"converted"`` or ``"diffusers"``: what ``--checkpoint`` names.

  Raises:
    FileNotFoundError: nothing at ``path``.
    ValueError: a path that is none of the three, named.
  """
  if not epath.Path(path).exists():
    raise FileNotFoundError(f"--checkpoint {path}: no such file or directory")
  if loading.is_workdir(path):
    return "workdir"
  if os.path.isdir(path) and converted.is_converted(path):
    return "converted"
  if os.path.isfile(os.path.join(path, DIFFUSERS_INDEX)):
    return "diffusers"
  raise ValueError(
      f"--checkpoint {path} is not a checkpoint evaluate can read; expected a training workdir "
      f"(with {loading.DENOISER_STAGE}/checkpoints/), a converted directory "
      f"(python -m vqdiffusion_jax.convert; {converted.CONFIG_NAME} of format "
      f"{converted.FORMAT!r}) or a diffusers VQDiffusionPipeline directory ({DIFFUSERS_INDEX})")


@dataclasses.dataclass(frozen=True)
class ReferenceImages:
  """Real images read batch by batch: records of a split (resized, centre-cropped) or an array.

  Attributes:
    source: records with an ``"image"`` (uint8 HWC), or a uint8 ``(N, S, S, 3)`` array.
    image_size: the side S the records' images are resized and cropped to.
    count: the first ``count`` entries are used.
    captions: each image's caption, when known (the oracle checks reconstructions).
    name: a description for the report.
  """

  source: Sequence
  image_size: int
  count: int
  captions: Sequence[str] | None = None
  name: str = ""

  @classmethod
  def from_array(cls, images: np.ndarray, captions: Sequence[str] | None = None,
                 name: str = "") -> ReferenceImages:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise ValueError(f"reference images must be uint8 (N, S, S, 3), got {images.dtype} "
                       f"{images.shape}")
    if captions is not None and len(captions) != len(images):
      captions = None
    return cls(images, images.shape[1], len(images), captions,
               name or f"{len(images)} evaluation images")

  def __len__(self) -> int:
    return self.count

  def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, Sequence[str] | None]]:
    """``(uint8 (b, S, S, 3) images, their captions or None)`` per batch, in order."""
    for start in range(0, self.count, batch_size):
      stop = min(start + batch_size, self.count)
      captions = None if self.captions is None else self.captions[start:stop]
      yield self.load(start, stop), captions

  def load(self, start: int, stop: int) -> np.ndarray:
    """The images ``start .. stop - 1`` as uint8 ``(stop - start, S, S, 3)``."""
    if isinstance(self.source, np.ndarray):
      return self.source[start:stop]
    return np.stack([loader.resize_and_crop(np.asarray(self.source[i]["image"]), self.image_size)
                     for i in range(start, stop)])


def first_captions(records: Sequence, count: int) -> list:
  """The condition of each of the first ``count`` records: its first caption.

  Records without ``captions`` give their class ``label`` (an int) when they
  have one (class folders), else None (unlabelled images).
  """
  if count and "captions" not in records[0]:
    if "label" in records[0]:
      return [int(records[i]["label"]) for i in range(count)]
    return [None] * count
  captions = []
  for i in range(count):
    found = loader.decode_captions(records[i].get("captions"))
    if not found:
      raise ValueError(f"record {i} of the evaluation split has no caption")
    captions.append(found[0])
  return captions


def split_reference(data: Any, split: str, home: str, image_size: int,
                    num_samples: int) -> tuple[list[str], ReferenceImages]:
  """(captions, real images) of the first ``num_samples`` records of a split.

  Args:
    data: a ``data`` config section (name, data_dir, and the shapes sizes).
    split: the split, e.g. ``"validation"``.
    home: the shapes data's default home (``home/data``).
    image_size: the side the real images are resized and cropped to.
    num_samples: how many records.
  """
  source = sources.split_source(data, split, home)
  count = min(num_samples, len(source))
  captions = first_captions(source, count)
  name = f"{data.name} {split}: {count} images at {image_size} px"
  return captions, ReferenceImages(source, image_size, count, captions, name)


def dataset_config(name: str, data_dir: str, image_size: int) -> ml_collections.ConfigDict:
  """A minimal ``data`` section for ``sources.split_source``."""
  return ml_collections.ConfigDict({"name": name, "data_dir": data_dir,
                                    "image_size": image_size, "num_train": 0, "num_test": 0})


def evaluation_data(config: Any, workdir: str, num_samples: int) -> tuple[list[str], np.ndarray]:
  """(captions, uint8 images) of a workdir's first ``num_samples`` evaluation examples.

  For small evaluations (the end-of-run report); ``split_reference`` streams.
  """
  captions, reference = split_reference(config.data, config.data.eval_split, workdir,
                                        int(config.data.image_size), num_samples)
  return captions, reference.load(0, len(reference))


def read_captions(path: str, limit: int | None = None) -> list[str]:
  """Prompts from a UTF-8 text file, one a line (blank lines skipped), the first ``limit``."""
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f"--captions {path}: no such file")
  lines = epath.Path(path).read_text(encoding="utf-8").splitlines()
  captions = [line.strip() for line in lines if line.strip()]
  if not captions:
    raise ValueError(f"--captions {path} holds no captions (one prompt a line)")
  return captions[:limit]


# ------------------------------------------------------------------- feature networks


@dataclasses.dataclass
class FeatureNetworks:
  """Optional networks of user-supplied weights, and the real images' FID statistics.

  Attributes:
    inception: ``[0, 1]`` images -> (pool features, unbiased logits), or None.
    clip: a CLIP model, or None.
    reference_stats: the real images' ``(mu, sigma)``, loaded or computed.
    reference_name: where ``reference_stats`` come from.
    inception_path: the Inception weights' file (part of a result's settings).
    clip_path: the CLIP directory (part of a result's settings).
  """

  inception: Callable | None = None
  clip: CLIPEmbedder | None = None
  reference_stats: tuple[np.ndarray, np.ndarray] | None = None
  reference_name: str = ""
  inception_path: str = ""
  clip_path: str = ""

  @classmethod
  def load(cls, inception_path: str = "", clip_path: str = "",
           reference_images: np.ndarray | None = None,
           reference_stats: str = "") -> FeatureNetworks:
    """Loads the networks; the real side's statistics from a file or ``reference_images``.

    Args:
      inception_path: pytorch-fid Inception weights, or "".
      clip_path: a Hugging Face CLIP directory, or "".
      reference_images: uint8 real images for FID (small sets; ``evaluate``
        streams larger ones), or None.
      reference_stats: a pytorch-fid ``.npz`` (``mu``, ``sigma``) used instead.
    """
    if reference_stats and not inception_path:
      raise ValueError(f"--reference_stats {reference_stats} needs --inception (the FID "
                       "Inception weights) to featurise the samples")
    networks = cls(inception_path=inception_path, clip_path=clip_path)
    if reference_stats:
      networks.reference_stats = fid.load_statistics(reference_stats, inception.POOL_FEATURES)
      networks.reference_name = os.fspath(outputs.absolute_path(reference_stats))
    if inception_path:
      networks.inception = inception.feature_function(*inception.load_inception(inception_path))
      if reference_images is not None and networks.reference_stats is None:
        reference = ReferenceImages.from_array(reference_images)
        networks.reference_stats = networks.statistics(reference.batches(50))
        networks.reference_name = reference.name
    if clip_path:
      networks.clip = load_clip(clip_path)
    return networks

  def inception_outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 (pool features, unbiased logits) of uint8 or ``[0, 1]`` images."""
    x = jnp.asarray(images, jnp.float32)
    x = x / 255.0 if images.dtype == np.uint8 else x
    pool, logits = self.inception(x)
    return np.asarray(pool, np.float64), np.asarray(logits, np.float64)

  def statistics(self, batches) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of the pool features of ``(images, captions)`` batches, streamed."""
    running = fid.RunningStatistics(inception.POOL_FEATURES)
    for images, _ in batches:
      running.update(self.inception_outputs(images)[0])
    return running.statistics()

  def settings(self, is_splits: int) -> dict:
    """What a sampler's scores depend on, beyond the samples."""
    return {"inception": self.inception_path, "clip": self.clip_path,
            "reference": self.reference_name, "is_splits": is_splits}


# ---------------------------------------------------------------------------- scoring


def to_uint8(images) -> np.ndarray:
  """``[0, 1]`` float images -> uint8, rounded as a saved PNG is."""
  return np.asarray(np.clip(np.asarray(images) * 255.0 + 0.5, 0, 255), np.uint8)


class SampleScorer:
  """Scores generated images batch by batch, keeping statistics and a preview, not the images.

  Args:
    num_images: how many images will arrive (the Inception Score's splits).
    networks: the feature networks and reference statistics, or None.
    oracle_ok: check the shapes oracle.
    grid_size: how many of the first images to keep for the preview grid.
    is_splits: the Inception Score's splits (fewer when there are fewer images).
  """

  def __init__(self, num_images: int, networks: FeatureNetworks | None = None, *,
               oracle_ok: bool = False, grid_size: int = 16,
               is_splits: int = image_metrics.IS_SPLITS):
    self.num_images, self.grid_size, self.oracle_ok = num_images, grid_size, oracle_ok
    self.networks = networks or FeatureNetworks()
    self.oracle_results: list[dict] = []
    self.captions_seen: list[str] = []
    self.preview: list[np.ndarray] = []
    self.running = self.scores = None
    if self.networks.inception is not None:
      self.running = fid.RunningStatistics(inception.POOL_FEATURES)
      self.scores = image_metrics.InceptionScoreAccumulator(
          num_images, min(is_splits, num_images))
    self.clip_sum, self.clip_count, self.count = 0.0, 0, 0

  def update(self, start: int, captions: Sequence[str], images: np.ndarray) -> None:
    """Scores uint8 ``(b, H, W, 3)`` images ``start .. start + b - 1`` for their captions."""
    if start != self.count or len(images) != len(captions):
      raise ValueError(f"expected the images from {self.count} with one caption each, got "
                       f"{len(images)} images from {start} and {len(captions)} captions")
    keep = self.grid_size - len(self.preview)
    self.preview.extend(image.copy() for image in images[:max(keep, 0)])
    if self.oracle_ok:
      self.oracle_results.extend(oracle.check_batch(images, list(captions)))
      self.captions_seen.extend(captions)
    if self.running is not None:
      pool, logits = self.networks.inception_outputs(images)
      self.running.update(pool)
      self.scores.update(logits, start)
    if self.networks.clip is not None and all(isinstance(c, str) for c in captions):
      image_embeds = self.networks.clip.embed_images(jnp.asarray(images, jnp.float32) / 255.0)
      text_embeds = self.networks.clip.embed_texts(list(captions))
      self.clip_sum += float(np.sum(np.asarray(clip_score(image_embeds, text_embeds),
                                               np.float64)))
      self.clip_count += len(images)
    self.count += len(images)

  def result(self) -> dict:
    """The scores of every image so far (all ``num_images`` for the Inception Score)."""
    scores = {}
    if self.oracle_ok:
      scores["oracle"] = oracle.summarize(self.oracle_results)
      scores["oracle_by_objects"] = accuracy_by_object_count(self.oracle_results,
                                                             self.captions_seen)
    if self.running is not None:
      scores |= self.scores.result()
      scores["inception_score_splits"] = self.scores.splits
      reference = self.networks.reference_stats
      if reference is not None and self.running.count > 1:
        scores["fid"] = fid.frechet_distance(*self.running.statistics(), *reference)
    if self.clip_count:
      scores["clip_score"] = self.clip_sum / self.clip_count
    return scores


def score_samples(images: np.ndarray, captions: Sequence[str], *, oracle_ok: bool,
                  networks: FeatureNetworks | None = None,
                  is_splits: int = image_metrics.IS_SPLITS) -> dict:
  """The metrics of generated images (float [0, 1]) for their captions, in one batch."""
  scorer = SampleScorer(len(images), networks, oracle_ok=oracle_ok, grid_size=0,
                        is_splits=is_splits)
  scorer.update(0, captions, to_uint8(images))
  return scorer.result()


def condition_arguments(pipe: Pipeline, conditions: Sequence) -> dict:
  """The ``Pipeline`` arguments that ask for one sample of each condition.

  Prompts for a text model, ``class_labels`` for a class-conditional one,
  ``num_images`` for an unconditional one (whose conditions are ignored).
  """
  kind = pipe.denoiser.conditioning
  if kind == "class":
    return {"class_labels": [int(c) for c in conditions]}
  if kind == "none":
    return {"num_images": len(conditions)}
  return {"prompts": list(conditions)}


def generate(pipe: Pipeline, captions: Sequence, spec: SamplerSpec, *, seed: int,
             batch_size: int) -> np.ndarray:
  """uint8 samples of ``captions`` (prompts, labels or Nones), the batch padded to
  ``batch_size`` (one compiled shape)."""
  padded = list(captions) + [captions[-1]] * (batch_size - len(captions))
  return to_uint8(np.stack(pipe(**condition_arguments(pipe, padded), seed=seed,
                                output_type="np", **spec.options())[:len(captions)]))


def sample_batches(pipe: Pipeline, captions: Sequence[str], spec: SamplerSpec, *, seed: int,
                   batch_size: int) -> Iterator[tuple[int, list[str], np.ndarray]]:
  """``(start, captions, uint8 images)`` per batch; batch ``start`` is sampled with
  ``seed + start``. Nothing but the batch being yielded is held."""
  for start in range(0, len(captions), batch_size):
    batch = list(captions[start:start + batch_size])
    yield start, batch, generate(pipe, batch, spec, seed=seed + start, batch_size=batch_size)


def score_stream(batches: Iterator[tuple[int, Sequence[str], np.ndarray]], scorer: SampleScorer,
                 progress: outputs.Progress | None = None) -> float:
  """Scores each batch as it arrives and lets it go; returns the seconds spent producing them."""
  seconds = 0.0
  while True:
    tick = time.perf_counter()
    item = next(batches, None)
    seconds += time.perf_counter() - tick
    if item is None:
      return seconds
    scorer.update(*item)
    del item  # the batch is not kept alive while the next one is made
    if progress is not None:
      progress.update(scorer.count, None)


def evaluate_sampler(pipe: Pipeline, captions: Sequence[str], spec: SamplerSpec, *, seed: int,
                     batch_size: int, networks: FeatureNetworks | None = None,
                     oracle_ok: bool = False, grid_size: int = 16,
                     is_splits: int = image_metrics.IS_SPLITS) -> tuple[dict, list[np.ndarray]]:
  """(scores with timing, the preview images) of one sampler setting, streamed."""
  scorer = SampleScorer(len(captions), networks, oracle_ok=oracle_ok, grid_size=grid_size,
                        is_splits=is_splits)
  progress = outputs.Progress(len(captions), name=f"sampling {spec.label}", unit="images")
  seconds = score_stream(sample_batches(pipe, captions, spec, seed=seed, batch_size=batch_size),
                         scorer, progress)
  progress.close()
  return ({"spec": dataclasses.asdict(spec), "seconds": seconds,
           "images_per_second": len(captions) / seconds, **scorer.result()}, scorer.preview)


class ReconstructionScorer:
  """PSNR / SSIM (and the oracle) of the VQ-VAE's round trip, batch by batch."""

  def __init__(self, pipe: Pipeline):
    vq = pipe.vqvae

    @jax.jit
    def round_trip(variables, x):
      tokens = vq.apply(variables, x * 2.0 - 1.0, method="encode")
      out = jnp.clip((vq.apply(variables, tokens, method="decode") + 1.0) / 2.0, 0.0, 1.0)
      return out, image_metrics.psnr(out, x), image_metrics.ssim(out, x)

    self.round_trip = functools.partial(round_trip, pipe.vqvae_variables)
    self.psnr_sum = self.ssim_sum = 0.0
    self.count = 0
    self.oracle_results: list[dict] = []

  def update(self, images: np.ndarray, captions: Sequence[str] | None = None) -> None:
    """Adds uint8 images; with shapes captions also the oracle on their reconstructions."""
    out, psnr, ssim = self.round_trip(jnp.asarray(images, jnp.float32) / 255.0)
    self.psnr_sum += float(np.sum(np.asarray(psnr, np.float64)))
    self.ssim_sum += float(np.sum(np.asarray(ssim, np.float64)))
    self.count += len(images)
    if captions is not None:
      self.oracle_results.extend(oracle.check_batch(np.asarray(out) * 2.0 - 1.0, list(captions)))

  def result(self) -> dict:
    metrics = {"psnr": self.psnr_sum / self.count, "ssim": self.ssim_sum / self.count,
               "num_images": self.count}
    if self.oracle_results:
      metrics["oracle"] = oracle.summarize(self.oracle_results)
    return metrics


def reference_pass(pipe: Pipeline, reference: ReferenceImages, *, batch_size: int,
                   networks: FeatureNetworks | None = None) -> dict:
  """One streamed pass over the real images: the VQ-VAE's reconstruction metrics and, when
  ``networks`` has an Inception but no reference statistics yet, those statistics."""
  reconstruction = ReconstructionScorer(pipe)
  running = None
  if networks is not None and networks.inception is not None and networks.reference_stats is None:
    running = fid.RunningStatistics(inception.POOL_FEATURES)
  oracle_ok = reference.captions is not None and is_shapes_captions(reference.captions)
  progress = outputs.Progress(len(reference), name="real images", unit="images")
  for images, captions in reference.batches(batch_size):
    reconstruction.update(images, captions if oracle_ok else None)
    if running is not None:
      running.update(networks.inception_outputs(images)[0])
    progress.update(reconstruction.count, None)
  progress.close()
  if running is not None and running.count > 1:
    networks.reference_stats = running.statistics()
    networks.reference_name = reference.name
  return reconstruction.result()


def reconstruction_metrics(pipe: Pipeline, images: np.ndarray, batch_size: int = 64,
                           captions: Sequence[str] | None = None) -> dict:
  """Mean PSNR / SSIM (dB, [0, 1] pixels) of the VQ-VAE's encode-decode round trip.

  With shapes ``captions`` also the oracle accuracy of the reconstructions:
  the ceiling that the denoiser's samples can reach through this VQ-VAE.
  """
  return reference_pass(pipe, ReferenceImages.from_array(images, captions),
                        batch_size=batch_size)


def accuracy_by_object_count(results: Sequence[dict], captions: Sequence[str]
                             ) -> dict[str, float]:
  """All-attributes oracle accuracy per number of objects a caption names."""
  groups: dict[int, list[bool]] = {}
  for result, caption in zip(results, captions, strict=True):
    groups.setdefault(len(shapes.parse_caption(caption)), []).append(result["all"])
  return {str(count): float(np.mean(hits)) for count, hits in sorted(groups.items())}


def is_shapes_captions(captions: Sequence) -> bool:
  """Whether the oracle can parse every caption (the embedded shapes data)."""
  if not all(isinstance(c, str) for c in captions):
    return False
  try:
    return all(shapes.parse_caption(c) for c in captions)
  except ValueError:
    return False


def _read_json(path: epath.Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def evaluate(pipe: Pipeline, captions: Sequence[str],
             reference_images: np.ndarray | ReferenceImages | None, specs: Sequence[SamplerSpec],
             out_dir: str | os.PathLike, *, seed: int = 0, batch_size: int = 64,
             grid_size: int = 16,
             networks: FeatureNetworks | None = None, tag: str = "",
             is_splits: int = image_metrics.IS_SPLITS, save_reference_stats: str = "") -> dict:
  """Evaluates every sampler spec and the VQ-VAE; writes JSON, grids and Markdown.

  Args:
    pipe: the pipeline.
    captions: the prompts, one sample each.
    reference_images: the real images (a uint8 array or a streamed
      ``ReferenceImages``), or None (no reconstruction metrics; FID only with
      ``networks.reference_stats``).
    specs: the sampler settings.
    out_dir: where the report goes.
    seed: sampling seed.
    batch_size: images per sampling call (and per real-image batch).
    grid_size: images in each preview grid.
    networks: the feature networks (FID, IS, CLIP), or None.
    tag: part of the settings a cached result must match.
    is_splits: the Inception Score's splits.
    save_reference_stats: write the real images' FID statistics to this ``.npz``.

  A sampler whose result file holds the same settings (``tag``, seed, caption
  count, metric networks, reference) is read back instead of re-sampled.
  """
  lead = jax.process_index() == 0  # with several processes, all sample and score, one writes
  out_dir = epath.Path(out_dir)
  if lead:
    out_dir.mkdir(parents=True, exist_ok=True)
  networks = networks or FeatureNetworks()
  reference = reference_images
  if isinstance(reference, np.ndarray):
    reference = ReferenceImages.from_array(reference, captions)
  report: dict[str, Any] = {}
  if reference is not None:
    report["vqvae"] = reference_pass(pipe, reference, batch_size=batch_size, networks=networks)
  if save_reference_stats:
    if networks.reference_stats is None:
      raise ValueError(f"--save_reference_stats {save_reference_stats}: no reference statistics "
                       "to save (they need --inception and real images)")
    if lead:
      fid.save_statistics(save_reference_stats, *networks.reference_stats)
  settings = {"tag": tag, "seed": seed, "num_samples": len(captions),
              "metrics": networks.settings(is_splits)}
  report = {"settings": settings, **report, "samplers": {}}
  oracle_ok = is_shapes_captions(captions)
  for spec in specs:
    path = out_dir / f"{spec.label}.json"
    cached = _read_json(path)
    if cached is None or cached.get("settings") != settings:
      scores, preview = evaluate_sampler(pipe, captions, spec, seed=seed, batch_size=batch_size,
                                         networks=networks, oracle_ok=oracle_ok,
                                         grid_size=grid_size, is_splits=is_splits)
      cached = {"settings": settings, **scores}
      if lead:
        outputs.save_image(out_dir / f"{spec.label}.png",
                           make_grid(preview, columns=int(np.ceil(np.sqrt(len(preview))))))
        outputs.write_json_atomically(path, cached)
    report["samplers"][spec.label] = cached
  report["grid_captions"] = list(captions[:grid_size])
  if lead:
    outputs.write_json_atomically(out_dir / REPORT_JSON, report)
    outputs.write_text(out_dir / REPORT_MD, markdown_report(report))
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
  if "vqvae" in report:
    tok = report["vqvae"]
    lines += ["## VQ-VAE reconstruction", "",
              f"PSNR {tok['psnr']:.2f} dB, SSIM {tok['ssim']:.4f} on {tok['num_images']} "
              "evaluation images." + _ceiling(tok), ""]
  lines += ["## Samplers", ""] + _metrics_note(report.get("settings", {}))
  rows = report["samplers"]
  metric_names = [m for m in METRIC_COLUMNS if any(m in r for r in rows.values())]
  header = ["sampler", "steps", "guidance", "truncation"]
  if any("oracle" in r for r in rows.values()):
    header += [f"oracle {a}" for a in (*shapes.ATTRIBUTES, "all")]
  header += [METRIC_COLUMNS[m] for m in metric_names] + ["images/s"]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows.values():
    spec = r["spec"]
    cells = [spec["name"], "all" if spec["steps"] is None else str(spec["steps"]),
             f"{spec['guidance']:g}", f"{spec['truncation']:g}"]
    if "oracle" in r:
      cells += [f"{r['oracle'][a]:.3f}" for a in (*shapes.ATTRIBUTES, "all")]
    cells += [_metric_cell(r, m) for m in metric_names]
    cells.append(f"{r['images_per_second']:.2f}")
    lines.append("| " + " | ".join(cells) + " |")
  lines += _by_object_count_table(rows)
  if not grids:
    return "\n".join(lines) + "\n"
  lines += ["", "## Sample grids", ""] + _grid_conditions(report.get("grid_captions", []))
  for label in rows:
    lines += [f"### {label}", "", f"![{label}]({label}.png)", ""]
  return "\n".join(lines)


def _grid_conditions(conditions: Sequence) -> list[str]:
  """The line naming each grid cell's caption or class (none for unconditional samples)."""
  if not conditions or all(c is None for c in conditions):
    return []
  what = "Captions" if isinstance(conditions[0], str) else "Classes"
  return [f"{what} of the grid cells, row-major: "
          + "; ".join(f"{i + 1}. {c}" for i, c in enumerate(conditions)), ""]


def _metric_cell(row: dict, name: str) -> str:
  if name not in row:
    return ""
  if name == "inception_score":
    return f"{row[name]:.2f} ± {row['inception_score_std']:.2f}"
  return f"{row[name]:.3f}"


def _metrics_note(settings: dict) -> list[str]:
  """A line saying what the FID / IS / CLIP columns were measured with."""
  metrics = settings.get("metrics", {})
  parts = []
  if metrics.get("reference"):
    parts.append(f"FID against {metrics['reference']}")
  if metrics.get("inception"):
    parts.append(f"IS (mean ± std over {metrics['is_splits']} splits) and QS / DS from the "
                 "FID Inception's unbiased logits")
  if metrics.get("clip"):
    parts.append(f"CLIP score with {metrics['clip']}")
  if not parts:
    return []
  return [f"{settings['num_samples']} samples per sampler; " + "; ".join(parts) + ".", ""]


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
  parser.add_argument("--checkpoint", "--workdir", dest="checkpoint", required=True,
                      help="A training workdir, a converted directory (python -m "
                           "vqdiffusion_jax.convert) or a diffusers VQDiffusionPipeline directory.")
  parser.add_argument("--sampler", action="append", dest="samplers",
                      help="Sampler spec name[/steps[/guidance[/truncation]]]; repeatable "
                           "(default: vqdiffusion/all/1 and vqdiffusion/all/3).")
  parser.add_argument("--num_samples", type=int, default=256,
                      help="Samples per sampler (and real images); e.g. 30000 for MSCOCO.")
  parser.add_argument("--batch_size", type=int, default=64, help="Images per sampling call.")
  parser.add_argument("--seed", type=int, default=0, help="Sampling seed.")
  parser.add_argument("--dataset", default="",
                      help="Captions and real images from a built dataset: 'shapes' or a TFDS "
                           "name (e.g. mscoco_captions); default: a workdir's own data.")
  parser.add_argument("--split", default="",
                      help="The --dataset split (default: 'test' for shapes, else 'validation').")
  parser.add_argument("--data_dir", default="", help="The --dataset's data directory.")
  parser.add_argument("--captions", default="",
                      help="A text file of prompts, one a line (replaces the dataset's captions).")
  parser.add_argument("--inception", default="",
                      help="pytorch-fid Inception weights (FID, IS, QS/DS).")
  parser.add_argument("--reference_stats", default="",
                      help="pytorch-fid statistics .npz (mu, sigma) of the real images, used "
                           "instead of computing them.")
  parser.add_argument("--save_reference_stats", default="",
                      help="Write the real images' statistics to this .npz (pytorch-fid format).")
  parser.add_argument("--is_splits", type=int, default=image_metrics.IS_SPLITS,
                      help="Inception Score splits.")
  parser.add_argument("--clip", default="", help="Hugging Face CLIP directory (CLIP score).")
  parser.add_argument("--grid_size", type=int, default=16, help="Images in each preview grid.")
  inputs.add_precision_argument(parser)
  parser.add_argument("--unknown_words", default="warn", choices=inputs.UNKNOWN_WORDS_MODES,
                      help="What empty captions, or words the trained text encoder never saw, "
                           "do: warn, error (stop before sampling) or ignore.")
  parser.add_argument("--out", default="",
                      help="Output directory (default WORKDIR/eval; required for other "
                           "checkpoints).")
  outputs.add_verbosity_argument(parser)
  return parser.parse_args(argv)


def evaluation_inputs(args: argparse.Namespace, kind: str,
                      image_size: int) -> tuple[list[str], ReferenceImages | None]:
  """The captions and the streamed real images the command line asks for."""
  reference, captions = None, None
  if args.dataset:
    split = args.split or ("test" if args.dataset == "shapes" else "validation")
    home = args.data_dir or (args.out or args.checkpoint)
    captions, reference = split_reference(dataset_config(args.dataset, args.data_dir, image_size),
                                          split, home, image_size, args.num_samples)
  elif kind == "workdir":
    config = loading.run_config(args.checkpoint)
    captions, reference = split_reference(config.data, config.data.eval_split, args.checkpoint,
                                          int(config.data.image_size), args.num_samples)
  if args.captions:
    captions = read_captions(args.captions, args.num_samples)
  return captions, reference


def check_arguments(args: argparse.Namespace) -> str:
  """Checks the flags before anything is loaded; returns the checkpoint's kind."""
  for name in ("num_samples", "batch_size", "is_splits"):
    values.positive_int(f"--{name}", getattr(args, name))
  values.non_negative_int("--grid_size", args.grid_size)
  values.seed("--seed", args.seed)
  kind = checkpoint_kind(args.checkpoint)
  if kind != "workdir" and not args.out:
    raise ValueError(f"--out is required for a {kind} checkpoint ({args.checkpoint}); the "
                     "default WORKDIR/eval is only for training workdirs")
  if kind != "workdir" and not (args.dataset or args.captions):
    raise ValueError(f"--checkpoint {args.checkpoint} is a {kind} checkpoint, which carries no "
                     "evaluation data: pass --captions FILE (one prompt a line) and/or "
                     "--dataset NAME (captions and real images)")
  if args.captions:
    read_captions(args.captions)
  if args.save_reference_stats and not args.inception:
    raise ValueError(f"--save_reference_stats {args.save_reference_stats} needs --inception")
  return kind


def main(argv: Sequence[str] | None = None) -> dict:
  """The command: ``prepare`` (every check and load), then ``run``; returns the report."""
  return run(prepare(argv))


@dataclasses.dataclass(frozen=True)
class Job:
  """An evaluation whose flags, checkpoint, networks and captions passed every check."""

  args: argparse.Namespace
  specs: list[SamplerSpec]
  networks: FeatureNetworks
  pipe: Pipeline
  captions: list[str]
  reference: ReferenceImages | None


def prepare(argv: Sequence[str] | None = None) -> Job:
  """Checks the flags, loads what they name and checks the captions: bad input fails here."""
  args = parse_args(argv)
  outputs.quiet_logging(args.verbosity)
  kind = check_arguments(args)
  specs = [SamplerSpec.parse(s) for s in args.samplers or ("vqdiffusion/all/1",
                                                           "vqdiffusion/all/3")]
  networks = FeatureNetworks.load(args.inception, args.clip,
                                  reference_stats=args.reference_stats)
  pipe = Pipeline.from_pretrained(args.checkpoint, precision=args.precision)
  captions, reference = evaluation_inputs(args, kind, pipe.image_size)
  report_captions(pipe, captions, args.unknown_words, "--unknown_words")
  return Job(args, specs, networks, pipe, captions, reference)


def run(job: Job) -> dict:
  """Samples and scores every sampler of ``job``, writes the report; returns it."""
  args = job.args
  report = evaluate(job.pipe, job.captions, job.reference, job.specs,
                    args.out or epath.Path(args.checkpoint) / "eval", seed=args.seed,
                    batch_size=args.batch_size, grid_size=args.grid_size, networks=job.networks,
                    tag="cli", is_splits=args.is_splits,
                    save_reference_stats=args.save_reference_stats)
  print(markdown_report(report, grids=False))
  return report


if __name__ == "__main__":
  outputs.one_line_warnings()
  with outputs.bad_input_is_one_line(*loading.BAD_INPUT_ERRORS):
    prepared = prepare(sys.argv[1:])
  run(prepared)
