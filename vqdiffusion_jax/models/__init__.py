"""Flax linen models: the VQ-VAE, denoisers, text encoders, LPIPS and the PatchGAN."""
