"""Fashion-MNIST as a local TFDS dataset, built from Debian's ``dataset-fashion-mnist`` IDX files.

The build needs no network and no TensorFlow: images are stored as raw ``uint8`` tensors
(``tfds.features.Tensor``; the ``Image`` feature would need TensorFlow to PNG-encode them) in
array_record files, which ``tfds.data_source`` reads. Examples keep the IDX file order
(``disable_shuffling``), so example ``i`` of a split is image ``i`` of its IDX file.
"""
from __future__ import annotations

import gzip
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from weit_jax.data_catalog import FASHION_MNIST_IDX_DIR

NAME = "fashion_mnist_local"
DEFAULT_IDX_DIR = FASHION_MNIST_IDX_DIR
INSTALL_HINT = "sudo apt-get install dataset-fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
               "Bag", "Ankle boot")


def read_idx(path: str) -> np.ndarray:
  """An IDX file (optionally gzipped) as a numpy array: 2 zero bytes, dtype code, ndim, dims, data."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if data[:2] != b"\0\0" or data[2] != 0x08:
    raise ValueError(f"{path} is not an unsigned-byte IDX file (header {data[:4]!r}).")
  ndim = data[3]
  shape = tuple(int(d) for d in np.frombuffer(data, ">i4", count=ndim, offset=4))
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def check_idx_dir(idx_dir: str) -> None:
  """Raises FileNotFoundError, saying how to install the files, if any IDX file is missing."""
  missing = [f for pair in FILES.values() for f in pair if not os.path.isfile(os.path.join(idx_dir, f))]
  if missing:
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files missing in {idx_dir}: {missing}. Install them with "
        f"`{INSTALL_HINT}` (or point data.idx_dir at a directory holding them).")


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST (60,000 train / 10,000 test, 28x28x1, 10 classes) from local IDX files."""

  name = NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Built from local IDX files; raw uint8 tensors; IDX order."}
  # TFDS's own lookup of this file needs the importlib_resources backport; give it directly.
  code_path = epath.Path(__file__)

  def __init__(self, *, idx_dir: str = DEFAULT_IDX_DIR, **kwargs):
    self._idx_dir = idx_dir
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly: dataset_info_from_configs() would look for metadata files in this package.
    return tfds.core.DatasetInfo(
        builder=self,
        description="Fashion-MNIST built from local IDX files (Debian dataset-fashion-mnist).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    check_idx_dir(self._idx_dir)
    return {split: self._generate_examples(*files) for split, files in FILES.items()}

  def _generate_examples(self, images_file: str, labels_file: str):
    images = read_idx(os.path.join(self._idx_dir, images_file))
    labels = read_idx(os.path.join(self._idx_dir, labels_file))
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
      raise ValueError(f"unexpected IDX shapes in {self._idx_dir}: images {images.shape}, "
                       f"labels {labels.shape}.")
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image[:, :, None], "label": int(label)}
