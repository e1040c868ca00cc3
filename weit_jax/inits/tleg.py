r"""TLEG (Xia et al., "Transformer as Linear Expansion of Learngene", AAAI 2024).

An auxiliary model whose block parameters are a linear function of the depth:

    theta_l = A + (l / L) * B,    l = 1, ..., L       (the paper's convention: l counts from 1)

for every parameter with a leading ``layers`` axis (a ViT's blocks; each ResNet stage's scanned
units, with L that stack's length); everything else (patch embedding, class token, position
embedding, final norm, a ResNet's root and first units, the head) is an ordinary dense parameter.
The trainable tree is ``{'A': ..., 'B': ..., 'dense': ...}``: ``A`` and ``B`` have the paths of
the block parameters without the ``layers`` axis, ``dense`` the paths of the rest.

A target of depth L' gets ``A + (l / L') * B`` for l = 1..L' (and the auxiliary's dense
parameters). TLEG expands depth only: every other axis of the target (width, MLP size, heads,
patch, image size, channels) must equal the auxiliary's. A different number of classes gets a new
head (the target model's own init). The paper is about ViTs; the rule applies to any family whose
blocks are scanned, and the ResNet benchmark uses it for the depth-only targets.

Pre-training (``programs/baseline_pretrain.py`` with :func:`make_task`) uses the shared
``train_loop.run``: the same data, step budget and optimizer as any other run of a
``configs/<family>_train.py`` config. Start: ``A`` and ``dense`` from the auxiliary model's own
initializers (``A`` = its first block), ``B = 0`` (all layers start equal; the gradient of ``B``
is the depth-weighted sum of the layers' gradients, so they separate at once).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from weit_jax import exports, models, optim, tasks, train_loop
from weit_jax.inits import common

EXPORT_FORM = "tleg"
DESCRIPTION = "layer l = A + (l/L) B"


def coefficients(depth: int) -> np.ndarray:
  """``l / L`` for l = 1..L: the weight of ``B`` in each layer."""
  return np.arange(1, depth + 1, dtype=np.float32) / np.float32(depth)


def tleg_params(A: Mapping, B: Mapping, depth) -> dict:
  """Stacked block parameters ``[A + (l / L) * B for l in 1..L]`` (a leading layers axis).

  ``A`` and ``B``: nested dicts with the same structure (leaves without the layers axis). ``depth``:
  L for every leaf, or a tree like ``A`` of each leaf's L (a ResNet's stages differ). Works on numpy
  and traced jax arrays alike (differentiable in ``A`` and ``B``).
  """
  def stack(a, b, n):
    a, b = jnp.asarray(a), jnp.asarray(b)
    c = jnp.asarray(coefficients(int(n)))
    return a[None] + c.reshape((int(n),) + (1,) * a.ndim).astype(b.dtype) * b[None]
  depths = depth if isinstance(depth, Mapping) else jax.tree_util.tree_map(lambda _: depth, dict(A))
  return jax.tree_util.tree_map(stack, dict(A), dict(B), dict(depths))


def split(params: Mapping, cfg) -> tuple[dict, dict]:
  """(block parameters (layers axis kept), the rest) of a plain parameter tree."""
  flat = common.flatten(params)
  layers = {k: v for k, v in flat.items() if common.is_layer_param(k, cfg)}
  dense = {k: v for k, v in flat.items() if not common.is_layer_param(k, cfg)}
  return common.unflatten(layers), common.unflatten(dense)


def to_plain(tree: Mapping, cfg) -> dict:
  """``{'A', 'B', 'dense'}`` -> the plain parameters of the model of ``cfg`` (its depth)."""
  shapes = common.shapes(cfg)
  depths = common.unflatten({k: shapes[k][0] for k in common.flatten(tree["A"])})
  flat = common.flatten(tleg_params(tree["A"], tree["B"], depths))
  flat.update(common.flatten(tree["dense"]))
  return common.unflatten(flat)


def tleg_axes(cfg) -> dict:
  """Logical axis names of the ``{'A', 'B', 'dense'}`` tree (A, B: block axes without ``layers``)."""
  P = jax.sharding.PartitionSpec
  ax = common.axes(cfg)
  layer = common.unflatten({k: P(*v[1:]) for k, v in ax.items() if common.is_layer_param(k, cfg)})
  dense = common.unflatten({k: P(*v) for k, v in ax.items() if not common.is_layer_param(k, cfg)})
  return {"A": layer, "B": layer, "dense": dense}


def initial_tree(cfg, key) -> dict:
  """The start of pre-training: A = the model's own init of its first block, B = 0, dense = own init."""
  params = nn.unbox(models.build(cfg).init(key, *models.dummy_inputs(cfg)))["params"]
  layers, dense = split(params, cfg)
  A = jax.tree_util.tree_map(lambda x: x[0], layers)
  return {"A": A, "B": jax.tree_util.tree_map(jnp.zeros_like, A), "dense": dense}


