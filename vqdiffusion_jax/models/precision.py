"""Matmuls on bfloat16 operands with float32 accumulation and results.

``mixed_dot_general`` is a drop-in ``dot_general`` for Flax's ``Dense`` and
``DenseGeneral`` (their ``dot_general=`` field) and for the attention core.
It rounds both operands to bfloat16 and asks for a float32 product, so
activations, norms, softmax and logits stay float32 while the matmuls run on
bfloat16 units (AMX on recent Xeons, tensor cores, the MXU).

Its backward pass rounds the incoming cotangent to bfloat16 too. Left to
autodiff, each backward matmul would pair a float32 cotangent with a
bfloat16 operand, which XLA runs as a float32 matmul: on XLA:CPU that is 3 to
5 times slower than the bfloat16 one (``benchmarks/roofline.py``).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MATMUL_DTYPES = ("float32", "bfloat16")
# CPU features with bfloat16 matrix units; without them XLA:CPU's bfloat16 matmuls
# are no faster than float32 ones (slower on AVX2-only machines).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")

# How the weight cotangent of a narrowing matmul is ordered (``_rhs_cotangent``).
WEIGHT_GRAD_ORDERS = ("cotangent_first", "operand_first")

DimensionNumbers = tuple[tuple[tuple[int, ...], tuple[int, ...]],
                         tuple[tuple[int, ...], tuple[int, ...]]]


def _product(lhs, rhs, dimension_numbers):
  return lax.dot_general(lhs, rhs, dimension_numbers, preferred_element_type=jnp.float32)


def _free_axes(ndim: int, contract, batch) -> list[int]:
  return [axis for axis in range(ndim) if axis not in contract and axis not in batch]


def _lhs_cotangent(cotangent, lhs_ndim: int, rhs, dimension_numbers) -> jax.Array:
  """The left operand's cotangent: the product's cotangent times the right operand."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  lhs_free = _free_axes(lhs_ndim, lhs_contract, lhs_batch)
  rhs_free = _free_axes(rhs.ndim, rhs_contract, rhs_batch)
  first = len(lhs_batch) + len(lhs_free)
  batch = tuple(range(len(lhs_batch)))
  product = _product(cotangent, rhs, ((tuple(range(first, first + len(rhs_free))),
                                       tuple(rhs_free)), (batch, tuple(rhs_batch))))
  # Its axes: batch, the left free axes, then the right contracting axes in their
  # own order, each standing for the left contracting axis it was paired with.
  produced_as = list(lhs_batch) + lhs_free + [lhs_contract[i] for i in np.argsort(rhs_contract)]
  return jnp.transpose(product, tuple(np.argsort(produced_as)))


