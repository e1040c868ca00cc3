r"""FINE: variable-depth initialization from shared factors (a baseline beside TLEG; DiTs first).

An auxiliary model whose block parameters share, per weight type, two factors across the layers:

    W_l = U diag(sigma_l) V^T,    l = 1, ..., L

for every parameter with a leading ``layers`` axis (a DiT's or ViT's blocks, a ResNet stack's units)
whose shape without ``layers`` has at least two axes, viewed as a matrix (m, n). ``U`` (m, r) and
``V`` (n, r) are shared by the layers, ``sigma_l`` (r,) is the layer's own, r = min(m, n).

The matrix split (:func:`matrix_split`), from the parameter's logical axes (without ``layers``):
the m side is the *first* axis and the n side the product of the rest (a query kernel (embed,
heads, kv) is (embed, heads * kv); a DiT's adaLN kernel (cond, modulation, embed) is (cond,
modulation * embed); a Dense kernel (embed, mlp) is itself), unless the first axis is one of
``SPLIT_BEFORE_LAST`` (``heads``, ``conv_h``, ``conv_w``: the input spans several axes, as in an
attention out kernel (heads, kv, embed) or a convolution (conv_h, conv_w, in, out)); then the m side
is the product of all but the last axis and n the last axis. The same rule splits the attention
biases (heads, kv) into (heads, kv).

Block parameters of one axis (LayerNorm scales, biases) or whose matrix has a side of 1 are not
factorized: they are kept per layer (``per_layer``, with the layers axis). Everything outside the
blocks (embedders, final layer, head) is an ordinary dense parameter. The trainable tree is
``{'U', 'V', 'sigma', 'per_layer', 'dense'}``: U, V, sigma have the paths of the factorized block
parameters (sigma with a leading layers axis: (L, r)), per_layer and dense the paths of the rest.

A target of depth L' (:func:`expand`) gets sigma and per_layer interpolated linearly over relative
depth (``scaler_init._resample``: target layer i sits at i (L - 1) / (L' - 1) of the source's
layers), and U, V, dense as they are. FINE expands depth only (like TLEG): every other axis of the
target must equal the auxiliary's; a different number of classes gets a new head (the target's own
init). :func:`adapt` then trains only sigma and per_layer of a target on a little data ("trained
sigma"), with U, V and dense frozen.

Pre-training (``programs/baseline_pretrain.py`` with :func:`make_task`) uses the shared
``train_loop.run``, like TLEG's. Start (:func:`initial_tree`): the auxiliary model's own initializers; per
factorized weight, U, V and the singular values s of the thin SVD of the model's init of its *first*
layer, and sigma_l = s for every layer (all layers start equal, like TLEG's B = 0, and the first
layer is exactly the model's own init up to float rounding). A zero-initialized weight (the DiT's
adaLN-Zero modulation kernels, zero biases: all singular values 0) gets random orthonormal U, V
(QR of a seeded Gaussian) and sigma = 0: it composes to exactly zero and its sigma still receives
gradient (u_i^T G v_i). per_layer starts as the first layer's init in every layer; dense as the
model's own init.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from weit_jax import config_checks, exports, metrics, models, optim, sharding, tasks, train_loop, workdir_lock
from weit_jax.inits import common, tleg
from weit_jax.scaler_init import _resample

EXPORT_FORM = "fine"
DESCRIPTION = "layer l = U diag(sigma_l) V^T"
SPLIT_BEFORE_LAST = ("heads", "conv_h", "conv_w")
FROZEN = r"^(U|V|dense)/"  # what adapt does not train


@dataclasses.dataclass(frozen=True)
class Factor:
  """One factorized block parameter: its shape and axes without ``layers``, and the matrix split."""
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  split: int  # the first ``split`` axes form the m side

  @property
  def m(self) -> int:
    return math.prod(self.shape[:self.split])

  @property
  def n(self) -> int:
    return math.prod(self.shape[self.split:])

  @property
  def r(self) -> int:
    return min(self.m, self.n)


def matrix_split(axes) -> int:
  """How many leading axes (of a block parameter without ``layers``) form the matrix's m side: 1,
  or all but the last when the first axis is in ``SPLIT_BEFORE_LAST``."""
  return len(axes) - 1 if axes[0] in SPLIT_BEFORE_LAST else 1


def factors(cfg) -> dict[common.Path, Factor]:
  """Path -> ``Factor`` of every factorized block parameter of the model of ``cfg``."""
  out = {}
  for path, ax in common.axes(cfg).items():
    shape = common.shapes(cfg)[path]
    if common.is_layer_param(path, cfg) and len(shape) >= 3:
      f = Factor(tuple(shape[1:]), tuple(ax[1:]), matrix_split(ax[1:]))
      if f.m > 1 and f.n > 1:
        out[path] = f
  return out


def compose(U, V, sigma):
  """``[U diag(sigma_l) V^T for every l]``: (m, r), (n, r), (L, r) -> (L, m, n); numpy or traced."""
  return jnp.einsum("mr,lr,nr->lmn", U, sigma, V, precision=jax.lax.Precision.HIGHEST)


def to_plain(tree: Mapping, cfg) -> dict:
  """``{'U', 'V', 'sigma', 'per_layer', 'dense'}`` -> the plain parameters of the model of ``cfg``
  (depth: sigma's leading axis, which must be the model's). Differentiable in every factor."""
  shapes = common.shapes(cfg)
  Vs, sigmas = common.flatten(tree["V"]), common.flatten(tree["sigma"])
  flat = {k: compose(U, Vs[k], sigmas[k]).reshape(shapes[k]) for k, U in common.flatten(tree["U"]).items()}
  flat.update(common.flatten(tree["per_layer"]))
  flat.update(common.flatten(tree["dense"]))
  return common.unflatten(flat)


def fine_axes(cfg) -> dict:
  """Logical axis names of the FINE tree: U, V by their matrix side's axis when it is a single axis
  (else None), the rank axis and sigma replicated, per_layer and dense as the model's."""
  P = jax.sharding.PartitionSpec
  ax, fac = common.axes(cfg), factors(cfg)
  one = lambda names: names[0] if len(names) == 1 else None
  layer = lambda k: common.is_layer_param(k, cfg) and k not in fac
  return {"U": common.unflatten({k: P(one(f.axes[:f.split]), None) for k, f in fac.items()}),
          "V": common.unflatten({k: P(one(f.axes[f.split:]), None) for k, f in fac.items()}),
          "sigma": common.unflatten({k: P(None, None) for k in fac}),
          "per_layer": common.unflatten({k: P(*v) for k, v in ax.items() if layer(k)}),
          "dense": common.unflatten({k: P(*v) for k, v in ax.items() if not common.is_layer_param(k, cfg)})}


