"""The device mesh, logical-axis shardings, and multi-host start-up.

The mesh always has the three axes ``("data", "fsdp", "tensor")``, built from
a config's ``mesh`` section (``configs/common.py``):

  shape: {data, fsdp, tensor}   axis sizes within a slice (ICI); one may be -1,
                                meaning "the remaining devices".
  dcn:   {data, fsdp, tensor}   how many slices each axis spans (DCN); all 1 on
                                one slice. When any is > 1 the mesh is the
                                hybrid ICI x DCN mesh of
                                ``mesh_utils.create_hybrid_device_mesh``, the
                                axis sizes being ``shape * dcn``.
  rules: ((logical, mesh axes), ...)   how logical axis names map to mesh axes.

Axes are ``AxisType.Auto``: shardings are given at jit boundaries and
propagated by the compiler (pjit style), not carried in types.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# An array this large whose rules ask for a sharding the mesh cannot give is logged.
REPLICATION_WARNING_BYTES = 4 * 2**20


def _section(section: Any) -> tuple[int, ...]:
  """Reads a {data, fsdp, tensor} mapping (ConfigDict, dict) or a 3-sequence."""
  if isinstance(section, Sequence):
    values = tuple(section)
  elif isinstance(section, Mapping) or hasattr(section, "keys"):
    unknown = set(section.keys()) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
    values = tuple(section.get(name, 1) for name in MESH_AXES)
  else:
    raise TypeError(f"mesh sizes must be a mapping or a sequence, got {section!r}")
  if len(values) != len(MESH_AXES):
    raise ValueError(f"mesh sizes need {len(MESH_AXES)} entries {MESH_AXES}, got {values}")
  return tuple(int(v) for v in values)


def _named(sizes: Sequence[int]) -> dict[str, int]:
  return dict(zip(MESH_AXES, sizes, strict=True))


def resolve_shape(shape: Any, num_devices: int) -> tuple[int, int, int]:
  """Axis sizes with a -1 entry filled in so that their product is ``num_devices``.

  Args:
    shape: {data, fsdp, tensor} sizes (mapping or 3-sequence); at most one -1.
    num_devices: the number of devices the sizes must multiply to.

  Returns:
    The (data, fsdp, tensor) sizes.

  Raises:
    ValueError: more than one -1, a size < 1, or a product that does not
      match ``num_devices``.
  """
  sizes = _section(shape)
  free = [i for i, size in enumerate(sizes) if size == -1]
  if len(free) > 1 or any(size < 1 and size != -1 for size in sizes):
    raise ValueError(f"mesh.shape {_named(sizes)}: sizes must be >= 1, "
                     "with at most one -1")
  fixed = math.prod(size for size in sizes if size != -1)
  if free:
    if num_devices % fixed:
      divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
      raise ValueError(f"mesh.shape {_named(sizes)}: {num_devices} devices "
                       f"are not divisible by the fixed axes' product {fixed}; pick sizes "
                       f"whose product is one of {divisors}")
    sizes = tuple(num_devices // fixed if size == -1 else size for size in sizes)
  elif fixed != num_devices:
    raise ValueError(f"mesh.shape {_named(sizes)} has {fixed} devices but "
                     f"{num_devices} are available; use -1 on one axis to fill")
  return sizes


def _slice_count(devices: Sequence[Any]) -> int:
  return len({getattr(device, "slice_index", 0) for device in devices})


def _granule_attribute(devices: Sequence[Any]) -> str:
  # TPU devices know their slice; where no slice is told apart (GPU hosts),
  # a process is the unit across the slower network.
  return "slice_index" if _slice_count(devices) > 1 else "process_index"


def device_grid(mesh_config: Any, devices: Sequence[Any]) -> np.ndarray:
  """The (data, fsdp, tensor) array of devices a mesh config asks for.

  Args:
    mesh_config: the config's ``mesh`` section (``shape`` and optional ``dcn``).
    devices: the devices to arrange.

  Returns:
    An object array of devices; on several slices, axis ``i`` is ``dcn[i]``
    blocks of ``shape[i]`` devices, each block within one slice. Slices are
    told apart by ``device.slice_index`` (TPU) or, where that does not vary,
    by ``device.process_index`` (one GPU host per slice).

  Raises:
    ValueError: sizes that do not match the devices, or dcn entries > 1 on a
      single slice.
  """
  dcn = _section(mesh_config.get("dcn", None) or (1, 1, 1))
  if any(size < 1 for size in dcn):
    raise ValueError(f"mesh dcn {_named(dcn)}: entries must be >= 1")
  if math.prod(dcn) == 1:
    if _slice_count(devices) > 1:
      raise ValueError(f"the devices span {_slice_count(devices)} slices; set mesh.dcn so "
                       "that its product is that number")
    shape = resolve_shape(mesh_config["shape"], len(devices))
    return mesh_utils.create_device_mesh(shape, devices)
  attribute = _granule_attribute(devices)
  num_slices = len({getattr(device, attribute) for device in devices})
  if num_slices != math.prod(dcn):
    raise ValueError(f"mesh dcn {_named(dcn)} asks for {math.prod(dcn)} "
                     f"slices but the devices span {num_slices} (by {attribute}); on one "
                     "slice the dcn entries must be 1")
  shape = resolve_shape(mesh_config["shape"], len(devices) // num_slices)
  return mesh_utils.create_hybrid_device_mesh(
      shape, dcn, devices, process_is_granule=attribute == "process_index")


def make_mesh(mesh_config: Any, devices: Sequence[Any] | None = None) -> Mesh:
  """The ("data", "fsdp", "tensor") mesh of a config's ``mesh`` section.

  Args:
    mesh_config: ``config.mesh``: ``shape`` {data, fsdp, tensor} (one may be
      -1) and ``dcn`` {data, fsdp, tensor} (slices per axis; all 1 on one slice).
    devices: the devices to use; default all of ``jax.devices()``.

  Returns:
    A mesh with Auto axis types (pjit-style sharding propagation).

  Raises:
    ValueError: when the sizes do not match the devices (the message says how).
  """
  devices = list(jax.devices() if devices is None else devices)
  grid = device_grid(mesh_config, devices)
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def normalize_rules(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
  """Logical-axis rules as hashable ``(name, mesh axis | tuple of axes | None)`` pairs.

  Configs that went through JSON or the command line hold lists; flax wants tuples.

  Args:
    rules: pairs ``(logical name, mesh axes)``; None means no rules.

  Returns:
    The rules as a tuple of pairs.
  """
  normalized = []
  for name, target in rules or ():
    if isinstance(target, (list, tuple)):
      target = tuple(target)
    normalized.append((name, target))
  return tuple(normalized)


def _axis_size(mesh: Mesh, target: Any) -> int:
  if target is None:
    return 1
  names = target if isinstance(target, tuple) else (target,)
  return math.prod(mesh.shape[name] for name in names)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes that do not divide their dimension (that part is replicated).

  For a dimension sharded over several mesh axes, the longest leading run of
  them whose sizes divide the dimension is kept. Tiny test models and odd
  sizes (a 5-row table on 2 tensor shards) therefore still run.

  Args:
    spec: the mesh-axis spec of an array.
    shape: the array's shape.
    mesh: the mesh.

  Returns:
    A spec jit accepts for this shape, without trailing Nones.
  """
  fitted = []
  for dim, target in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
    names = () if target is None else (target if isinstance(target, tuple) else (target,))
    kept = ()
    for name in names:
      if dim % _axis_size(mesh, kept + (name,)):
        break
      kept += (name,)
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  while fitted and fitted[-1] is None:
    fitted.pop()
  return PartitionSpec(*fitted)


