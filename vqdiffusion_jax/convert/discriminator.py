"""taming's ``NLayerDiscriminator`` state dicts into our PatchGAN's variables.

Our convs and norms are named ``conv{layer}`` / ``norm{layer}``; taming keeps
them in one ``main`` Sequential, with LeakyReLUs between. The rules below
place every conv kernel, bias, norm scale and bias (and BatchNorm's running
statistics) by its index there.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vqdiffusion_jax.convert import common
from vqdiffusion_jax.models.discriminator import NLayerDiscriminator


def _taming_indices(module: NLayerDiscriminator) -> tuple[dict[int, int], dict[int, int]]:
  """Positions of our convs and norms in taming's ``main`` Sequential."""
  per_block = 2 if module.norm == "none" else 3
  conv_index, norm_index = {0: 0}, {}
  for layer in range(1, module.num_layers + 1):
    conv_index[layer] = 2 + per_block * (layer - 1)
    if module.norm != "none":
      norm_index[layer] = conv_index[layer] + 1
  conv_index[module.num_layers + 1] = 2 + per_block * module.num_layers
  return conv_index, norm_index


def conversion_rules(module: NLayerDiscriminator,
                     prefix: str = "") -> dict[tuple[str, ...], common.Rule]:
  """Variables path -> (torch key, transform) for taming's ``NLayerDiscriminator``.

  Args:
    module: our discriminator, configured as the torch one.
    prefix: prepended to torch keys, e.g. ``"loss.discriminator."`` in a
      taming VQGAN checkpoint.

  Returns:
    Rules over the ``{"params", "batch_stats"}`` tree.
  """
  conv_index, norm_index = _taming_indices(module)
  rules = {}
  for layer, index in conv_index.items():
    torch_name = f"{prefix}main.{index}"
    rules[("params", f"conv{layer}", "kernel")] = (f"{torch_name}.weight", common.conv)
    if layer in (0, module.num_layers + 1) or module.norm == "none":
      rules[("params", f"conv{layer}", "bias")] = (f"{torch_name}.bias", common.same)
  for layer, index in norm_index.items():
    torch_name = f"{prefix}main.{index}"
    rules[("params", f"norm{layer}", "scale")] = (f"{torch_name}.weight", common.same)
    rules[("params", f"norm{layer}", "bias")] = (f"{torch_name}.bias", common.same)
    if module.norm == "batch":
      rules[("batch_stats", f"norm{layer}", "mean")] = (f"{torch_name}.running_mean",
                                                        common.same)
      rules[("batch_stats", f"norm{layer}", "var")] = (f"{torch_name}.running_var",
                                                       common.same)
  return rules


def variables_from_torch(module: NLayerDiscriminator, state_dict: Mapping[str, np.ndarray],
                         in_channels: int = 3, prefix: str = "") -> dict:
  """Converts a taming ``NLayerDiscriminator`` state dict into our variables.

  Args:
    module: our discriminator, configured as the torch one.
    state_dict: the torch arrays (``common.to_numpy`` of the state dict);
      ``num_batches_tracked`` is ignored.
    in_channels: image channels (taming's ``input_nc``).
    prefix: prefix of the discriminator's keys in ``state_dict``.

  Returns:
    ``{"params": ..., "batch_stats": ...}`` (no batch_stats unless norm is
    "batch") of float32 NumPy arrays.

  Raises:
    ConversionError: on missing, unused or misshapen keys.
  """
  size = 2 ** (module.num_layers + 2)  # leaves 2x2 logits; kernels do not depend on it
  dummy = jax.ShapeDtypeStruct((1, size, size, in_channels), jnp.float32)
  target = jax.eval_shape(module.init, jax.random.key(0), dummy)
  source = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
  return common.assemble(target, conversion_rules(module, prefix), source,
                         what="NLayerDiscriminator checkpoint",
                         ignore=lambda key: key.endswith(".num_batches_tracked"))
