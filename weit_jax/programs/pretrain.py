"""Stage 1: constraint-based pre-training of weight templates (DESIGN.md sections 1 and 3).

The trainable tree is ``{'templates', 'scalers'}`` (``hard``) or ``{'dense', 'templates',
'scalers'}`` (``soft``); the model is the plain ViT applied to ``materialize(templates, scalers)``
(or to ``dense``). Optional: distillation from a plain-ViT teacher export, and templates extracted
in closed form from a dense checkpoint as the starting point.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from weit_jax import (checkpoint, config_checks, distributed, generator, input_pipeline, losses, metrics, optim,
                      sharding, train_loop)
from weit_jax.models import vit

MODES = ("hard", "soft")


@dataclasses.dataclass
class Setup:
  """Everything static about a pre-training config: built and validated before anything compiles."""
  model_config: vit.ViTConfig
  model: vit.ViT
  gen: generator.WeightGenerator


def model_config_from(config, model_fields=None) -> vit.ViTConfig:
  """The ViT config from ``config.model`` (or ``model_fields``) and the dataset's image format."""
  info = input_pipeline.dataset_info(config.data.name)
  fields = dict(model_fields if model_fields is not None else config.model)
  variant = fields.pop("variant", None)
  return vit.make_config(variant, image_size=int(config.data.image_size), channels=int(info.channels),
                         num_classes=int(info.num_classes), **fields)


def build(config) -> Setup:
  if config.constraint.mode not in MODES:
    raise ValueError(f"constraint.mode={config.constraint.mode!r}; use one of {MODES}.")
  optim.schedule(optim.with_total_steps(config.optim, config.total_steps))  # validates the schedule
  cfg = model_config_from(config)
  model = vit.ViT(cfg)
  gen = generator.WeightGenerator.from_model(model, vit.dummy_input(cfg), tiles=dict(config.weit.tiles),
                                             num_templates=int(config.weit.num_templates))
  if config.batch_size % jax.process_count():
    raise ValueError(f"batch_size={config.batch_size} must be divisible by the {jax.process_count()} processes.")
  return Setup(cfg, model, gen)


def make_task(config, setup: Setup, *, teacher=None) -> train_loop.Task:
  """The pre-training task. ``teacher``: (ViT module, its params) for distillation, or None."""
  model, gen = setup.model, setup.gen
  soft = config.constraint.mode == "soft"
  stats = generator.param_stats(model, vit.dummy_input(setup.model_config))

  def init_params(key):
    k_gen, k_dense = jax.random.split(key)
    templates, scalers = gen.init(k_gen, stats)
    params = {"templates": templates, "scalers": scalers}
    if soft:
      params["dense"] = nn.unbox(model.init(k_dense, vit.dummy_input(setup.model_config)))["params"]
    if teacher is not None:
      params["teacher"] = teacher[1]
    return params

  axes = {"templates": gen.template_axes(), "scalers": gen.scaler_axes()}
  if soft:
    axes["dense"] = gen.param_axes()
  if teacher is not None:
    axes["teacher"] = jax.tree_util.tree_map(lambda _: jax.sharding.PartitionSpec(), teacher[1])

  def forward(params, images):
    weights = params["dense"] if soft else gen.materialize(params["templates"], params["scalers"])
    return model.apply({"params": weights}, images)

  def loss_fn(params, batch, key):
    del key
    logits = forward(params, batch["image"])
    ce = losses.softmax_cross_entropy(logits, batch["labels"], config.label_smoothing)
    loss, aux = ce, {"ce": ce, "accuracy": jnp.mean(losses.accuracy(logits, batch["labels"]))}
    if teacher is not None and config.distill.weight:
      t_logits = teacher[0].apply({"params": jax.lax.stop_gradient(params["teacher"])}, batch["image"])
      kd = losses.distillation(logits, t_logits, config.distill.temperature)
      loss, aux["distill"] = loss + config.distill.weight * kd, kd
    if config.constraint.diversity:
      div = losses.template_diversity(params["templates"])
      loss, aux["diversity"] = loss + config.constraint.diversity * div, div
    if soft:
      pen = losses.soft_constraint(params["dense"], gen.materialize(params["templates"], params["scalers"]))
      loss, aux["constraint"] = loss + config.constraint.soft_lambda * pen, pen
    return loss, aux

  optim_config = optim.with_total_steps(config.optim, config.total_steps)
  abstract = jax.eval_shape(init_params, jax.random.key(0))
  tx = optim.make_optimizer(
      optim_config, abstract,
      weight_decay={"templates": config.constraint.template_wd, "scalers": config.constraint.scaler_wd,
                    "dense": config.constraint.dense_wd if soft else 0.0},
      frozen="^teacher/" if teacher is not None else None)
  return train_loop.Task(init_params=init_params, param_axes=axes, loss_fn=loss_fn,
                         logits_fn=forward, optimizer=tx, lr_schedule=optim.schedule(optim_config))