def initial_tree(cfg, key) -> dict:
  """The start of pre-training (module docstring): SVD factors of the model's own init of its first
  layer, the same sigma in every layer; random orthonormal U, V and sigma = 0 for a zero weight.
  Traceable (``jit``, ``eval_shape``)."""
  params = nn.unbox(models.build(cfg).init(key, *models.dummy_inputs(cfg)))["params"]
  layers, dense = tleg.split(params, cfg)
  fac = factors(cfg)
  tree = {"U": {}, "V": {}, "sigma": {}, "per_layer": {}}
  rng = jax.random.fold_in(key, 0xF1E)
  for i, (path, w) in enumerate(sorted(common.flatten(layers).items())):
    if path not in fac:
      tree["per_layer"][path] = jnp.broadcast_to(w[:1], w.shape)
      continue
    f = fac[path]
    u, s, vt = jnp.linalg.svd(w[0].reshape(f.m, f.n), full_matrices=False)
    ku, kv = jax.random.split(jax.random.fold_in(rng, i))
    zero = jnp.max(s) == 0  # a zero-initialized weight: any orthonormal pair composes to it
    tree["U"][path] = jnp.where(zero, jnp.linalg.qr(jax.random.normal(ku, (f.m, f.r)))[0], u)
    tree["V"][path] = jnp.where(zero, jnp.linalg.qr(jax.random.normal(kv, (f.n, f.r)))[0], vt.T)
    tree["sigma"][path] = jnp.broadcast_to(jnp.where(zero, 0.0, s), (w.shape[0], f.r))
  return dict({k: common.unflatten(v) for k, v in tree.items()}, dense=dense)