def _rhs_cotangent(cotangent, lhs, rhs_ndim: int, dimension_numbers,
                   cotangent_first: bool) -> jax.Array:
  """The right operand's cotangent: the left operand times the product's cotangent.

  Both operands are contracted over their leading (free) axes. XLA:CPU copies
  the first of the two into a transposed layout, so the smaller one goes
  first: the left operand for a weight as wide as its input, the cotangent
  for a weight that narrows (an MLP's second layer, whose 4x wider input
  would otherwise be transposed every step: the shapes denoiser's step runs
  1.1-1.26x faster, ``benchmarks/denoiser_step_layouts.py``). The product
  comes out in the chosen order and is transposed to the right operand's layout.
  ``cotangent_first=False`` keeps the left operand first for every weight.
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  lhs_free = _free_axes(lhs.ndim, lhs_contract, lhs_batch)
  rhs_free = _free_axes(rhs_ndim, rhs_contract, rhs_batch)
  first = len(lhs_batch)
  batch = tuple(range(first))
  cotangent_free = tuple(range(first, first + len(lhs_free)))
  cotangent_rest = tuple(range(first + len(lhs_free), cotangent.ndim))
  # The right contracting axes, each standing for the left contracting axis it was paired with.
  contract_as = [rhs_contract[i] for i in np.argsort(lhs_contract)]
  lhs_width = np.prod([lhs.shape[axis] for axis in lhs_contract], dtype=int)
  cotangent_width = np.prod([cotangent.shape[axis] for axis in cotangent_rest], dtype=int)
  # With batch axes only the left-first order has a bfloat16 kernel on XLA:CPU.
  if cotangent_first and not lhs_batch and cotangent_width < lhs_width:
    return _narrow_weight_cotangent(cotangent, lhs, lhs_free, lhs_contract, rhs_free,
                                    contract_as)
  product = _product(lhs, cotangent, ((tuple(lhs_free), cotangent_free),
                                      (tuple(lhs_batch), batch)))
  produced_as = list(rhs_batch) + contract_as + rhs_free
  return jnp.transpose(product, tuple(np.argsort(produced_as)))


def _narrow_weight_cotangent(cotangent, lhs, lhs_free, lhs_contract, rhs_free,
                             contract_as) -> jax.Array:
  """``_rhs_cotangent`` without batch axes, the cotangent first, as one 2-D product.

  XLA:CPU runs this order on its bfloat16 kernels only as a plain matrix
  product; with several contracted axes it falls back to one that has none.
  """
  rows = int(np.prod([lhs.shape[axis] for axis in lhs_free], dtype=int))
  # The left contracting axes in their own order, as ``contract_as`` counts them.
  contract = sorted(lhs_contract)
  lhs_2d = jnp.transpose(lhs, tuple(lhs_free) + tuple(contract)).reshape(rows, -1)
  cotangent_2d = cotangent.reshape(rows, -1)
  product = _product(cotangent_2d, lhs_2d, (((0,), (0,)), ((), ())))
  product = product.reshape(cotangent.shape[len(lhs_free):]
                            + tuple(lhs.shape[axis] for axis in contract))
  produced_as = rhs_free + contract_as
  return jnp.transpose(product, tuple(np.argsort(produced_as)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _bf16_product(lhs, rhs, dimension_numbers: DimensionNumbers, cotangent_first: bool):
  """float32 operands in, rounded to bfloat16; float32 product and cotangents."""
  del cotangent_first
  return _product(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), dimension_numbers)


def _bf16_product_fwd(lhs, rhs, dimension_numbers, cotangent_first):
  del cotangent_first
  lhs, rhs = lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16)
  return _product(lhs, rhs, dimension_numbers), (lhs, rhs)


def _bf16_product_bwd(dimension_numbers, cotangent_first, residuals, cotangent):
  lhs, rhs = residuals
  cotangent = cotangent.astype(jnp.bfloat16)
  return (_lhs_cotangent(cotangent, lhs.ndim, rhs, dimension_numbers),
          _rhs_cotangent(cotangent, lhs, rhs.ndim, dimension_numbers, cotangent_first))


_bf16_product.defvjp(_bf16_product_fwd, _bf16_product_bwd)


def _batch_axes_first(x: jax.Array, batch, contract):
  """``x`` with its batch axes moved to the front, and its new contracting axes."""
  order = list(batch) + [axis for axis in range(x.ndim) if axis not in batch]
  return jnp.transpose(x, order), tuple(order.index(axis) for axis in contract)


def mixed_dot_general(lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None, *, weight_grads: str = "cotangent_first",
                      **kwargs) -> jax.Array:
  """``lax.dot_general`` of the operands rounded to bfloat16, float32 out.

  The signature is ``lax.dot_general``'s; ``precision`` and
  ``preferred_element_type`` are ignored (the point is to fix both).
  ``weight_grads`` orders the weight cotangent of a narrowing matmul
  (``WEIGHT_GRAD_ORDERS``; see ``_rhs_cotangent``).
  """
  del precision, preferred_element_type, kwargs
  if weight_grads not in WEIGHT_GRAD_ORDERS:
    raise ValueError(f"weight_grads {weight_grads!r} not in {WEIGHT_GRAD_ORDERS}")
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  # XLA:CPU has no bfloat16 x bfloat16 = float32 kernel for batch axes elsewhere.
  lhs, lhs_contract = _batch_axes_first(jnp.asarray(lhs, jnp.float32), lhs_batch, lhs_contract)
  rhs, rhs_contract = _batch_axes_first(jnp.asarray(rhs, jnp.float32), rhs_batch, rhs_contract)
  batch = tuple(range(len(lhs_batch)))
  return _bf16_product(lhs, rhs, ((lhs_contract, rhs_contract), (batch, batch)),
                       weight_grads == "cotangent_first")


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
  """The CPU's feature flags from ``cpuinfo`` (Linux), read once; empty where it cannot be."""
  if not os.path.exists(cpuinfo):
    return frozenset()
  with open(cpuinfo) as f:
    for line in f:
      if line.startswith("flags"):
        return frozenset(line.partition(":")[2].split())
  return frozenset()


