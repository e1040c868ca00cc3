"""Sample quality (weit_jax/evaluators/sample_quality.py): the Fréchet distance against closed forms and scipy's
sqrtm; the feature classifier (weit_jax/evaluators/feature_classifier.py) and the measurement on it."""
import os

import jax
import ml_collections
import numpy as np
import pytest
import scipy.linalg

from helpers import TINY_RECIPE
from weit_jax import data_catalog
from weit_jax.evaluators import distances, feature_classifier, sample_quality


def random_spd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def test_diagonal_gaussians_closed_form():
  """Diagonal covariances commute: the distance is ||mu1 - mu2||^2 + sum (sqrt(s1) - sqrt(s2))^2."""
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
  assert distances.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-10)


def test_general_covariances_match_the_sqrtm_formula():
  rng = np.random.default_rng(1)
  for d in (3, 17):
    mu1, mu2, c1, c2 = rng.normal(size=d), rng.normal(size=d), random_spd(rng, d), random_spd(rng, d)
    want = np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * np.real(scipy.linalg.sqrtm(c1 @ c2)))
    assert distances.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(want, rel=1e-8)
    assert distances.frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-9)


def test_feature_statistics_and_sample_estimates():
  """Two large samples of one Gaussian are close; a shifted one is as far as the shift."""
  rng = np.random.default_rng(2)
  cov = random_spd(rng, 4)
  a = rng.multivariate_normal(np.zeros(4), cov, size=20_000)
  b = rng.multivariate_normal(np.zeros(4), cov, size=20_000)
  c = b + np.array([1.0, 0.0, 0.0, 0.0])
  mu_a, cov_a = distances.feature_statistics(a)
  np.testing.assert_allclose(cov_a, np.cov(a.T), rtol=1e-12)
  same = distances.frechet_distance(mu_a, cov_a, *distances.feature_statistics(b))
  shifted = distances.frechet_distance(mu_a, cov_a, *distances.feature_statistics(c))
  assert same < 0.01 and shifted == pytest.approx(1.0 + same, abs=0.02)
  with pytest.raises(ValueError, match="N >= 2"):
    distances.feature_statistics(np.ones((1, 4)))
  with pytest.raises(ValueError, match="different dimensions"):
    distances.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_kernel_distance_matches_the_pairwise_sums():
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(7, 5)), rng.normal(0.5, 1.0, size=(9, 5))
  k = lambda a, b: (a @ b / 5 + 1) ** 3
  want = (sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / 42
          + sum(k(y[i], y[j]) for i in range(9) for j in range(9) if i != j) / 72
          - 2 * sum(k(a, b) for a in x for b in y) / 63)
  assert distances.kernel_distance(x, y) == pytest.approx(want, rel=1e-10)
  big = rng.normal(size=(4000, 3))
  assert abs(distances.kernel_distance(big[:2000], big[2000:])) < 0.01  # unbiased: ~0 for one law
  with pytest.raises(ValueError, match="N, M >= 2"):
    distances.kernel_distance(x, y[:, :4])


# --- the feature classifier and the measurement on it ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_classifier(learnable_data, tmp_path_factory):
  """The classifier recipe at a tiny size, on the learnable Fashion-MNIST stand-in (bars per class)."""
  config = learnable_data(ml_collections.ConfigDict(dict(data=data_catalog.default_data_config(
      "fashion_mnist_local"))))
  data_dir = config.data.data_dir
  path = feature_classifier.cache_dir(data_dir, TINY_RECIPE)
  classifier = feature_classifier.load(data_dir, TINY_RECIPE, log=lambda msg: None)
  return classifier, data_dir, path


def test_the_classifier_is_built_once_whole_and_deterministically(tiny_classifier, monkeypatch, tmp_path):
  classifier, data_dir, path = tiny_classifier
  assert classifier.meta["path"] == path and classifier.meta["test_accuracy"] > 0.9  # the bars are easy
  assert classifier.reference_mean.shape == (16,) and classifier.meta["reference_examples"] == 240
  # A second load reads the cache: it never trains again.
  monkeypatch.setattr(feature_classifier, "train", lambda *a, **k: pytest.fail("trained again"))
  again = feature_classifier.load(data_dir, TINY_RECIPE)
  for a, b in zip(jax.tree_util.tree_leaves(classifier.params), jax.tree_util.tree_leaves(again.params)):
    np.testing.assert_array_equal(a, b)
  monkeypatch.undo()
  # The recipe's seed pins the weights: the same few steps twice give the same parameters.
  short = dict(TINY_RECIPE, steps=3)
  first = feature_classifier.train(data_dir, short, log=lambda msg: None)[1]
  second = feature_classifier.train(data_dir, short, log=lambda msg: None)[1]
  for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(second)):
    np.testing.assert_array_equal(a, b)
  # A build that fails half way leaves no cache folder (nor a temporary one) behind.
  def fail(*args, **kwargs):
    raise OSError("disk full")
  monkeypatch.setattr(feature_classifier, "train", lambda *a, **k: (classifier.model, classifier.params))
  monkeypatch.setattr(np, "savez", fail)
  with pytest.raises(OSError, match="disk full"):
    feature_classifier.build(str(tmp_path / "cache" / "c"), data_dir, TINY_RECIPE, log=lambda msg: None)
  assert os.listdir(tmp_path / "cache") == []


def test_the_metric_is_zero_on_its_reference_low_on_real_images_high_on_noise(tiny_classifier):
  classifier, data_dir, _ = tiny_classifier
  reference, ref_labels = feature_classifier.real_images(TINY_RECIPE["reference_split"], data_dir, TINY_RECIPE)
  same = sample_quality.measure(classifier, reference, ref_labels)
  # The very images of the statistics: zero, up to the round-off of the matrix square root.
  assert same[sample_quality.FID_KEY] == pytest.approx(0.0, abs=1e-5 * np.trace(classifier.reference_cov))
  # Class fidelity: the mean over classes of the classifier's accuracy on each class (hand computed).
  test_images, test_labels = feature_classifier.real_images("test", data_dir, TINY_RECIPE)
  real = sample_quality.measure(classifier, test_images, test_labels)
  predicted = np.argmax(classifier.apply(test_images)[1], -1)
  want = {c: np.mean(predicted[test_labels == c] == c) for c in np.unique(test_labels)}
  assert real["per_class"] == pytest.approx(want)
  assert real[sample_quality.FIDELITY_KEY] == pytest.approx(np.mean(list(want.values())))
  # Seeded noise in [-1, 1], and the real images blurred: both are further from the reference
  # than real test images; labels a class off lower fidelity.
  rng = np.random.default_rng(0)
  noise = sample_quality.measure(classifier, rng.uniform(-1, 1, test_images.shape), test_labels)
  blurred = (test_images + np.roll(test_images, 3, axis=1) + np.roll(test_images, -3, axis=1)) / 3
  blur = sample_quality.measure(classifier, blurred, test_labels)
  assert real[sample_quality.FID_KEY] < blur[sample_quality.FID_KEY] < noise[sample_quality.FID_KEY]
  assert real[sample_quality.FID_KEY] < 0.1 * noise[sample_quality.FID_KEY]
  off = sample_quality.measure(classifier, test_images, (test_labels + 1) % 10)
  assert off[sample_quality.FIDELITY_KEY] < 0.2 < 0.9 < real[sample_quality.FIDELITY_KEY]