# --- the source an initializer reads ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FINESource:
  """A FINE model: its config (depth L) and ``{'U', 'V', 'sigma', 'per_layer', 'dense'}``."""
  config: Any
  tree: Mapping[str, Any]

  @classmethod
  def from_export(cls, directory: str) -> "FINESource":
    meta = exports.read_meta(directory)
    if meta.get("form") != EXPORT_FORM:
      raise ValueError(f"{directory} is not a FINE export (form={meta.get('form')!r}); give the WORKDIR/export "
                       "of a baseline_pretrain run with baseline=fine (configs/baseline_pretrain.py).")
    cfg = models.from_record(meta["model"])
    abstract = jax.eval_shape(lambda k: initial_tree(cfg, k), jax.random.key(0))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    return cls(cfg, common.to_numpy(exports.restore_tree(epath.Path(directory) / "params", target)))

  def describe(self) -> str:
    return f"FINE {models.family_of(self.config).name} {self.config.short_name()}"


def check_sizes(aux, target) -> None:
  """Refuses a target that differs from the auxiliary model anywhere but depth (and classes):
  ``tleg.check_sizes``'s rule and message, for FINE."""
  try:
    tleg.check_sizes(aux, target)
  except ValueError as e:
    raise ValueError(str(e).replace("TLEG", "FINE")) from None


def expand_tree(source: FINESource | str, target, *, seed: int = 0) -> dict:
  """The FINE tree of depth ``target.depth``: sigma and per_layer interpolated over relative depth
  (per parameter: a ResNet's stacks have their own lengths), U, V and dense copied (a fresh head
  for another number of classes)."""
  if isinstance(source, str):
    source = FINESource.from_export(source)
  if not isinstance(source, FINESource):
    raise ValueError(f"fine needs a FINESource or a FINE export folder; got {type(source).__name__}.")
  check_sizes(source.config, target)
  shapes = common.shapes(target)
  depth = lambda group: common.unflatten({k: np.asarray(_resample(np.asarray(v, np.float32), 0, shapes[k][0]),
                                                         np.float32)
                                          for k, v in common.flatten(source.tree[group]).items()})
  tree = dict(common.to_numpy(source.tree), sigma=depth("sigma"), per_layer=depth("per_layer"))
  if models.other_classes(source.config, target):
    dense, own = common.flatten(tree["dense"]), common.flatten(common.own_init(target, seed))
    dense.update({p: own[p] for p in models.classifier_paths(target) if p in dense})
    tree["dense"] = common.unflatten(dense)
  return tree


def expand(source: FINESource | str, target, *, seed: int = 0) -> dict:
  """Plain parameters of ``target`` from ``expand_tree`` (the initializer registered as ``fine``)."""
  params = common.to_numpy(to_plain(expand_tree(source, target, seed=seed), target))
  common.check_tree(params, target, "fine")
  return params


# --- pre-training (programs/baseline_pretrain.py) ---------------------------------------------------

def _train_task(task: tasks.Task, cfg, tree_like, optim_config, *, init_params, frozen=None,
                weight_decay=None) -> train_loop.Task:
  model = models.build(cfg)

  def forward(tree, *inputs):
    return model.apply({"params": to_plain(tree, cfg)}, *inputs)

  tx = optim.make_optimizer(optim_config, tree_like, weight_decay=weight_decay, frozen=frozen)
  return train_loop.Task(init_params=init_params, param_axes=fine_axes(cfg), loss_fn=task.loss_fn(forward),
                         eval_fn=task.eval_fn(forward), optimizer=tx, lr_schedule=optim.schedule(optim_config),
                         experience=task.experience(forward))


def make_task(config, cfg) -> train_loop.Task:
  """The FINE pre-training task for a ``configs/<family>_train.py``-style config (model = auxiliary)."""
  task = tasks.from_config(config)
  init_params = lambda key: initial_tree(cfg, key)
  optim_config = optim.with_total_steps(config.optim, task.optimizer_steps(config.total_steps))
  return _train_task(task, cfg, jax.eval_shape(init_params, jax.random.key(0)), optim_config,
                     init_params=init_params, weight_decay=float(config.weight_decay))


# --- trained sigma for a target ----------------------------------------------------------------------

def factors_dir(workdir: str) -> str:
  """Where :func:`adapt` writes the target's trained factors (a FINE export of the target)."""
  return str(epath.Path(workdir) / "fine_export")