def _leaf_spec(leaf: Any, rules: tuple[tuple[str, Any], ...]) -> tuple[PartitionSpec, tuple]:
  if isinstance(leaf, nn.LogicallyPartitioned):
    return nn.logical_to_mesh_axes(leaf.names, rules), leaf.value.shape
  if isinstance(leaf, nn.Partitioned):
    return leaf.get_partition_spec(), leaf.value.shape
  return PartitionSpec(), tuple(getattr(leaf, "shape", ()))


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Sequence[Sequence[Any]]) -> Any:
  """NamedShardings of a tree whose leaves may carry logical partitioning.

  Args:
    abstract_tree: e.g. ``jax.eval_shape(model.init, ...)``: leaves are
      ``nn.LogicallyPartitioned`` boxes (logical names, mapped by ``rules``),
      ``nn.Partitioned`` boxes (mesh axes), or plain arrays / ShapeDtypeStructs
      (replicated).
    mesh: the device mesh.
    rules: logical name -> mesh axes pairs (``config.mesh.rules``).

  Returns:
    The tree of NamedShardings, shaped like the unboxed tree (one sharding
    per box); mesh axes that do not divide a dimension are dropped
    (``fit_spec``), with a warning for arrays of 4 MiB and more.
  """
  rules = normalize_rules(rules)

  def sharding(path, leaf):
    spec, shape = _leaf_spec(leaf, rules)
    fitted = fit_spec(spec, shape, mesh)
    _warn_if_replicated(jax.tree_util.keystr(path), spec, fitted, leaf)
    return NamedSharding(mesh, fitted)

  return jax.tree.map_with_path(sharding, abstract_tree,
                                is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _warn_if_replicated(name: str, spec: PartitionSpec, fitted: PartitionSpec, leaf: Any) -> None:
  """Logs a warning when ``fit_spec`` dropped mesh axes of an array worth sharding."""
  value = leaf.value if isinstance(leaf, nn.meta.AxisMetadata) else leaf
  shape, dtype = tuple(getattr(value, "shape", ())), getattr(value, "dtype", None)
  if dtype is None or math.prod(shape) * np.dtype(dtype).itemsize < REPLICATION_WARNING_BYTES:
    return
  padded = lambda s: tuple(s) + (None,) * (len(shape) - len(s))  # noqa: E731
  dropped = [f"dimension {i} ({size}) over {want}" for i, (size, want, got)
             in enumerate(zip(shape, padded(spec), padded(fitted), strict=True)) if want != got]
  if dropped:
    logging.warning("%s %s: the mesh axes do not divide %s; replicated there instead",
                    name, shape, ", ".join(dropped))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ("data", "fsdp"), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_block(mesh: Mesh, global_batch: int, name: str = "global batch") -> tuple[int, int]:
  """Which block of every global batch this process feeds, and how many blocks there are.

  ``batch_sharding`` cuts the batch into ``data * fsdp`` rows of devices; this
  process's devices hold some of them, which must be one contiguous run. The
  loaders give the process that block (``data.loader.sharded_batches`` with
  ``process_index, process_count = batch_block(...)``), so that the global
  batch is the same whatever the number of processes. Processes whose devices
  hold the same rows (a tensor axis across processes) read the same block.

  Args:
    mesh: the training mesh.
    global_batch: examples per step, which the batch rows must divide.
    name: the config key of ``global_batch``, for the error.

  Raises:
    ValueError: ``global_batch`` not a multiple of the rows, or this
      process's rows not one contiguous run or not an equal share.
  """
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch < 1 or global_batch % rows:
    below = max(rows, global_batch // rows * rows)
    raise ValueError(f"{name}={global_batch} does not split over the mesh's {rows} batch "
                     f"shards (data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']}) on "
                     f"{mesh.size} devices; pick a multiple of {rows}, e.g. "
                     + (f"{below} or {below + rows}" if below != global_batch else f"{rows}"))
  held = sorted({index[0].start or 0 for index in
                 batch_sharding(mesh).addressable_devices_indices_map((rows,)).values()})
  if held != list(range(held[0], held[0] + len(held))) or rows % len(held):
    raise ValueError(f"process {jax.process_index()} holds batch rows {held} of {rows}: not "
                     "one contiguous equal share; order the mesh's devices process by process")
  return held[0] // len(held), rows // len(held)


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
  """``batch_sharding`` behind a leading step axis (batches stacked for ``scan_steps``)."""
  return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, PartitionSpec())


# Environment variables whose presence (with a value > 1 where it is a count)
# means this process is one of several that jax.distributed.initialize() can
# discover on its own.
_MULTIPROCESS_COUNTS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES")
_MULTIPROCESS_ADDRESSES = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def is_multiprocess(environ: Mapping[str, str] | None = None) -> bool:
  """Whether the environment describes a multi-process (multi-host) job.

  Detected from: ``JAX_COORDINATOR_ADDRESS`` / ``MEGASCALE_COORDINATOR_ADDRESS``
  set; ``SLURM_NTASKS``, ``OMPI_COMM_WORLD_SIZE`` or ``JAX_NUM_PROCESSES`` > 1;
  or ``TPU_WORKER_HOSTNAMES`` naming more than one host (a TPU pod slice).

  Args:
    environ: the environment to read; default ``os.environ``.

  Returns:
    True when several processes take part.
  """
  environ = os.environ if environ is None else environ
  if any(environ.get(name) for name in _MULTIPROCESS_ADDRESSES):
    return True
  for name in _MULTIPROCESS_COUNTS:
    value = environ.get(name, "").strip()
    if value.isdigit() and int(value) > 1:
      return True
  hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  return len(hosts) > 1


def multihost_initialize(force: bool | None = None,
                         environ: Mapping[str, str] | None = None) -> bool:
  """Calls ``jax.distributed.initialize()`` when, and only when, multi-process.

  Call it first thing, before any other JAX call touches the devices.

  Args:
    force: True / False overrides detection (e.g. from a ``--multihost``
      flag); None detects from the environment (``is_multiprocess``).
    environ: the environment for detection; default ``os.environ``.

  Returns:
    Whether ``jax.distributed.initialize()`` was called (or had been already).
  """
  environ = os.environ if environ is None else environ
  wanted = is_multiprocess(environ) if force is None else force
  if not wanted:
    return False
  if not jax.distributed.is_initialized():
    # SIGTERM stays with Python: checkpoint.PreemptionWatcher agrees on the stop step.
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(**explicit_process_arguments(environ))
  return True


def explicit_process_arguments(environ: Mapping[str, str]) -> dict[str, int]:
  """``num_processes`` and ``process_id`` from ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``.

  JAX reads ``JAX_COORDINATOR_ADDRESS`` itself but not these two, which
  ``launch/local_multiprocess.sh`` sets; where they are unset, JAX detects
  them from the cluster (TPU, SLURM, Open MPI).

  Raises:
    ValueError: a value that is not a non-negative integer, or only one of the two set.
  """
  names = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
  values = {key: environ.get(name, "").strip() for key, name in names.items()}
  given = {key: value for key, value in values.items() if value}
  if not given:
    return {}
  if len(given) != len(names):
    raise ValueError(f"set both {' and '.join(names.values())} or neither; got "
                     + ", ".join(f"{names[k]}={v!r}" for k, v in values.items()))
  for key, value in given.items():
    if not value.isdigit():
      raise ValueError(f"{names[key]}={value!r} is not a non-negative integer")
  return {key: int(value) for key, value in given.items()}