def resolve_matmul_dtype(name: str, platform: str | None = None,
                         flags: frozenset[str] | None = None) -> str:
  """A config's matmul dtype name made concrete: "auto" picks the faster one here.

  Args:
    name: "float32", "bfloat16" (returned as they are) or "auto".
    platform: the JAX backend ("cpu", "gpu", "tpu"); default ``jax.default_backend()``.
    flags: the CPU feature flags; default ``cpu_flags()``.

  Returns:
    For "auto", "bfloat16" on GPU and TPU and on CPUs with bfloat16 matrix
    units (``BF16_CPU_FLAGS``), otherwise "float32".
  """
  if name in MATMUL_DTYPES:
    return name
  if name != "auto":
    raise ValueError(f"matmul dtype {name!r} not in {(*MATMUL_DTYPES, 'auto')}")
  platform = platform or jax.default_backend()
  if platform != "cpu":
    return "bfloat16"
  flags = cpu_flags() if flags is None else flags
  return "bfloat16" if any(flag in flags for flag in BF16_CPU_FLAGS) else "float32"


# What sampling runs its matmuls in: "fast" is ``resolve_matmul_dtype("auto")``,
# "float32" the exact path, "bfloat16" forces bfloat16 products on any machine.
SAMPLING_PRECISIONS = ("fast", "float32", "bfloat16")


def sampling_matmul_dtype(precision: str, platform: str | None = None,
                          flags: frozenset[str] | None = None) -> str:
  """The matmul dtype of a ``SAMPLING_PRECISIONS`` name on this machine.

  "fast" is bfloat16 products with float32 accumulation where the machine
  has bfloat16 units (GPU, TPU, ``BF16_CPU_FLAGS``), otherwise float32;
  ``platform`` and ``flags`` as ``resolve_matmul_dtype``.
  """
  if precision not in SAMPLING_PRECISIONS:
    raise ValueError(f"precision must be one of {', '.join(map(repr, SAMPLING_PRECISIONS))}, "
                     f"got {precision!r}")
  return resolve_matmul_dtype("auto" if precision == "fast" else precision, platform, flags)


def dot_general_for(matmul_dtype: str, weight_grads: str = "cotangent_first"):
  """The dot_general for a matmul dtype name.

  "float32": ``lax.dot_general`` itself (the module's compute dtype decides);
  "bfloat16": ``mixed_dot_general`` with ``weight_grads``.
  """
  if matmul_dtype not in MATMUL_DTYPES:
    raise ValueError(f"matmul dtype {matmul_dtype!r} not in {MATMUL_DTYPES}")
  if weight_grads not in WEIGHT_GRAD_ORDERS:
    raise ValueError(f"weight_grads {weight_grads!r} not in {WEIGHT_GRAD_ORDERS}")
  if matmul_dtype == "float32":
    return lax.dot_general
  if weight_grads == "cotangent_first":
    return mixed_dot_general
  return functools.partial(mixed_dot_general, weight_grads=weight_grads)


