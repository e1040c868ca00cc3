"""Stage 1: constraint-based pre-training of weight templates (docs/design.md sections 1 and 4).

The trainable tree is ``{'templates', 'scalers'}`` (``hard``) or ``{'dense', 'templates',
'scalers'}`` (``soft``); the model (any family of ``weit_jax.models``, ``config.model.family``) is
applied to ``materialize(templates, scalers)`` (or to ``dense``), and trained for the task of
``weit_jax.tasks`` (``config.task``). Optional, for classification: distillation from a teacher
export; and templates extracted in closed form from a dense checkpoint as the starting point.

Templates from a checkpoint one already has (``init_templates_from``: a big_vision ``.npz`` or an
export folder of any family; ``weit_jax/dense_checkpoint.py``): the model fields ``config.model``
leaves unset are read from it (``configs/vit_pretrain.py:from_checkpoint`` leaves the sizes unset),
the checkpoint is checked against that model before anything is written, and the templates and the
source's scalers are extracted in closed form. With ``total_steps=0`` the run saves them as its step
0 without training: a workdir the init program takes like any pre-training workdir; a positive
``total_steps`` fine-tunes them under the constraint. ``summary.json`` records the source, how each
parameter came from it and the relative reconstruction error per bank (``template_source``).

Multi-size pre-training (``weit.extra_sizes``): every step also trains other sizes composed from the
same templates, each with scalers of its own (``params['extra_scalers'][name]``), on the same batch;
the loss is the mean over all sizes. The templates are then trained to serve several sizes, not one,
and the init program starts each target from the scalers of the trained size nearest to it.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np

from weit_jax import (checkpoint, config_checks, dense_checkpoint, distributed, exports, extract, generator, losses,
                      metrics, models, optim, sharding, tasks, train_loop, workdir_lock)

MODES = ("hard", "soft")


@dataclasses.dataclass
class Size:
  """One model size composed from the templates: the auxiliary, or one of ``weit.extra_sizes``."""
  name: str
  model_config: object
  model: nn.Module
  gen: generator.WeightGenerator


@dataclasses.dataclass
class Setup:
  """Everything static about a pre-training config: built and validated before anything compiles."""
  model_config: object  # the auxiliary model's config (any family)
  model: nn.Module
  gen: generator.WeightGenerator
  task: tasks.Task
  extra: tuple[Size, ...] = ()  # weit.extra_sizes, trained with the auxiliary (own scalers each)

  def sizes(self, params: dict) -> list[tuple[Size, dict]]:
    """Every trained size with its scalers in ``params``, the auxiliary first."""
    auxiliary = Size(self.model_config.short_name(), self.model_config, self.model, self.gen)
    return [(auxiliary, params["scalers"])] + [(s, params["extra_scalers"][s.name]) for s in self.extra]


def build(config) -> Setup:
  if config.constraint.mode not in MODES:
    raise ValueError(f"constraint.mode={config.constraint.mode!r}; use one of {MODES}.")
  task = tasks.from_config(config)
  optim.schedule(optim.with_total_steps(config.optim, task.optimizer_steps(config.total_steps)))  # validates it
  cfg = tasks.model_config(config)
  model = models.build(cfg)
  make_gen = lambda whole=None: generator.WeightGenerator.from_model(
      model, *models.dummy_inputs(cfg), tiles=dict(config.weit.tiles), num_templates=int(config.weit.num_templates),
      whole=whole)
  gen = make_gen()
  if config.weit.get("zero_init", "ones") not in generator.ZERO_INITS:
    raise ValueError(f"weit.zero_init={config.weit.zero_init!r}; use one of {generator.ZERO_INITS}.")
  if config.weit.get("untemplated"):  # embeddings, norms, heads trained as ordinary parameters
    gen = make_gen(gen.whole_banks(config.weit.untemplated))
  if config.batch_size % jax.process_count():
    raise ValueError(f"batch_size={config.batch_size} must be divisible by the {jax.process_count()} processes.")
  return Setup(cfg, model, gen, task, extra_sizes(config, cfg, gen, task))


def extra_sizes(config, cfg, gen: generator.WeightGenerator, task: tasks.Task) -> tuple[Size, ...]:
  """``weit.extra_sizes`` ('depth=6,width=96,heads=3;depth=2', fields over the auxiliary's, as the init
  program's targets): their models and generators, checked against the auxiliary's templates."""
  spec = config.weit.get("extra_sizes", "")
  if not spec:
    return ()
  if config.constraint.mode != "hard":
    raise ValueError("weit.extra_sizes needs constraint.mode='hard' (the soft constraint ties one dense model to "
                     "the templates); set --config.weit.extra_sizes=''.")
  if task.collects_experience:
    raise ValueError(f"weit.extra_sizes is for tasks trained on a dataset; the {config.task!r} task collects its own "
                     "experience with the model it trains. Set --config.weit.extra_sizes=''.")
  family = models.family_of(cfg)
  out, names = [], {cfg.short_name()}
  for fields in models.parse_targets(spec, family):
    size_cfg = models.target_config(fields, cfg)
    name = size_cfg.short_name()
    if name in names:
      raise ValueError(f"weit.extra_sizes={spec!r} repeats the size {name} (the auxiliary is {cfg.short_name()}).")
    names.add(name)
    model = models.build(size_cfg)
    size_gen = generator.WeightGenerator.from_model(
        model, *models.dummy_inputs(size_cfg), tiles=dict(gen.tiles), num_templates=gen.num_templates,
        whole=gen.whole_shapes())
    try:
      size_gen.check_templates(gen.template_shapes())
    except ValueError as e:
      raise ValueError(f"weit.extra_sizes: size {name} cannot share the auxiliary's templates: {e}") from None
    out.append(Size(name, size_cfg, model, size_gen))
  return tuple(out)


def make_task(config, setup: Setup, *, teacher=None) -> train_loop.Task:
  """The pre-training task. ``teacher``: (model module, its params) for distillation, or None."""
  model, gen, task = setup.model, setup.gen, setup.task
  soft = config.constraint.mode == "soft"
  stats = generator.param_stats(model, *models.dummy_inputs(setup.model_config))

  zero_init = config.weit.get("zero_init", "ones")
  extra_stats = [generator.param_stats(s.model, *models.dummy_inputs(s.model_config)) for s in setup.extra]

  def init_params(key):
    k_gen, k_dense, k_extra = jax.random.split(key, 3)
    templates, scalers = gen.init(k_gen, stats, zero_init=zero_init)
    params = {"templates": templates, "scalers": scalers}
    if setup.extra:  # each size's scalers give its own initial weight scale over the same templates
      params["extra_scalers"] = {s.name: s.gen.init(k, st, zero_init=zero_init)[1] for s, st, k in zip(
          setup.extra, extra_stats, jax.random.split(k_extra, len(setup.extra)))}
    if soft:
      params["dense"] = nn.unbox(model.init(k_dense, *models.dummy_inputs(setup.model_config)))["params"]
    if teacher is not None:
      params["teacher"] = teacher[1]
    return params

  axes = {"templates": gen.template_axes(), "scalers": gen.scaler_axes()}
  if setup.extra:
    axes["extra_scalers"] = {s.name: s.gen.scaler_axes() for s in setup.extra}
  if soft:
    axes["dense"] = gen.param_axes()
  if teacher is not None:
    axes["teacher"] = jax.tree_util.tree_map(lambda _: jax.sharding.PartitionSpec(), teacher[1])

  def forward(params, *inputs):
    weights = params["dense"] if soft else gen.materialize(params["templates"], params["scalers"])
    return model.apply({"params": weights}, *inputs)

  def loss_fn(params, batch, key):
    inputs = task.inputs(batch, key)
    outputs = forward(params, *inputs)
    objective, aux = task.loss(outputs, batch, key)
    loss, aux = objective, dict(aux, objective=objective)
    for size in setup.extra:  # the same inputs through each extra size; the mean over sizes
      weights = size.gen.materialize(params["templates"], params["extra_scalers"][size.name])
      aux[f"objective_{size.name}"], _ = task.loss(size.model.apply({"params": weights}, *inputs), batch, key)
      loss = loss + aux[f"objective_{size.name}"]
    loss = loss / (1 + len(setup.extra))
    if teacher is not None and config.distill.weight:
      t_outputs = teacher[0].apply({"params": jax.lax.stop_gradient(params["teacher"])}, *inputs)
      kd = task.teacher_loss(outputs, t_outputs, config.distill.temperature)
      loss, aux["distill"] = loss + config.distill.weight * kd, kd
    if config.constraint.diversity:
      div = losses.template_diversity(params["templates"])
      loss, aux["diversity"] = loss + config.constraint.diversity * div, div
    if soft:
      pen = losses.soft_constraint(params["dense"], gen.materialize(params["templates"], params["scalers"]))
      loss, aux["constraint"] = loss + config.constraint.soft_lambda * pen, pen
    return loss, aux

  optim_config = optim.with_total_steps(config.optim, task.optimizer_steps(config.total_steps))
  abstract = jax.eval_shape(init_params, jax.random.key(0))
  tx = optim.make_optimizer(
      optim_config, abstract,
      weight_decay={"templates": config.constraint.template_wd, "scalers": config.constraint.scaler_wd,
                    **({"extra_scalers": config.constraint.scaler_wd} if setup.extra else {}),
                    "dense": config.constraint.dense_wd if soft else 0.0},
      frozen="^teacher/" if teacher is not None else None)
  return train_loop.Task(init_params=init_params, param_axes=axes, loss_fn=loss_fn,
                         eval_fn=task.eval_fn(forward), optimizer=tx, lr_schedule=optim.schedule(optim_config),
                         experience=task.experience(forward))


def check_teacher(config) -> None:
  """Refuses a distillation setting that cannot work (reads only the teacher's export record).
  Configs of tasks without distillation (diffusion, control) have no ``distill`` section."""
  if not config.get("distill") or not config.distill.teacher:
    if config.get("distill") and config.distill.weight:
      raise ValueError("distill.weight is set but distill.teacher is not; give a plain-model export folder.")
    return
  tasks.from_config(config).check_teacher()
  exports.read_meta(config.distill.teacher)


def load_teacher(config):
  check_teacher(config)
  if not config.get("distill") or not config.distill.teacher:
    return None
  t_cfg = models.from_record(exports.read_meta(config.distill.teacher)["model"])
  return models.build(t_cfg), exports.load_params(config.distill.teacher)


def with_source(config):
  """``(config, source)``: without ``init_templates_from``, ``(config, None)``; with it, the checkpoint
  (``dense_checkpoint.read``) and a copy of ``config`` whose model fields left unset are the
  checkpoint's (``dense_checkpoint.model_fields``). That copy is what the run records, so its
  workdir rebuilds its model without the checkpoint."""
  if not config.get("init_templates_from"):
    return config, None
  family = models.family_named_in(config.model)
  source = dense_checkpoint.read(config.init_templates_from, family)
  fields = dense_checkpoint.model_fields(config.model.to_dict(), source)
  out = config.copy_and_resolve_references()
  for name, value in fields.items():
    if out.model.get(name) is None and value is not None:
      out.model[name] = "-".join(map(str, value)) if isinstance(value, (tuple, list)) else value
  return out, source


def initial_params_from_dense(config, setup: Setup, task: train_loop.Task,
                              source: dense_checkpoint.Source | None = None) -> tuple[dict, dict]:
  """Closed-form templates (Van Loan-Pitsianis + truncated SVD) of a dense checkpoint
  (``init_templates_from``, or ``source`` already read), fitted to the auxiliary's shapes first
  (``dense_checkpoint.adapt``). Returns the initial trainable tree (``soft``: the dense weights too)
  and the record of where the templates came from."""
  if source is None:
    source = dense_checkpoint.read(config.init_templates_from, models.family_of(setup.model_config))
  dense, handling = dense_checkpoint.adapt(source, setup.gen, setup.model_config, seed=int(config.seed))
  templates, scalers, errors = extract.extract_templates(setup.gen, dense)
  metrics.log(f"Templates extracted from {config.init_templates_from} ({source.form}); relative reconstruction "
              "error per bank:")
  for path, err in sorted(errors.items()):
    metrics.log(f"  {path:70s} {err:.4f}")
  for path, how in sorted(handling.items()):
    if how != dense_checkpoint.COPIED:
      metrics.log(f"  {path}: {how}")
  key = jax.random.key(int(config.seed))
  others = set(jax.eval_shape(task.init_params, key)) - {"templates", "scalers"}  # extra sizes' scalers, ...
  params = jax.device_get(jax.jit(task.init_params)(key)) if others else {}
  params["templates"], params["scalers"] = templates, scalers
  if "dense" in params:  # the soft constraint's free weights start as the checkpoint's
    params["dense"] = dense
  record = dict(source.describe(), num_templates=setup.gen.num_templates, tiles=dict(setup.gen.tiles),
                parameters=handling, reconstruction_error=errors)
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params), record


@dataclasses.dataclass
class Validated:
  """What ``validate`` read and built."""
  config: object  # the config the run records (model fields completed from init_templates_from)
  setup: Setup
  mesh: jax.sharding.Mesh
  source: dense_checkpoint.Source | None  # the checkpoint of init_templates_from, read
  handling: dict[str, str] | None  # how each parameter comes from it (dense_checkpoint.plan)


def validate(config, workdir: str) -> Validated:
  """Every check of a pre-training run, before anything compiles or is written to ``workdir``
  (the embedded dataset may be built into its own data_dir); a checkpoint in ``init_templates_from``
  is read whole and checked against the auxiliary model, parameter by parameter."""
  config_checks.check_ranges(config)
  config, source = with_source(config)
  setup = build(config)
  check_teacher(config)
  handling = dense_checkpoint.plan(source, setup.gen, setup.model_config) if source is not None else None
  mesh = sharding.make_mesh(dict(config.mesh))
  distributed.process_batch_rows(mesh, int(config.batch_size))  # the batch splits over the mesh
  setup.task.prepare()
  train_loop.check_workdir(config, workdir)
  return Validated(config, setup, mesh, source, handling)


def run(config, workdir: str) -> dict:
  # ----- validate everything before anything compiles or writes --------------------------------
  checked = validate(config, workdir)
  config, setup, mesh = checked.config, checked.setup, checked.mesh
  teacher = load_teacher(config)
  with workdir_lock.hold(workdir, "pretrain"):  # the first write: refused if another run holds it
    train_loop.guard_workdir(config, workdir)
    counts = setup.gen.counts()
    metrics.log(f"Auxiliary {models.family_of(setup.model_config).name} {setup.model_config.short_name()}: "
                f"{counts['materialized']:,} weights from "
                f"{counts['templates']:,} template and {counts['scalers']:,} scaler parameters "
                f"(N={setup.gen.num_templates}, tiles {setup.gen.tiles}, constraint {config.constraint.mode}).")
    for size in setup.extra:
      metrics.log(f"Also trained from the same templates (weit.extra_sizes): {size.name}, "
                  f"{size.gen.counts()['materialized']:,} weights from {size.gen.counts()['scalers']:,} scalers of its own.")

    # ----- task, data ------------------------------------------------------------------------------
    task = make_task(config, setup, teacher=teacher)
    initial, source = (initial_params_from_dense(config, setup, task, checked.source)
                       if checked.source is not None else (None, None))
    train_iter = setup.task.train_iterator(config.batch_size, config.seed, mesh)
    make_eval_iter = lambda: setup.task.eval_iterator(config.batch_size)

    # ----- train (total_steps=0: the initial templates saved as step 0) ------------------------------
    extra = dict(program="pretrain", **{f"{k}_params": v for k, v in counts.items()},
                 **({"template_source": source} if source is not None else {}))
    summary = train_loop.run(config, workdir, task, mesh=mesh, train_iter=train_iter,
                             make_eval_iter=make_eval_iter, initial_params=initial, summary_extra=extra,
                             title=f"pre-training {setup.model_config.short_name()}")
    return summary


def restore_templates(workdir: str, step: int | None = None):
  """Templates (and the auxiliary scalers) of a pre-training workdir, at ``step`` or the latest:
  ``(config, setup, params, step)`` (``restore_state`` also gives the experience's carry)."""
  config, setup, state, step = restore_state(workdir, step)
  return config, setup, state["params"], step


def restore_state(workdir: str, step: int | None = None):
  """The train state of a pre-training workdir, at ``step`` or the latest, with the experience's
  carry (a control task's observation statistics) as a pytree under ``carry``.

  Rebuilds the run's own abstract state from its recorded config, so nothing about the run has
  to be repeated on the command line.
  """
  import json
  import ml_collections
  from etils import epath
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise ValueError(f"{workdir} is not a pre-training workdir (no config.json); give the --workdir "
                     "that `main.py --config=configs/<family>_pretrain.py` wrote.")
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
  if task.experience is not None:
    state["carry"] = train_loop.carry_of(task, state)
  return config, setup, state, step
