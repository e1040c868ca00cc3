"""The stages that the image benchmarks (classification in init_quality.py, generation in
generation_quality.py) share: pre-training on Fashion-MNIST at one budget (WeiT's templates, a
baseline's auxiliary model, plain models such as the dense source of weight selection), WeiT's
scaler training of every target, and the configs they run with.

Every function takes the family's ``FamilySetup`` (on ``args.setup`` for the stages): no module
holds a current family.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import shutil

import ml_collections

from harness import log, read_json, wall_clock, write_json

IMAGE = dict(image_size=28, channels=1, num_classes=10)  # Fashion-MNIST and MNIST-5k


@dataclasses.dataclass(frozen=True)
class FamilySetup:
  """One model family's benchmark: the auxiliary model of WeiT and TLEG (``config.model`` fields),
  the targets as init-program specs (fields not given come from the auxiliary), the dense source of
  weight selection (the union of the targets), the report's name and the tiles in words."""
  family: str
  auxiliary: dict
  targets: tuple[tuple[str, str], ...]  # (role, spec)
  dense_source: dict
  report: str
  tiles: str
  weit_tiles: tuple | None = None  # configs/<family>_pretrain.tiles(*weit_tiles), if not the config's own
  budget: dict = dataclasses.field(default_factory=dict)  # over the full budget

  @property
  def roles(self) -> list[str]:
    return [role for role, _ in self.targets]


def unlocked(config) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(config.to_dict())


def configs(setup: FamilySetup, program: str):
  """The family's runlocal config module of ``program`` (pretrain, init, train)."""
  return importlib.import_module(f"configs.{setup.family}_{program}")


def data_config(setup: FamilySetup, name: str, budget: dict):
  from configs import common
  from weit_jax import data_catalog, models
  # As the family's configs read it: a generator's data has no pad-and-crop and pixels in [-1, 1].
  generation = "diffusion" in models.get(setup.family).tasks
  d = common.generation_data(name) if generation else data_catalog.default_data_config(name)
  if name == "fashion_mnist_local":
    d.eval_split = budget["fmnist_eval"]
  d.read_threads = 4
  d.prefetch_buffer_size = 256
  return d


def model_fields(setup: FamilySetup, **fields) -> ml_collections.ConfigDict:
  from configs import common
  fields = dict(fields)
  return common.model_config(fields.pop("variant", None), family=setup.family, **fields)


def aux_config(setup: FamilySetup):
  from weit_jax import models
  return models.from_config(model_fields(setup, **setup.auxiliary), IMAGE)


def target_configs(setup: FamilySetup) -> dict:
  """role -> model config, built exactly as programs/init.py builds them (so WeiT's exports match)."""
  from weit_jax import models
  aux = aux_config(setup)
  out = {}
  for role, spec in setup.targets:
    (fields,) = models.parse_targets(spec, models.family_of(aux))
    out[role] = models.target_config(fields, aux)
  return out


def dense_source_config(setup: FamilySetup):
  from weit_jax import models
  return models.from_config(model_fields(setup, **setup.dense_source), IMAGE)


