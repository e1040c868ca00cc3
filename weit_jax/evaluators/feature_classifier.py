"""The Fashion-MNIST classifier whose features measure generated images.

No Inception network can be downloaded here, so sample quality is measured on the features of a
classifier the project trains itself: "FID, Fashion-MNIST classifier features" (never "FID" alone:
the number is not comparable to published Inception FIDs). A small CNN (two stages of two 3x3
convolutions, a 64-d feature layer, a linear head), trained with a pinned recipe and seed, then
cached like the datasets: the first use builds it (about 8 minutes on 2 CPU cores), later uses
read it. To build it ahead of time:

  python -m weit_jax.evaluators.feature_classifier [--data_dir=DIR]

Cache: ``DATA_DIR/weit_jax_feature_classifier/<dataset>-<recipe digest>/`` (``DATA_DIR`` as the
datasets': ``data.data_dir`` or TFDS's default), holding ``params.npz``, ``reference.npz`` (the
features' mean and covariance on ``RECIPE['reference_split']``, the real images generated ones are
compared with) and ``meta.json`` (the recipe, the test accuracy). Another recipe is another folder.
Images go in as generation sees them: ``[N, 28, 28, 1]`` in [-1, 1].
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from weit_jax import data_catalog, input_pipeline
from weit_jax.evaluators import distances

RECIPE = dict(dataset="fashion_mnist_local", channels=(16, 32), features=64, steps=1500, batch_size=128,
              lr=2e-3, crop_padding=2, seed=0, reference_split="train[:10000]", test_split="test")


class FeatureCNN(nn.Module):
  """``images -> (features [N, features], logits [N, classes])``."""
  channels: tuple[int, ...]
  features: int
  num_classes: int

  @nn.compact
  def __call__(self, x):
    for c in self.channels:
      x = nn.relu(nn.Conv(c, (3, 3))(x))
      x = nn.relu(nn.Conv(c, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), (2, 2))
    features = nn.relu(nn.Dense(self.features)(x.reshape(x.shape[0], -1)))
    return features, nn.Dense(self.num_classes)(features)


def _model(recipe: dict) -> tuple[FeatureCNN, jax.Array]:
  """The recipe's network and an example input (one image of the dataset's shape)."""
  info = data_catalog.dataset_info(recipe["dataset"])
  model = FeatureCNN(tuple(recipe["channels"]), int(recipe["features"]), info.num_classes)
  return model, jnp.zeros((1, info.image_size, info.image_size, info.channels))


def data_config(split: str | None = None, data_dir: str | None = None, recipe: dict | None = None):
  """The classifier's data: pixels in [-1, 1] as image generation reads them; training adds the
  small datasets' pad-and-crop and flips."""
  recipe = recipe or RECIPE
  d = data_catalog.default_data_config(recipe["dataset"])
  channels = len(d.mean)
  d.update(dict(mean=(0.5,) * channels, std=(0.5,) * channels, data_dir=data_dir))
  if split:
    d.eval_split = split
  return d


def cache_dir(data_dir: str | None = None, recipe: dict | None = None) -> str:
  recipe = recipe or RECIPE
  digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
  return os.path.join(input_pipeline._data_dir_text(data_dir), "weit_jax_feature_classifier",
                      f"{recipe['dataset']}-{digest}")


