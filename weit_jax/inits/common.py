"""What every initializer shares: a model's abstract parameters and logical axes, its own init,
and conversions between nested and flat (path-tuple) parameter trees."""
from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from weit_jax import models

LAYERS = "layers"  # the scanned depth axis (nn.scan metadata_params in every family's blocks)
Path = tuple[str, ...]


@functools.lru_cache(maxsize=64)
def _abstract(cfg):
  boxed = jax.eval_shape(models.build(cfg).init, jax.random.key(0), *models.dummy_inputs(cfg))
  shapes = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(nn.unbox(boxed)["params"]).items()}
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  specs = jax.tree_util.tree_map(tuple, nn.get_partition_spec(boxed)["params"], is_leaf=is_spec)
  axes = {k: tuple(v) for k, v in traverse_util.flatten_dict(specs).items()}
  return shapes, axes


def shapes(cfg) -> dict[Path, tuple[int, ...]]:
  """Path -> shape of every parameter of the model of ``cfg`` (no computation)."""
  return dict(_abstract(cfg)[0])


def axes(cfg) -> dict[Path, tuple[str | None, ...]]:
  """Path -> logical axis names (from ``nn.get_partition_spec`` of the abstract init)."""
  return dict(_abstract(cfg)[1])


def axis_sizes(cfg) -> dict[str, int]:
  """Width axis name -> its size in this model (the same for every parameter that carries it). The
  other axes (``models.FIXED_AXES``: layers, kernels, tokens, ...) vary by parameter; see
  ``fixed_axis_differences``."""
  out: dict[str, int] = {}
  for path, ax in axes(cfg).items():
    for name, n in zip(ax, shapes(cfg)[path]):
      if name is None or name in models.FIXED_AXES:
        continue
      if out.setdefault(name, n) != n:
        raise ValueError(f"logical axis {name!r} has sizes {out[name]} and {n} in one model ({'/'.join(path)}).")
  return out


def fixed_axis_differences(source, target) -> list[tuple[str, str, int | None, int]]:
  """``(parameter path, axis name, source size, target size)`` for every fixed (non-width) axis of
  the target whose size differs from the source's (a parameter the source lacks: source size None)."""
  src_shapes, src_axes = shapes(source), axes(source)
  out = []
  for path, ax in axes(target).items():
    for i, name in enumerate(ax):
      if name is None or name in models.FIXED_AXES:
        n_src = src_shapes[path][i] if path in src_shapes and src_axes[path] == ax else None
        if n_src != shapes(target)[path][i]:
          out.append(("/".join(path), name, n_src, shapes(target)[path][i]))
  return out


def is_layer_param(path: Path, cfg) -> bool:
  ax = axes(cfg)[path]
  return bool(ax) and ax[0] == LAYERS


def own_init(cfg, seed: int) -> dict:
  """The model's own initializers, as a nested dict of float32 numpy arrays."""
  return models.init_params(cfg, seed)


def to_numpy(tree) -> Any:
  """Writable float32 numpy copies of every leaf."""
  return jax.tree_util.tree_map(lambda x: np.array(x, np.float32), jax.device_get(tree))


def flatten(tree: Mapping) -> dict[Path, Any]:
  return traverse_util.flatten_dict(dict(tree))


def unflatten(flat: Mapping[Path, Any]) -> dict:
  return traverse_util.unflatten_dict(dict(flat))


def check_tree(params: Mapping, cfg, what: str) -> None:
  """Raises ValueError unless ``params`` has exactly the paths and shapes of the model of ``cfg``."""
  want = shapes(cfg)
  have = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
  if want != have:
    diff = sorted(set(want.items()) ^ set(have.items()))[:4]
    raise ValueError(f"{what}: parameters do not match a {models.family_of(cfg).name} {cfg.short_name()}; first "
                     f"differences "
                     f"(path, shape): {diff}.")
