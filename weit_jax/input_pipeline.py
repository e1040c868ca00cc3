"""Input pipeline: ``tfds.data_source`` + grain, per-process sharding, numpy preprocessing. No TensorFlow.

Every dataset is an array_record TFDS dataset read by random access. Training reads one global
shuffled stream: global batch ``b`` is stream positions ``[b * B, (b + 1) * B)`` whatever the number
of processes, and each JAX process reads the rows of every global batch that its devices hold
(``make_train_iterator(..., mesh=mesh)``; by default the process's contiguous block). The caller
builds global arrays from those local batches (``jax.make_array_from_process_local_data``). So a
run gives the same global batches on 1 host or on 64, and can resume on another number of hosts
(``seek``). Eval reads contiguous per-process shards (``grain.sharding.ShardByJaxProcess``).

Datasets: ``data_catalog.DATASETS`` (the known datasets and a config's data section, importable
without the data libraries).

Batches are dicts of numpy arrays: ``image`` float32 [B, H, W, C] (normalized), ``labels`` float32
one-hot [B, num_classes] (soft after mixup; label smoothing is left to the loss), and for eval
``mask`` float32 [B] (1 real, 0 padding).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import types
from typing import Any, Mapping

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from weit_jax import datasets as local_datasets
from weit_jax import distributed
from weit_jax.data_catalog import DATASETS, FASHION_MNIST_IDX_DIR, RANDOM_CROPS, default_data_config
from weit_jax.datasets import fashion_mnist_local, mnist_5k

# The datasets built here (DatasetInfo.local): name -> their TFDS builder.
LOCAL_BUILDERS = {"fashion_mnist_local": local_datasets.FashionMnistLocal, "mnist_5k": local_datasets.Mnist5k}

def num_examples(name: str, split: str, data_dir: str | None = None) -> int:
  """The number of examples of ``split`` of dataset ``name`` (slices like 'train[:10%]' allowed) as
  stored on disk."""
  config = default_data_config(name)
  config.data_dir = data_dir
  return len(_open(config, split))


# ---------------------------------------------------------------------------------------------------
# Preparing and opening datasets
# ---------------------------------------------------------------------------------------------------


def _options(data_config: Any) -> types.SimpleNamespace:
  """The config over the dataset's defaults, validated (errors before anything is read)."""
  given = data_config.to_dict() if isinstance(data_config, ml_collections.ConfigDict) else dict(data_config)
  if "name" not in given:
    raise ValueError(f"data config needs a `name`; valid names: {sorted(DATASETS)}.")
  o = default_data_config(given["name"]).to_dict()
  o.update(given)
  o = types.SimpleNamespace(**o)
  info = DATASETS[o.name]
  if o.random_crop not in RANDOM_CROPS:
    raise ValueError(f"data.random_crop={o.random_crop!r}; valid: {RANDOM_CROPS}.")
  if int(o.image_size) <= 0 or int(o.crop_padding) < 0 or float(o.mixup_alpha) < 0:
    raise ValueError(f"data.image_size must be > 0, crop_padding and mixup_alpha >= 0; got "
                     f"{o.image_size}, {o.crop_padding}, {o.mixup_alpha}.")
  if not 0 < float(o.center_crop_fraction) <= 1:
    raise ValueError(f"data.center_crop_fraction must be in (0, 1]; got {o.center_crop_fraction}.")
  for key in ("mean", "std"):
    if len(getattr(o, key)) not in (1, info.channels):
      raise ValueError(f"data.{key} has {len(getattr(o, key))} entries; {o.name} has {info.channels} channels.")
  return o


def _data_dir_text(data_dir: str | None) -> str:
  return os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)


def _check_prepared(name: str, data_dir: str | None) -> None:
  """Raises FileNotFoundError, saying how to prepare it, unless ``name`` is ready in array_record."""
  builder = tfds.builder(name, data_dir=data_dir)
  where = _data_dir_text(data_dir)
  if not builder.is_prepared():
    manual = (" ImageNet needs the ILSVRC2012 train/val tars in DATA_DIR/downloads/manual first."
              if name == "imagenet2012" else "")
    raise FileNotFoundError(
        f"dataset {name!r} is not prepared in data_dir {where} (expected {builder.data_dir}). Nothing "
        f"is downloaded at run time: prepare it beforehand, on a machine with network and TensorFlow, "
        f"with `tfds build {name} --data_dir=DATA_DIR --file_format=array_record`, then copy DATA_DIR "
        f"here and set data.data_dir.{manual}")
  fmt = builder.info.file_format
  if fmt is not None and fmt != tfds.core.FileFormat.ARRAY_RECORD:
    raise FileNotFoundError(
        f"dataset {name!r} in {where} is stored as {fmt.value}; random access needs array_record. "
        f"Rebuild it with `tfds build {name} --data_dir=DATA_DIR --file_format=array_record`.")


