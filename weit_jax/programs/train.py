"""Stage 3: train a plain model (any family) like any other, from an export (``config.init``) or
from scratch. Every baseline initializer feeds this program; nothing of WeiT remains in the model."""
from __future__ import annotations


import flax.linen as nn
import jax
import numpy as np
from etils import epath

from weit_jax import (config_checks, distributed, exports, metrics, models, optim, sharding, tasks,
                      train_loop, workdir_lock)


def initial_params(config, cfg):
  """The export's parameters (with a fresh head if the number of classes differs), or None."""
  if not config.init:
    return None
  exported = models.from_record(exports.read_meta(config.init)["model"])
  family = models.family_of(cfg)
  sizes = {k: (getattr(exported, k), getattr(cfg, k)) for k in family.data_fields
           if k != "num_classes" and getattr(exported, k, None) != getattr(cfg, k)}
  if sizes:
    raise ValueError(f"{config.init} was exported for other data sizes than this run's: {sizes} (export, this "
                     f"run); {tasks.from_config(config).export_hint()}, or train from scratch without --config.init.")
  if not models.same_up_to_head(exported, cfg):
    exports.load_params(config.init, expected_model=cfg)  # raises, naming the differing fields
  params = jax.device_get(exports.load_params(config.init))
  if models.other_classes(exported, cfg):
    params = models.with_fresh_classifier(params, cfg, int(config.seed))
    metrics.log(f"The export has {exported.num_classes} classes, this dataset {cfg.num_classes}: "
                "the head is re-initialized.")
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)


def make_task(config, model: nn.Module, cfg, workdir: str | None = None, mesh=None, task=None) -> train_loop.Task:
  """The trainable task; with ``workdir`` and ``mesh``, the task's extra eval (sample quality) too.
  ``task``: the ``tasks.Task`` (default: the config's)."""
  task = task or tasks.from_config(config)
  boxed = jax.eval_shape(model.init, jax.random.key(0), *models.dummy_inputs(cfg))

  def init_params(key):
    return nn.unbox(model.init(key, *models.dummy_inputs(cfg)))["params"]

  def forward(params, *inputs):
    return model.apply({"params": params}, *inputs)

  optim_config = optim.with_total_steps(config.optim, task.optimizer_steps(config.total_steps))
  tx = optim.make_optimizer(optim_config, jax.eval_shape(init_params, jax.random.key(0)),
                            weight_decay=float(config.weight_decay))
  return train_loop.Task(init_params=init_params, param_axes=nn.get_partition_spec(boxed)["params"],
                         loss_fn=task.loss_fn(forward), eval_fn=task.eval_fn(forward), optimizer=tx,
                         lr_schedule=optim.schedule(optim_config),
                         extra_eval=task.extra_eval_fn(forward, cfg, workdir, mesh) if workdir else None,
                         experience=task.experience(forward))


def validate(config, workdir: str):
  """Every check of a training run, before anything compiles or is written to ``workdir``.
  Returns (model config, model, mesh, initial params or None)."""
  config_checks.check_ranges(config)
  task = tasks.from_config(config)
  optim.schedule(optim.with_total_steps(config.optim, task.optimizer_steps(config.total_steps)))  # validates it
  fields = None
  if config.init:  # the size comes from the export
    exported = models.from_record(exports.read_meta(config.init)["model"])
    family = models.family_of(exported)
    wanted = models.family_named_in(config.model)
    if family is not wanted:
      raise ValueError(f"{config.init} is an export of a {family.name} model, but this config trains a "
                       f"{wanted.name}; use configs/{family.name}_train.py.")
    if (conflict := models.option_conflict(config.model, exported)):  # the export's computation is the model's
      name, want, have = conflict
      raise ValueError(f"{config.init} is an export of a model with {name}={have!r}, but --config.model.{name}="
                       f"{want!r}; leave it unset (the export's) or give an export of that option.")
    fields = dict({k: getattr(exported, k) for k in family.target_fields + family.option_fields},
                  family=family.name, **{k: config.model.get(k) for k in models.RUNTIME_FIELDS})
  cfg = tasks.model_config(config, fields)
  model = models.build(cfg)
  mesh = sharding.make_mesh(dict(config.mesh))
  distributed.process_batch_rows(mesh, int(config.batch_size))  # the batch splits over the mesh
  task.prepare()
  init = initial_params(config, cfg)  # refuses an export of another shape
  train_loop.check_workdir(config, workdir)
  return cfg, model, mesh, init


def task_with_export(config):
  """The config's task, continuing from the export's record (``Task.continuing``: a control task
  takes the observation statistics the policy was trained with, if they fit)."""
  task = tasks.from_config(config)
  return task.continuing(exports.read_meta(config.init)) if config.init else task


def run(config, workdir: str) -> dict:
  cfg, model, mesh, init = validate(config, workdir)
  with workdir_lock.hold(workdir, "train"):  # the first write: refused if another run holds it
    train_loop.guard_workdir(config, workdir)
    metrics.log(f"{models.family_of(cfg).name} {cfg.short_name()} from {config.init or 'random initialization'}.")
    task = task_with_export(config)
    trainable = make_task(config, model, cfg, workdir, mesh, task=task)
    train_iter = task.train_iterator(config.batch_size, config.seed, mesh)
    make_eval_iter = lambda: task.eval_iterator(config.batch_size)
    summary = train_loop.run(config, workdir, trainable, mesh=mesh, train_iter=train_iter, make_eval_iter=make_eval_iter,
                             initial_params=init, summary_extra=dict(program="train", init=config.init or "random"),
                             title=f"training {cfg.short_name()} from {config.init or 'random init'}")
    write_export(workdir, cfg, config, summary, task)
    return summary


def write_export(workdir: str, cfg, config, summary, task: tasks.Task) -> None:
  """The trained model as an export (as the init program writes them: to sample, evaluate or train
  on) in ``WORKDIR/export``; one of an earlier, shorter run of the same workdir is replaced."""
  export = epath.Path(workdir) / "export"
  steps = int(summary["final_step"])
  if (export / exports.META).exists():
    if exports.read_meta(str(export)).get("training", {}).get("steps") == steps:
      return  # a finished run invoked again
    export.rmtree()  # the run was extended: its export is stale
  elif export.exists():
    export.rmtree()  # left by a crash before export.json was written
  evals = {k.removeprefix("eval_"): v for k, v in summary.items() if k.startswith("eval_")}
  exports.write(str(export), summary["params"], dict(
      model=models.to_record(cfg), training=dict(init=config.init or "random", steps=steps, seed=int(config.seed),
                                      **evals), **task.export_record(summary.get("carry"))))
  metrics.log(f"Exported the trained model to {export}.")
