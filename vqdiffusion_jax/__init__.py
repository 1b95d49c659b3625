"""vqdiffusion-jax: VQ-Diffusion text-to-image synthesis in JAX and Flax.

``from vqdiffusion_jax import Pipeline, make_grid`` gives the notebook
pipeline (imported on first use, so importing the package stays cheap);
``PromptWarning`` is the warning of a prompt it cannot read (empty, or with
words its text encoder never saw).
"""

__version__ = "0.1.0"
__all__ = ["Pipeline", "PromptWarning", "make_grid"]


def __getattr__(name: str):
  if name in __all__:
    from vqdiffusion_jax import pipeline  # noqa: PLC0415
    return getattr(pipeline, name)
  raise AttributeError(f"module 'vqdiffusion_jax' has no attribute {name!r}")