def prepare(data_config: Any) -> None:
  """Builds a local dataset into data_dir once (later calls reuse it); checks that others exist."""
  o = _options(data_config)
  builder_cls = LOCAL_BUILDERS.get(o.name)
  if builder_cls is None:
    _check_prepared(o.name, o.data_dir)
    return
  kwargs = {}
  if builder_cls is local_datasets.FashionMnistLocal:
    kwargs["idx_dir"] = o.idx_dir or FASHION_MNIST_IDX_DIR
  builder = builder_cls(data_dir=o.data_dir, file_format="array_record", **kwargs)
  if builder.is_prepared():
    return
  # Clear errors before TFDS starts writing.
  if "idx_dir" in kwargs:
    fashion_mnist_local.check_idx_dir(kwargs["idx_dir"])
  else:
    mnist_5k.csv_path()
  with tempfile.TemporaryDirectory() as tmp:  # keeps TFDS's (unused) downloads dir out of data_dir
    try:
      builder.download_and_prepare(download_dir=tmp)
    except Exception:
      # Another process sharing data_dir may have finished the same build first.
      if not builder_cls(data_dir=o.data_dir, **kwargs).is_prepared():
        raise


def _open(data_config: Any, split: str):
  """The TFDS random-access data source of ``split`` (building a local dataset first if needed)."""
  o = _options(data_config)
  if DATASETS[o.name].local:
    prepare(data_config)
  try:
    return tfds.data_source(o.name, split=split, data_dir=o.data_dir, download=False)
  except Exception as e:
    _check_prepared(o.name, o.data_dir)  # a clearer error when the data is missing
    raise ValueError(f"cannot read split {split!r} of {o.name!r} from {_data_dir_text(o.data_dir)}: {e}") from e


