"""Stage 2: initialize models of any size from pre-trained templates, and export them.

For each target size: restore the templates (frozen), build scalers for the target by a heuristic,
train only the scalers on a little data, materialize the plain parameters inside ``jit`` with the
target's shardings, and export them (plus the compact templates + scalers form).
"""
from __future__ import annotations

import dataclasses
import functools
import json

import flax.linen as nn
import jax
from etils import epath

from weit_jax import (checkpoint, config_checks, distributed, exports, generator, metrics, models, optim, scaler_init,
                      sharding, tasks, train_loop, workdir_lock)
from weit_jax.programs import pretrain

def _targets_from_config(config, source, data: dict) -> list:
  """Target model configs: ``config.targets`` ('S/16;depth=7,width=320,heads=5', sizes of the
  templates' family), else ``config.target``; ``data``: the fields the init task's data fixes."""
  family = models.family_of(source)
  if config.targets:
    return [models.target_config(f, source, data) for f in models.parse_targets(config.targets, family)]
  fields = {k: v for k, v in config.target.items() if v is not None and k not in models.RUNTIME_FIELDS}
  fields.pop("family", None)  # checked by _check_family
  return [models.target_config(fields, source, data)]


def _check_family(config, source) -> None:
  """Refuses templates of another family than the init config's (its ``target``), before the
  templates' task is rebuilt with this config's fields."""
  family = models.family_of(source)
  wanted = models.family_named_in(config.target).name
  if wanted != family.name:
    raise ValueError(f"this init config makes {wanted} models, but the templates in {config.templates} are of the "
                     f"{family.name} family; use configs/{family.name}_init.py (or templates of a {wanted}).")


@dataclasses.dataclass
class Target:
  model_config: object
  model: nn.Module
  gen: generator.WeightGenerator
  name: str


@dataclasses.dataclass
class Validated:
  """What ``validate`` loaded and built: the template source and every target."""
  src_config: object
  src_setup: pretrain.Setup
  src_params: dict
  src_step: int
  targets: list[Target]
  task: tasks.Task  # the pre-training task, on num_examples examples
  mesh: jax.sharding.Mesh


def validate(config, workdir: str) -> Validated:
  """Every check of an init run, before anything compiles or is written to ``workdir``: the
  templates are restored (read) and every target is checked against them."""
  config_checks.check_ranges(config)
  if not config.templates:
    raise ValueError("config.templates is not set; give the pre-training workdir: --config.templates=DIR.")
  optim.schedule(_optim_config(config))  # validates the schedule
  mesh = sharding.make_mesh(dict(config.mesh))
  distributed.process_batch_rows(mesh, int(config.batch_size))  # the batch splits over the mesh
  src_config, src_setup, src_state, src_step = pretrain.restore_state(config.templates, config.templates_step)
  src_params = src_state["params"]
  source = src_setup.model_config
  _check_family(config, source)
  task = _task(config, src_config, src_state)
  targets = []
  for cfg in _targets_from_config(config, source, task.model_fields()):
    model = models.build(cfg)
    gen = generator.WeightGenerator.from_model(model, *models.dummy_inputs(cfg), tiles=dict(src_config.weit.tiles),
                                               num_templates=int(src_config.weit.num_templates),
                                               whole=src_setup.gen.whole_shapes())
    gen.check_templates(src_params["templates"])
    targets.append(Target(cfg, model, gen, cfg.short_name()))
  names = [t.name for t in targets]
  if len(set(names)) != len(names):
    raise ValueError(f"targets repeat a size: {names}.")
  task.prepare()
  _check_adapt(config, src_config, task)
  train_loop.check_workdir(config, workdir)
  return Validated(src_config, src_setup, src_params, src_step, targets, task, mesh)


