"""The Fréchet distance (weit_jax/sample_quality.py) against closed forms and scipy's sqrtm."""
import numpy as np
import pytest
import scipy.linalg

from weit_jax import sample_quality


def random_spd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def test_diagonal_gaussians_closed_form():
  """Diagonal covariances commute: the distance is ||mu1 - mu2||^2 + sum (sqrt(s1) - sqrt(s2))^2."""
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
  assert sample_quality.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-10)


def test_general_covariances_match_the_sqrtm_formula():
  rng = np.random.default_rng(1)
  for d in (3, 17):
    mu1, mu2, c1, c2 = rng.normal(size=d), rng.normal(size=d), random_spd(rng, d), random_spd(rng, d)
    want = np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * np.real(scipy.linalg.sqrtm(c1 @ c2)))
    assert sample_quality.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(want, rel=1e-8)
    assert sample_quality.frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-9)


def test_feature_statistics_and_sample_estimates():
  """Two large samples of one Gaussian are close; a shifted one is as far as the shift."""
  rng = np.random.default_rng(2)
  cov = random_spd(rng, 4)
  a = rng.multivariate_normal(np.zeros(4), cov, size=20_000)
  b = rng.multivariate_normal(np.zeros(4), cov, size=20_000)
  c = b + np.array([1.0, 0.0, 0.0, 0.0])
  mu_a, cov_a = sample_quality.feature_statistics(a)
  np.testing.assert_allclose(cov_a, np.cov(a.T), rtol=1e-12)
  same = sample_quality.frechet_distance(mu_a, cov_a, *sample_quality.feature_statistics(b))
  shifted = sample_quality.frechet_distance(mu_a, cov_a, *sample_quality.feature_statistics(c))
  assert same < 0.01 and shifted == pytest.approx(1.0 + same, abs=0.02)
  with pytest.raises(ValueError, match="N >= 2"):
    sample_quality.feature_statistics(np.ones((1, 4)))
  with pytest.raises(ValueError, match="different dimensions"):
    sample_quality.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
