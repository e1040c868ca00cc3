"""Meshes from config, logical axis rules, and placement of parameters and batches.

One annotation (the logical axis names the model carries) drives sharding; the rules below map
those names onto the ``('data', 'fsdp', 'model')`` mesh, maxtext-style.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
# Default meshes (-1 takes the remaining devices). Training replicates the model over data
# parallelism; the init program (and its dry run) shards the materialized model over every device.
DATA_PARALLEL = dict(data=-1, fsdp=1, model=1)
FSDP_ALL = dict(data=1, fsdp=-1, model=1)

# logical name -> mesh axis (or axes). Templates are sharded along their tile axes through the same
# names; scalers carry no names and are replicated.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("layers", None),
    ("templates", None),
    ("tokens", None),
    ("classes", None),
    ("patch_h", None),
    ("patch_w", None),
    ("channels", None),
    ("conv_h", None),
    ("conv_w", None),
    # A ResNet's channel axes (models/resnet.py: stem, then per stage mid{s}a, mid{s}b, res{s}); a
    # kernel has two of them, and the first listed here takes fsdp.
    ("stem", "fsdp"),
    *((name, "fsdp") for s in range(1, 9) for name in (f"mid{s}a", f"mid{s}b", f"res{s}")),
)


def make_mesh(mesh_shape: Mapping[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
  """A mesh over ``('data', 'fsdp', 'model')``; one size may be -1 and takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  if isinstance(mesh_shape, Mapping):
    unknown = set(mesh_shape) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}.")
    sizes = [int(mesh_shape.get(a, 1)) for a in MESH_AXES]
  else:
    sizes = [int(s) for s in mesh_shape]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: use positive sizes and at most one -1.")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % fixed:
      raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide the {len(devices)} devices.")
    sizes[sizes.index(-1)] = len(devices) // fixed
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"but {len(devices)} are available; set one size to -1 to fill.")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _mesh_spec(shape: Sequence[int], logical: Sequence[str | None], mesh, rules) -> P:
  """Logical names -> mesh PartitionSpec, dropping mesh axes that do not divide a dimension and
  moving each dropped one to another dimension it divides (``_fallback``)."""
  spec = nn.logical_to_mesh_axes(tuple(logical), rules)
  fixed, dropped = [], []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    names = tuple(a for a in names if mesh.shape[a] > 1)
    if names and dim % math.prod(mesh.shape[a] for a in names):
      dropped += names
      names = ()  # e.g. a tile of 12 over 8 devices: replicate that dimension instead
    fixed.append(names)
  _fallback(fixed, dropped, shape, logical, mesh, rules)
  return P(*(names[0] if len(names) == 1 else (names or None) for names in fixed))


def _fallback(fixed: list[tuple[str, ...]], dropped: Sequence[str], shape, logical, mesh, rules) -> None:
  """Puts each dropped mesh axis on a dimension left unsplit that it divides, in place.

  Without it a weight whose first sharded dimension does not divide is whole on every device, e.g.
  ViT-G/14's width 1664 over 256 chips: all of G/14 on each chip, though its MLP dimension (8192)
  splits 256 ways. Only dimensions whose logical name the rules shard somewhere qualify (never
  ``layers``, ``templates``, ``kv``, ...); the largest is taken, the first on a tie. A pure function
  of shapes, names, mesh sizes and rules, so every host derives the same spec; a weight whose
  dimensions all divide never gets here.
  """
  shardable = {name for name, axes in rules if axes}
  for axis in dropped:
    free = [i for i, (dim, name) in enumerate(zip(shape, logical))
            if not fixed[i] and name in shardable and dim % mesh.shape[axis] == 0]
    if free:
      fixed[max(free, key=lambda i: (shape[i], -i))] = (axis,)


def shardings(abstract_tree, logical_tree, mesh, rules=DEFAULT_RULES):
  """A tree of ``NamedSharding`` for ``abstract_tree`` from its logical axis names."""
  is_spec = lambda x: isinstance(x, P)
  return jax.tree_util.tree_map(
      lambda spec, leaf: NamedSharding(mesh, _mesh_spec(leaf.shape, tuple(spec), mesh, rules)),
      logical_tree, abstract_tree, is_leaf=is_spec)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh, rules=DEFAULT_RULES) -> NamedSharding:
  """Leading (batch) axis over ``data`` and ``fsdp``; the rest replicated."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), rules))


def batch_ways(mesh, rules=DEFAULT_RULES) -> int:
  """Into how many shards ``batch_sharding`` splits a batch."""
  spec = batch_sharding(mesh, rules).spec
  axes = spec[0] if len(spec) else None
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return math.prod(mesh.shape[a] for a in axes)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh, rules=DEFAULT_RULES) -> dict:
  """This process's slice of a batch -> global arrays sharded along the batch axis."""
  sharding = batch_sharding(mesh, rules)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
