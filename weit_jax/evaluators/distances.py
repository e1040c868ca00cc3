"""Distances between sets of image features: the Fréchet distance of Gaussians fitted to them
(FID's formula) and the kernel distance (KID's). Pure numpy; which network gives the features is
the caller's choice (``feature_classifier``; the Inception cross-check of the generation benchmark).
"""
from __future__ import annotations

import numpy as np


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean and (unbiased) covariance of ``[N, D]`` features, in float64."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"features must be [N, D] with N >= 2; got shape {f.shape}.")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
  """The Fréchet distance of N(mu1, cov1) and N(mu2, cov2).

  ``Tr((S_1 S_2)^(1/2))`` is computed as the sum of the square roots of the eigenvalues of the
  symmetric ``S_1^(1/2) S_2 S_1^(1/2)`` (same spectrum as ``S_1 S_2``), so no complex matrix square
  root is needed; tiny negative eigenvalues from round-off are clipped to zero.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
  if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.shape[0],) * 2:
    raise ValueError(f"statistics of different dimensions: means {mu1.shape}, {mu2.shape}; covariances "
                     f"{cov1.shape}, {cov2.shape}.")
  w, v = np.linalg.eigh((cov1 + cov1.T) / 2)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  middle = root1 @ cov2 @ root1
  trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * trace_root)


def kernel_distance(features1, features2) -> float:
  """KID's formula: the unbiased squared MMD between two feature sets with the polynomial kernel
  ``k(x, y) = (x . y / D + 1)^3`` (Binkowski et al., 2018), on all pairs (no subsets)."""
  x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
    raise ValueError(f"features must be [N, D] and [M, D] with N, M >= 2; got {x.shape}, {y.shape}.")
  d = x.shape[1]
  kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
  m, n = len(x), len(y)
  return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
               - 2 * kxy.mean())
