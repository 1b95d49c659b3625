"""A dataset split as a random-access source: the embedded shapes data or a built TFDS dataset.

``split_source(config.data, split, workdir)`` is how training, the token
cache and evaluation find their records: the shapes data is built on first
use under ``data.data_dir`` (default ``WORKDIR/data``; by process 0, the others
waiting); any other name is a
TFDS dataset the user has built (``data.real`` has builders for CUB-200,
MSCOCO, Conceptual Captions and captioned folders).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds

from vqdiffusion_jax import hosts
from vqdiffusion_jax.data import shapes

Record = Mapping[str, Any]


def split_source(data: Any, split: str, workdir: str) -> Sequence[Record]:
  """The records of one split of ``data.name``.

  Args:
    data: the config's ``data`` section (name, data_dir, image_size and the
      shapes split sizes num_train / num_test, 0 for the default).
    split: a split name or slice, e.g. ``"train"`` or ``"test[:100]"``.
    workdir: the run's directory (the shapes data's default home).
  """
  if data.name == "shapes":
    sizes = {k: v for k, v in (("num_train", data.num_train), ("num_test", data.num_test)) if v}
    with hosts.process_zero_first("vqdiffusion_jax_shapes_build"):
      builder = shapes.build(data.data_dir or os.path.join(workdir, "data"),
                             int(data.image_size), **sizes)
    return builder.as_data_source(split=split)
  return tfds_source(data.name, split, data.data_dir)


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
