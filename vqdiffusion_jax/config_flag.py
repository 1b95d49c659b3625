"""The ``--config`` flag: a config file read from any directory, its overrides checked by name.

``define()`` is ``ml_collections``' ``DEFINE_config_file`` with its own
parser: ``--config=PATH[:ARG]`` loads ``PATH``'s ``get_config(ARG)`` with the
directory above ``PATH``'s package on ``sys.path`` (so that
``configs/coco.py``'s ``from configs import cub200`` works whatever the
working directory), and every ``--config.KEY=VALUE`` must name a key the
config has. A missing file, a bad ``ARG`` or an unknown key is one line
(absl's "FATAL Flags parsing error: ...") naming the flag and, for a key,
the nearest keys of its section.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import os
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from absl import flags
from ml_collections import config_dict, config_flags

NEAREST_KEYS = 3


def define(name: str = "config", help_string: str = "Experiment config file.",
           flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
  """Defines ``--NAME=PATH[:ARG]`` and its ``--NAME.KEY=VALUE`` overrides; the config is locked."""
  holder = config_flags.DEFINE_config_file(name, None, help_string, flag_values=flag_values,
                                           lock_config=True)
  flag_values[name].parser = ConfigFileParser(name, flag_values)
  return holder


class ConfigFileParser(flags.ArgumentParser):
  """Parses ``PATH[:ARG]`` into the config, checking the command line's overrides against it."""

  def __init__(self, name: str, flag_values: flags.FlagValues):
    self.name = name
    self.flag_values = flag_values

  def parse(self, argument: str) -> config_dict.ConfigDict:
    path, _, arg = argument.partition(":")
    # Not ValueErrors: absl would prefix them with the flag and its value a second time.
    try:
      config = load(path, arg or None)
    except (FileNotFoundError, ValueError) as error:
      raise flags.IllegalFlagValueError(f"--{self.name}={argument}: {error}") from None
    try:
      check_overrides(config, override_names(self._argv(), self.name), self.name)
    except ValueError as error:
      raise flags.IllegalFlagValueError(str(error)) from None
    return config

  def flag_type(self) -> str:
    return "config object"

  def _argv(self) -> list[str]:
    return self.flag_values.read_flags_from_files(sys.argv, force_gnu=False)


def load(path: str | os.PathLike, arg: str | None = None) -> Any:
  """``get_config(arg)`` of the config file ``path``, from any working directory.

  A file inside a package (``configs/``) may import its siblings
  (``from configs import cub200``): the directory above the package is on
  ``sys.path`` while the file loads.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: from ``get_config``, e.g. an unknown ``arg``.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config file {path}")
  name = "vqdiffusion_jax_config_" + re.sub(r"\W", "_", os.path.splitext(path)[0])
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  with _package_root_importable(path):
    sys.modules[name] = module
    spec.loader.exec_module(module)
    config = module.get_config() if arg is None else module.get_config(arg)
  if isinstance(config, config_dict.ConfigDict):
    config.lock()
  return config


@contextlib.contextmanager
def _package_root_importable(path: str) -> Iterator[None]:
  directory = os.path.dirname(path)
  root = os.path.dirname(directory)
  if not os.path.isfile(os.path.join(directory, "__init__.py")) or root in sys.path:
    yield
    return
  sys.path.insert(0, root)
  try:
    yield
  finally:
    sys.path.remove(root)


def override_names(argv: Sequence[str], name: str = "config") -> list[str]:
  """The keys that ``--NAME.KEY=VALUE`` (or ``--noNAME.KEY``) arguments set, in order."""
  pattern = re.compile(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)")
  return [match.group(1) for match in map(pattern.match, argv) if match]


def check_overrides(config: Any, keys: Sequence[str], name: str = "config") -> None:
  """A ValueError naming the first override whose key the config lacks, and the nearest keys."""
  for key in keys:
    problem = _missing_part(config, key)
    if problem is not None:
      raise ValueError(f"--{name}.{key}: {problem}")


def _missing_part(config: Any, key: str) -> str | None:
  """What is wrong with the dotted ``key`` in ``config``, or None when the config has it."""
  section, walked = config, []
  for part in key.split("."):
    field = re.sub(r"\[.*\]$", "", part)  # "layers[0]" indexes the field "layers"
    where = ".".join(walked) or "the config"
    if not isinstance(section, (config_dict.ConfigDict, dict)):
      return f"{where} is a value ({type(section).__name__}), not a section with keys"
    keys = sorted(section.keys())
    if field not in keys:
      nearest = difflib.get_close_matches(field, keys, n=NEAREST_KEYS, cutoff=0.0)
      prefix = ".".join(walked) + "." if walked else ""
      return (f"{where} has no key {field!r}; the nearest are "
              + ", ".join(prefix + k for k in nearest))
    section = section[field]
    walked.append(field)
  return None