def run(config, workdir: str) -> dict:
  # ----- validate and load what is shared: templates, data ---------------------------------------
  v = validate(config, workdir)
  with workdir_lock.hold(workdir, "init"):  # the first write: refused if another run holds it
    names = [t.name for t in v.targets]
    train_loop.guard_workdir(config, workdir, also_remove=names)  # overwrite: the old targets go too
    source = v.src_setup.model_config
    templates = jax.device_get(v.src_params["templates"])
    metrics.log(f"Templates from {config.templates} (step {v.src_step}); auxiliary {source.short_name()}; "
                f"{len(v.targets)} target(s): {', '.join(names)}.")

    results = {}
    for target in v.targets:
      results[target.name] = _init_one(config, workdir, target, templates, v.src_setup, v.src_params, v.src_step,
                                       v.task, v.mesh)
    if metrics.is_main():
      (epath.Path(workdir) / "targets.json").write_text(json.dumps(results, indent=2))
    return results


def _task(config, src_config, src_state) -> tasks.Task:
  """The task of pre-training as scaler training sees it (``Task.scaler_training_config``: e.g. the
  first num_examples training examples), continuing from what the templates' run carried (a control
  task's observation statistics)."""
  task_config = src_config.copy_and_resolve_references()
  tasks.task_class(task_config).scaler_training_config(task_config, config)
  task = tasks.from_config(task_config)
  return task.continuing(task.export_record(src_state.get("carry")))


ADAPT = ("ppo", "distill")


def _check_adapt(config, src_config, task) -> None:
  adapt = config.get("adapt", "ppo")
  if adapt not in ADAPT:
    raise ValueError(f"adapt={adapt!r}; use one of {ADAPT}.")
  if adapt == "distill":
    task.check_distillation(src_config)


def _teacher(src_setup, src_params):
  """The auxiliary model (its templates and scalers) as ``(params, *inputs) -> outputs``."""
  weights = src_setup.gen.materialize(src_params["templates"], src_params["scalers"])
  return lambda _, *inputs: src_setup.model.apply({"params": weights}, *inputs)


def _optim_config(config, task=None):
  """The scaler-training optimizer config; ``steps=0`` (heuristic only) needs no warmup."""
  steps = max(int(config.steps), 1)
  c = optim.with_total_steps(config.optim, task.optimizer_steps(steps) if task is not None else steps)
  if int(config.steps) == 0:
    c.warmup_steps = 0
  return c


