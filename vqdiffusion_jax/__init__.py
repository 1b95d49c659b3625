"""vqdiffusion-jax: VQ-Diffusion text-to-image synthesis in JAX and Flax."""

__version__ = "0.1.0"