def check_teacher(config) -> None:
  """Refuses a distillation setting that cannot work (reads only the teacher's export record)."""
  if not config.distill.teacher:
    if config.distill.weight:
      raise ValueError("distill.weight is set but distill.teacher is not; give a plain-ViT export folder.")
    return
  checkpoint.read_export_meta(config.distill.teacher)


def load_teacher(config):
  check_teacher(config)
  if not config.distill.teacher:
    return None
  meta = checkpoint.read_export_meta(config.distill.teacher)
  t_cfg = vit.ViTConfig(**meta["model"])
  return vit.ViT(t_cfg), checkpoint.load_params(config.distill.teacher)


def initial_params_from_dense(config, setup: Setup, task: train_loop.Task):
  """Closed-form templates (Van Loan-Pitsianis + truncated SVD) from a dense plain-ViT export."""
  from weit_jax import extract
  dense = checkpoint.load_params(config.init_templates_from)
  templates, scalers, errors = extract.extract_templates(setup.gen, jax.device_get(dense))
  metrics.log(f"Templates extracted from {config.init_templates_from}; relative reconstruction error per bank:")
  for path, err in sorted(errors.items()):
    metrics.log(f"  {path:70s} {err:.4f}")
  params = jax.device_get(task.init_params(jax.random.key(int(config.seed))))
  params["templates"], params["scalers"] = templates, scalers
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)


def validate(config, workdir: str) -> tuple[Setup, jax.sharding.Mesh]:
  """Every check of a pre-training run, before anything compiles or is written to ``workdir``
  (the embedded dataset may be built into its own data_dir)."""
  config_checks.check_ranges(config)
  setup = build(config)
  check_teacher(config)
  if config.init_templates_from:
    checkpoint.read_export_meta(config.init_templates_from)  # refuses a folder that is not an export
  mesh = sharding.make_mesh(dict(config.mesh))
  distributed.process_batch_rows(mesh, int(config.batch_size))  # the batch splits over the mesh
  input_pipeline.prepare(config.data)
  train_loop.check_workdir(config, workdir)
  return setup, mesh


def run(config, workdir: str) -> dict:
  # ----- validate everything before anything compiles or writes --------------------------------
  setup, mesh = validate(config, workdir)
  teacher = load_teacher(config)
  train_loop.guard_workdir(config, workdir)
  counts = setup.gen.counts()
  metrics.log(f"Auxiliary ViT {setup.model_config.short_name()}: {counts['materialized']:,} weights from "
              f"{counts['templates']:,} template and {counts['scalers']:,} scaler parameters "
              f"(N={setup.gen.num_templates}, tiles {setup.gen.tiles}, constraint {config.constraint.mode}).")

  # ----- task, data ------------------------------------------------------------------------------
  task = make_task(config, setup, teacher=teacher)
  initial = initial_params_from_dense(config, setup, task) if config.init_templates_from else None
  train_iter = input_pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size,
                                                   seed=config.seed, mesh=mesh)
  make_eval_iter = lambda: input_pipeline.make_eval_iterator(config.data, global_batch_size=config.batch_size)

  # ----- train -----------------------------------------------------------------------------------
  summary = train_loop.run(config, workdir, task, mesh=mesh, train_iter=train_iter,
                           make_eval_iter=make_eval_iter, initial_params=initial,
                           summary_extra=dict(program="pretrain", **{f"{k}_params": v for k, v in counts.items()}),
                           title=f"pre-training {setup.model_config.short_name()}")
  return summary


def restore_templates(workdir: str, step: int | None = None):
  """Templates (and the auxiliary scalers) of a pre-training workdir, at ``step`` or the latest.

  Rebuilds the run's own abstract state from its recorded config, so nothing about the run has
  to be repeated on the command line.
  """
  import json
  import ml_collections
  from etils import epath
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise ValueError(f"{workdir} is not a pre-training workdir (no config.json); give the --workdir "
                     "that `main.py --config=configs/vit_pretrain.py` wrote.")
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  if config.get("program") != "pretrain":
    raise ValueError(f"{workdir} holds a {config.get('program')!r} run, not pre-training.")
  setup = build(config)
  task = make_task(config, setup, teacher=load_teacher(config))  # the state's shape includes the teacher
  mesh = sharding.make_mesh({"data": -1})
  abstract, shardings = train_loop.state_shardings(task, mesh)
  ckpt = checkpoint.Checkpointer(workdir, every=1)
  steps = ckpt.all_steps()
  if not steps:
    raise ValueError(f"{workdir} has no checkpoint yet; run pre-training first.")
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise ValueError(f"step {step} is not a checkpoint of {workdir}; available: {steps}.")
  state = ckpt.restore(step, checkpoint.abstract_with_shardings(abstract, shardings), None)
  ckpt.close()
  return config, setup, state["params"], step
