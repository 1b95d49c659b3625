"""Evaluation metrics for generated images: FID, CLIP score, IS quality/diversity, PSNR, SSIM.

- ``fid``: Fréchet distance of feature statistics (``fid_from_features``).
- ``inception``: the FID InceptionV3 (pytorch-fid's weights), giving the pool
  features for FID and the class logits for the Inception Score.
- ``clip_score``: CLIP image and text embeddings and torchmetrics' CLIP score.
- ``image_metrics``: per-image PSNR and SSIM, and the quality and diversity
  factors of the Inception Score.

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
from vqdiffusion_jax.evaluation.fid import feature_statistics, fid_from_features, frechet_distance
from vqdiffusion_jax.evaluation.image_metrics import inception_quality_diversity, psnr, ssim
from vqdiffusion_jax.evaluation.inception import (
    FIDInceptionV3,
    load_inception,
    state_dict_template,
)

__all__ = [
    "CLIPEmbedder",
    "FIDInceptionV3",
    "clip_score",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "inception_quality_diversity",
    "load_clip",
    "load_inception",
    "preprocess_images",
    "psnr",
    "ssim",
    "state_dict_template",
]
