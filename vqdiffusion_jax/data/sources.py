"""A dataset split as a random-access source: the embedded shapes data or a built TFDS dataset.

``split_source(config.data, split, workdir)`` is how training, the token
cache and evaluation find their records: the shapes data is built on first
use under ``data.data_dir`` (default ``WORKDIR/data``; a local directory, as
array_record files are written and read as local files, so it must be given
when the workdir is a URL such as ``gs://``). The datasets of ``data.real``
(CUB-200, MSCOCO, Conceptual Captions, captioned folders, and ImageNet-style
class folders and FFHQ-style image folders, whose records carry a ``label``
or no condition instead of captions) are built on first use from the user's
download in ``data.manual_dir``, into ``data.data_dir`` (default
``WORKDIR/data`` when a manual directory is given, else TFDS's default data
dir); process 0 builds while the others wait. Any other name is a TFDS
dataset the user has built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from vqdiffusion_jax import hosts, outputs
from vqdiffusion_jax.data import real, shapes

Record = Mapping[str, Any]


def split_source(data: Any, split: str, workdir: str) -> Sequence[Record]:
  """The records of one split of ``data.name``.

  Args:
    data: the config's ``data`` section (name, data_dir, manual_dir,
      image_size and the shapes split sizes num_train / num_test, 0 for the
      default).
    split: a split name or slice, e.g. ``"train"`` or ``"test[:100]"``.
    workdir: the run's directory (the default home of the data it builds).
  """
  if data.name == "shapes":
    if not data.data_dir and outputs.is_url(workdir):
      raise ValueError(f"data.data_dir is empty and the workdir {workdir} is a URL: set "
                       "data.data_dir to a local directory for the shapes data (its "
                       "array_record files are written and read as local files)")
    sizes = {k: v for k, v in (("num_train", data.num_train), ("num_test", data.num_test)) if v}
    with hosts.process_zero_first("vqdiffusion_jax_shapes_build"):
      builder = shapes.build(data.data_dir or os.path.join(workdir, "data"),
                             int(data.image_size), **sizes)
    return builder.as_data_source(split=split)
  manual_dir = str(data.get("manual_dir", "") or "")
  data_dir = data.data_dir or (os.path.join(workdir, "data") if manual_dir else "")
  if data.name in real.BUILDERS:
    ensure_built(data.name, data_dir, manual_dir)
  return tfds_source(data.name, split, data_dir)


def ensure_built(name: str, data_dir: str, manual_dir: str) -> None:
  """Builds the captioned dataset ``name`` from ``manual_dir`` unless ``data_dir`` has it.

  Process 0 builds; every process waits for it at a barrier (none with one
  process).

  Raises:
    FileNotFoundError: the dataset is not built and no ``manual_dir`` is
      given, naming the flag to set; or the manual directory lacks a file or
      folder of the dataset's layout, naming it.
  """
  root = epath.Path(data_dir or tfds.core.constants.DATA_DIR).expanduser()
  builder_class = real.BUILDERS[name]
  if (root / name).exists() and builder_class(data_dir=root).is_prepared():
    return
  if not manual_dir:
    raise FileNotFoundError(
        f"dataset {name!r} is not built in {root} and data.manual_dir is empty: pass "
        f"--config.data.manual_dir=DIR, your download laid out as {name} expects, to build "
        f"it there:\n{builder_class.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  with hosts.process_zero_first(f"vqdiffusion_jax_build_{name}"):
    if hosts.is_main_process():
      real.prepare(name, data_dir=root, manual_dir=manual_dir)


def tfds_source(name: str, split: str, data_dir: str = "") -> Sequence[Record]:
  """A built TFDS dataset as a random-access source (no TensorFlow needed).

  Args:
    name: TFDS name, e.g. ``"mscoco_captions"`` (registered or only built on disk).
    split: split name or slice, e.g. ``"train"`` or ``"train[:1000]"``.
    data_dir: TFDS data directory; empty for TFDS's default.

  Returns:
    A sequence of dicts: images as uint8 arrays, text as bytes.

  Raises:
    FileNotFoundError: when the dataset is not built in ``data_dir``.
    ValueError: when it was built in a format without random access.
  """
  where = data_dir or "the default TFDS data dir"
  hint = (f"build it first, with file_format='array_record', into {where}")
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.DatasetNotFoundError:
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is neither registered nor built in {where}; {hint}") from None
  if not builder.is_prepared():
    raise FileNotFoundError(f"TFDS dataset {name!r} is not built in {builder.data_dir}; {hint}")
  try:
    return builder.as_data_source(split=split)
  except NotImplementedError:
    raise ValueError(
        f"TFDS dataset {name!r} in {builder.data_dir} is stored as {builder.info.file_format}, "
        f"which has no random access; rebuild it with file_format='array_record'") from None
