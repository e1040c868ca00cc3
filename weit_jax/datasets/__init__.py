"""Local datasets as TFDS builders (array_record, built without TensorFlow or network).

Importing this package registers the builders with TFDS, so ``tfds.data_source(name, ...)`` finds
them by name (a prepared data_dir is also readable without them, from its dataset_info.json).
"""
from weit_jax.datasets.fashion_mnist_local import FashionMnistLocal
from weit_jax.datasets.mnist_5k import Mnist5k

__all__ = ["FashionMnistLocal", "Mnist5k"]
