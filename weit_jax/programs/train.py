"""Stage 3: train a plain ViT like any other model, from an export (``config.init``) or from
scratch. Every baseline initializer feeds this program; nothing of WeiT remains in the model."""
from __future__ import annotations

import dataclasses

import jax
import flax.linen as nn
import numpy as np

from weit_jax import (checkpoint, config_checks, distributed, input_pipeline, losses, metrics, optim, sharding,
                      train_loop)
from weit_jax.models import vit
from weit_jax.programs.pretrain import model_config_from


def initial_params(config, cfg: vit.ViTConfig, model: vit.ViT):
  """The export's parameters (with a fresh head if the number of classes differs), or None."""
  if not config.init:
    return None
  meta = checkpoint.read_export_meta(config.init)
  exported = vit.ViTConfig(**meta["model"])
  if dataclasses.replace(exported, num_classes=cfg.num_classes, dtype=cfg.dtype) != cfg:
    checkpoint.load_params(config.init, expected_model=cfg)  # raises, naming the differing fields
  params = jax.device_get(checkpoint.load_params(config.init))
  if exported.num_classes != cfg.num_classes:
    fresh = nn.unbox(jax.jit(model.init)(jax.random.key(int(config.seed)), vit.dummy_input(cfg)))["params"]
    params["head"] = jax.device_get(fresh["head"])
    metrics.log(f"The export has {exported.num_classes} classes, this dataset {cfg.num_classes}: "
                "the head is re-initialized.")
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)


def make_task(config, model: vit.ViT, cfg: vit.ViTConfig) -> train_loop.Task:
  boxed = jax.eval_shape(model.init, jax.random.key(0), vit.dummy_input(cfg))

  def init_params(key):
    return nn.unbox(model.init(key, vit.dummy_input(cfg)))["params"]

  def logits_fn(params, images):
    return model.apply({"params": params}, images)

  loss_fn = losses.classification(logits_fn, config.label_smoothing)

  optim_config = optim.with_total_steps(config.optim, config.total_steps)
  tx = optim.make_optimizer(optim_config, jax.eval_shape(init_params, jax.random.key(0)),
                            weight_decay=float(config.weight_decay))
  return train_loop.Task(init_params=init_params, param_axes=nn.get_partition_spec(boxed)["params"],
                         loss_fn=loss_fn, logits_fn=logits_fn, optimizer=tx, lr_schedule=optim.schedule(optim_config))


def validate(config, workdir: str):
  """Every check of a training run, before anything compiles or is written to ``workdir``.
  Returns (model config, model, mesh, initial params or None)."""
  config_checks.check_ranges(config)
  optim.schedule(optim.with_total_steps(config.optim, config.total_steps))  # validates the schedule
  fields = None
  if config.init:  # the size comes from the export
    exported = vit.ViTConfig(**checkpoint.read_export_meta(config.init)["model"])
    fields = dict({k: getattr(exported, k) for k in vit.SIZE_FIELDS}, dtype=config.model.dtype)
  cfg = model_config_from(config, fields)
  model = vit.ViT(cfg)
  mesh = sharding.make_mesh(dict(config.mesh))
  distributed.process_batch_rows(mesh, int(config.batch_size))  # the batch splits over the mesh
  input_pipeline.prepare(config.data)
  init = initial_params(config, cfg, model)  # refuses an export of another shape
  train_loop.check_workdir(config, workdir)
  return cfg, model, mesh, init


def run(config, workdir: str) -> dict:
  cfg, model, mesh, init = validate(config, workdir)
  train_loop.guard_workdir(config, workdir)
  metrics.log(f"ViT {cfg.short_name()} from {config.init or 'random initialization'}.")
  task = make_task(config, model, cfg)
  train_iter = input_pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed,
                                                   mesh=mesh)
  make_eval_iter = lambda: input_pipeline.make_eval_iterator(config.data, global_batch_size=config.batch_size)
  return train_loop.run(config, workdir, task, mesh=mesh, train_iter=train_iter, make_eval_iter=make_eval_iter,
                        initial_params=init, summary_extra=dict(program="train", init=config.init or "random"),
                        title=f"training {cfg.short_name()} from {config.init or 'random init'}")
