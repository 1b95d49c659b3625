"""Noise schedules of the mask-and-replace process, held as log tables.

A schedule is fully described by its cumulative parameters: ``abar_t`` (the
probability that a token is still itself and was never touched) and
``cbar_t`` (the probability that it has become [MASK]) for t = 0..T-1, the
official code's 0-based steps. The per-step parameters follow from ratios
(``alpha_t = abar_t / abar_{t-1}``, ``1 - gamma_t = (1 - cbar_t) / (1 -
cbar_{t-1})``) and the uniform-replacement mass from the rows summing to one
(``beta_t = (1 - alpha_t - gamma_t) / K``), exactly as the official
``alpha_schedule`` derives them.

Tables are computed in float64 with NumPy and stored as float32 arrays, like
the official buffers. Cumulative tables have T + 1 entries: index T is the
identity transition, which is what t = -1 (``x_{-1} = x_0``) looks up.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from vqdiffusion_jax.diffusion.logspace import log1mexp

SCHEDULES = ("mask_and_replace", "cosine", "uniform")


@struct.dataclass
class Schedule:
  """Log tables of a mask-and-replace schedule; a pytree, safe to pass to jit.

  Attributes:
    log_at, log_bt, log_ct: (T,) log alpha_t, beta_t, gamma_t of step t.
    log_1m_ct: (T,) log(1 - gamma_t).
    log_cumprod_at, log_cumprod_bt, log_cumprod_ct: (T + 1,) log abar_t,
      bbar_t, cbar_t; index T is the identity (abar = 1, bbar = cbar = 0).
    log_1m_cumprod_ct: (T + 1,) log(1 - cbar_t).
    codebook_size: K, the number of codebook tokens; [MASK] is index K.
  """

  log_at: jax.Array
  log_bt: jax.Array
  log_ct: jax.Array
  log_1m_ct: jax.Array
  log_cumprod_at: jax.Array
  log_cumprod_bt: jax.Array
  log_cumprod_ct: jax.Array
  log_1m_cumprod_ct: jax.Array
  codebook_size: int = struct.field(pytree_node=False)

  @property
  def num_timesteps(self) -> int:
    return self.log_at.shape[0]

  @property
  def mask_index(self) -> int:
    return self.codebook_size

  @property
  def num_classes(self) -> int:
    """K + 1: the codebook tokens and [MASK]."""
    return self.codebook_size + 1


class Transition(NamedTuple):
  """Log parameters (a, b, c, 1 - c) of one mask-and-replace matrix."""

  log_a: jax.Array
  log_b: jax.Array
  log_c: jax.Array
  log_1m_c: jax.Array


def _log(x: np.ndarray) -> np.ndarray:
  with np.errstate(divide="ignore"):
    return np.log(x)


def from_cumulative(cumprod_at: np.ndarray, cumprod_ct: np.ndarray,
                    codebook_size: int) -> Schedule:
  """Builds a schedule from its cumulative keep and mask probabilities.

  Args:
    cumprod_at: (T,) abar_t for t = 0..T-1, non-increasing, in (0, 1].
    cumprod_ct: (T,) cbar_t, non-decreasing, in [0, 1).
    codebook_size: K.

  Returns:
    The schedule, with per-step parameters derived as the official code does.

  Raises:
    ValueError: if the parameters do not define valid transition matrices.
  """
  att = np.asarray(cumprod_at, np.float64)
  ctt = np.asarray(cumprod_ct, np.float64)
  if att.ndim != 1 or att.shape != ctt.shape or att.shape[0] < 2:
    raise ValueError("cumprod_at and cumprod_ct must be 1-D of equal length "
                     f">= 2, got {att.shape} and {ctt.shape}")
  if codebook_size < 1:
    raise ValueError(f"codebook_size must be positive, got {codebook_size}")
  att_prev = np.concatenate(([1.0], att[:-1]))
  one_minus_ctt_prev = 1.0 - np.concatenate(([0.0], ctt[:-1]))
  at = att / att_prev
  ct = 1.0 - (1.0 - ctt) / one_minus_ctt_prev
  bt = (1.0 - at - ct) / codebook_size
  btt = (1.0 - att - ctt) / codebook_size
  _check_probabilities(at=at, bt=bt, ct=ct, att=att, btt=btt, ctt=ctt)

  cum_a = np.concatenate((att, [1.0]))
  cum_b = np.concatenate((btt, [0.0]))
  cum_c = np.concatenate((ctt, [0.0]))
  log_ct, log_cum_c = _log(ct), _log(cum_c)
  as_f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  return Schedule(
      log_at=as_f32(_log(at)),
      log_bt=as_f32(_log(bt)),
      log_ct=as_f32(log_ct),
      # The official 1e-40 guard keeps log(1 - c) finite when c rounds to 1.
      log_1m_ct=as_f32(np.log(1.0 - np.exp(log_ct) + 1e-40)),
      log_cumprod_at=as_f32(_log(cum_a)),
      log_cumprod_bt=as_f32(_log(cum_b)),
      log_cumprod_ct=as_f32(log_cum_c),
      log_1m_cumprod_ct=as_f32(np.log(1.0 - np.exp(log_cum_c) + 1e-40)),
      codebook_size=int(codebook_size),
  )


def _check_probabilities(**params: np.ndarray) -> None:
  for name, value in params.items():
    if not np.all(np.isfinite(value)) or np.any(value < 0) or np.any(value > 1):
      raise ValueError(f"schedule parameter {name} leaves [0, 1]: {value}")


def _progress(num_timesteps: int) -> np.ndarray:
  """t / (T - 1) for t = 0..T-1, the official code's linear interpolant."""
  if num_timesteps < 2:
    raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
  return np.arange(0, num_timesteps) / (num_timesteps - 1)


