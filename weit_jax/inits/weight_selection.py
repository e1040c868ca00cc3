"""Weight selection (Xu et al., "Initializing Models with Larger Ones", ICLR 2024).

A smaller target is initialized with a subset of a larger pre-trained model's weights:

- **layers**: the first N blocks of the source (N = target depth): the paper's "first-N" layer
  selection.
- **every width axis** (``embed``, ``mlp``, ``heads``, ``kv``): the paper's *uniform* element
  selection, evenly spaced indices. As in the authors' code: when the source size is a multiple
  of the target size, indices ``0, s, 2s, ...`` (step ``s = n_src // n_tgt``); otherwise
  ``round(linspace(0, n_src - 1, n_tgt))``.
- **consistency**: the indices are chosen once per *logical axis name* (read from the model's own
  ``nn.get_partition_spec``), so every parameter with an ``embed`` axis keeps the same residual
  channels, every ``mlp`` axis the same hidden units, and ``heads`` / ``kv`` select the same
  heads and the same per-head dimensions in query, key, value and out. (The paper's per-tensor
  selection over a fused qkv matrix is not head-aware; selecting heads and head dimensions
  separately is the natural reading for a model with separate ``heads`` and ``kv`` axes.)
- **head**: re-initialized with the target model's own initializer (a new task, possibly a
  different number of classes, so ``classes`` may differ).

Every other axis (``tokens``, ``patch_h``, ``patch_w``, ``channels`` and unnamed ones) must match:
the patch size, image size and channels of source and target must be equal. Weight selection
cannot grow a model: a target larger than the source along any dimension is refused.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from weit_jax import checkpoint
from weit_jax.inits import common
from weit_jax.models import vit

SELECTED_AXES = ("embed", "mlp", "heads", "kv")  # evenly spaced indices
FIRST_N_AXES = (common.LAYERS,)  # the first N entries
REINITIALIZED = ("head",)  # top-level parameters taken from the target's own init
# The config field behind each selectable dimension, for error messages.
FIELD_OF_AXIS = {"layers": "depth", "embed": "width", "mlp": "mlp_dim", "heads": "num_heads", "kv": "head_dim"}
MUST_MATCH = ("patch_size", "image_size", "channels")


@dataclasses.dataclass(frozen=True)
class DenseSource:
  """A pre-trained plain ViT: its config and its parameters (nested dict)."""
  config: vit.ViTConfig
  params: Mapping[str, Any]

  @classmethod
  def from_export(cls, directory: str) -> "DenseSource":
    cfg = vit.ViTConfig(**checkpoint.read_export_meta(directory)["model"])
    return cls(cfg, common.to_numpy(checkpoint.load_params(directory)))

  def describe(self) -> str:
    return f"dense ViT {self.config.short_name()}"


def uniform_indices(n_source: int, n_target: int) -> np.ndarray:
  """Xu et al.'s uniform element selection of ``n_target`` of ``n_source`` indices."""
  if not 1 <= n_target <= n_source:
    raise ValueError(f"cannot select {n_target} of {n_source} indices.")
  if n_source % n_target == 0:
    return np.arange(n_target) * (n_source // n_target)
  return np.round(np.linspace(0, n_source - 1, n_target)).astype(np.int64)


def check_sizes(source: vit.ViTConfig, target: vit.ViTConfig) -> None:
  """Raises ValueError naming every dimension where the target is larger than the source (or a
  format field that differs). Called before anything is computed."""
  s, t = common.size_fields(source), common.size_fields(target)
  larger = [f"{field} ({t[field]} > {s[field]})" for field in ("depth", "width", "mlp_dim", "num_heads", "head_dim")
            if t[field] > s[field]]
  if larger:
    raise ValueError(
        f"weight selection cannot grow a model: the target is larger than the source in {', '.join(larger)}; "
        f"source {source.short_name()}, target {target.short_name()}. Use a source at least as large along "
        "every dimension (depth, width, mlp_dim, num_heads, head_dim).")
  for field in MUST_MATCH:
    if t[field] != s[field]:
      raise ValueError(f"weight selection needs the same {field} in source and target (the tokens and "
                       f"patch-embedding axes are copied whole); source {s[field]}, target {t[field]}.")


def axis_indices(source: vit.ViTConfig, target: vit.ViTConfig) -> dict[str, np.ndarray]:
  """Logical axis name -> the source indices the target keeps (one choice per axis name)."""
  check_sizes(source, target)
  src, tgt = common.axis_sizes(source), common.axis_sizes(target)
  out = {}
  for name, n in tgt.items():
    if name in FIRST_N_AXES:
      out[name] = np.arange(n)
    elif name in SELECTED_AXES:
      out[name] = uniform_indices(src[name], n)
  return out


def select(source: DenseSource | str, target: vit.ViTConfig, *, seed: int = 0) -> dict:
  """The target's parameters selected from ``source`` (a ``DenseSource`` or an export folder)."""
  if isinstance(source, str):
    source = DenseSource.from_export(source)
  if not isinstance(source, DenseSource):
    raise ValueError("weight_selection needs a DenseSource (config + params) or a plain-ViT export folder; "
                     f"got {type(source).__name__}.")
  common.check_tree(source.params, source.config, "weight_selection source")
  index = axis_indices(source.config, target)
  src_flat = common.flatten(source.params)
  fresh = None
  out = {}
  for path, shape in common.shapes(target).items():
    if path[0] in REINITIALIZED:
      fresh = common.flatten(common.own_init(target, seed)) if fresh is None else fresh
      out[path] = fresh[path]
      continue
    w = np.asarray(src_flat[path], np.float32)
    for axis, name in enumerate(common.axes(target)[path]):
      if name in index:
        w = np.take(w, index[name], axis=axis)
      elif w.shape[axis] != shape[axis]:
        raise ValueError(f"{'/'.join(path)}: axis {axis} ({name}) has size {w.shape[axis]} in the source "
                         f"and {shape[axis]} in the target, and weight selection does not resize it.")
    out[path] = np.ascontiguousarray(w)
  return common.unflatten(out)