def train_config(setup: FamilySetup, budget: dict, *, dataset: str, steps: int, seed: int, model=None, init=None,
                 eval_every=0, batch_size=None):
  """A configs/<family>_train.py:runlocal config: the same optimizer and schedule for every method."""
  from weit_jax import models
  c = unlocked(configs(setup, "train").get_config("runlocal"))
  if model is not None:
    family = models.family_of(model)
    c.model = model_fields(setup, **{k: getattr(model, k) for k in family.target_fields})
  c.init = init
  c.data = data_config(setup, dataset, budget)
  c.seed = int(seed)
  c.total_steps = int(steps)
  c.batch_size = int(batch_size or budget["batch_size"])
  c.optim.warmup_steps = max(1, int(steps) // 10)
  c.eval_every = int(eval_every)
  c.eval_at = ",".join(str(s) for s in early_evals(budget, eval_every))
  c.log_every = int(eval_every) or max(1, int(steps) // 4)
  c.checkpoint_every = int(steps)  # only the final state (the loop always saves it); runs restart instead
  return c


def early_evals(budget: dict, eval_every: int) -> list[int]:
  """The extra eval steps before the first periodic one: every ``budget['early_every']`` steps (none
  when 0 or absent). A good initialization reaches random init's final accuracy within the first
  eval interval, where the curve rises fastest: a speed-up interpolated between step 0 and that
  eval alone would be a guess."""
  early = int(budget.get("early_every") or 0)
  return list(range(early, int(eval_every), early)) if early and eval_every else []


def draw(args) -> int:
  """Which draw of the pre-training stages: the seed of every pre-training (WeiT's, the baselines',
  the dense source's) and of WeiT's scaler training; 0 unless ``--draw`` says otherwise."""
  return int(getattr(args, "draw", 0) or 0)


def pretrain_config(args, model):
  """``train_config`` for a pre-training run of ``model`` on Fashion-MNIST at the pre-training budget."""
  b = args.budget
  c = train_config(args.setup, b, dataset="fashion_mnist_local", steps=b["pretrain_steps"], seed=draw(args),
                   model=model, batch_size=b["pretrain_batch_size"])
  c.checkpoint_every = max(1, b["pretrain_steps"] // 4)  # long: resumable
  return c


def apply_overrides(config, overrides: dict | None) -> None:
  """Dotted config keys -> values (an ablation's recipe), set in place."""
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value


# ---------------------------------------------------------------------------------------------------
# Stage 1: pre-training (same data, same steps, same batch)
# ---------------------------------------------------------------------------------------------------

def pretrain_dir(args, name: str) -> str:
  """Pre-training folders are keyed by their budget (a new budget never resumes an old run) and draw."""
  b = args.budget
  return os.path.join(args.workdir, "pretrain", f"{name}_P{b['pretrain_steps']}xB{b['pretrain_batch_size']}"
                      + (f"_draw{draw(args)}" if draw(args) else ""))


def done(path: str, steps: int) -> dict | None:
  """The cached record at ``path`` if it ran ``steps`` steps."""
  record = read_json(path)
  return record if record and record.get("steps") == steps else None


def pretrain_weit(args, variant: str = "", overrides: dict | None = None) -> dict:
  """WeiT's template pre-training with the family's runlocal recipe; ``variant`` (a folder name
  suffix) with ``overrides`` (dotted config keys -> values) for an ablation of that recipe."""
  from weit_jax.programs import pretrain
  setup, b = args.setup, args.budget
  c = unlocked(configs(setup, "pretrain").get_config("runlocal"))
  c.model = model_fields(setup, **setup.auxiliary)
  if setup.weit_tiles:
    c.weit.tiles = configs(setup, "pretrain").tiles(*setup.weit_tiles)
  c.seed = draw(args)
  apply_overrides(c, overrides)
  # Keyed by the recipe too: a changed default never reuses templates of the old one.
  # weit.extra_sizes off ('') is the recipe of templates made before the option existed: same key.
  weit = {k: v for k, v in c.weit.to_dict().items() if not (k == "extra_sizes" and not v)}
  recipe = hashlib.sha1(json.dumps([weit, c.constraint.to_dict()], sort_keys=True).encode()).hexdigest()[:6]
  workdir = pretrain_dir(args, "weit" + (f"-{variant}" if variant else "") + f"-{recipe}")
  record_path = os.path.join(workdir, "bench.json")
  if (r := done(record_path, b["pretrain_steps"])):
    return r
  c.data = data_config(setup, "fashion_mnist_local", b)
  c.total_steps, c.batch_size = b["pretrain_steps"], b["pretrain_batch_size"]
  c.optim.warmup_steps = min(c.optim.warmup_steps, max(1, b["pretrain_steps"] // 10))
  c.eval_every, c.log_every = 0, max(1, b["pretrain_steps"] // 10)
  c.checkpoint_every = max(1, b["pretrain_steps"] // 4)
  aux = aux_config(setup)
  log(f"pre-training WeiT templates ({aux.short_name()}, {b['pretrain_steps']} steps) in {workdir}")
  summary, wall = wall_clock(pretrain.run, c, workdir)
  return write_json(record_path, dict(
      method="weit", model=aux.short_name(), steps=b["pretrain_steps"], workdir=workdir,
      eval_accuracy=summary.get("eval_accuracy"), eval_loss=summary.get("eval_loss"), wall_s=round(wall, 1),
      lr=c.optim.lr, weit=c.weit.to_dict(), constraint=c.constraint.to_dict(),
      params=dict(templates=summary.get("templates_params"), scalers=summary.get("scalers_params"))))


def pretrain_baseline(args, method: str) -> dict:
  """The auxiliary model of a baseline's own pre-training (``programs/baseline_pretrain.py``: TLEG,
  FINE): the auxiliary's size, the same data, steps and optimizer."""
  from configs import baseline_pretrain as baseline_config
  from weit_jax.programs import baseline_pretrain
  b = args.budget
  workdir = pretrain_dir(args, method)
  record_path = os.path.join(workdir, "bench.json")
  if (r := done(record_path, b["pretrain_steps"])):
    return r
  aux = aux_config(args.setup)
  c = pretrain_config(args, aux)
  log(f"pre-training the {method.upper()} auxiliary model ({aux.short_name()}, {b['pretrain_steps']} steps) "
      f"in {workdir}")
  summary, wall = wall_clock(baseline_pretrain.run, baseline_config.from_train_config(c, method), workdir)
  return write_json(record_path, dict(
      method=method, model=aux.short_name(), steps=b["pretrain_steps"], workdir=workdir,
      export=baseline_pretrain.export_dir(workdir), eval_accuracy=summary.get("eval_accuracy"),
      eval_loss=summary.get("eval_loss"), wall_s=round(wall, 1), lr=c.optim.lr))


def pretrain_plain(args, name: str, cfg, what: str, *, export_name: str, init: str, configure=None,
                   **record) -> dict:
  """``cfg`` trained from random init by ``programs/train.py`` (the dense source of weight
  selection, an unconstrained auxiliary), exported to ``export_name`` in its folder (``init``: the
  export's init). ``configure``: changes to the train config; ``record``: bench.json's first fields."""
  from weit_jax import exports, models
  from weit_jax.inits import common
  from weit_jax.programs import train
  b = args.budget
  workdir = pretrain_dir(args, name)
  record_path = os.path.join(workdir, "bench.json")
  if (r := done(record_path, b["pretrain_steps"])):
    return r
  c = pretrain_config(args, cfg)
  if configure:
    configure(c)
  log(f"pre-training {what} {cfg.short_name()} ({b['pretrain_steps']} steps) in {workdir}")
  summary, wall = wall_clock(train.run, c, workdir)
  export = os.path.join(workdir, export_name)
  if os.path.exists(export):
    shutil.rmtree(export)
  exports.write(export, common.to_numpy(summary["params"]),
                dict(model=models.to_record(cfg), init=init, steps=b["pretrain_steps"]))
  return write_json(record_path, dict(
      record, model=cfg.short_name(), steps=b["pretrain_steps"], workdir=workdir, export=export,
      eval_accuracy=summary.get("eval_accuracy"), eval_loss=summary.get("eval_loss"), wall_s=round(wall, 1),
      lr=c.optim.lr))


def pretrain_dense(args) -> dict:
  """The dense source of weight selection: as large as the largest target along every axis."""
  return pretrain_plain(args, "dense", dense_source_config(args.setup), "the dense source", export_name="export",
                        init="dense_source", method="weight_selection")


def pretrain_target(args, role: str) -> dict:
  """The target ``role`` itself trained from random init at the pre-training budget: the reference an
  initializer of other sizes is measured against (what paying a pre-training per size would give)."""
  cfg = target_configs(args.setup)[role]
  return pretrain_plain(args, f"target-{role}", cfg, f"the {role} target itself", export_name="export",
                        init="pretrained_target", method="pretrained", role=role)


def extract_weit(args, dense: dict, num_templates: int | None = None) -> dict:
  """WeiT's templates extracted in closed form from the dense source of weight selection
  (``programs/pretrain.py`` with ``init_templates_from`` and ``total_steps=0``: no training step): a
  templates workdir at step 0 with the family's runlocal tiles and N (or ``num_templates``). Its
  record has the reconstruction error per bank and the eval accuracy of the dense source composed
  from the extracted templates and scalers."""
  from weit_jax.programs import pretrain
  setup, b = args.setup, args.budget
  c = unlocked(configs(setup, "pretrain").get_config("runlocal"))
  c.model = model_fields(setup)  # every size from the dense source's export
  if setup.weit_tiles:
    c.weit.tiles = configs(setup, "pretrain").tiles(*setup.weit_tiles)
  if num_templates:
    c.weit.num_templates = int(num_templates)
  n = int(c.weit.num_templates)
  recipe = hashlib.sha1(json.dumps(c.weit.to_dict(), sort_keys=True).encode()).hexdigest()[:6]
  workdir = pretrain_dir(args, f"dense-extracted-N{n}-{recipe}")
  record_path = os.path.join(workdir, "bench.json")
  if (r := done(record_path, 0)):
    return r
  c.init_templates_from = dense["export"]
  c.data = data_config(setup, "fashion_mnist_local", b)
  c.total_steps, c.batch_size = 0, b["pretrain_batch_size"]
  c.eval_every, c.log_every, c.checkpoint_every = 0, 1, 1
  log(f"extracting N={n} templates from the dense source {dense['model']} in {workdir}")
  summary, wall = wall_clock(pretrain.run, c, workdir)
  errors = summary["template_source"]["reconstruction_error"]
  return write_json(record_path, dict(
      method="weit_extracted", model=dense["model"], steps=0, templates_step=0, workdir=workdir, num_templates=n,
      source=dense["export"], eval_accuracy=summary.get("eval_accuracy"), eval_loss=summary.get("eval_loss"),
      reconstruction_error=dict(mean=float(sum(errors.values()) / len(errors)), max=max(errors.values()),
                                per_bank=errors),
      wall_s=round(wall, 1), params=dict(templates=summary.get("templates_params"),
                                         scalers=summary.get("scalers_params"))))


def full_spec(cfg) -> str:
  """An init-program target spec that names every size field of ``cfg``: the same target from
  templates of any auxiliary (a spec that names only some fields takes the rest from the templates')."""
  from weit_jax import models
  parts = []
  for name in models.family_of(cfg).target_fields:
    value = getattr(cfg, name)
    if value is not None:
      parts.append(f"{name}={'-'.join(map(str, value)) if isinstance(value, (tuple, list)) else value}")
  return ",".join(parts)


def init_weit(args, weit_pretrain: dict, roles: list[str] | None = None, overrides: dict | None = None) -> dict:
  """programs/init.py for every target (or ``roles``): role -> {export, accuracy before/after, wall};
  ``overrides``: init config fields (e.g. ``{'optim.lr': 1e-2}``, ``{'steps': 10}``) for an
  ablation, over the budget's scaler steps and examples. Templates of another model than the
  auxiliary (``extract_weit``'s, at step 0) get every target in full."""
  from weit_jax import exports
  from weit_jax.programs import init as init_program
  setup, b = args.setup, args.budget
  chosen = [(role, spec) for role, spec in setup.targets if roles is None or role in roles]
  c = unlocked(configs(setup, "init").get_config("runlocal"))
  c.steps, c.num_examples, c.batch_size = b["init_steps"], b["init_examples"], b["pretrain_batch_size"]
  c.seed = draw(args)  # (the workdir is the templates' own, so it is keyed by the draw)
  apply_overrides(c, overrides)
  # Keyed by what differs from the default: steps, examples, lr by value, any other override by a hash.
  other = {k: v for k, v in (overrides or {}).items() if k not in ("steps", "num_examples", "optim.lr")}
  every = (weit_pretrain["workdir"] + f"_init_S{c.steps}xE{c.num_examples}_lr{c.optim.lr:g}"
           + (f"_{hashlib.sha1(json.dumps(other, sort_keys=True).encode()).hexdigest()[:6]}" if other else ""))
  workdir = every + ("" if roles is None else "_" + "-".join(role for role, _ in chosen))
  record_path = os.path.join(workdir, "bench.json")
  if (r := read_json(record_path) or read_json(os.path.join(every, "bench.json"))):  # every target's serves a subset
    return r
  c.templates = weit_pretrain["workdir"]
  c.templates_step = weit_pretrain.get("templates_step", b["pretrain_steps"])
  if weit_pretrain["model"] == aux_config(setup).short_name():
    c.targets = ";".join(spec for _, spec in chosen)
  else:
    c.targets = ";".join(full_spec(target_configs(setup)[role]) for role, _ in chosen)
  c.optim.warmup_steps = min(c.optim.warmup_steps, max(1, c.steps // 10))
  c.log_every = max(1, c.steps // 4)
  c.checkpoint_every = max(1, c.steps)
  log(f"WeiT init of {len(chosen)} targets ({c.steps} scaler-training steps each) in {workdir}")
  _, wall = wall_clock(init_program.run, c, workdir)
  out = {}
  for role, cfg in target_configs(setup).items():
    if role not in dict(chosen):
      continue
    export = os.path.join(workdir, cfg.short_name(), "export")
    st = exports.read_meta(export)["scaler_training"]
    out[role] = dict(export=export, **{k: st.get(k) for k in ("accuracy_before", "accuracy_after", "loss_before",
                                                              "loss_after", "scalers_from")})
  return write_json(record_path, dict(targets=out, wall_s=round(wall, 1), steps=c.steps,
                                      num_examples=c.num_examples, batch_size=c.batch_size, lr=c.optim.lr))


# ---------------------------------------------------------------------------------------------------
# Downstream: which method initializes which target, from what
# ---------------------------------------------------------------------------------------------------

def applies(setup: FamilySetup, method: str, target, sources: dict) -> str | None:
  """None if ``method`` can initialize ``target``; otherwise why not (the table says N/A)."""
  from weit_jax.inits import fine, mimetic, tleg, weight_selection
  try:
    if method == "mimetic":
      mimetic.check_target(target)
    elif method == "fine":
      fine.check_sizes(aux_config(setup), target)
    elif method == "weight_selection":
      weight_selection.check_sizes(sources["dense_config"], target)
    elif method == "tleg":
      tleg.check_sizes(aux_config(setup), target)
  except ValueError as e:
    return str(e).split(";")[0]
  return None


# Methods that are another method's initializer from another source (the rest: their own name).
INITIALIZERS = {"weit_extracted": "weit",  # the init program's exports, from templates extracted in closed form
                "pretrained": "weit"}  # an export folder of the target's own model, loaded as it is


def source_for(method: str, role: str, sources: dict):
  return {"random": None, "mimetic": None, "weit": (sources.get("weit") or {}).get(role),
          "weit_extracted": (sources.get("weit_extracted") or {}).get(role),
          "weight_selection": sources.get("dense"), "tleg": sources.get("tleg"),
          "fine": (sources.get("fine") or {}).get(role),
          "pretrained": (sources.get("pretrained") or {}).get(role)}[method]


def benchmark_roles(args) -> list[str] | None:
  """The targets a benchmark runs (its ``--roles``), or None for every target of the family: WeiT's
  scaler training then trains only those."""
  roles = list(getattr(args, "roles", None) or [])
  return None if not roles or set(roles) == set(args.setup.roles) else roles


def pretrain_sources(args, stages: dict) -> dict:
  """Stages 1-2 for the methods of ``args.methods`` that need them (records into ``stages``); the
  sources the downstream runs start from."""
  from weit_jax import inits
  sources: dict = {"dense_config": dense_source_config(args.setup)}
  if "weit" in args.methods:
    stages["pretrain"]["weit"] = pretrain_weit(args)
    stages["init"] = init_weit(args, stages["pretrain"]["weit"], roles=benchmark_roles(args))
    sources["weit"] = {role: r["export"] for role, r in stages["init"]["targets"].items()}
  if "tleg" in args.methods:
    stages["pretrain"]["tleg"] = pretrain_baseline(args, "tleg")
    sources["tleg"] = inits.TLEGSource.from_export(stages["pretrain"]["tleg"]["export"])
  if "weight_selection" in args.methods or "weit_extracted" in args.methods:
    stages["pretrain"]["dense"] = pretrain_dense(args)
  if "weight_selection" in args.methods:
    sources["dense"] = inits.DenseSource.from_export(stages["pretrain"]["dense"]["export"])
  if "weit_extracted" in args.methods:  # templates of the same dense model, in closed form, then scaler training
    stages["extracted"] = extract_weit(args, stages["pretrain"]["dense"])
    stages["init_extracted"] = init_weit(args, stages["extracted"], roles=benchmark_roles(args))
    sources["weit_extracted"] = {role: r["export"] for role, r in stages["init_extracted"]["targets"].items()}
  if "pretrained" in args.methods:  # the reference: every target pre-trained itself
    roles = benchmark_roles(args) or args.setup.roles
    for role in roles:
      stages["pretrain"][f"target-{role}"] = pretrain_target(args, role)
    sources["pretrained"] = {role: stages["pretrain"][f"target-{role}"]["export"] for role in roles}
  return sources