def mask_and_replace(num_timesteps: int, codebook_size: int, *,
                     att_1: float = 0.99999, att_T: float = 0.000009,  # noqa: N803
                     ctt_1: float = 0.000009, ctt_T: float = 0.99999  # noqa: N803
                     ) -> Schedule:
  """The official ``alpha1`` schedule: abar and cbar linear in t.

  Args:
    num_timesteps: T.
    codebook_size: K ([MASK] not counted).
    att_1, att_T: abar at the first and last step.
    ctt_1, ctt_T: cbar at the first and last step.

  Returns:
    The schedule; with the defaults abar_t + cbar_t = 0.999999 for every t.
  """
  s = _progress(num_timesteps)
  return from_cumulative(s * (att_T - att_1) + att_1,
                         s * (ctt_T - ctt_1) + ctt_1, codebook_size)


def cosine(num_timesteps: int, codebook_size: int, *, ctt_1: float = 0.000009,
           ctt_T: float = 0.99999, replace_mass: float = 1e-6) -> Schedule:  # noqa: N803
  """MaskGIT's cosine masking: the masked fraction is sin(pi/2 * t/(T-1)).

  Args:
    num_timesteps: T.
    codebook_size: K.
    ctt_1, ctt_T: cbar at the first and last step.
    replace_mass: total uniform-replacement probability K * bbar_t, constant
      in t as in the official schedule; abar_t = 1 - cbar_t - replace_mass.

  Returns:
    The schedule.
  """
  ctt = ctt_1 + (ctt_T - ctt_1) * np.sin(0.5 * math.pi * _progress(num_timesteps))
  return from_cumulative(1.0 - ctt - replace_mass, ctt, codebook_size)


