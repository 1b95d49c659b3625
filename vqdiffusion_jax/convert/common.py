"""Rename rules and a checked assembly of PyTorch tensors into Flax params.

Conversions are explicit: each converter lists, for every parameter of our
module, the PyTorch key it comes from and the layout change it needs
(``linear``: transpose, ``conv``: OIHW -> HWIO, ``same``: as is). ``assemble``
then checks the result against the module's ``eval_shape`` tree: every
parameter filled, every shape right, every source key used; anything else is
a ``ConversionError`` that names the keys.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import numpy as np

from vqdiffusion_jax import extras
from vqdiffusion_jax.convert import identify


class ConversionError(ValueError):
  """A checkpoint does not match the module it is converted into."""


def linear(w: np.ndarray) -> np.ndarray:
  """torch Linear weight (out, in) -> Flax Dense kernel (in, out)."""
  return np.ascontiguousarray(np.asarray(w).T)


def conv(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight (O, I, kH, kW) -> Flax Conv kernel (kH, kW, I, O)."""
  return np.ascontiguousarray(np.transpose(np.asarray(w), (2, 3, 1, 0)))


def same(w: np.ndarray) -> np.ndarray:
  return np.asarray(w)


Rule = tuple[str, Callable[[np.ndarray], np.ndarray]]


def to_numpy(state_dict: Mapping[str, object]) -> dict[str, np.ndarray]:
  """A torch state dict (tensors) or a dict of arrays -> float32/int NumPy.

  The arrays are copies: later in-place updates of the tensors (running
  statistics, optimiser steps) do not reach them.
  """
  out = {}
  for key, value in state_dict.items():
    if hasattr(value, "detach"):
      value = value.detach().cpu()
      value = value.float().numpy() if value.is_floating_point() else value.numpy()
    out[key] = np.array(value, copy=True)
  return out


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The arrays of one weights file, by its ending: ``.safetensors``, ``.npz``, else PyTorch.

  A PyTorch file is read with ``weights_only=True``: tensors, no Python objects.
  Floating arrays come back as float32 copies.

  Raises:
    ConversionError: naming the file: not of the format its name says, or damaged.
    extras.MissingExtraError: safetensors or PyTorch is not installed.
  """
  path = os.fspath(path)
  if path.endswith(".npz"):
    with np.load(path) as arrays:
      loaded = {k: arrays[k] for k in arrays.files}
  elif path.endswith(".safetensors"):
    loaded = read_safetensors(path)
  else:
    loaded = torch_load(path, "PyTorch weights file")
    if not isinstance(loaded, Mapping):
      raise ConversionError(f"{path} holds a {type(loaded).__name__}, not a state dict")
  return {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
          for k, v in to_numpy(loaded).items()}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A safetensors file's arrays, its header checked first so that a bad file is named."""
  load_file = extras.require("safetensors.numpy", f"reading {path}").load_file
  if not os.path.isfile(path):
    raise FileNotFoundError(f"safetensors file not found: {path}")
  kind, description = identify.identify_file(path)
  if kind != identify.SAFETENSORS:
    raise ConversionError(f"{path}: truncated or not a safetensors file ({description})")
  try:
    return load_file(path)
  except Exception as error:  # safetensors' own error type; the file is at fault either way
    raise ConversionError(f"{path}: truncated or not a safetensors file ({error})") from error


def torch_load(path: str | os.PathLike, what: str, allow_pickle: bool = False) -> Any:
  """``torch.load`` of a file checked to be a PyTorch checkpoint first.

  Args:
    path: the file.
    what: what the file should be, for the errors (e.g. "official checkpoint").
    allow_pickle: unpickle Python objects besides tensors (``weights_only=False``).

  Raises:
    FileNotFoundError: no file at ``path``.
    ConversionError: naming the file: not a PyTorch checkpoint (saying what it
      looks like), damaged, or holding Python objects besides tensors when
      ``allow_pickle`` is off (the only case where ``--allow-pickle`` helps).
    extras.MissingExtraError: PyTorch is not installed.
  """
  torch = extras.require("torch", f"reading the {what} {os.fspath(path)}")
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} not found: {path}")
  kind, description = identify.identify_file(path)
  if kind != identify.TORCH:
    raise ConversionError(f"{path} is not a PyTorch checkpoint ({description}); expected the "
                          f"{what}")
  try:
    return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
  except pickle.UnpicklingError as error:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if not allow_pickle and found:
      raise ConversionError(
          f"{path} holds Python objects besides tensors ({found.group(1)}); if you trust the "
          "file, load it with allow_pickle=True (--allow-pickle)") from error
    raise ConversionError(f"{path} is {description} that PyTorch cannot read (damaged or "
                          f"truncated?): {_first_line(error)}") from error
  except Exception as error:  # torch.load of a damaged file raises whatever its bytes lead to
    raise ConversionError(f"{path} is {description} that PyTorch cannot read (damaged or "
                          f"truncated?): {type(error).__name__}: {_first_line(error)}") from error


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