@dataclasses.dataclass
class FeatureClassifier:
  params: Any
  model: FeatureCNN
  meta: dict
  reference_mean: np.ndarray
  reference_cov: np.ndarray

  def __post_init__(self):
    self._apply = jax.jit(lambda p, x: self.model.apply({"params": p}, x))

  def apply(self, images, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """``(features, logits)`` of ``images`` in [-1, 1], as float64 numpy arrays."""
    images = np.asarray(images, np.float32)
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
      chunk = images[i:i + batch_size]
      pad = batch_size - len(chunk)  # one compiled shape for every chunk
      f, lg = self._apply(self.params, np.pad(chunk, [(0, pad)] + [(0, 0)] * (chunk.ndim - 1)))
      feats.append(np.asarray(f, np.float64)[:len(chunk)])
      logits.append(np.asarray(lg, np.float64)[:len(chunk)])
    return np.concatenate(feats), np.concatenate(logits)


def real_images(split: str, data_dir: str | None = None, recipe: dict | None = None):
  """``(images in [-1, 1], labels)`` of a split, in file order."""
  images, labels = [], []
  for batch in input_pipeline.make_eval_iterator(data_config(split, data_dir, recipe), global_batch_size=500):
    keep = batch["mask"] > 0
    images.append(batch["image"][keep])
    labels.append(np.argmax(batch["labels"][keep], -1))
  return np.concatenate(images), np.concatenate(labels)


def train(data_dir: str | None = None, recipe: dict | None = None, log=print):
  """Trains the classifier with ``recipe`` (deterministic for its seed); returns (model, params)."""
  recipe = recipe or RECIPE
  model, example = _model(recipe)
  data = data_config(None, data_dir, recipe)
  data.crop_padding = int(recipe["crop_padding"])  # pad-and-crop augmentation (and the dataset's flips)
  batches = iter(input_pipeline.make_train_iterator(data, global_batch_size=int(recipe["batch_size"]),
                                                   seed=int(recipe["seed"])))
  params = model.init(jax.random.key(int(recipe["seed"])), example)["params"]
  tx = optax.adam(optax.cosine_decay_schedule(float(recipe["lr"]), int(recipe["steps"])))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, images, labels):
    def loss_fn(p):
      return optax.softmax_cross_entropy(model.apply({"params": p}, images)[1], labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  t0 = time.time()
  total = int(recipe["steps"])
  for i in range(1, total + 1):
    batch = next(batches)
    params, opt_state, loss = step(params, opt_state, batch["image"], batch["labels"])
    if i % 250 == 0 or i == total:
      log(f"  feature classifier: step {i}/{total}, loss {float(loss):.4f}, {time.time() - t0:.0f}s")
  return model, jax.device_get(params)


def build(path: str, data_dir: str | None = None, recipe: dict | None = None, log=print) -> None:
  """Trains the classifier and writes its cache folder ``path`` whole (a crash leaves no half of it)."""
  recipe = recipe or RECIPE
  model, params = train(data_dir, recipe, log)
  classifier = FeatureClassifier(params, model, {}, np.zeros(0), np.zeros(0))
  test_images, test_labels = real_images(recipe["test_split"], data_dir, recipe)
  accuracy = float(np.mean(np.argmax(classifier.apply(test_images)[1], -1) == test_labels))
  features, _ = classifier.apply(real_images(recipe["reference_split"], data_dir, recipe)[0])
  mean, cov = distances.feature_statistics(features)
  meta = dict(recipe=recipe, test_accuracy=accuracy, reference_examples=len(features), jax=jax.__version__)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=".building-")
  try:
    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(os.path.join(tmp, "params.npz"), **flat)
    np.savez(os.path.join(tmp, "reference.npz"), mean=mean, cov=cov)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump(meta, f, indent=2)
    try:
      os.rename(tmp, path)
    except OSError:
      if not os.path.exists(os.path.join(path, "meta.json")):  # not another process's finished build
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  log(f"Feature classifier built in {path}: test accuracy {accuracy:.4f}.")


def load(data_dir: str | None = None, recipe: dict | None = None, log=print) -> FeatureClassifier:
  """The cached classifier of ``recipe``; built first (once) if the cache does not have it."""
  recipe = recipe or RECIPE
  path = cache_dir(data_dir, recipe)
  if not os.path.exists(os.path.join(path, "meta.json")):
    log(f"Building the sample-quality feature classifier (once; about 8 minutes on 2 CPU cores) in {path}.")
    build(path, data_dir, recipe, log)
  return read(path)


def read(path: str) -> FeatureClassifier:
  """The classifier ``build`` wrote to ``path``."""
  with open(os.path.join(path, "meta.json")) as f:
    meta = json.load(f)
  model, example = _model(meta["recipe"])
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), example)["params"])
  with np.load(os.path.join(path, "params.npz")) as saved:
    params = jax.tree_util.tree_map_with_path(lambda k, _: saved[jax.tree_util.keystr(k)], abstract)
  with np.load(os.path.join(path, "reference.npz")) as ref:
    mean, cov = ref["mean"], ref["cov"]
  return FeatureClassifier(params, model, dict(meta, path=path), mean, cov)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description="Build (once) the Fashion-MNIST feature classifier of "
                              "sample quality, and print where it is and its test accuracy.")
  p.add_argument("--data_dir", default=None, help="the datasets' data_dir (default: TFDS's)")
  args = p.parse_args(argv)
  classifier = load(args.data_dir)
  print(json.dumps(classifier.meta, indent=2))


if __name__ == "__main__":
  main()