def is_mixed(dot_general) -> bool:
  """Whether ``dot_general`` is ``mixed_dot_general`` (with any weight-gradient order)."""
  return getattr(dot_general, "func", dot_general) is mixed_dot_general


_NHWC = ("NHWC", "HWIO", "NHWC")


def _padding_pairs(padding, kernel: tuple[int, int], strides: tuple[int, int],
                   spatial: tuple[int, int]) -> list[tuple[int, int]]:
  if isinstance(padding, str):
    return lax.padtype_to_pads(spatial, kernel, strides, padding)
  return [tuple(int(p) for p in pair) for pair in padding]


def _patches(images: jax.Array, kernel: tuple[int, int], strides: tuple[int, int]) -> jax.Array:
  """(B, H, W, C) -> (B, H', W', kh * kw * C): each output position's window, HWC-major."""
  (kh, kw), (sh, sw) = kernel, strides
  batch, height, width, channels = images.shape
  rows, cols = (height - kh) // sh + 1, (width - kw) // sw + 1
  if (kh, kw) == (1, 1):
    return images[:, ::sh, ::sw][:, :rows, :cols]
  if (kh, kw) == (sh, sw):  # Non-overlapping windows: a reshape, no copies per tap.
    tiles = images[:, :rows * kh, :cols * kw].reshape(batch, rows, kh, cols, kw, channels)
    return tiles.transpose(0, 1, 3, 2, 4, 5).reshape(batch, rows, cols, kh * kw * channels)
  taps = [images[:, i:i + sh * (rows - 1) + 1:sh, j:j + sw * (cols - 1) + 1:sw]
          for i in range(kh) for j in range(kw)]
  return jnp.concatenate(taps, axis=-1)


def matmul_conv(dot_general):
  """A ``conv_general_dilated`` for 2-D NHWC / HWIO convolutions as one ``dot_general``.

  The input's windows are gathered (im2col) and multiplied by the kernel
  reshaped to (kh * kw * C_in, C_out), so the convolution runs on whatever
  the given ``dot_general`` runs on (e.g. ``mixed_dot_general``'s bfloat16
  units). Meant for small kernels on small grids (the patch VQ-VAE): the
  gathered windows take kh * kw times the input's memory. Dilation and
  feature groups are not supported.

  Args:
    dot_general: a ``lax.dot_general``-like function.

  Returns:
    A function with ``lax.conv_general_dilated``'s signature (Flax's
    ``nn.Conv(conv_general_dilated=...)``).
  """
  def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, precision=None,
           preferred_element_type=None):
    del precision, preferred_element_type
    expected = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    if lhs.ndim != 4 or (dimension_numbers is not None and lax.conv_dimension_numbers(
        lhs.shape, rhs.shape, dimension_numbers) != expected):
      raise ValueError(f"matmul_conv takes 2-D NHWC / HWIO convolutions, got input "
                       f"{lhs.shape} with dimension numbers {dimension_numbers}")
    if feature_group_count != 1 or any(d != 1 for d in (*(lhs_dilation or ()),
                                                         *(rhs_dilation or ()))):
      raise ValueError("matmul_conv supports neither dilation nor feature groups")
    kernel, strides = tuple(rhs.shape[:2]), tuple(window_strides)
    pads = _padding_pairs(padding, kernel, strides, tuple(lhs.shape[1:3]))
    padded = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
    windows = _patches(padded, kernel, strides)
    return dot_general(windows, rhs.reshape(-1, rhs.shape[-1]), (((3,), (0,)), ((), ())))

  return conv


def conv_for(matmul_dtype: str):
  """Flax's ``conv_general_dilated`` for a matmul dtype name.

  "float32": None (Flax's default, ``lax.conv_general_dilated``);
  "bfloat16": ``matmul_conv(mixed_dot_general)``.
  """
  dot_general = dot_general_for(matmul_dtype)
  return matmul_conv(dot_general) if is_mixed(dot_general) else None
