"""Offline conversion of PyTorch checkpoints into our parameter trees.

  python -m vqdiffusion_jax.convert SRC --out DIR

``load_denoiser(path)`` accepts our converted directory, a diffusers
pipeline or Transformer2DModel directory, or an official ``.pth``.
"""

from vqdiffusion_jax.convert.pipeline import (
    convert,
    load_denoiser,
    load_text_encoder,
    load_vqvae,
)

__all__ = ["convert", "load_denoiser", "load_text_encoder", "load_vqvae"]
