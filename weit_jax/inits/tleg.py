r"""TLEG (Xia et al., "Transformer as Linear Expansion of Learngene", AAAI 2024).

An auxiliary ViT of depth L whose block parameters are a linear function of the depth:

    theta_l = A + (l / L) * B,    l = 1, ..., L       (the paper's convention: l counts from 1)

for every parameter with a leading ``layers`` axis; everything outside the blocks (patch
embedding, class token, position embedding, final norm, head) is an ordinary dense parameter. The
trainable tree is ``{'A': ..., 'B': ..., 'dense': ...}``: ``A`` and ``B`` have the paths of the
block parameters without the ``layers`` axis, ``dense`` the paths of the rest.

A target of depth L' gets ``A + (l / L') * B`` for l = 1..L' (and the auxiliary's dense
parameters). TLEG expands depth only: the target's width, MLP size, heads, patch, image size and
channels must equal the auxiliary's. A different number of classes gets a new head (the target
model's own init).

Pre-training (:func:`pretrain`) uses the shared ``train_loop.run`` with a ``Task`` like
``programs/pretrain.py``: the same data, step budget and optimizer as any other run of a
``configs/vit_train.py``-style config. Start: ``A`` and ``dense`` from the auxiliary model's own
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

from weit_jax import checkpoint, config_checks, input_pipeline, losses, metrics, optim, sharding, train_loop
from weit_jax.inits import common
from weit_jax.models import vit

EXPORT_FORM = "tleg"
MUST_MATCH = ("width", "mlp_dim", "num_heads", "patch_size", "image_size", "channels")


def coefficients(depth: int) -> np.ndarray:
  """``l / L`` for l = 1..L: the weight of ``B`` in each layer."""
  return np.arange(1, depth + 1, dtype=np.float32) / np.float32(depth)


def tleg_params(A: Mapping, B: Mapping, depth: int) -> dict:
  """Stacked block parameters ``[A + (l / depth) * B for l in 1..depth]`` (a leading layers axis).

  ``A`` and ``B``: nested dicts with the same structure (leaves without the layers axis). Works on
  numpy and traced jax arrays alike (differentiable in ``A`` and ``B``).
  """
  c = jnp.asarray(coefficients(depth))

  def stack(a, b):
    a, b = jnp.asarray(a), jnp.asarray(b)
    return a[None] + c.reshape((depth,) + (1,) * a.ndim).astype(b.dtype) * b[None]
  return jax.tree_util.tree_map(stack, dict(A), dict(B))


def split(params: Mapping, cfg: vit.ViTConfig) -> tuple[dict, dict]:
  """(block parameters (layers axis kept), the rest) of a plain parameter tree."""
  flat = common.flatten(params)
  layers = {k: v for k, v in flat.items() if common.is_layer_param(k, cfg)}
  dense = {k: v for k, v in flat.items() if not common.is_layer_param(k, cfg)}
  return common.unflatten(layers), common.unflatten(dense)


def to_plain(tree: Mapping, depth: int) -> dict:
  """``{'A', 'B', 'dense'}`` -> the plain parameters of a ViT of ``depth`` blocks."""
  flat = common.flatten(tleg_params(tree["A"], tree["B"], depth))
  flat.update(common.flatten(tree["dense"]))
  return common.unflatten(flat)


def tleg_axes(cfg: vit.ViTConfig) -> dict:
  """Logical axis names of the ``{'A', 'B', 'dense'}`` tree (A, B: block axes without ``layers``)."""
  P = jax.sharding.PartitionSpec
  ax = common.axes(cfg)
  layer = common.unflatten({k: P(*v[1:]) for k, v in ax.items() if common.is_layer_param(k, cfg)})
  dense = common.unflatten({k: P(*v) for k, v in ax.items() if not common.is_layer_param(k, cfg)})
  return {"A": layer, "B": layer, "dense": dense}


def initial_tree(cfg: vit.ViTConfig, key) -> dict:
  """The start of pre-training: A = the model's own init of its first block, B = 0, dense = own init."""
  params = nn.unbox(vit.ViT(cfg).init(key, vit.dummy_input(cfg)))["params"]
  layers, dense = split(params, cfg)
  A = jax.tree_util.tree_map(lambda x: x[0], layers)
  return {"A": A, "B": jax.tree_util.tree_map(jnp.zeros_like, A), "dense": dense}


# --- the source an initializer reads ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TLEGSource:
  """A trained TLEG auxiliary model: its config (depth L) and ``{'A', 'B', 'dense'}``."""
  config: vit.ViTConfig
  tree: Mapping[str, Any]

  @classmethod
  def from_export(cls, directory: str) -> "TLEGSource":
    meta = checkpoint.read_export_meta(directory)
    if meta.get("form") != EXPORT_FORM:
      raise ValueError(f"{directory} is not a TLEG export (form={meta.get('form')!r}); give the folder "
                       "tleg.pretrain wrote (WORKDIR/tleg_export).")
    cfg = vit.ViTConfig(**meta["model"])
    abstract = jax.eval_shape(lambda k: initial_tree(cfg, k), jax.random.key(0))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    return cls(cfg, common.to_numpy(checkpoint.restore_tree(epath.Path(directory) / "params", target)))

  def describe(self) -> str:
    return f"TLEG auxiliary ViT {self.config.short_name()}"


