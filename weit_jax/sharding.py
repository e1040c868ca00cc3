"""Meshes from config, logical axis rules, and placement of parameters and batches.

One annotation (the logical axis names the model carries) drives sharding; the rules below map
those names onto the ``('data', 'fsdp', 'model')`` mesh, maxtext-style.
"""
from __future__ import annotations

import math
import types
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


# A device may hold this many elements (16 MiB in float32) of one weight without it counting as
# unsplit: stacked biases and norms, a head's 1000 classes that no power of two divides.
LARGE_WEIGHT = 1 << 22


def unsplit_weights(abstract_tree, logical_tree, mesh_shape: Mapping[str, int], rules=DEFAULT_RULES,
                    min_size: int = LARGE_WEIGHT) -> list[tuple[str, tuple[int, ...], int]]:
  """The weights the rules split fewer ways than the mesh has devices, with at least ``min_size``
  elements on each device: (path, shape, ways). ViT-G/14 on fsdp=256: its attention kernels
  (48, 1664, 16, 104) have no dimension 256 divides and stay whole on every chip."""
  mesh = types.SimpleNamespace(shape=dict(mesh_shape))  # specs depend on the sizes alone
  devices = math.prod(mesh.shape.values())
  is_spec = lambda x: isinstance(x, P)
  flat, _ = jax.tree_util.tree_flatten_with_path(logical_tree, is_leaf=is_spec)
  shapes = jax.tree_util.tree_leaves(abstract_tree)
  out = []
  for (path, logical), leaf in zip(flat, shapes):
    spec = _mesh_spec(leaf.shape, tuple(logical), mesh, rules)
    ways = math.prod(mesh.shape[a] for axes in spec if axes
                     for a in ((axes,) if isinstance(axes, str) else axes))
    if ways < devices and math.prod(leaf.shape) / ways >= min_size:
      out.append((jax.tree_util.keystr(path, simple=True, separator="/"), tuple(leaf.shape), ways))
  return out


def unsplit_bytes(whole: Sequence[tuple[str, tuple[int, ...], int]]) -> int:
  """Float32 bytes per device of ``unsplit_weights``'s weights (as materialized)."""
  return sum(4 * math.prod(shape) // ways for _, shape, ways in whole)


def mesh_splitting_every_weight(abstract_tree, logical_tree, devices: int, rules=DEFAULT_RULES,
                                min_size: int = LARGE_WEIGHT) -> dict[str, int] | None:
  """The mesh ``data=1, fsdp x model = devices`` with the most fsdp ways on which no device holds a
  large part of a weight that the rules leave unsplit, or None when no such mesh exists."""
  for model in (m for m in range(1, devices + 1) if devices % m == 0):
    shape = dict(data=1, fsdp=devices // model, model=model)
    if not unsplit_weights(abstract_tree, logical_tree, shape, rules, min_size):
      return shape
  return None


def split_advice(abstract_tree, logical_tree, mesh, flag: str = "--config.mesh", rules=DEFAULT_RULES,
                 min_size: int = LARGE_WEIGHT) -> str | None:
  """One paragraph when large weights stay (partly) whole on ``mesh``: which, how many bytes per chip,
  and a mesh of the same devices that splits them all (as ``flag``.fsdp/.model settings); None when
  every large weight is split."""
  whole = unsplit_weights(abstract_tree, logical_tree, mesh.shape, rules, min_size)
  if not whole:
    return None
  devices = math.prod(mesh.shape.values())
  names = ", ".join(f"{p} {s} ({w} of {devices} ways)" for p, s, w in whole[:3])
  more = f" and {len(whole) - 3} more" if len(whole) > 3 else ""
  better = mesh_splitting_every_weight(abstract_tree, logical_tree, devices, rules, min_size)
  fix = (f"a mesh of fsdp={better['fsdp']} x model={better['model']} splits every one "
         f"({flag}.fsdp={better['fsdp']} {flag}.model={better['model']})" if better else
         "no mesh of these devices over fsdp and model splits them all")
  return (f"{len(whole)} weights are not split over all {devices} devices of mesh {dict(mesh.shape)} "
          f"({unsplit_bytes(whole) / 2**30:.2f} GiB per device in float32): {names}{more}; no dimension of theirs "
          f"divides the mesh axes the rules give it. {fix[0].upper()}{fix[1:]}.")


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