# --- the source an initializer reads ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TLEGSource:
  """A trained TLEG auxiliary model: its config (depth L) and ``{'A', 'B', 'dense'}``."""
  config: Any
  tree: Mapping[str, Any]

  @classmethod
  def from_export(cls, directory: str) -> "TLEGSource":
    meta = exports.read_meta(directory)
    if meta.get("form") != EXPORT_FORM:
      raise ValueError(f"{directory} is not a TLEG export (form={meta.get('form')!r}); give the WORKDIR/export "
                       "of a baseline_pretrain run with baseline=tleg (configs/baseline_pretrain.py).")
    cfg = models.from_record(meta["model"])
    abstract = jax.eval_shape(lambda k: initial_tree(cfg, k), jax.random.key(0))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    return cls(cfg, common.to_numpy(exports.restore_tree(epath.Path(directory) / "params", target)))

  def describe(self) -> str:
    return f"TLEG auxiliary {models.family_of(self.config).name} {self.config.short_name()}"


def check_sizes(aux, target) -> None:
  """Refuses a target that differs from the auxiliary model anywhere but depth (and classes)."""
  fa, ft = models.family_of(aux).name, models.family_of(target).name
  if fa != ft:
    raise ValueError(f"TLEG needs a target of the auxiliary model's family; auxiliary {fa}, target {ft}.")
  a, t = common.axis_sizes(aux), common.axis_sizes(target)
  differ = [f"{name} ({t.get(name)} vs {a.get(name)})" for name in sorted(set(a) | set(t)) if a.get(name) != t.get(name)]
  differ += sorted({f"{name} ({n_t} vs {n_s})" for path, name, n_s, n_t in
                    common.fixed_axis_differences(aux, target) if name not in ("layers", "classes")})
  if differ:
    raise ValueError(f"TLEG expands depth only: the target differs from the auxiliary model along {', '.join(differ)} "
                     f"(target vs auxiliary); auxiliary {aux.short_name()}, target {target.short_name()}. Use a "
                     "target of the auxiliary's widths (any depth), or another method.")


def expand(source: TLEGSource | str, target, *, seed: int = 0) -> dict:
  """Target layer l of L' = A + (l / L') * B; the dense parameters from the auxiliary model."""
  if isinstance(source, str):
    source = TLEGSource.from_export(source)
  if not isinstance(source, TLEGSource):
    raise ValueError(f"tleg needs a TLEGSource or a TLEG export folder; got {type(source).__name__}.")
  check_sizes(source.config, target)
  params = common.to_numpy(to_plain(source.tree, target))
  if models.other_classes(source.config, target):
    params = models.with_fresh_classifier(params, target, seed)
  common.check_tree(params, target, "tleg")
  return params


# --- pre-training (programs/baseline_pretrain.py) ---------------------------------------------------

def make_task(config, cfg) -> train_loop.Task:
  """The TLEG pre-training task for a ``configs/<family>_train.py``-style config (model = auxiliary)."""
  model = models.build(cfg)
  task = tasks.from_config(config)

  def init_params(key):
    return initial_tree(cfg, key)

  def forward(tree, *inputs):
    return model.apply({"params": to_plain(tree, cfg)}, *inputs)

  optim_config = optim.with_total_steps(config.optim, task.optimizer_steps(config.total_steps))
  tx = optim.make_optimizer(optim_config, jax.eval_shape(init_params, jax.random.key(0)),
                            weight_decay=float(config.weight_decay))
  return train_loop.Task(init_params=init_params, param_axes=tleg_axes(cfg), loss_fn=task.loss_fn(forward),
                         eval_fn=task.eval_fn(forward), optimizer=tx, lr_schedule=optim.schedule(optim_config),
                         experience=task.experience(forward))