# ---------------------------------------------------------------------------------------------------
# Preprocessing (numpy; runs in grain, per example)
# ---------------------------------------------------------------------------------------------------


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of a uint8 [H, W, C] image (PIL; no-op when the size already matches)."""
  if image.shape[:2] == (height, width):
    return image
  if image.shape[2] == 3:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))
  return np.stack([np.asarray(Image.fromarray(image[..., c]).resize((width, height), Image.Resampling.BILINEAR))
                   for c in range(image.shape[2])], axis=-1)


def _resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  scale = size / min(h, w)
  return _resize(image, max(size, round(h * scale)), max(size, round(w * scale)))


def _center_crop(image: np.ndarray, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def _random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  h, w = image.shape[:2]
  top, left = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
  return image[top:top + size, left:left + size]


def _inception_crop(image: np.ndarray, rng: np.random.Generator, area=(0.08, 1.0),
                    ratio=(3 / 4, 4 / 3), attempts: int = 10) -> np.ndarray:
  """A random crop of random area and aspect ratio (Inception-style); the whole image as fallback."""
  h, w = image.shape[:2]
  for _ in range(attempts):
    target = h * w * rng.uniform(*area)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    ch, cw = round(math.sqrt(target / aspect)), round(math.sqrt(target * aspect))
    if 0 < ch <= h and 0 < cw <= w:
      top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      return image[top:top + ch, left:left + cw]
  return image


def _geometry(image: np.ndarray, size: int, fraction: float) -> np.ndarray:
  """The eval view: resize the shorter side to size / fraction, then center-crop size x size."""
  return _center_crop(_resize_shorter(image, round(size / fraction)), size)


def _normalize(image: np.ndarray, mean, std) -> np.ndarray:
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  return (image.astype(np.float32) / 255.0 - mean) / std


def _decode(element: Mapping[str, Any]) -> tuple[np.ndarray, int]:
  image = np.asarray(element["image"])
  return (image[..., None] if image.ndim == 2 else image), int(element["label"])


def _one_hot(label: int, num_classes: int) -> np.ndarray:
  out = np.zeros((num_classes,), np.float32)
  out[label] = 1.0
  return out


@dataclasses.dataclass(frozen=True)
class _TrainPreprocess(grain.transforms.RandomMap):
  """Random crop (Inception / resize-and-crop / pad-and-crop), flip, normalize, one-hot."""
  num_classes: int
  image_size: int
  random_crop: str
  crop_padding: int
  center_crop_fraction: float
  flip: bool
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def random_map(self, element, rng: np.random.Generator):
    image, label = _decode(element)
    s = self.image_size
    if self.random_crop == "inception":
      image = _resize(_inception_crop(image, rng), s, s)
    elif self.random_crop == "resize_crop":
      image = _random_crop(_resize_shorter(image, round(s / self.center_crop_fraction)), s, rng)
    else:
      image = _geometry(image, s, self.center_crop_fraction)
      if self.crop_padding:
        p = self.crop_padding
        image = _random_crop(np.pad(image, ((p, p), (p, p), (0, 0))), s, rng)  # zero padding
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    return {"image": _normalize(image, self.mean, self.std), "labels": _one_hot(label, self.num_classes)}


@dataclasses.dataclass(frozen=True)
class _EvalPreprocess(grain.transforms.Map):
  """Deterministic: resize + center crop, normalize, one-hot; keeps the padding mask."""
  num_classes: int
  image_size: int
  center_crop_fraction: float
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def map(self, element):
    image, label = _decode(element)
    image = _geometry(image, self.image_size, self.center_crop_fraction)
    return {"image": _normalize(image, self.mean, self.std), "labels": _one_hot(label, self.num_classes),
            "mask": np.float32(element["mask"])}


@dataclasses.dataclass(frozen=True)
class _Mixup(grain.transforms.RandomMap):
  """Mixup within a local batch: x = lam * x + (1 - lam) * roll(x, 1), likewise the labels."""
  alpha: float

  def random_map(self, batch, rng: np.random.Generator):
    lam = np.float32(rng.beta(self.alpha, self.alpha))
    mix = lambda x: lam * x + (1 - lam) * np.roll(x, 1, axis=0)
    return {**batch, "image": mix(batch["image"]), "labels": mix(batch["labels"])}


class _PaddedSource:
  """A data source padded to ``length`` (wrapping around) with a ``mask``: 1 real, 0 padding."""

  def __init__(self, source, length: int):
    self._source, self._length = source, length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int):
    n = len(self._source)
    return {**self._source[index % n], "mask": float(index < n)}

  def __repr__(self) -> str:  # grain checks it when restoring iterator state
    return f"_PaddedSource({self._source!r}, length={self._length})"


# ---------------------------------------------------------------------------------------------------
# Iterators
# ---------------------------------------------------------------------------------------------------


def _local_batch(global_batch_size: int, shard_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % shard_count:
    raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of the number "
                     f"of data shards (processes) {shard_count}.")
  return global_batch_size // shard_count


def _read_options(o) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=int(o.read_threads), prefetch_buffer_size=int(o.prefetch_buffer_size))


class _GlobalBatchSampler:
  """This process's rows of every global batch of one shuffled, endless stream.

  The stream (every record once per epoch, reshuffled each epoch, a random seed per stream
  position) does not depend on the number of processes: local batch ``b`` holds stream positions
  ``b * global_batch_size + rows``. Grain's worker processes (``worker_count`` W) each build whole
  batches from the local indices ``w, w + W, ...`` and are read round robin; the index mapping
  accounts for that, so every local batch is still rows of one global batch, in order.
  """

  def __init__(self, num_records: int, *, global_batch_size: int, rows, seed: int, workers: int):
    self._stream = grain.samplers.IndexSampler(num_records=num_records, shard_options=grain.sharding.NoSharding(),
                                               shuffle=True, num_epochs=None, seed=seed)
    self.num_records, self.global_batch_size, self.seed = num_records, global_batch_size, seed
    self.rows = np.asarray(rows, np.int64)
    self.local_batch = len(self.rows)
    self.workers = max(int(workers), 1)

  def __len__(self) -> int:
    return sys.maxsize  # endless

  def stream_position(self, index: int) -> int:
    w, r = index % self.workers, index // self.workers
    j, i = divmod(r, self.local_batch)
    return (j * self.workers + w) * self.global_batch_size + int(self.rows[i])

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    if index < 0:
      raise IndexError(f"negative sampler index {index}")
    meta = self._stream[self.stream_position(index)]
    return grain.RecordMetadata(index=index, record_key=meta.record_key, rng=meta.rng)

  def __repr__(self) -> str:  # grain checks it when restoring iterator state
    return (f"_GlobalBatchSampler(num_records={self.num_records}, global_batch_size={self.global_batch_size}, "
            f"rows={_ranges(self.rows)}, seed={self.seed}, workers={self.workers})")


def _ranges(rows: np.ndarray) -> str:
  """[0, 1, 2, 5, 6] -> '0-2,5-6' (short, exact)."""
  parts, start = [], None
  for k, r in enumerate(rows):
    if start is None:
      start = r
    if k + 1 == len(rows) or rows[k + 1] != r + 1:
      parts.append(f"{start}-{r}" if r != start else f"{r}")
      start = None
  return ",".join(parts)


def _contiguous_rows(global_batch_size: int, shard_index: int, shard_count: int) -> np.ndarray:
  local = _local_batch(global_batch_size, shard_count)
  return np.arange(shard_index * local, (shard_index + 1) * local)


def make_train_iterator(data_config: Any, *, global_batch_size: int, seed: int,
                        shard_options: grain.sharding.ShardOptions | None = None,
                        mesh=None) -> grain.DataLoader:
  """An endless, shuffled (reshuffled each epoch), augmented stream of this process's batches.

  Global batch ``b`` is the same examples (with the same augmentations) for any number of
  processes. This process reads the rows of it that its devices hold in ``mesh`` (its rows of
  ``sharding.batch_sharding(mesh)``; all rows where the batch is replicated across processes).
  Without a mesh: the ``jax.process_index()``-th contiguous block, or with ``shard_options``
  ``ShardOptions(i, n)`` the ``i``-th of ``n`` blocks. Same seed -> same batches;
  ``iter(loader)`` supports get_state/set_state, and ``seek``.
  """
  o = _options(data_config)
  info = DATASETS[o.name]
  if mesh is not None:
    if global_batch_size <= 0:
      raise ValueError(f"global batch size {global_batch_size} must be positive.")
    rows = distributed.process_batch_rows(mesh, global_batch_size)
  else:
    shard = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    rows = _contiguous_rows(global_batch_size, shard.shard_index, shard.shard_count)
  source = _open(data_config, o.train_split)
  sampler = _GlobalBatchSampler(len(source), global_batch_size=global_batch_size, rows=rows,
                                seed=int(seed) % 2**32, workers=int(o.worker_count))
  operations = [
      _TrainPreprocess(info.num_classes, int(o.image_size), o.random_crop, int(o.crop_padding),
                       float(o.center_crop_fraction), bool(o.flip), tuple(o.mean), tuple(o.std)),
      grain.transforms.Batch(len(rows), drop_remainder=True),
  ]
  if o.mixup_alpha > 0:
    operations.append(_Mixup(float(o.mixup_alpha)))  # after Batch: it mixes examples of one local batch
  return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                          worker_count=int(o.worker_count), worker_buffer_size=int(o.worker_buffer_size),
                          shard_options=grain.sharding.NoSharding(), read_options=_read_options(o))


def seek(iterator, num_batches: int) -> None:
  """Positions ``iter(make_train_iterator(...))`` so that its next batch is (this process's rows
  of) global batch ``num_batches``: how a run resumes on another number of processes, where the
  saved per-process iterator states do not apply."""
  sampler = getattr(getattr(iterator, "_data_loader", None), "_sampler", None)
  if not isinstance(sampler, _GlobalBatchSampler):
    raise ValueError(f"cannot seek {type(iterator).__name__}: only iterators of make_train_iterator can seek.")
  state = json.loads(iterator.get_state().decode())
  workers, local = int(state["worker_count"]), sampler.local_batch
  n = int(num_batches)
  if workers == 0:
    state["last_seen_indices"] = {"0": n * local - 1}
    state["last_worker_index"] = -1
  else:
    # Worker w has built the batches w, w + W, ... among the first n; grain records, per worker,
    # the last local index it read (see grain's DataLoader state).
    done = [max(0, -(-(n - w) // workers)) for w in range(workers)]
    state["last_seen_indices"] = {str(w): w - workers + done[w] * local * workers for w in range(workers)}
    state["last_worker_index"] = (n - 1) % workers
  iterator.set_state(json.dumps(state).encode())


def make_eval_iterator(data_config: Any, *, global_batch_size: int, split: str | None = None,
                       shard_options: grain.sharding.ShardOptions | None = None) -> grain.DataLoader:
  """One deterministic pass over ``split`` (default data.eval_split) in file order.

  The split is padded to a multiple of the global batch, so every process yields the same number
  of full batches and every example appears exactly once across processes with ``mask`` 1.
  """
  o = _options(data_config)
  info = DATASETS[o.name]
  shard = shard_options or grain.sharding.ShardByJaxProcess()
  local_batch = _local_batch(global_batch_size, shard.shard_count)
  source = _open(data_config, split or o.eval_split)
  padded = _PaddedSource(source, -(-len(source) // global_batch_size) * global_batch_size)
  # Shards are contiguous and equal (len(padded) is a multiple of the shard count).
  sampler = grain.samplers.IndexSampler(num_records=len(padded), shard_options=shard, shuffle=False,
                                        num_epochs=1)
  operations = [
      _EvalPreprocess(info.num_classes, int(o.image_size), float(o.center_crop_fraction), tuple(o.mean),
                      tuple(o.std)),
      grain.transforms.Batch(local_batch, drop_remainder=True),
  ]
  return grain.DataLoader(data_source=padded, sampler=sampler, operations=operations,
                          worker_count=int(o.worker_count), worker_buffer_size=int(o.worker_buffer_size),
                          shard_options=shard, read_options=_read_options(o))