def uniform(num_timesteps: int, codebook_size: int, *, att_1: float = 0.99999,
            att_T: float = 0.000009) -> Schedule:  # noqa: N803
  """Uniform replacement only (Paella): no [MASK] is ever produced.

  The kept fraction abar falls from att_1 to att_T along the same cosine
  shape as ``cosine``.

  Args:
    num_timesteps: T.
    codebook_size: K.
    att_1, att_T: abar at the first and last step.

  Returns:
    The schedule, with cbar_t = gamma_t = 0 (their logs are -inf).
  """
  att = att_1 + (att_T - att_1) * np.sin(0.5 * math.pi * _progress(num_timesteps))
  return from_cumulative(att, np.zeros_like(att), codebook_size)


def make(name: str, num_timesteps: int, codebook_size: int, **kwargs) -> Schedule:
  """Builds a schedule by name: one of ``SCHEDULES``.

  ``"alpha1"``, the official code's name, is accepted for
  ``"mask_and_replace"``.
  """
  builders = {"mask_and_replace": mask_and_replace, "alpha1": mask_and_replace,
              "cosine": cosine, "uniform": uniform}
  if name not in builders:
    raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
  return builders[name](num_timesteps, codebook_size, **kwargs)


def lookup(table: jax.Array, t: jax.Array) -> jax.Array:
  """``table[t]`` as a select-and-sum over the (short) table.

  Unlike a gather, this takes the sharding of ``t`` under any mesh, Auto or
  Explicit, with no output sharding to spell out; tables hold only T + 1
  entries, so the extra work is nil.
  """
  t = jnp.asarray(t)
  hit = t[..., None] == jnp.arange(table.shape[0], dtype=t.dtype)
  return jnp.sum(jnp.where(hit, table, 0.0), axis=-1)


def cumulative(schedule: Schedule, t: jax.Array) -> Transition:
  """Parameters of Qbar_t = Q_t ... Q_0; t = -1 gives the identity."""
  t = jnp.remainder(t, schedule.num_timesteps + 1)
  return Transition(*(lookup(table, t) for table in (
      schedule.log_cumprod_at, schedule.log_cumprod_bt, schedule.log_cumprod_ct,
      schedule.log_1m_cumprod_ct)))


def step(schedule: Schedule, t: jax.Array) -> Transition:
  """Parameters of the one-step matrix Q_t (t in 0..T-1)."""
  return Transition(*(lookup(table, t) for table in (
      schedule.log_at, schedule.log_bt, schedule.log_ct, schedule.log_1m_ct)))


def multistep(schedule: Schedule, t: jax.Array, s: jax.Array) -> Transition:
  """Parameters of Q_t ... Q_{s+1}, the transition from x_s to x_t (s < t).

  Mask-and-replace matrices compose into one of the same form: a = abar_t /
  abar_s, 1 - c = (1 - cbar_t) / (1 - cbar_s), and from the off-diagonal
  entries of Qbar_t = Qbar_s Q_{s->t}, b = (bbar_t - a bbar_s) / (abar_s + K
  bbar_s). Where s = t - 1 the stored one-step tables are returned exactly.

  Args:
    schedule: the schedule.
    t: later step, 0..T-1.
    s: earlier step, -1..t-1.

  Returns:
    The transition's log parameters, shaped like t and s broadcast.
  """
  cum_t, cum_s = cumulative(schedule, t), cumulative(schedule, s)
  log_a = cum_t.log_a - cum_s.log_a
  log_1m_c = cum_t.log_1m_c - cum_s.log_1m_c
  log_norm = jnp.logaddexp(cum_s.log_a, cum_s.log_b + math.log(schedule.codebook_size))
  log_b = (cum_t.log_b + log1mexp(log_a + cum_s.log_b - cum_t.log_b) - log_norm)
  composed = Transition(log_a, log_b, log1mexp(log_1m_c), log_1m_c)
  one_step = step(schedule, jnp.clip(t, 0, schedule.num_timesteps - 1))
  is_one_step = (s == t - 1)
  return Transition(*(jnp.where(is_one_step, a, b)
                      for a, b in zip(one_step, composed, strict=True)))