def _init_one(config, workdir, target: Target, templates, src_setup, src_params, src_step, task, mesh) -> dict:
  tdir = str(epath.Path(workdir) / target.name)
  export_dir = str(epath.Path(tdir) / "export")
  if (epath.Path(export_dir) / exports.META).exists():  # written last: the target is done
    metrics.log(f"[{target.name}] already exported in {export_dir}; skipping.")
    return exports.read_meta(export_dir)["scaler_training"]
  gen, cfg = target.gen, target.model_config
  counts = gen.counts()
  metrics.log(f"[{target.name}] {counts['materialized']:,} weights, {counts['scalers']:,} trainable scalers "
              f"(heuristic {config.scaler_init}).")
  advice = sharding.split_advice(gen.param_shapes(), gen.param_axes(), mesh)
  if advice:  # it fits, but each device holds more of the export than it needs to
    metrics.log(f"[{target.name}] note: {advice}")

  # ----- scalers by heuristic, from the nearest trained size (the auxiliary unless weit.extra_sizes) ---
  sizes = src_setup.sizes(src_params)
  source, source_scalers = sizes[scaler_init.nearest_size(gen, [s.gen for s, _ in sizes])]
  stats = generator.param_stats(target.model, *models.dummy_inputs(cfg))
  scalers = scaler_init.init_scalers(
      config.scaler_init, gen, templates, key=jax.random.key(int(config.seed)), target_stats=stats,
      source=source.gen, source_scalers=jax.device_get(source_scalers),
      source_stats=generator.param_stats(source.model, *models.dummy_inputs(source.model_config)))
  if len(sizes) > 1 and config.scaler_init == "interpolate":
    metrics.log(f"[{target.name}] scalers interpolated from the trained size {source.name}.")

  # ----- train only the scalers --------------------------------------------------------------------
  def forward(params, *inputs):
    return target.model.apply({"params": gen.materialize(params["templates"], params["scalers"])}, *inputs)

  loop_config = config.copy_and_resolve_references()
  with loop_config.unlocked():
    loop_config.total_steps = max(int(config.steps), 1)
  optim_config = _optim_config(config, task)
  initial = {"templates": templates, "scalers": scalers}
  tx = optim.make_optimizer(optim_config, initial, weight_decay={"scalers": config.scaler_wd},
                            frozen="^templates/")
  loss_fn, experience = task.loss_fn(forward), task.experience(forward)
  if config.get("adapt", "ppo") == "distill":  # the auxiliary policy acts; the target matches its outputs
    loss_fn, experience = task.distillation(forward, _teacher(src_setup, src_params))
  trainable = train_loop.Task(init_params=lambda key: initial, param_axes={
      "templates": gen.template_axes(), "scalers": gen.scaler_axes()}, loss_fn=loss_fn,
      eval_fn=task.eval_fn(forward), optimizer=tx, lr_schedule=optim.schedule(optim_config), experience=experience)
  make_eval_iter = lambda: task.eval_iterator(config.batch_size)
  _, shardings = train_loop.state_shardings(trainable, mesh)
  eval_step = train_loop.make_eval_step(trainable, shardings["params"], sharding.batch_sharding(mesh), mesh)
  start = {"params": jax.device_put(initial, shardings["params"])}
  if trainable.experience is not None:  # the experience's first carry: the observation statistics
    # made with the train loop's shardings: the evaluation before and after compiles once
    start["carry"] = jax.jit(lambda key: jax.tree_util.tree_leaves(trainable.experience.init(key)),
                             out_shardings=shardings["carry"])(jax.random.key(int(config.seed)))
  before = train_loop.evaluate_all(trainable, eval_step, 0, start, make_eval_iter(), mesh)
  metrics.log(f"[{target.name}] before scaler training: {train_loop.format_eval(before)}")
  if config.steps > 0:
    train_iter = task.train_iterator(config.batch_size, config.seed, mesh)
    summary = train_loop.run(loop_config, tdir, trainable, mesh=mesh, train_iter=train_iter,
                             make_eval_iter=make_eval_iter, initial_params=initial,
                             title=f"scaler training {target.name}")
    params = summary.pop("params")
    after = {k: v for k, v in summary.items() if k.startswith("eval_")}
    carry = summary.get("carry")
  else:
    params, after = start["params"], before
    carry = train_loop.carry_of(trainable, start) if trainable.experience is not None else None

  # ----- materialize with the target's shardings, export -------------------------------------------
  out_sh = sharding.shardings(gen.param_shapes(), gen.param_axes(), mesh)
  plain = jax.jit(functools.partial(gen.materialize, shardings=out_sh), out_shardings=out_sh)(
      params["templates"], params["scalers"])
  record = dict(
      model=models.to_record(cfg),
      template_source=dict(workdir=checkpoint.absolute(config.templates), step=int(src_step)),
      scaler_training=dict(heuristic=config.scaler_init, steps=int(config.steps),
                           **({"scalers_from": source.name} if config.scaler_init == "interpolate" else {}),
                           **({"adapt": config.adapt} if "adapt" in config else {}),
                           batch_size=int(config.batch_size),
                           **{k: config[k] for k in ("num_examples", "env", "backend") if k in config},
                           lr=float(config.optim.lr), seed=int(config.seed),
                           **{f"{k.removeprefix('eval_')}_before": v for k, v in before.items()},
                           **{f"{k.removeprefix('eval_')}_after": v for k, v in after.items()}),
      params=counts, **task.export_record(carry))
  # The compact form first: the plain export's export.json marks the target as done.
  compact_dir = epath.Path(tdir) / "compact"
  if compact_dir.exists():  # left by a run that died before the plain export
    compact_dir.rmtree()
  exports.write(str(compact_dir), {"templates": params["templates"], "scalers": params["scalers"]},
                dict(record, tiles=dict(gen.tiles), num_templates=gen.num_templates, form="compact"))
  exports.write(export_dir, plain, record)
  metrics.log(f"[{target.name}] after scaler training: {train_loop.format_eval(after)}; exported to {export_dir}")
  return record["scaler_training"]