def check_sizes(aux: vit.ViTConfig, target: vit.ViTConfig) -> None:
  for field in MUST_MATCH:
    a, t = getattr(aux, field), getattr(target, field)
    if a != t:
      raise ValueError(f"TLEG expands depth only: the target's {field} ({t}) differs from the auxiliary "
                       f"model's ({a}); auxiliary {aux.short_name()}, target {target.short_name()}. Use a "
                       "target of the auxiliary's width, MLP size and heads (any depth), or another method.")


def expand(source: TLEGSource | str, target: vit.ViTConfig, *, seed: int = 0) -> dict:
  """Target layer l of L' = A + (l / L') * B; the dense parameters from the auxiliary model."""
  if isinstance(source, str):
    source = TLEGSource.from_export(source)
  if not isinstance(source, TLEGSource):
    raise ValueError(f"tleg needs a TLEGSource or a TLEG export folder; got {type(source).__name__}.")
  check_sizes(source.config, target)
  params = common.to_numpy(to_plain(source.tree, target.depth))
  if source.config.num_classes != target.num_classes:
    params["head"] = common.own_init(target, seed)["head"]
  common.check_tree(params, target, "tleg")
  return params


# --- pre-training with the shared loop -------------------------------------------------------------

def make_task(config, cfg: vit.ViTConfig) -> train_loop.Task:
  """The TLEG pre-training task for a ``configs/vit_train.py``-style config (model = auxiliary)."""
  model = vit.ViT(cfg)

  def init_params(key):
    return initial_tree(cfg, key)

  def logits_fn(tree, images):
    return model.apply({"params": to_plain(tree, cfg.depth)}, images)

  loss_fn = losses.classification(logits_fn, config.label_smoothing)

  optim_config = optim.with_total_steps(config.optim, config.total_steps)
  tx = optim.make_optimizer(optim_config, jax.eval_shape(init_params, jax.random.key(0)),
                            weight_decay=float(config.weight_decay))
  return train_loop.Task(init_params=init_params, param_axes=tleg_axes(cfg), loss_fn=loss_fn,
                         logits_fn=logits_fn, optimizer=tx, lr_schedule=optim.schedule(optim_config))


def export_dir(workdir: str) -> str:
  return str(epath.Path(workdir) / "tleg_export")


def pretrain(config, workdir: str) -> dict:
  """Trains the TLEG auxiliary model of ``config.model`` on ``config.data`` for ``config.total_steps``
  (resuming like any run) and exports ``{'A', 'B', 'dense'}`` to ``WORKDIR/tleg_export``.

  ``config``: a ``configs/vit_train.py``-style config (``init`` must be unset).
  """
  from weit_jax.programs.pretrain import model_config_from
  if config.get("init"):
    raise ValueError("TLEG pre-training starts from its own initialization; unset config.init.")
  config_checks.check_ranges(config)
  optim.schedule(optim.with_total_steps(config.optim, config.total_steps))
  cfg = model_config_from(config)
  mesh = sharding.make_mesh(dict(config.mesh))
  input_pipeline.prepare(config.data)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.program = "tleg_pretrain"  # a workdir of another program is refused by the guard
  train_loop.guard_workdir(config, workdir)
  metrics.log(f"TLEG auxiliary ViT {cfg.short_name()}: layer l = A + (l/{cfg.depth}) B.")
  task = make_task(config, cfg)
  train_iter = input_pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed,
                                                   mesh=mesh)
  make_eval_iter = lambda: input_pipeline.make_eval_iterator(config.data, global_batch_size=config.batch_size)
  summary = train_loop.run(config, workdir, task, mesh=mesh, train_iter=train_iter, make_eval_iter=make_eval_iter,
                           summary_extra=dict(program="tleg_pretrain"), title=f"TLEG pre-training {cfg.short_name()}")
  out = export_dir(workdir)
  if (epath.Path(out) / checkpoint.EXPORT_META).exists():
    if checkpoint.read_export_meta(out).get("steps") != int(config.total_steps):
      epath.Path(out).rmtree()  # an export of a shorter run of this workdir: replace it
  if not (epath.Path(out) / checkpoint.EXPORT_META).exists():
    tree = common.to_numpy(summary["params"])
    checkpoint.export_params(out, tree, dict(model=dataclasses.asdict(cfg), form=EXPORT_FORM, init="tleg_aux",
                                             steps=int(config.total_steps), eval_accuracy=summary["eval_accuracy"]))
  return summary
