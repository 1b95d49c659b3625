"""LPIPS weights from user-supplied files: torchvision's VGG16 and the LPIPS heads.

``load_lpips(vgg_path, heads_path)`` reads the two files (``.pth`` or
``.safetensors``) and checks every key and shape against ``models.lpips.LPIPS``:
the VGG16 convs come from torchvision's ``features.{index}`` keys, the five
heads from LPIPS's ``lin{i}.model.1.weight``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from vqdiffusion_jax.convert import common
from vqdiffusion_jax.models.lpips import VGG16_STAGES, abstract_params, vgg_conv_name


def torchvision_conv_indices() -> dict[str, int]:
  """Maps our VGG16 conv names to their index in torchvision's ``vgg16().features``.

  Returns:
    {"conv1_1": 0, "conv1_2": 2, "conv2_1": 5, ..., "conv5_3": 28}.
  """
  indices, position = {}, 0
  for stage, widths in enumerate(VGG16_STAGES):
    if stage:
      position += 1  # the max-pool
    for index in range(len(widths)):
      indices[vgg_conv_name(stage, index)] = position
      position += 2  # the conv and its ReLU
  return indices


def conversion_rules() -> dict[tuple[str, ...], common.Rule]:
  """Flax path -> (torch key, transform) for the VGG16 and heads checkpoints.

  Returns:
    Rules in the torchvision (``features.{idx}.weight``) and LPIPS
    (``lin{i}.model.1.weight``) key layouts, which do not overlap.
  """
  rules = {}
  for name, index in torchvision_conv_indices().items():
    rules[("vgg", name, "kernel")] = (f"features.{index}.weight", common.conv)
    rules[("vgg", name, "bias")] = (f"features.{index}.bias", common.same)
  for level in range(len(VGG16_STAGES)):
    rules[(f"lin{level}", "kernel")] = (f"lin{level}.model.1.weight", common.conv)
  return rules


def params_from_state_dicts(vgg: Mapping[str, np.ndarray],
                            heads: Mapping[str, np.ndarray]) -> dict:
  """Converts the torchvision VGG16 and LPIPS heads state dicts into our params.

  Args:
    vgg: torchvision VGG16 arrays (``features.*``; ``classifier.*`` is ignored).
    heads: LPIPS head arrays (``lin{i}.model.1.weight``, i = 0..4).

  Returns:
    The params tree as float32 NumPy arrays.

  Raises:
    ConversionError: on missing, unused or misshapen keys.
  """
  overlap = sorted(set(vgg) & set(heads))
  if overlap:
    raise common.ConversionError(f"keys in both the VGG16 and the heads file: {overlap}")
  source = {**vgg, **heads}
  return common.assemble(abstract_params(), conversion_rules(), source,
                         what="VGG16 + LPIPS heads checkpoint",
                         ignore=lambda key: key in vgg and key.startswith("classifier."))


def load_lpips(vgg_path: str | os.PathLike, heads_path: str | os.PathLike) -> dict:
  """Reads LPIPS weights from user-supplied files.

  Args:
    vgg_path: the torchvision VGG16 state dict (``vgg16-397923af.pth`` or a
      ``.safetensors`` with the same ``features.{idx}.weight/bias`` keys).
    heads_path: the LPIPS v0.1 VGG heads (``vgg.pth`` of LPIPS or taming,
      keys ``lin{i}.model.1.weight``), ``.pth`` or ``.safetensors``.

  Returns:
    The frozen params tree (float32 NumPy arrays) for ``LPIPS().apply``.

  Raises:
    FileNotFoundError: a file is missing (nothing is downloaded).
    ConversionError: a file does not hold the expected keys and shapes.
  """
  vgg = _read_file(vgg_path, "the torchvision VGG16 state dict "
                   "(keys features.{idx}.weight / features.{idx}.bias)")
  heads = _read_file(heads_path, "the LPIPS VGG heads, e.g. LPIPS v0.1 / taming "
                     "vgg.pth (keys lin{i}.model.1.weight)")
  return params_from_state_dicts(vgg, heads)


def _read_file(path: str | os.PathLike, contents: str) -> dict[str, np.ndarray]:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"LPIPS weight file not found: {path!r}; it should contain "
                            f"{contents}. Weights are not downloaded; supply the file.")
  return common.read_weights(path)

