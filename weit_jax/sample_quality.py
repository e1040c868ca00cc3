"""Sample quality: the Fréchet distance between two sets of features (FID's formula).

``FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))`` between Gaussians fitted to the
features of real and generated images. Which network gives the features decides what the number
means: no Inception weights can be downloaded here, so the project's numbers use a classifier it
trains itself and say so ("FID, Fashion-MNIST classifier features"; never "FID" alone).
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
