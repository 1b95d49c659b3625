"""Explicit (K + 1) x (K + 1) transition matrices in float64, for tests only.

Row convention: ``M[i, j] = q(x_t = j | x_{t-1} = i)``, so a distribution
(row vector) v moves as ``v @ M`` and ``Qbar_t = Q_0 @ Q_1 @ ... @ Q_t``.
"""

import numpy as np


def transition_matrix(a: float, b: float, c: float, num_codes: int) -> np.ndarray:
  """The mask-and-replace matrix with keep a, replace b (each), mask c."""
  m = np.full((num_codes + 1, num_codes + 1), b, np.float64)
  m[np.arange(num_codes), np.arange(num_codes)] = a + b
  m[:, num_codes] = c
  m[num_codes, :] = 0.0
  m[num_codes, num_codes] = 1.0
  return m


def official_parameters(num_timesteps: int, num_codes: int, att_1=0.99999,
                        att_T=0.000009, ctt_1=0.000009, ctt_T=0.99999):  # noqa: N803
  """Per-step (a, b, c) of the official linear schedule, from its definition."""
  s = np.arange(num_timesteps) / (num_timesteps - 1)
  abar = att_1 + s * (att_T - att_1)
  cbar = ctt_1 + s * (ctt_T - ctt_1)
  a = abar / np.concatenate(([1.0], abar[:-1]))
  c = 1.0 - (1.0 - cbar) / (1.0 - np.concatenate(([0.0], cbar[:-1])))
  return a, (1.0 - a - c) / num_codes, c


def step_matrices(schedule) -> list[np.ndarray]:
  """Q_t for t = 0..T-1 from a schedule's float32 one-step log tables."""
  tables = [np.exp(np.asarray(x, np.float64))
            for x in (schedule.log_at, schedule.log_bt, schedule.log_ct)]
  return [transition_matrix(a, b, c, schedule.codebook_size)
          for a, b, c in zip(*tables, strict=True)]


def product(matrices: list[np.ndarray], size: int) -> np.ndarray:
  out = np.eye(size)
  for m in matrices:
    out = out @ m
  return out


def posterior(p_x0: np.ndarray, x_t: int, qbar_s: np.ndarray, q_s_to_t: np.ndarray,
              qbar_t: np.ndarray) -> np.ndarray:
  """``sum_k p(x0 = k) q(x_s | x_t, x0 = k)`` by Bayes' rule on dense matrices.

  ``p_x0`` is over the K codebook classes (x_0 is never [MASK]).
  """
  num_codes = p_x0.shape[-1]
  weights = p_x0 / qbar_t[:num_codes, x_t]
  return (weights @ qbar_s[:num_codes]) * q_s_to_t[:, x_t]
