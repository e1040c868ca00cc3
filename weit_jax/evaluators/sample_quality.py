"""Samples of an image-generation model and their quality.

``generate``: class-conditional samples (``rectified_flow.sample``, jitted once per shape);
``grid_png``: a grid of them, one row per class. ``measure``: the Fréchet distance between
Gaussians fitted to the features of real and generated images,
``||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))`` (FID's formula), and class fidelity (how
often the classifier names the class a sample was generated for). Which network gives the features
decides what the number means: no Inception weights can be downloaded here, so the features are
those of a Fashion-MNIST classifier the project trains itself (``evaluators/feature_classifier.py``), and
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

from weit_jax import rectified_flow
from weit_jax.evaluators.distances import feature_statistics, frechet_distance

# Keys of the metrics a training run logs (as eval_<key>) and the benchmark reports, and the FID's name.
FID_KEY = "fid_fmnist_classifier_features"
FID_NAME = "FID, Fashion-MNIST classifier features"
FIDELITY_KEY = "class_fidelity"


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
    return rectified_flow.sample(lambda x, t, y: model_fn(params, x, t, y), noise, labels, steps=steps,
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
