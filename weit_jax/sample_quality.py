"""Samples of an image-generation model and their quality.

``generate``: class-conditional samples (``tasks.diffusion.sample``, jitted once per shape);
``grid_png``: a grid of them, one row per class. ``measure``: the Fréchet distance between
Gaussians fitted to the features of real and generated images,
``||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))`` (FID's formula), and class fidelity (how
often the classifier names the class a sample was generated for). Which network gives the features
decides what the number means: no Inception weights can be downloaded here, so the features are
those of a Fashion-MNIST classifier the project trains itself (``weit_jax.feature_classifier``), and
the metric is called "FID, Fashion-MNIST classifier features" everywhere, never "FID" alone.
``SampleEval``: both, with a sample grid, at the eval steps of a training run.

The value depends on the number of samples (the covariance estimate is biased): compare runs with
the same count; real test images of the same count give the floor (docs/results/generation.md).
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any, Callable

import jax
import numpy as np
from etils import epath

from weit_jax.tasks import diffusion

# Keys of the metrics a training run logs (as eval_<key>) and the benchmark reports, and the FID's name.
FID_KEY = "fid_fmnist_classifier_features"
FID_NAME = "FID, Fashion-MNIST classifier features"
FIDELITY_KEY = "class_fidelity"


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


def measure(classifier, images, labels) -> dict:
  """``{FID_KEY: the Fréchet distance of the samples' features to the classifier's real reference,
  FIDELITY_KEY: mean over classes of the accuracy on that class's samples, 'per_class': {class:
  accuracy}}`` for ``images`` in [-1, 1] generated for ``labels``."""
  features, logits = classifier.apply(images)
  mean, cov = feature_statistics(features)
  labels = np.asarray(labels)
  correct = np.argmax(logits, -1) == labels
  per_class = {int(c): float(np.mean(correct[labels == c])) for c in np.unique(labels)}
  return {FID_KEY: frechet_distance(mean, cov, classifier.reference_mean, classifier.reference_cov),
          FIDELITY_KEY: float(np.mean(list(per_class.values()))), "per_class": per_class}


def sample_labels(classes, per_class: int) -> np.ndarray:
  return np.repeat(np.asarray(classes, np.int32), per_class)


def make_generate(model_fn: Callable, cfg, *, steps: int, guidance: float, out_sharding=None):
  """``(params, noise, labels) -> images`` (jitted): ``steps`` Euler steps of the rectified-flow ODE
  with ``model_fn(params, x, t, y)``, guidance ``guidance``."""
  def run(params, noise, labels):
    return diffusion.sample(lambda x, t, y: model_fn(params, x, t, y), noise, labels, steps=steps,
                            scale=guidance, null_class=cfg.num_classes)
  return jax.jit(run, out_shardings=out_sharding)


def noise_for(labels, cfg, seed: int):
  return jax.random.normal(jax.random.key(seed), (len(labels), cfg.image_size, cfg.image_size, cfg.channels))


def generate(model, params, cfg, classes, *, per_class: int, steps: int, guidance: float, seed: int):
  """``(images [len(classes) * per_class, H, W, C] in [-1, 1] (clipped), labels)`` of a model
  (``model.apply``) and its params; the noise comes from ``seed``."""
  labels = sample_labels(classes, per_class)
  run = make_generate(lambda p, x, t, y: model.apply({"params": p}, x, t, y), cfg, steps=steps, guidance=guidance)
  images = run(params, noise_for(labels, cfg, seed), labels)
  return np.clip(np.asarray(images), -1.0, 1.0), labels


def grid_canvas(images: np.ndarray, per_class: int) -> np.ndarray:
  """``[rows * (H + 2), per_class * (W + 2), C]`` in [0, 1]: ``per_class`` consecutive images per
  row (one class each), on a white 1-pixel border; images in [-1, 1]."""
  rows = len(images) // per_class
  h, w, c = images.shape[1:]
  tiles = ((np.asarray(images, np.float32) + 1) / 2).reshape(rows, per_class, h, w, c)
  canvas = np.ones((rows * (h + 2), per_class * (w + 2), c), np.float32)
  for r in range(rows):
    for k in range(per_class):
      canvas[r * (h + 2) + 1:r * (h + 2) + 1 + h, k * (w + 2) + 1:k * (w + 2) + 1 + w] = tiles[r, k]
  return canvas


def grid_png(images: np.ndarray, labels: np.ndarray, per_class: int, title: str) -> bytes:
  """One row per class; images in [-1, 1]."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = len(images) // per_class
  h, w, c = images.shape[1:]
  canvas = grid_canvas(images, per_class)
  fig, ax = plt.subplots(figsize=(max(3.0, per_class * 0.6), max(2.0, rows * 0.6) + 0.5))
  ax.imshow(canvas[..., 0] if c == 1 else canvas, cmap="gray" if c == 1 else None, vmin=0, vmax=1,
            interpolation="nearest")
  ax.set_yticks([r * (h + 2) + h / 2 for r in range(rows)], [f"class {labels[r * per_class]}" for r in range(rows)])
  ax.set_xticks([])
  ax.set_title(title, fontsize=8)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  return buf.getvalue()


def write_whole(path, data: bytes) -> None:
  """Writes ``data`` to ``path`` through a temporary file: a crash leaves no half-written file."""
  path = epath.Path(path)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_bytes(data)
  tmp.replace(path)


@dataclasses.dataclass
class SampleEval:
  """Sample quality at a training run's eval steps: ``per_class`` samples of every class (the same
  noise each time, from ``seed``), their metrics (``measure``), and a grid of the first
  ``grid_columns`` of each class in ``WORKDIR/samples/step_<step>.png``."""
  classifier: Any
  model_fn: Callable  # (params, x, t, y) -> velocity
  cfg: Any
  workdir: str
  per_class: int
  steps: int
  guidance: float
  seed: int = 0
  grid_columns: int = 8
  out_sharding: Any = None

  def __post_init__(self):
    self.labels = sample_labels(range(self.cfg.num_classes), self.per_class)
    self.noise = noise_for(self.labels, self.cfg, self.seed)
    self._generate = make_generate(self.model_fn, self.cfg, steps=self.steps, guidance=self.guidance,
                                   out_sharding=self.out_sharding)

  def __call__(self, step: int, params) -> dict[str, float]:
    images = np.clip(np.asarray(jax.device_get(self._generate(params, self.noise, self.labels))), -1.0, 1.0)
    result = measure(self.classifier, images, self.labels)
    if jax.process_index() == 0:
      cols = min(self.grid_columns, self.per_class)
      keep = np.concatenate([np.arange(c * self.per_class, c * self.per_class + cols)
                             for c in range(self.cfg.num_classes)])
      title = (f"{self.cfg.short_name()} at step {step}: {self.steps} Euler steps, guidance {self.guidance}\n"
               f"{_fmt(result)}")
      out = epath.Path(self.workdir) / "samples"
      out.mkdir(parents=True, exist_ok=True)
      write_whole(out / f"step_{step:07d}.png", grid_png(images[keep], self.labels[keep], cols, title))
    return {FID_KEY: result[FID_KEY], FIDELITY_KEY: result[FIDELITY_KEY]}


def _fmt(result: dict) -> str:
  return f"{FID_NAME}: {result[FID_KEY]:.2f}; class fidelity {result[FIDELITY_KEY]:.3f}"
