"""The training loss per position, fused so no (B, N, K) temporary is needed.

``discrete.loss_terms`` states the official loss literally, building the
model and true posteriors as (B, N, K + 1) arrays. Here the same quantities
are rewritten so that every K-wide value is an elementwise function of the
logits, the token indices and a few per-position scalars, and is consumed
only by reductions over K. XLA then fuses each reduction with the
elementwise work feeding it and nothing K-wide is stored. The gradient is
written out by hand (a custom VJP) for the same reason: automatic
differentiation would keep K-wide residuals for the backward pass.

XLA does not always fuse a K-wide value into every reduction that reads it
(on CPU it stores it instead), so positions are also processed in chunks
along N by a ``fori_loop``: whatever XLA stores is chunk-sized. Slicing along
N leaves the batch axis, the one sharded over devices, untouched.

With s = t - 1, ``Qbar`` cumulative and ``Q`` one-step matrices, the model
posterior over codebook classes j is, before its clamp to [-70, 0],

    v_j = logaddexp(r_j + log abar_s, log bbar_s + L) + log q(x_t | x_s = j)
    r_j = l_j - log q(x_t | x_0 = j),   L = logsumexp(r_0..r_{K-1}, log 1e-30)

with l the clamped log-softmax of the logits, and for [MASK]
``v_K = logaddexp(log 1e-30 + log(1 - cbar_s), log cbar_s + L) + log q(x_t
| x_s = [MASK])``. Both ``q(x_t | .)`` factors take one value where the class
equals x_t and another elsewhere, so they are per-position scalars. The true
posterior is the same expression with l replaced by the log one-hot of x_0.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from vqdiffusion_jax.diffusion.logspace import LOG_PROB_MIN, LOG_ZERO
from vqdiffusion_jax.diffusion.schedule import Schedule, cumulative, step

DEFAULT_CHUNK_ELEMENTS = 1 << 22


class _Position(NamedTuple):
  """Per-position scalars (B, N, 1) that the K-wide expressions broadcast."""

  qt_hit: jax.Array   # log q(x_t | x_0 = j) where j == x_t
  qt_miss: jax.Array  # ... where j != x_t
  qs_hit: jax.Array   # log q(x_t | x_{t-1} = j) where j == x_t
  qs_miss: jax.Array
  qs_mask: jax.Array  # log q(x_t | x_{t-1} = [MASK])
  log_a_prev: jax.Array  # log abar_{t-1}
  log_b_prev: jax.Array
  log_c_prev: jax.Array
  log_1m_c_prev: jax.Array


def _position_scalars(schedule: Schedule, x_t: jax.Array, t: jax.Array) -> _Position:
  per_sample = lambda v: jnp.broadcast_to(jnp.asarray(v)[..., None], x_t.shape)  # noqa: E731
  cum_t, one, prev = cumulative(schedule, t), step(schedule, t), cumulative(schedule, t - 1)
  mask = x_t == schedule.mask_index

  def pick(if_mask, value):
    return jnp.where(mask, per_sample(if_mask), per_sample(value))
  fields = _Position(
      qt_hit=pick(cum_t.log_c, jnp.logaddexp(cum_t.log_a, cum_t.log_b)),
      qt_miss=pick(cum_t.log_c, jnp.logaddexp(LOG_ZERO + cum_t.log_a, cum_t.log_b)),
      qs_hit=pick(one.log_c, jnp.logaddexp(one.log_a, one.log_b)),
      qs_miss=pick(one.log_c, jnp.logaddexp(LOG_ZERO + one.log_a, one.log_b)),
      qs_mask=jnp.where(mask, 0.0, LOG_ZERO),
      log_a_prev=per_sample(prev.log_a), log_b_prev=per_sample(prev.log_b),
      log_c_prev=per_sample(prev.log_c), log_1m_c_prev=per_sample(prev.log_1m_c))
  return _Position(*(f[..., None].astype(jnp.float32) for f in fields))


def _lse_with_zero(x: jax.Array) -> jax.Array:
  """logsumexp over the last axis with one more entry log(1e-30), keepdims."""
  return jnp.logaddexp(jax.nn.logsumexp(x, axis=-1, keepdims=True), LOG_ZERO)


def _in_range(v: jax.Array) -> jax.Array:
  """Where the [-70, 0] clamp passes gradients (inclusive, as torch.clamp)."""
  return (v >= LOG_PROB_MIN) & (v <= 0.0)


def _indicators(z, x0, x_t) -> tuple[jax.Array, jax.Array]:
  """(class == x_t, log one-hot of x_0), both K-wide."""
  classes = jnp.arange(z.shape[-1], dtype=x_t.dtype)
  return x_t[..., None] == classes, jnp.where(x0[..., None] == classes, 0.0, LOG_ZERO)


class _Wide(NamedTuple):
  """K-wide expressions, recomputed wherever they are needed."""

  log_softmax: jax.Array  # unclamped
  log_x0: jax.Array       # l, clamped
  ratio: jax.Array        # r
  carried: jax.Array      # v - log q(x_t | x_s)
  v_model: jax.Array
  v_true: jax.Array


def _ratios(z, shift, onehot_x0, hit_t, p: _Position):
  """(log-softmax, l, r, the true posterior's r), before any normaliser."""
  log_softmax = z - shift
  log_x0 = jnp.clip(log_softmax, LOG_PROB_MIN, 0.0)
  log_qt = jnp.where(hit_t, p.qt_hit, p.qt_miss)
  return log_softmax, log_x0, log_x0 - log_qt, onehot_x0 - log_qt


def _wide(z, shift, onehot_x0, hit_t, p: _Position, lse_model, lse_true) -> _Wide:
  log_softmax, log_x0, ratio, ratio_true = _ratios(z, shift, onehot_x0, hit_t, p)
  log_qs = jnp.where(hit_t, p.qs_hit, p.qs_miss)
  carried = jnp.logaddexp(ratio + p.log_a_prev, p.log_b_prev + lse_model)
  carried_true = jnp.logaddexp(ratio_true + p.log_a_prev, p.log_b_prev + lse_true)
  return _Wide(log_softmax, log_x0, ratio, carried, carried + log_qs, carried_true + log_qs)


def _mask_entry(p: _Position, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(pre-clamp value, carried part) of the posterior's [MASK] entry."""
  carried = jnp.logaddexp(LOG_ZERO + p.log_1m_c_prev, p.log_c_prev + lse)
  return carried + p.qs_mask, carried


def _clamp(v: jax.Array) -> jax.Array:
  return jnp.clip(v, LOG_PROB_MIN, 0.0)


def _forward(z, x0, x_t, p: _Position):
  hit_t, onehot_x0 = _indicators(z, x0, x_t)
  shift = jax.nn.logsumexp(z, axis=-1, keepdims=True)
  _, _, ratio, ratio_true = _ratios(z, shift, onehot_x0, hit_t, p)
  lse_model, lse_true = _lse_with_zero(ratio), _lse_with_zero(ratio_true)
  w = _wide(z, shift, onehot_x0, hit_t, p, lse_model, lse_true)

  out, true = _clamp(w.v_model), _clamp(w.v_true)
  out_mask = _clamp(_mask_entry(p, lse_model)[0])
  true_mask = _clamp(_mask_entry(p, lse_true)[0])
  kl = (jnp.sum(jnp.exp(true) * (true - out), axis=-1)
        + (jnp.exp(true_mask) * (true_mask - out_mask))[..., 0])
  nll = -(jnp.sum(jnp.exp(onehot_x0) * out, axis=-1) + (jnp.exp(LOG_ZERO) * out_mask)[..., 0])
  aux = jnp.sum(jnp.exp(onehot_x0) * (onehot_x0 - w.log_x0), axis=-1)
  return (kl, nll, aux), (shift, lse_model, lse_true)


def _backward(z, x0, x_t, p: _Position, shift, lse_model, lse_true, g_kl, g_nll, g_aux):
  g_kl, g_nll, g_aux = (g[..., None] for g in (g_kl, g_nll, g_aux))
  hit_t, onehot_x0 = _indicators(z, x0, x_t)
  w = _wide(z, shift, onehot_x0, hit_t, p, lse_model, lse_true)
  true = _clamp(w.v_true)
  v_mask, carried_mask = _mask_entry(p, lse_model)
  true_mask = _clamp(_mask_entry(p, lse_true)[0])

  # d loss / d posterior entry, zero where the clamp binds.
  d_out = -(g_kl * jnp.exp(true) + g_nll * jnp.exp(onehot_x0)) * _in_range(w.v_model)
  d_out_mask = -(g_kl * jnp.exp(true_mask) + g_nll * jnp.exp(LOG_ZERO)) * _in_range(v_mask)
  # v_j moves with r_j by sigma_j and with L by 1 - sigma_j; v_K with L by tau.
  sigma = jnp.exp(w.ratio + p.log_a_prev - w.carried)
  tau = jnp.exp(p.log_c_prev + lse_model - carried_mask)
  d_lse = jnp.sum(d_out * (1.0 - sigma), axis=-1, keepdims=True) + d_out_mask * tau
  d_ratio = d_out * sigma + jnp.exp(w.ratio - lse_model) * d_lse
  d_log_x0 = (d_ratio - g_aux * jnp.exp(onehot_x0)) * _in_range(w.log_softmax)
  return d_log_x0 - jnp.exp(w.log_softmax) * jnp.sum(d_log_x0, axis=-1, keepdims=True)


def _map_chunks(fn, num_chunks: int, *args):
  """``fn(*args)`` computed on ``num_chunks`` slices along axis 1 (N) in turn.

  Every array in ``args`` and in ``fn``'s outputs is laid out (B, N, ...);
  outputs are written into place slice by slice.
  """
  if num_chunks == 1:
    return fn(*args)
  anchor = jax.tree.leaves(args)[0]
  batch, length = anchor.shape[:2]
  size = length // num_chunks
  take = lambda tree, i: jax.tree.map(  # noqa: E731
      lambda x: jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=1), tree)

  def zeros(chunk_shape):
    # Built from an input so it carries the batch sharding under any mesh.
    rest = chunk_shape.shape[2:]
    base = jnp.zeros_like(anchor[(...,) + (0,) * (anchor.ndim - 2)], dtype=chunk_shape.dtype)
    return jnp.broadcast_to(base.reshape(batch, length, *(1,) * len(rest)),
                            (batch, length, *rest))

  def body(i, outs):
    return jax.tree.map(lambda o, c: jax.lax.dynamic_update_slice_in_dim(o, c, i * size, axis=1),
                        outs, fn(*take(args, i)))
  init = jax.tree.map(zeros, jax.eval_shape(fn, *take(args, 0)))
  return jax.lax.fori_loop(0, num_chunks, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _terms(z, x0, x_t, p: _Position, num_chunks: int):
  return _map_chunks(_forward, num_chunks, z, x0, x_t, p)[0]


def _terms_fwd(z, x0, x_t, p, num_chunks):
  outs, stats = _map_chunks(_forward, num_chunks, z, x0, x_t, p)
  return outs, (z, x0, x_t, p, stats)


def _terms_bwd(num_chunks, res, cotangents):
  z, x0, x_t, p, stats = res
  d_z = _map_chunks(_backward, num_chunks, z, x0, x_t, p, *stats, *cotangents)
  return d_z, None, None, None


_terms.defvjp(_terms_fwd, _terms_bwd)


def _num_chunks(batch: int, length: int, num_codes: int, max_chunk_elements: int) -> int:
  """The fewest chunks dividing N whose (B, N / chunks, K) slice fits."""
  for chunks in range(1, length + 1):
    if length % chunks == 0 and batch * (length // chunks) * num_codes <= max_chunk_elements:
      return chunks
  return length


def position_terms(schedule: Schedule, logits: jax.Array, x0: jax.Array, x_t: jax.Array,
                   t: jax.Array, *, max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-position loss terms of the official objective, fused.

  Args:
    schedule: the noise schedule.
    logits: (B, N, K) network output (any float dtype; computed in float32).
    x0: (B, N) int clean tokens.
    x_t: (B, N) int noised tokens.
    t: (B,) int steps, 0..T-1.
    max_chunk_elements: largest (B, chunk, K) slice processed at once; the
      loss's temporaries are a small multiple of it.

  Returns:
    ``(kl, nll, aux)``, each (B, N) float32: ``KL(q(x_{t-1} | x_t, x_0) ||
    p_theta(x_{t-1} | x_t))``, ``-log p_theta(x_0 | x_t)`` under the
    posterior at s = t - 1 (the decoder NLL where t = 0), and ``KL(x_0 ||
    p_theta(x~_0 | x_t))`` over the K codebook classes. Differentiable in
    ``logits`` only.
  """
  p = _position_scalars(schedule, x_t, t)
  chunks = _num_chunks(*logits.shape, max_chunk_elements)
  return _terms(logits.astype(jnp.float32), x0, x_t, p, chunks)