def load_torch_checkpoint(path: str | os.PathLike, what: str,
                          allow_pickle: bool = False) -> Mapping[str, Any]:
  """A PyTorch checkpoint file's dict, read with ``weights_only`` unless ``allow_pickle``.

  Raises:
    FileNotFoundError: no file at ``path``; the message names ``what`` it should be.
    ConversionError: as ``torch_load``, or the file does not hold a dict.
  """
  loaded = torch_load(path, what, allow_pickle)
  if not isinstance(loaded, Mapping):
    raise ConversionError(f"{os.fspath(path)} holds a {type(loaded).__name__}, not a state dict")
  return loaded


def read_weights_in(directory: str | os.PathLike, names: Sequence[str],
                    what: str) -> dict[str, np.ndarray]:
  """``read_weights`` of the first of ``names`` present in ``directory``.

  Raises:
    FileNotFoundError: none is there; the message names ``what`` the directory is.
  """
  for name in names:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return read_weights(path)
  raise FileNotFoundError(f"no {' or '.join(names)} in {what} {os.fspath(directory)}")


def assemble(abstract_params, rules: Mapping[tuple[str, ...], Rule],
             source: Mapping[str, np.ndarray], *, what: str = "checkpoint",
             ignore: Callable[[str], bool] = lambda key: False):
  """Builds a params tree from ``source`` by ``rules``, checked against a target.

  Args:
    abstract_params: the target tree (e.g. ``jax.eval_shape(module.init,
      ...)["params"]``), leaves with ``.shape``; logical-partitioning boxes
      are looked through.
    rules: for each flattened target path, ``(source_key, transform)``.
    source: the checkpoint's arrays by key.
    what: a name for the checkpoint in error messages.
    ignore: source keys that may legitimately stay unused (e.g. buffers).

  Returns:
    A nested dict of float32 NumPy arrays shaped like ``abstract_params``.

  Raises:
    ConversionError: naming missing rules, missing or unused source keys, and
      shape mismatches, all at once.
  """
  target = flax.traverse_util.flatten_dict(flax.core.unfreeze(nn.meta.unbox(abstract_params)))
  problems = []
  no_rule = sorted("/".join(p) for p in target if p not in rules)
  if no_rule:
    problems.append(f"parameters without a conversion rule: {no_rule}")
  stray_rules = sorted("/".join(p) for p in rules if p not in target)
  if stray_rules:
    problems.append(f"rules for parameters the module does not have: {stray_rules}")
  missing = sorted({rules[p][0] for p in target if p in rules and rules[p][0] not in source})
  if missing:
    problems.append(f"keys missing from the {what}: {missing}")
  used = {rule[0] for rule in rules.values()}
  unused = sorted(k for k in source if k not in used and not ignore(k))
  if unused:
    problems.append(f"unused keys in the {what}: {unused}")
  out = {}
  for path, leaf in target.items():
    if path not in rules or rules[path][0] not in source:
      continue
    key, transform = rules[path]
    try:
      value = transform(source[key])
    except ValueError as error:  # a reshape that cannot fit: the sizes differ
      problems.append(f"{key} -> {'/'.join(path)}: shape {np.shape(source[key])} cannot be "
                      f"converted for the module's {tuple(leaf.shape)} ({error})")
      continue
    if tuple(value.shape) != tuple(leaf.shape):
      problems.append(f"{key} -> {'/'.join(path)}: shape {tuple(value.shape)} "
                      f"(after conversion) but the module expects {tuple(leaf.shape)}")
      continue
    out[path] = value.astype(leaf.dtype if hasattr(leaf, "dtype") else np.float32)
  if problems:
    raise ConversionError(f"{what} does not match the module:\n  " + "\n  ".join(problems))
  return flax.traverse_util.unflatten_dict(out)

