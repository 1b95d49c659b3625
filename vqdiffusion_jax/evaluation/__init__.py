"""Evaluation metrics for generated images: FID, Inception Score, CLIP score, PSNR, SSIM.

- ``fid``: Fréchet distance of feature statistics (``fid_from_features``),
  their float64 running accumulation (``RunningStatistics``), and pytorch-fid's
  statistics files (``load_statistics``, ``save_statistics``).
- ``inception``: the FID InceptionV3 (pytorch-fid's weights), giving the pool
  features for FID and the class logits; ``feature_function`` gives the pool
  features and the Inception Score's unbiased logits.
- ``clip_score``: CLIP image and text embeddings and torchmetrics' CLIP score.
- ``image_metrics``: per-image PSNR and SSIM, the Inception Score
  (torch-fidelity's convention, all at once or streamed) and its quality and
  diversity factors.

Every network reads weights from files the user supplies; nothing is downloaded.
The package attribute ``clip_score`` is the function; import the module's other
names from ``vqdiffusion_jax.evaluation.clip_score`` directly.
"""

from vqdiffusion_jax.evaluation.clip_score import (
    CLIPEmbedder,
    clip_score,
    load_clip,
    preprocess_images,
)
from vqdiffusion_jax.evaluation.fid import (
    RunningStatistics,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    load_statistics,
    save_statistics,
)
from vqdiffusion_jax.evaluation.image_metrics import (
    InceptionScoreAccumulator,
    inception_quality_diversity,
    inception_score,
    psnr,
    ssim,
)
from vqdiffusion_jax.evaluation.inception import (
    FIDInceptionV3,
    feature_function,
    load_inception,
    state_dict_template,
    unbiased_logits,
)

__all__ = [
    "CLIPEmbedder",
    "FIDInceptionV3",
    "InceptionScoreAccumulator",
    "RunningStatistics",
    "clip_score",
    "feature_function",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "inception_quality_diversity",
    "inception_score",
    "load_clip",
    "load_inception",
    "load_statistics",
    "preprocess_images",
    "psnr",
    "save_statistics",
    "ssim",
    "state_dict_template",
    "unbiased_logits",
]
