"""Offline conversion of PyTorch checkpoints into our parameter trees.

  python -m vqdiffusion_jax.convert SRC --out DIR

``checkpoints`` reads any supported source (our converted directory, a
diffusers pipeline or model directory, an official ``.pth``); the other
modules hold one converter each (denoiser, VQ-VAE, CLIP text tower, LPIPS,
discriminator), ``common`` the rename rules and the checked assembly, and
``converted`` our own directory format.
"""
