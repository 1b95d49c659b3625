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

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MATMUL_DTYPES = ("float32", "bfloat16")

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


def _rhs_cotangent(cotangent, lhs, rhs_ndim: int, dimension_numbers) -> jax.Array:
  """The right operand's cotangent: the left operand times the product's cotangent.

  The left operand goes first: XLA:CPU then contracts over its leading axes
  with its bfloat16 kernels, where the other order falls back to float32.
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  lhs_free = _free_axes(lhs.ndim, lhs_contract, lhs_batch)
  rhs_free = _free_axes(rhs_ndim, rhs_contract, rhs_batch)
  first = len(lhs_batch)
  batch = tuple(range(first))
  product = _product(lhs, cotangent, ((tuple(lhs_free), tuple(range(first, first + len(lhs_free)))),
                                      (tuple(lhs_batch), batch)))
  # Its axes: batch, the left contracting axes in their own order (each standing
  # for the right contracting axis it was paired with), then the right free axes.
  produced_as = list(rhs_batch) + [rhs_contract[i] for i in np.argsort(lhs_contract)] + rhs_free
  return jnp.transpose(product, tuple(np.argsort(produced_as)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bf16_product(lhs, rhs, dimension_numbers: DimensionNumbers):
  """float32 operands in, rounded to bfloat16; float32 product and cotangents."""
  return _product(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), dimension_numbers)


def _bf16_product_fwd(lhs, rhs, dimension_numbers):
  lhs, rhs = lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16)
  return _product(lhs, rhs, dimension_numbers), (lhs, rhs)


def _bf16_product_bwd(dimension_numbers, residuals, cotangent):
  lhs, rhs = residuals
  cotangent = cotangent.astype(jnp.bfloat16)
  return (_lhs_cotangent(cotangent, lhs.ndim, rhs, dimension_numbers),
          _rhs_cotangent(cotangent, lhs, rhs.ndim, dimension_numbers))


_bf16_product.defvjp(_bf16_product_fwd, _bf16_product_bwd)


def _batch_axes_first(x: jax.Array, batch, contract):
  """``x`` with its batch axes moved to the front, and its new contracting axes."""
  order = list(batch) + [axis for axis in range(x.ndim) if axis not in batch]
  return jnp.transpose(x, order), tuple(order.index(axis) for axis in contract)


def mixed_dot_general(lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None, **kwargs) -> jax.Array:
  """``lax.dot_general`` of the operands rounded to bfloat16, float32 out.

  The signature is ``lax.dot_general``'s; ``precision`` and
  ``preferred_element_type`` are ignored (the point is to fix both).
  """
  del precision, preferred_element_type, kwargs
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  # XLA:CPU has no bfloat16 x bfloat16 = float32 kernel for batch axes elsewhere.
  lhs, lhs_contract = _batch_axes_first(jnp.asarray(lhs, jnp.float32), lhs_batch, lhs_contract)
  rhs, rhs_contract = _batch_axes_first(jnp.asarray(rhs, jnp.float32), rhs_batch, rhs_contract)
  batch = tuple(range(len(lhs_batch)))
  return _bf16_product(lhs, rhs, ((lhs_contract, rhs_contract), (batch, batch)))


def dot_general_for(matmul_dtype: str):
  """The dot_general for a matmul dtype name.

  "float32": ``lax.dot_general`` itself (the module's compute dtype decides);
  "bfloat16": ``mixed_dot_general``.
  """
  if matmul_dtype not in MATMUL_DTYPES:
    raise ValueError(f"matmul dtype {matmul_dtype!r} not in {MATMUL_DTYPES}")
  return mixed_dot_general if matmul_dtype == "bfloat16" else lax.dot_general
