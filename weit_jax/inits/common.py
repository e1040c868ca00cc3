"""What every initializer shares: a model's abstract parameters and logical axes, its own init,
and conversions between nested and flat (path-tuple) parameter trees."""
from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from weit_jax.models import vit

LAYERS = "layers"  # the scanned depth axis (nn.scan metadata_params in models/vit.py)
Path = tuple[str, ...]


@functools.lru_cache(maxsize=64)
def _abstract(cfg: vit.ViTConfig):
  boxed = jax.eval_shape(vit.ViT(cfg).init, jax.random.key(0), vit.dummy_input(cfg))
  shapes = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(nn.unbox(boxed)["params"]).items()}
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  specs = jax.tree_util.tree_map(tuple, nn.get_partition_spec(boxed)["params"], is_leaf=is_spec)
  axes = {k: tuple(v) for k, v in traverse_util.flatten_dict(specs).items()}
  return shapes, axes


def shapes(cfg: vit.ViTConfig) -> dict[Path, tuple[int, ...]]:
  """Path -> shape of every parameter of ``vit.ViT(cfg)`` (no computation)."""
  return dict(_abstract(cfg)[0])


def axes(cfg: vit.ViTConfig) -> dict[Path, tuple[str | None, ...]]:
  """Path -> logical axis names (from ``nn.get_partition_spec`` of the abstract init)."""
  return dict(_abstract(cfg)[1])


def axis_sizes(cfg: vit.ViTConfig) -> dict[str, int]:
  """Logical axis name -> its size in this model (the same for every parameter that carries it)."""
  out: dict[str, int] = {}
  for path, ax in axes(cfg).items():
    for name, n in zip(ax, shapes(cfg)[path]):
      if name is None:
        continue
      if out.setdefault(name, n) != n:
        raise ValueError(f"logical axis {name!r} has sizes {out[name]} and {n} in one model ({'/'.join(path)}).")
  return out


def is_layer_param(path: Path, cfg: vit.ViTConfig) -> bool:
  ax = axes(cfg)[path]
  return bool(ax) and ax[0] == LAYERS


def own_init(cfg: vit.ViTConfig, seed: int) -> dict:
  """The model's own initializers (``vit.ViT(cfg).init``), as a nested dict of float32 numpy arrays."""
  params = jax.jit(vit.ViT(cfg).init)(jax.random.key(int(seed)), vit.dummy_input(cfg))
  return to_numpy(nn.unbox(params)["params"])


def to_numpy(tree) -> Any:
  """Writable float32 numpy copies of every leaf."""
  return jax.tree_util.tree_map(lambda x: np.array(x, np.float32), jax.device_get(tree))


def flatten(tree: Mapping) -> dict[Path, Any]:
  return traverse_util.flatten_dict(dict(tree))


def unflatten(flat: Mapping[Path, Any]) -> dict:
  return traverse_util.unflatten_dict(dict(flat))


def check_tree(params: Mapping, cfg: vit.ViTConfig, what: str) -> None:
  """Raises ValueError unless ``params`` has exactly the paths and shapes of ``vit.ViT(cfg)``."""
  want = shapes(cfg)
  have = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
  if want != have:
    diff = sorted(set(want.items()) ^ set(have.items()))[:4]
    raise ValueError(f"{what}: parameters do not match a ViT {cfg.short_name()}; first differences "
                     f"(path, shape): {diff}.")


def size_fields(cfg: vit.ViTConfig) -> dict[str, int]:
  """The sizes an initializer may compare between source and target (head_dim included)."""
  return dict(depth=cfg.depth, width=cfg.width, mlp_dim=cfg.mlp_dim, num_heads=cfg.num_heads,
              head_dim=cfg.head_dim, patch_size=cfg.patch_size, image_size=cfg.image_size,
              channels=cfg.channels, num_classes=cfg.num_classes)
