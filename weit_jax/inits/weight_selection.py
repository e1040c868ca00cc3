"""Weight selection (Xu et al., "Initializing Models with Larger Ones", ICLR 2024).

A smaller target is initialized with a subset of a larger pre-trained model's weights:

- **layers**: the first N blocks of the source (N = target depth): the paper's "first-N" layer
  selection.
- **every width axis** (a ViT's ``embed``, ``mlp``, ``heads``, ``kv``; a ResNet's ``stem``,
  ``mid{s}``, ``res{s}``: every logical axis but ``models.FIXED_AXES``): the paper's *uniform* element
  selection, evenly spaced indices. As in the authors' code: when the source size is a multiple
  of the target size, indices ``0, s, 2s, ...`` (step ``s = n_src // n_tgt``); otherwise
  ``round(linspace(0, n_src - 1, n_tgt))``.
- **consistency**: the indices are chosen once per *logical axis name* (read from the model's own
  ``nn.get_partition_spec``), so every parameter with an ``embed`` axis keeps the same residual
  channels, every ``mlp`` axis the same hidden units, and ``heads`` / ``kv`` select the same
  heads and the same per-head dimensions in query, key, value and out. (The paper's per-tensor
  selection over a fused qkv matrix is not head-aware; selecting heads and head dimensions
  separately is the natural reading for a model with separate ``heads`` and ``kv`` axes.)
- **head** (every parameter with a ``classes`` axis, in a family whose ``classes`` axis is an
  output: ``models.Family.class_head``): re-initialized with the target model's own initializer (a
  new task, possibly a different number of classes, so ``classes`` may differ). A conditional
  generator's class embedding (a DiT's) is an input the model reads: selected along its width
  axis like every other parameter, the classes kept.

Every other axis (``tokens``, ``patch_h``, ``patch_w``, ``conv_h``, ``conv_w``, ``channels`` and
unnamed ones) must match: the patch or kernel size, image size and channels of source and target
must be equal. Weight selection cannot grow a model: a target larger than the source along any
dimension is refused. The paper also covers ConvNets (ConvNeXt); for a ResNet, the same rules
select the first units of every stage and evenly spaced channels.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from weit_jax import exports, models
from weit_jax.inits import common

FIRST_N_AXES = (common.LAYERS,)  # the first N entries; every other non-fixed axis: evenly spaced


@dataclasses.dataclass(frozen=True)
class DenseSource:
  """A pre-trained plain model (any family): its config and its parameters (nested dict)."""
  config: Any
  params: Mapping[str, Any]

  @classmethod
  def from_export(cls, directory: str) -> "DenseSource":
    cfg = models.from_record(exports.read_meta(directory)["model"])
    return cls(cfg, common.to_numpy(exports.load_params(directory)))

  def describe(self) -> str:
    return f"dense {models.family_of(self.config).name} {self.config.short_name()}"


def uniform_indices(n_source: int, n_target: int) -> np.ndarray:
  """Xu et al.'s uniform element selection of ``n_target`` of ``n_source`` indices."""
  if not 1 <= n_target <= n_source:
    raise ValueError(f"cannot select {n_target} of {n_source} indices.")
  if n_source % n_target == 0:
    return np.arange(n_target) * (n_source // n_target)
  return np.round(np.linspace(0, n_source - 1, n_target)).astype(np.int64)


def check_sizes(source, target) -> None:
  """Raises ValueError naming every axis where the target is larger than the source (or a fixed
  axis that differs). Called before anything is computed."""
  fs, ft = models.family_of(source).name, models.family_of(target).name
  if fs != ft:
    raise ValueError(f"weight selection needs a source of the target's family; source {fs}, target {ft}.")
  s, t = common.axis_sizes(source), common.axis_sizes(target)
  larger = [f"{name} ({t[name]} > {s.get(name, 0)})" for name in sorted(t) if t[name] > s.get(name, 0)]
  differ = common.fixed_axis_differences(source, target)
  larger += sorted({f"{name} ({n_t} > {n_s})" for path, name, n_s, n_t in differ
                    if name in FIRST_N_AXES and n_s is not None and n_t > n_s})
  if larger:
    raise ValueError(
        f"weight selection cannot grow a model: the target is larger than the source along {', '.join(larger)}; "
        f"source {source.short_name()}, target {target.short_name()}. Use a source at least as large along "
        "every axis.")
  for path, name, n_s, n_t in differ:
    if n_s is None:
      raise ValueError(f"weight selection: the source has no parameter {path} of the target's layout.")
    if name not in FIRST_N_AXES and name != "classes":
      raise ValueError(f"weight selection needs the same {name!r} axis in source and target (it is copied "
                       f"whole: patch or kernel size, image size, channels); {path}: source {n_s}, target {n_t}.")


def axis_indices(source, target) -> dict[str, np.ndarray]:
  """Width axis name -> the source indices the target keeps (one choice per axis name)."""
  check_sizes(source, target)
  src, tgt = common.axis_sizes(source), common.axis_sizes(target)
  return {name: uniform_indices(src[name], n) for name, n in tgt.items()}


def select(source: DenseSource | str, target, *, seed: int = 0) -> dict:
  """The target's parameters selected from ``source`` (a ``DenseSource`` or an export folder)."""
  if isinstance(source, str):
    source = DenseSource.from_export(source)
  if not isinstance(source, DenseSource):
    raise ValueError("weight_selection needs a DenseSource (config + params) or a plain-model export folder; "
                     f"got {type(source).__name__}.")
  common.check_tree(source.params, source.config, "weight_selection source")
  index = axis_indices(source.config, target)
  src_flat = common.flatten(source.params)
  head = set(models.classifier_paths(target)) if models.family_of(target).class_head else set()
  fresh = common.flatten(common.own_init(target, seed)) if head else {}
  out = {}
  for path, shape in common.shapes(target).items():
    if path in head:
      out[path] = fresh[path]
      continue
    w = np.asarray(src_flat[path], np.float32)
    for axis, name in enumerate(common.axes(target)[path]):
      if name in FIRST_N_AXES:
        w = np.take(w, np.arange(shape[axis]), axis=axis)
      elif name in index:
        w = np.take(w, index[name], axis=axis)
      elif w.shape[axis] != shape[axis]:
        raise ValueError(f"{'/'.join(path)}: axis {axis} ({name}) has size {w.shape[axis]} in the source "
                         f"and {shape[axis]} in the target, and weight selection does not resize it.")
    out[path] = np.ascontiguousarray(w)
  return common.unflatten(out)
