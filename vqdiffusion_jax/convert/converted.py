"""Our converted-checkpoint directory: Orbax params plus a JSON config.

Layout of a directory written by ``save``::

  DIR/config.json   {"format": "vqdiffusion_jax", "version": 1, "source": ...,
                     "components": {"denoiser": {...}, "vqvae": {...}, ...}}
  DIR/params/       an Orbax checkpoint of {component: params}; the denoiser's
                    blocks are stored one by one (``block_{i}``), never stacked
  DIR/tokenizer/    the text encoder's tokenizer files, when there is one

``config.json`` may also hold ``"pipeline"``: how the parts are used together
(the noise schedule, the tokenizer's padding convention).

The directory is assembled under a temporary name beside ``DIR`` and moved
into place in one rename, so an interrupted conversion never leaves a
half-written ``DIR``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from vqdiffusion_jax import outputs

FORMAT = "vqdiffusion_jax"
VERSION = 1
CONFIG_NAME = "config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"


def is_converted(path: str | os.PathLike) -> bool:
  """Whether ``path`` (local or a URL) is a directory written by ``save``."""
  config = epath.Path(path) / CONFIG_NAME
  if not config.is_file():
    return False
  try:
    return json.loads(config.read_text()).get("format") == FORMAT
  except json.JSONDecodeError:
    return False


def save(out_dir: str | os.PathLike, components: Mapping[str, tuple[dict, Any]], *,
         source: str, tokenizer: Any = None, pipeline: Mapping[str, Any] | None = None,
         overwrite: bool = False) -> None:
  """Writes components' configs and params to ``out_dir``, atomically.

  Args:
    out_dir: the directory to create.
    components: name -> (JSON-serialisable config, params tree).
    source: where the weights came from, recorded in the config.
    tokenizer: a Hugging Face tokenizer to save under ``tokenizer/``.
    pipeline: JSON settings that join the components (see the module docstring).
    overwrite: replace an existing ``out_dir``.

  Raises:
    FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
  """
  out_dir = outputs.local_path(out_dir, "the converted checkpoint directory")
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(staging, PARAMS_DIR),
                      {name: params for name, (_, params) in components.items()})
    checkpointer.wait_until_finished()
    if tokenizer is not None:
      tokenizer.save_pretrained(os.path.join(staging, TOKENIZER_DIR))
    config = {"format": FORMAT, "version": VERSION, "source": source,
              "components": {name: cfg for name, (cfg, _) in components.items()}}
    if pipeline is not None:
      config["pipeline"] = dict(pipeline)
    with open(os.path.join(staging, CONFIG_NAME), "w") as f:
      json.dump(config, f, indent=2)
    if os.path.exists(out_dir):
      shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def read_config(path: str | os.PathLike) -> dict:
  """The config of a converted directory, checked for format and version."""
  config_path = epath.Path(path) / CONFIG_NAME
  if not config_path.is_file():
    raise FileNotFoundError(f"{config_path} is missing: not a converted checkpoint")
  config = outputs.read_json(config_path, remedy="convert the checkpoint again")
  if config.get("format") != FORMAT or config.get("version") != VERSION:
    raise ValueError(f"{config_path}: format {config.get('format')!r} version "
                     f"{config.get('version')!r}, expected {FORMAT!r} version {VERSION}")
  return config


def restore(path: str | os.PathLike, name: str, abstract_params: Any) -> Any:
  """Restores one component's params onto ``abstract_params``' structure.

  Args:
    path: a converted directory.
    name: the component ("denoiser", "vqvae", "text_encoder").
    abstract_params: the target tree (``jax.ShapeDtypeStruct`` leaves, with
      shardings where the params should be placed).

  Returns:
    The params tree.

  Raises:
    KeyError: the directory has no such component.
    ValueError: the stored params do not fit ``abstract_params``.
  """
  path = outputs.absolute_path(path)
  components = read_config(path)["components"]
  if name not in components:
    raise KeyError(f"{path} has no {name!r} component; it has {sorted(components)}")
  params_dir = path / PARAMS_DIR
  if not params_dir.is_dir():
    raise FileNotFoundError(f"{params_dir} is missing: the checkpoint is incomplete")
  checkpointer = ocp.StandardCheckpointer()
  stored = checkpointer.metadata(params_dir).item_metadata
  _check_matches(stored[name], abstract_params, f"{params_dir} [{name}]")
  target = {key: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), value)
            for key, value in stored.items() if key != name}
  target[name] = abstract_params
  return checkpointer.restore(params_dir, _placed(target))[name]


def _placed(target: Any) -> Any:
  """With several processes, leaves without a sharding are restored replicated on every device."""
  if jax.process_count() == 1:
    return target
  everywhere = jax.sharding.NamedSharding(
      jax.make_mesh((jax.device_count(),), ("all",),
                    axis_types=(jax.sharding.AxisType.Auto,)),
      jax.sharding.PartitionSpec())
  return jax.tree.map(lambda leaf: leaf if getattr(leaf, "sharding", None) is not None
                      else jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=everywhere),
                      target)


def _check_matches(stored: Any, abstract: Any, where: str) -> None:
  """Raises ValueError naming every missing, extra or mis-shaped parameter."""
  flat = lambda tree: {"/".join(str(getattr(k, "key", k)) for k in path): leaf  # noqa: E731
                       for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  have, want = flat(stored), flat(abstract)
  problems = [f"missing {k}" for k in sorted(want.keys() - have.keys())]
  problems += [f"unexpected {k}" for k in sorted(have.keys() - want.keys())]
  problems += [f"{k}: stored {tuple(have[k].shape)}, model {tuple(want[k].shape)}"
               for k in sorted(want.keys() & have.keys())
               if tuple(have[k].shape) != tuple(want[k].shape)]
  if problems:
    raise ValueError(f"{where} does not match the model:\n  " + "\n  ".join(problems))
