"""Fréchet Inception Distance between two sets of features (Heusel et al. 2017).

FID fits a Gaussian to each set of Inception pool features and measures

  ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2}).

The classic implementations (pytorch-fid, TTUR) take ``scipy.linalg.sqrtm`` of
the non-symmetric product ``S1 S2``, which is slow and turns complex or
non-finite when a covariance is singular (fewer samples than dimensions). We
use the symmetric form instead: ``S1 S2`` is similar to
``S1^{1/2} S2 S1^{1/2}``, a positive semi-definite matrix, so

  Tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(S1^{1/2} S2 S1^{1/2})),

with both square roots taken by ``eigh`` and round-off negative eigenvalues
clipped to zero. Everything is computed in float64 with NumPy, on the host.

``RunningStatistics`` accumulates the mean and covariance batch by batch
(Chan et al.'s pairwise update of the mean and the centred scatter matrix), so
the features of a large sample never have to be held at once; its result
equals ``feature_statistics`` of all the features to float64 rounding.

Precomputed statistics are exchanged as pytorch-fid writes them: an ``.npz``
with ``mu`` (D,) and ``sigma`` (D, D) (``save_statistics``,
``load_statistics``).
"""

from __future__ import annotations

import os
import zipfile

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The mean and covariance of a set of feature vectors.

  Args:
    features: ``(N, D)`` features, ``N >= 2``.

  Returns:
    ``(mu, sigma)``: float64 ``(D,)`` mean and ``(D, D)`` covariance
    (``np.cov(rowvar=False)``, normalised by ``N - 1``).

  Raises:
    ValueError: not a 2-D array, fewer than two rows, or non-finite values.
  """
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2:
    raise ValueError(f"features must be (N, D), got shape {features.shape}")
  if features.shape[0] < 2:
    raise ValueError(f"need at least 2 feature vectors for a covariance, got {features.shape[0]}")
  if not np.all(np.isfinite(features)):
    raise ValueError("features contain NaN or Inf")
  return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """The Fréchet distance between two Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

  Args:
    mu1: ``(D,)`` mean of the first set.
    sigma1: ``(D, D)`` covariance of the first set (symmetric PSD).
    mu2: ``(D,)`` mean of the second set.
    sigma2: ``(D, D)`` covariance of the second set.

  Returns:
    The distance as a Python float, ``>= 0`` (round-off below zero is clipped).

  Raises:
    ValueError: shapes that are not ``(D,)`` / ``(D, D)`` with one common D,
      or NaN / Inf entries.
  """
  mu1, sigma1 = _checked(mu1, sigma1, "first")
  mu2, sigma2 = _checked(mu2, sigma2, "second")
  if mu1.shape != mu2.shape:
    raise ValueError(f"the two sets have different feature sizes: {mu1.shape[0]} and "
                     f"{mu2.shape[0]}")
  root1 = _psd_sqrt(sigma1)
  trace_sqrt = np.sum(np.sqrt(_psd_eigenvalues(root1 @ sigma2 @ root1)))
  diff = mu1 - mu2
  distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
  return float(max(distance, 0.0))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
  """FID between two sets of (Inception pool) features.

  Args:
    features1: ``(N1, D)`` features of the first image set.
    features2: ``(N2, D)`` features of the second image set.

  Returns:
    ``frechet_distance`` of their means and covariances.
  """
  return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def _checked(mu, sigma, which: str) -> tuple[np.ndarray, np.ndarray]:
  mu = np.asarray(mu, dtype=np.float64)
  sigma = np.asarray(sigma, dtype=np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"the {which} set's statistics must be mu (D,) and sigma (D, D), got "
                     f"{mu.shape} and {sigma.shape}")
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f"the {which} set's statistics contain NaN or Inf")
  return mu, sigma


def _psd_eigenvalues(matrix: np.ndarray) -> np.ndarray:
  """Eigenvalues of a symmetric PSD matrix, symmetrised first, negatives clipped to 0."""
  return np.clip(np.linalg.eigvalsh((matrix + matrix.T) / 2.0), 0.0, None)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """The symmetric PSD square root, by ``eigh``."""
  values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


class RunningStatistics:
  """The float64 mean and covariance of feature vectors that arrive in batches.

  ``update`` merges each batch's count, mean and centred scatter matrix into
  the running ones; ``statistics`` gives ``(mu, sigma)`` as
  ``feature_statistics`` would for all the rows at once.
  """

  def __init__(self, dim: int):
    self.count = 0
    self.mean = np.zeros(dim, np.float64)
    self.scatter = np.zeros((dim, dim), np.float64)

  def update(self, features: np.ndarray) -> None:
    """Adds ``(B, D)`` feature vectors."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[1] != self.mean.shape[0]:
      raise ValueError(f"features must be (B, {self.mean.shape[0]}), got {features.shape}")
    if not np.all(np.isfinite(features)):
      raise ValueError("features contain NaN or Inf")
    if not len(features):
      return
    batch_count = features.shape[0]
    batch_mean = features.mean(axis=0)
    centred = features - batch_mean
    total = self.count + batch_count
    delta = batch_mean - self.mean
    self.scatter += centred.T @ centred
    self.scatter += np.outer(delta, delta) * (self.count * batch_count / total)
    self.mean += delta * (batch_count / total)
    self.count = total

  def statistics(self) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)``: the mean and the covariance normalised by ``N - 1``."""
    if self.count < 2:
      raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.count}")
    return self.mean.copy(), self.scatter / (self.count - 1)


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes ``mu`` and ``sigma`` as pytorch-fid does: ``np.savez(path, mu=..., sigma=...)``."""
  mu, sigma = _checked(mu, sigma, "saved")
  directory = os.path.dirname(os.fspath(path))
  if directory:
    os.makedirs(directory, exist_ok=True)
  np.savez(path, mu=mu, sigma=sigma)


def load_statistics(path: str | os.PathLike,
                    dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Reads precomputed FID statistics (pytorch-fid's ``.npz``: ``mu`` and ``sigma``).

  Args:
    path: the ``.npz`` file.
    dim: the feature size the statistics must have (2048 for Inception pool
      features); None (the default) accepts any.

  Returns:
    ``(mu, sigma)`` as float64 ``(D,)`` and ``(D, D)``.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not an ``.npz``, keys other than ``mu`` / ``sigma`` missing,
      wrong shapes or non-finite values; the message names the file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"FID statistics file not found: {path}")
  try:
    data = np.load(path, allow_pickle=False)
  except (OSError, ValueError, zipfile.BadZipFile) as error:
    raise ValueError(f"FID statistics file {path} is not a readable .npz: {error}") from None
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise ValueError(f"FID statistics file {path} is a single .npy array, not an .npz with "
                     "'mu' and 'sigma'")
  with data:
    missing = [key for key in ("mu", "sigma") if key not in data.files]
    if missing:
      raise ValueError(f"FID statistics file {path} lacks {missing}; it holds "
                       f"{sorted(data.files)}, expected 'mu' (D,) and 'sigma' (D, D) as "
                       "pytorch-fid writes them")
    mu, sigma = data["mu"], data["sigma"]
  try:
    mu, sigma = _checked(mu, sigma, "stored")
  except ValueError as error:
    raise ValueError(f"FID statistics file {path}: {error}") from None
  if dim is not None and mu.shape[0] != dim:
    raise ValueError(f"FID statistics file {path} has {mu.shape[0]}-d features; expected {dim}")
  return mu, sigma