def adapt(source: FINESource | str, target_cfg, config, workdir: str, *, steps: int, num_examples: int) -> str:
  """FINE's "trained sigma": ``expand_tree``'s factors for ``target_cfg``, then only sigma and
  per_layer trained (U, V, dense frozen; no weight decay) for ``steps`` steps on the first
  ``num_examples`` examples of ``config``'s training split (a ``configs/<family>_train.py``-style
  config: its optimizer, batch size, seed, mesh, task). Writes the trained factors to
  ``WORKDIR/fine_export`` (a FINE export of the target) and the plain parameters to
  ``WORKDIR/export`` (``init='fine'``, ``sigma_training``), last; returns that folder. Resumes an
  interrupted run; a finished one (``export.json`` there) is returned as it is."""
  out = str(epath.Path(workdir) / "export")
  if (epath.Path(out) / exports.META).exists():
    metrics.log(f"FINE target {target_cfg.short_name()} already exported in {out}.")
    return out
  if isinstance(source, str):
    source = FINESource.from_export(source)
  start = expand_tree(source, target_cfg, seed=int(config.seed))
  config = ml_collections.ConfigDict(config.copy_and_resolve_references().to_dict())
  if "sample_quality" in config:  # the train program's measurement; this loop never makes one
    del config["sample_quality"]
  config.update(dict(program="fine_adapt", total_steps=max(int(steps), 1), init=None,
                     fine=dict(source=source.describe(), target=models.to_record(target_cfg),
                               num_examples=int(num_examples))))
  if "data" not in config:
    raise ValueError("FINE's sigma training reads a dataset's first num_examples examples; this task has none.")
  config.data.train_split = f"{config.data.train_split}[:{int(num_examples)}]"
  config_checks.check_ranges(config)
  task = tasks.from_config(config)
  optim_config = optim.with_total_steps(config.optim, task.optimizer_steps(int(config.total_steps)))
  if int(steps) == 0:
    optim_config.warmup_steps = 0
  trainable = _train_task(task, target_cfg, start, optim_config, init_params=lambda key: start,
                          frozen=FROZEN)
  mesh = sharding.make_mesh(dict(config.mesh))
  task.prepare()
  with workdir_lock.hold(workdir, config.program):  # the first write: refused if another run holds it
    train_loop.guard_workdir(config, workdir)
    make_eval_iter = lambda: task.eval_iterator(config.batch_size)
    _, shardings = train_loop.state_shardings(trainable, mesh)
    eval_step = train_loop.make_eval_step(trainable, shardings["params"], sharding.batch_sharding(mesh), mesh)
    before = train_loop.evaluate_all(trainable, eval_step, 0, {"params": jax.device_put(start, shardings["params"])},
                                     make_eval_iter(), mesh)
    tree, after = start, before
    if int(steps) > 0:
      summary = train_loop.run(config, workdir, trainable, mesh=mesh,
                               train_iter=task.train_iterator(config.batch_size, config.seed, mesh),
                               make_eval_iter=make_eval_iter, initial_params=start,
                               title=f"FINE sigma training {target_cfg.short_name()}")
      tree, after = summary.pop("params"), {k: v for k, v in summary.items() if k.startswith("eval_")}
    tree = common.to_numpy(tree)
    record = dict(model=models.to_record(target_cfg), init="fine", source=source.describe(), sigma_training=dict(
        steps=int(steps), num_examples=int(num_examples), batch_size=int(config.batch_size),
        lr=float(config.optim.lr), seed=int(config.seed),
        **{f"{k.removeprefix('eval_')}_before": v for k, v in before.items()},
        **{f"{k.removeprefix('eval_')}_after": v for k, v in after.items()}))
    factors = epath.Path(factors_dir(workdir))
    if factors.exists():  # left by a run that died before the plain export
      factors.rmtree()
    exports.write(str(factors), tree, dict(record, form=EXPORT_FORM))
    params = common.to_numpy(to_plain(tree, target_cfg))
    common.check_tree(params, target_cfg, "fine")
    exports.write(out, params, record)
    metrics.log(f"FINE target {target_cfg.short_name()}: {train_loop.format_eval(before)} -> "
                f"{train_loop.format_eval(after)}; exported to {out}")
    return out
