"""Optional dependencies: a clear error naming the install extra when one is missing.

PyTorch, safetensors, transformers and diffusers are needed only to read or
write PyTorch files (conversion, export, CLIP and LPIPS weights); the
``torch`` extra installs them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

TORCH_EXTRA = "pip install 'vqdiffusion-jax[torch]'"


class MissingExtraError(ImportError):
  """An optional dependency is not installed; the message says how to install it."""


def missing(error: ModuleNotFoundError, purpose: str) -> MissingExtraError:
  """The ``MissingExtraError`` for ``error``, a failed import of an optional package."""
  name = (error.name or "a package").split(".")[0]
  return MissingExtraError(f"{purpose} needs {name}, which is not installed; install it with "
                           f"{TORCH_EXTRA}")


def require(module: str, purpose: str) -> ModuleType:
  """Imports ``module`` (a package of the ``torch`` extra) for ``purpose``.

  Raises:
    MissingExtraError: the package is not installed; the message names it, the
      purpose and the install command.
  """
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as error:
    if (error.name or "").split(".")[0] != module.split(".")[0]:
      raise  # the package is there but one of its own imports is not: not ours to explain
    raise missing(error, purpose) from None
