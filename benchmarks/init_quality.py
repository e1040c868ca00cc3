r"""Initialization quality: WeiT against baseline initializers, on targets of several sizes.

  python benchmarks/init_quality.py                  # the full run (~60 min on a 2-core machine alone)
  python benchmarks/init_quality.py --quick          # smoke test: tiny budgets, 1 seed, a few minutes
  python benchmarks/init_quality.py --estimate       # time one step of each size; print the projection

Stages (each cached in ``--workdir``; an interrupted run continues where it stopped):

1. Pre-training, all on Fashion-MNIST (``fashion_mnist_local``) for the same number of steps with
   the same batch size: WeiT templates (``programs/pretrain.py``, the family's auxiliary model), the
   TLEG auxiliary model (``inits/tleg.py``, the same size) and the dense source of weight selection
   (a plain model trained from random init by ``programs/train.py``; as large as the largest target
   along every axis, so weight selection applies to every target).
2. WeiT initialization of every target (``programs/init.py``: frozen templates, scaler training).
3. For every target, method, dataset and seed: an export (``weit_jax.inits``), its eval accuracy
   at step 0, and a fixed training budget with ``programs/train.py`` (eval every k steps).
   Datasets: Fashion-MNIST (the pre-training data: same-dataset setting) and ``mnist_5k`` (5,000 real
   MNIST digits, train 4,000 / test 1,000: the transfer setting; every method gets a new head).
4. ``docs/results/init_quality.{md,json}`` and plots, written from the results only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

METHODS = ("random", "weit", "weight_selection", "tleg", "mimetic")
LABELS = {"random": "random", "weit": "WeiT", "weight_selection": "weight selection", "tleg": "TLEG",
          "mimetic": "mimetic", "fine": "FINE"}
COLORS = {"random": "tab:gray", "weit": "tab:red", "weight_selection": "tab:blue", "tleg": "tab:green",
          "mimetic": "tab:purple", "fine": "tab:orange"}
DATASETS = ("fashion_mnist_local", "mnist_5k")
DATASET_LABELS = {"fashion_mnist_local": "Fashion-MNIST (same dataset)", "mnist_5k": "MNIST-5k (transfer)"}

# Per model family: the auxiliary model of WeiT and TLEG (``config.model`` fields), the targets as
# init-program specs (fields not given come from the auxiliary; a ViT's MLP keeps its ratio 2), the
# dense source of weight selection (the union of the targets), the runlocal configs, the report's
# name and the tiles in words.
SETUPS = {
    "vit": dict(
        auxiliary=dict(variant="pico/4"),  # d3-w64-h2-m128
        targets=(("shallower", "depth=2"),  # d2-w64
                 ("deeper", "depth=6"),  # d6-w64
                 ("narrower", "width=40,heads=2"),  # d3-w40: 40 is not a multiple of the embed tile (16)
                 ("wider", "width=96,heads=3")),  # d3-w96
        dense_source=dict(depth=6, width=96, num_heads=3, mlp_dim=192, patch_size=4),
        report="init_quality",
        tiles="Runlocal tiles are embed 16, mlp 16, heads 1, kv 8: width 40 (and MLP 80) is not a tile multiple."),
    "resnet": dict(
        auxiliary=dict(variant="mu", depth="3"),  # r3-3-3-w8-g4: stages of 8/16/32 bottleneck channels
        targets=(("shallower", "depth=2"),  # r2-2-2-w8
                 ("deeper", "depth=5"),  # r5-5-5-w8
                 ("narrower", "width=6,groups=2"),  # r3-3-3-w6: 6 (and 24, 12, 48, ...) are not tile multiples
                 ("wider", "width=12")),  # r3-3-3-w12
        dense_source=dict(variant="mu", depth="5", width=12),
        report="init_quality_resnet",
        weit_tiles=(3, 4),  # configs/resnet_pretrain.tiles(stages, tile): width 8 is two tiles, as the ViT's 64 is four
        # Convolutions at 14x14 with 8-48 channels run slowly on a CPU: fewer pre-training and
        # downstream steps keep the whole benchmark near an hour on two cores (--estimate says 127 min
        # with the ViT's budget).
        budget=dict(pretrain_steps=600, train_steps=60, eval_every=20),
        tiles="Tiles are stem 4, mid{s} 4, res{s} 16 (conv kernels: both channel axes; the spatial kernel "
              "whole in the template): width 6 (stage channels 6/24, 12/48, 24/96) is not a tile multiple."),
}
FAMILY = "vit"  # set from --family by parse_args


def setup() -> dict:
  return SETUPS[FAMILY]


BUDGETS = {
    # pretrain_*: each pre-training run (WeiT, TLEG, dense source) and WeiT's scaler training;
    # init_*: WeiT's scaler-training steps / examples; train_steps, batch_size: every downstream run,
    # evaluated every `eval_every` steps on `fmnist_eval` (Fashion-MNIST) or the 1,000 MNIST-5k digits.
    "full": dict(pretrain_steps=1000, pretrain_batch_size=128, init_steps=100, init_examples=2000,
                 train_steps=150, batch_size=64, eval_every=25, seeds=3, fmnist_eval="test[:1000]"),
    "quick": dict(pretrain_steps=30, pretrain_batch_size=64, init_steps=5, init_examples=256,
                  train_steps=20, batch_size=32, eval_every=10, seeds=1, fmnist_eval="test[:500]"),
}


# ---------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------

def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default=None, help="cache of every stage (default workdirs/bench, "
                 "workdirs/bench_quick with --quick)")
  p.add_argument("--out", default=None, help="where the report goes (default docs/results; "
                 "WORKDIR/results with --quick, so a smoke test never overwrites the real report)")
  p.add_argument("--family", default="vit", choices=sorted(SETUPS), help="the model family to benchmark")
  p.add_argument("--quick", action="store_true", help="tiny budgets and 1 seed: a smoke test")
  p.add_argument("--estimate", action="store_true", help="time one training step of every size and "
                 "print the projected wall time of the chosen budgets; trains nothing")
  for key, value in BUDGETS["full"].items():
    p.add_argument("--" + key.replace("_", "-"), type=type(value), default=None,
                   help=f"override the budget (full: {value}, quick: {BUDGETS['quick'][key]})")
  p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
  p.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of " + ",".join(DATASETS))
  args = p.parse_args(argv)
  global FAMILY
  FAMILY = args.family
  budget = dict(BUDGETS["quick" if args.quick else "full"])
  if not args.quick:
    budget.update(SETUPS[FAMILY].get("budget", {}))
  for key in budget:
    if getattr(args, key) is not None:
      budget[key] = getattr(args, key)
  args.budget = budget
  default_workdir = os.path.join(ROOT, "workdirs", ("bench_quick" if args.quick else "bench")
                                 + ("" if args.family == "vit" else f"_{args.family}"))
  args.workdir = os.path.abspath(args.workdir or default_workdir)
  args.out = os.path.abspath(args.out or (os.path.join(args.workdir, "results") if args.quick else
                                          os.path.join(ROOT, "docs", "results")))
  args.methods = [m for m in args.methods.split(",") if m]
  args.datasets = [d for d in args.datasets.split(",") if d]
  for m in args.methods:
    if m not in METHODS:
      p.error(f"unknown method {m!r}; valid: {METHODS}")
  if args.family != "vit" and "mimetic" in args.methods:
    args.methods.remove("mimetic")  # sets self-attention weights; reported as N/A
  for d in args.datasets:
    if d not in DATASETS:
      p.error(f"unknown dataset {d!r}; valid: {DATASETS}")
  if "random" not in args.methods:
    p.error("the speed-up is measured against random init: keep 'random' in --methods")
  if budget["train_steps"] % budget["eval_every"]:
    p.error(f"--train-steps={budget['train_steps']} must be a multiple of --eval-every={budget['eval_every']}")
  return args


def enable_compilation_cache(workdir: str) -> None:
  """Every run of one target compiles the same step: keep the executables on disk across runs."""
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def log(msg: str) -> None:
  print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def unlocked(config) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(config.to_dict())


def data_config(name: str, budget: dict):
  from configs import common
  from weit_jax import data_catalog, models
  # As the family's configs read it: a generator's data has no pad-and-crop and pixels in [-1, 1].
  generation = "diffusion" in models.get(FAMILY).tasks
  d = common.generation_data(name) if generation else data_catalog.default_data_config(name)
  if name == "fashion_mnist_local":
    d.eval_split = budget["fmnist_eval"]
  d.read_threads = 4
  d.prefetch_buffer_size = 256
  return d


def configs(program: str):
  """The family's runlocal config module of ``program`` (pretrain, init, train)."""
  import importlib
  return importlib.import_module(f"configs.{FAMILY}_{program}")


def model_fields(**fields) -> ml_collections.ConfigDict:
  from configs import common
  fields = dict(fields)
  return common.model_config(fields.pop("variant", None), family=FAMILY, **fields)


def aux_config():
  from weit_jax import models
  return models.from_config(model_fields(**setup()["auxiliary"]), dict(image_size=28, channels=1, num_classes=10))


def target_configs() -> dict:
  """role -> model config, built exactly as programs/init.py builds them (so WeiT's exports match)."""
  from weit_jax import models
  aux = aux_config()
  out = {}
  for role, spec in setup()["targets"]:
    (fields,) = models.parse_targets(spec, models.family_of(aux))
    out[role] = models.target_config(fields, aux)
  return out


def dense_source_config():
  from weit_jax import models
  return models.from_config(model_fields(**setup()["dense_source"]), dict(image_size=28, channels=1, num_classes=10))


def train_config(budget: dict, *, dataset: str, steps: int, seed: int, model=None, init=None, eval_every=0,
                 batch_size=None):
  """A configs/<family>_train.py:runlocal config: the same optimizer and schedule for every method."""
  from weit_jax import models
  c = unlocked(configs("train").get_config("runlocal"))
  if model is not None:
    family = models.family_of(model)
    c.model = model_fields(**{k: getattr(model, k) for k in family.target_fields})
  c.init = init
  c.data = data_config(dataset, budget)
  c.seed = int(seed)
  c.total_steps = int(steps)
  c.batch_size = int(batch_size or budget["batch_size"])
  c.optim.warmup_steps = max(1, int(steps) // 10)
  c.eval_every = int(eval_every)
  c.log_every = int(eval_every) or max(1, int(steps) // 4)
  c.checkpoint_every = int(steps)  # only the final state (the loop always saves it); runs restart instead
  return c


def apply_overrides(config, overrides: dict | None) -> None:
  """Dotted config keys -> values (an ablation's recipe), set in place."""
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value


def wall_clock(fn, *args, **kwargs):
  t0 = time.time()
  out = fn(*args, **kwargs)
  return out, time.time() - t0


# ---------------------------------------------------------------------------------------------------
# Stage 1: pre-training (same data, same steps, same batch)
# ---------------------------------------------------------------------------------------------------

def pretrain_dir(args, name: str) -> str:
  """Pre-training folders are keyed by their budget: a new budget never resumes an old run."""
  b = args.budget
  return os.path.join(args.workdir, "pretrain", f"{name}_P{b['pretrain_steps']}xB{b['pretrain_batch_size']}")


def _done(path: str, steps: int) -> dict | None:
  if os.path.exists(path):
    record = json.load(open(path))
    if record.get("steps") == steps:
      return record
  return None


def pretrain_weit(args, variant: str = "", overrides: dict | None = None) -> dict:
  """WeiT's template pre-training with the family's runlocal recipe; ``variant`` (a folder name
  suffix) with ``overrides`` (dotted config keys -> values) for an ablation of that recipe."""
  import hashlib
  from weit_jax.programs import pretrain
  b = args.budget
  c = unlocked(configs("pretrain").get_config("runlocal"))
  c.model = model_fields(**setup()["auxiliary"])
  if "weit_tiles" in setup():
    c.weit.tiles = configs("pretrain").tiles(*setup()["weit_tiles"])
  apply_overrides(c, overrides)
  # Keyed by the recipe too: a changed default never reuses templates of the old one.
  # weit.extra_sizes off ('') is the recipe of templates made before the option existed: same key.
  weit = {k: v for k, v in c.weit.to_dict().items() if not (k == "extra_sizes" and not v)}
  recipe = hashlib.sha1(json.dumps([weit, c.constraint.to_dict()], sort_keys=True).encode()).hexdigest()[:6]
  workdir = pretrain_dir(args, "weit" + (f"-{variant}" if variant else "") + f"-{recipe}")
  record_path = os.path.join(workdir, "bench.json")
  if (r := _done(record_path, b["pretrain_steps"])):
    return r
  c.data = data_config("fashion_mnist_local", b)
  c.total_steps, c.batch_size = b["pretrain_steps"], b["pretrain_batch_size"]
  c.optim.warmup_steps = min(c.optim.warmup_steps, max(1, b["pretrain_steps"] // 10))
  c.eval_every, c.log_every = 0, max(1, b["pretrain_steps"] // 10)
  c.checkpoint_every = max(1, b["pretrain_steps"] // 4)
  log(f"pre-training WeiT templates ({aux_config().short_name()}, {b['pretrain_steps']} steps) in {workdir}")
  summary, wall = wall_clock(pretrain.run, c, workdir)
  record = dict(method="weit", model=aux_config().short_name(), steps=b["pretrain_steps"], workdir=workdir,
                eval_accuracy=summary.get("eval_accuracy"), eval_loss=summary.get("eval_loss"), wall_s=round(wall, 1), lr=c.optim.lr,
                weit=c.weit.to_dict(), constraint=c.constraint.to_dict(),
                params=dict(templates=summary.get("templates_params"), scalers=summary.get("scalers_params")))
  json.dump(record, open(record_path, "w"), indent=2)
  return record


def pretrain_tleg(args) -> dict:
  from weit_jax.programs import baseline_pretrain
  b = args.budget
  workdir = pretrain_dir(args, "tleg")
  record_path = os.path.join(workdir, "bench.json")
  if (r := _done(record_path, b["pretrain_steps"])):
    return r
  c = train_config(b, dataset="fashion_mnist_local", steps=b["pretrain_steps"], seed=0, model=aux_config(),
                   batch_size=b["pretrain_batch_size"])
  c.checkpoint_every = max(1, b["pretrain_steps"] // 4)  # long: resumable
  log(f"pre-training the TLEG auxiliary model ({aux_config().short_name()}, {b['pretrain_steps']} steps) in {workdir}")
  summary, wall = wall_clock(baseline_pretrain.run, baseline_pretrain.for_baseline(c, "tleg"), workdir)
  record = dict(method="tleg", model=aux_config().short_name(), steps=b["pretrain_steps"], workdir=workdir,
                export=baseline_pretrain.export_dir(workdir), eval_accuracy=summary.get("eval_accuracy"), eval_loss=summary.get("eval_loss"), wall_s=round(wall, 1),
                lr=c.optim.lr)
  json.dump(record, open(record_path, "w"), indent=2)
  return record


def pretrain_dense(args) -> dict:
  from weit_jax import exports, models
  from weit_jax.inits import common
  from weit_jax.programs import train
  b = args.budget
  workdir = pretrain_dir(args, "dense")
  record_path = os.path.join(workdir, "bench.json")
  if (r := _done(record_path, b["pretrain_steps"])):
    return r
  cfg = dense_source_config()
  c = train_config(b, dataset="fashion_mnist_local", steps=b["pretrain_steps"], seed=0, model=cfg,
                   batch_size=b["pretrain_batch_size"])
  c.checkpoint_every = max(1, b["pretrain_steps"] // 4)  # long: resumable
  log(f"pre-training the dense source {cfg.short_name()} ({b['pretrain_steps']} steps) in {workdir}")
  summary, wall = wall_clock(train.run, c, workdir)
  export = os.path.join(workdir, "export")
  if os.path.exists(export):
    shutil.rmtree(export)
  exports.write(export, common.to_numpy(summary["params"]),
                dict(model=models.to_record(cfg), init="dense_source", steps=b["pretrain_steps"]))
  record = dict(method="weight_selection", model=cfg.short_name(), steps=b["pretrain_steps"], workdir=workdir,
                export=export, eval_accuracy=summary.get("eval_accuracy"), eval_loss=summary.get("eval_loss"), wall_s=round(wall, 1), lr=c.optim.lr)
  json.dump(record, open(record_path, "w"), indent=2)
  return record


def init_weit(args, weit_pretrain: dict, roles: list[str] | None = None, overrides: dict | None = None) -> dict:
  """programs/init.py for every target (or ``roles``): role -> {export, accuracy before/after, wall};
  ``overrides``: init config fields (e.g. ``{'optim.lr': 1e-2}``) for an ablation."""
  from weit_jax import exports
  from weit_jax.programs import init as init_program
  b = args.budget
  chosen = [(role, spec) for role, spec in setup()["targets"] if roles is None or role in roles]
  c = unlocked(configs("init").get_config("runlocal"))
  apply_overrides(c, overrides)
  workdir = (weit_pretrain["workdir"] + f"_init_S{b['init_steps']}xE{b['init_examples']}_lr{c.optim.lr:g}"
             + ("" if roles is None else "_" + "-".join(role for role, _ in chosen)))
  record_path = os.path.join(workdir, "bench.json")
  if os.path.exists(record_path):
    return json.load(open(record_path))
  c.templates = weit_pretrain["workdir"]
  c.templates_step = b["pretrain_steps"]
  c.targets = ";".join(spec for _, spec in chosen)
  c.steps, c.num_examples, c.batch_size = b["init_steps"], b["init_examples"], b["pretrain_batch_size"]
  c.optim.warmup_steps = min(c.optim.warmup_steps, max(1, b["init_steps"] // 10))
  c.log_every = max(1, b["init_steps"] // 4)
  c.checkpoint_every = max(1, b["init_steps"])
  log(f"WeiT init of {len(setup()['targets'])} targets ({b['init_steps']} scaler-training steps each) in {workdir}")
  _, wall = wall_clock(init_program.run, c, workdir)
  out = {}
  for role, cfg in target_configs().items():
    if role not in dict(chosen):
      continue
    export = os.path.join(workdir, cfg.short_name(), "export")
    st = exports.read_meta(export)["scaler_training"]
    out[role] = dict(export=export, **{k: st.get(k) for k in ("accuracy_before", "accuracy_after", "loss_before",
                                                              "loss_after", "scalers_from")})
  record = dict(targets=out, wall_s=round(wall, 1), steps=b["init_steps"], num_examples=b["init_examples"],
                lr=c.optim.lr)
  json.dump(record, open(record_path, "w"), indent=2)
  return record


# ---------------------------------------------------------------------------------------------------
# Stage 3: downstream runs
# ---------------------------------------------------------------------------------------------------

def applies(method: str, target, sources: dict) -> str | None:
  """None if ``method`` can initialize ``target``; otherwise why not (the table says N/A)."""
  from weit_jax.inits import fine, mimetic, tleg, weight_selection
  try:
    if method == "mimetic":
      mimetic.check_target(target)
    elif method == "fine":
      fine.check_sizes(aux_config(), target)
    elif method == "weight_selection":
      weight_selection.check_sizes(sources["dense_config"], target)
    elif method == "tleg":
      tleg.check_sizes(aux_config(), target)
  except ValueError as e:
    return str(e).split(";")[0]
  return None


def source_for(method: str, role: str, sources: dict):
  return {"random": None, "mimetic": None, "weit": (sources.get("weit") or {}).get(role),
          "weight_selection": sources.get("dense"), "tleg": sources.get("tleg"),
          "fine": (sources.get("fine") or {}).get(role)}[method]


def step0_accuracy(config, cfg) -> float:
  """Eval accuracy of exactly the parameters train.run starts from."""
  from weit_jax import input_pipeline, models, sharding, train_loop
  from weit_jax.programs import train
  mesh = sharding.make_mesh({"data": -1})
  task = train.make_task(config, models.build(cfg), cfg)
  _, shardings = train_loop.state_shardings(task, mesh)
  params = jax.device_put(train.initial_params(config, cfg), shardings["params"])
  eval_step = train_loop.make_eval_step(task, shardings["params"], sharding.batch_sharding(mesh), mesh)
  batches = input_pipeline.make_eval_iterator(config.data, global_batch_size=config.batch_size)
  return train_loop.evaluate(eval_step, params, batches, mesh)["eval_accuracy"]


def eval_curve(workdir: str) -> dict[int, float]:
  from weit_jax import metrics
  curve = {}
  for rec in metrics.read_metrics(workdir):  # the last record of a step wins
    if "eval_accuracy" in rec:
      curve[int(rec["step"])] = float(rec["eval_accuracy"])
  return curve


def run_one(args, method: str, role: str, cfg, dataset: str, seed: int, sources: dict) -> dict:
  """One (method, target, dataset, seed): export, step-0 accuracy, training. Cached in its folder."""
  from weit_jax import exports, inits, models
  from weit_jax.programs import train
  b = args.budget
  budget_key = {k: v for k, v in b.items() if k != "seeds"}  # everything a run's result depends on
  tag = (f"P{b['pretrain_steps']}xB{b['pretrain_batch_size']}_S{b['init_steps']}xE{b['init_examples']}"
         f"_T{b['train_steps']}xB{b['batch_size']}_k{b['eval_every']}")
  run_dir = os.path.join(args.workdir, "runs", tag, dataset, cfg.short_name(), method, f"seed{seed}")
  result_path = os.path.join(run_dir, "result.json")
  if os.path.exists(result_path):
    result = json.load(open(result_path))
    if result.get("budget") == budget_key:
      return result
  if os.path.exists(run_dir):
    shutil.rmtree(run_dir)  # an interrupted run starts over (runs are short)
  t0 = time.time()
  export = os.path.join(run_dir, "export")
  init = inits.get(method)
  params = init(source_for(method, role, sources), cfg, seed=seed)
  if dataset != "fashion_mnist_local":  # transfer: a new task gets a new head, whatever the method
    params = models.with_fresh_classifier(params, cfg, seed)
  exports.write(export, params, dict(model=models.to_record(cfg), init=method, seed=seed,
                                     source=inits.describe_source(source_for(method, role, sources)),
                                     head="new" if dataset != "fashion_mnist_local" else "kept"))
  c = train_config(b, dataset=dataset, steps=b["train_steps"], seed=seed, init=export, eval_every=b["eval_every"])
  acc0 = step0_accuracy(c, cfg)
  t_train = time.time()
  summary = train.run(c, os.path.join(run_dir, "train"))
  t_end = time.time()
  curve = eval_curve(os.path.join(run_dir, "train"))
  curve[0] = acc0
  result = dict(method=method, target=cfg.short_name(), role=role, dataset=dataset, seed=seed, budget=budget_key,
                curve={str(s): curve[s] for s in sorted(curve)}, final_accuracy=summary["eval_accuracy"],
                step0_accuracy=acc0, wall_s=round(t_end - t0, 2), train_wall_s=round(t_end - t_train, 2))
  shutil.rmtree(os.path.join(run_dir, "train", "checkpoints"), ignore_errors=True)  # only the curve is kept
  shutil.rmtree(export, ignore_errors=True)
  with open(result_path + ".tmp", "w") as f:
    json.dump(result, f, indent=2)
  os.replace(result_path + ".tmp", result_path)
  return result


# ---------------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------------

def steps_to_reach(steps: list[int], accs: list[float], threshold: float) -> float | None:
  """The first step at which the (linearly interpolated) curve reaches ``threshold``; None if never."""
  for i, (s, a) in enumerate(zip(steps, accs)):
    if a >= threshold:
      if i == 0:
        return float(s)
      s0, a0 = steps[i - 1], accs[i - 1]
      return s0 + (s - s0) * (threshold - a0) / (a - a0)
  return None


def aggregate(results: list[dict], budget: dict) -> dict:
  """dataset -> role -> method -> {steps, mean, std, final mean/std, step0 mean/std, seeds, speedup}."""
  table: dict = {}
  for r in results:
    table.setdefault(r["dataset"], {}).setdefault(r["role"], {}).setdefault(r["method"], []).append(r)
  out: dict = {}
  T = budget["train_steps"]
  for dataset, roles in table.items():
    for role, methods in roles.items():
      entry = {}
      for method, runs in methods.items():
        steps = sorted(int(s) for s in runs[0]["curve"])
        acc = np.array([[r["curve"][str(s)] for s in steps] for r in runs])
        final = np.array([r["final_accuracy"] for r in runs])
        entry[method] = dict(target=runs[0]["target"], steps=steps, mean=acc.mean(0).tolist(), std=acc.std(0).tolist(),
                             final_mean=float(final.mean()), final_std=float(final.std()),
                             step0_mean=float(acc[:, 0].mean()), step0_std=float(acc[:, 0].std()),
                             seeds=sorted(r["seed"] for r in runs), wall_s=float(sum(r["wall_s"] for r in runs)))
      if "random" in entry:
        threshold = entry["random"]["final_mean"]
        for method, e in entry.items():
          needed = steps_to_reach(e["steps"], e["mean"], threshold)
          e["steps_to_random_final"] = needed
          e["speedup"] = (None if needed is None else (math.inf if needed == 0 else T / needed))
      out.setdefault(dataset, {})[role] = entry
  return out


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------

def fmt_acc(mean: float, std: float, n: int) -> str:
  return f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}"


def fmt_speedup(e: dict, T: int, method: str, final: str | None = None) -> str:
  """The speed-up cell; ``final``: the run's final value as the report writes it (default: accuracy, %)."""
  final = final or f"{100 * e['final_mean']:.1f}%"
  if method == "random":
    return f"1× (reference: {final} at step {T})"
  if e.get("speedup") is None:
    return f"not reached (final {final})"
  if math.isinf(e["speedup"]):
    return "∞ (at step 0)"
  return f"{e['speedup']:.1f}× ({e['steps_to_random_final']:.0f} steps)"


def plot(agg: dict, dataset: str, roles: list[str], targets: dict, path: str, budget: dict) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(roles), figsize=(4.2 * len(roles), 3.9), squeeze=False)
  handles = {}
  for ax, role in zip(axes[0], roles):
    for method in METHODS:
      e = agg.get(dataset, {}).get(role, {}).get(method)
      if e is None:
        continue
      s, m, sd = np.array(e["steps"]), 100 * np.array(e["mean"]), 100 * np.array(e["std"])
      (handles[method],) = ax.plot(s, m, label=LABELS[method], color=COLORS[method], marker="o", ms=3)
      ax.fill_between(s, m - sd, m + sd, color=COLORS[method], alpha=0.18, linewidth=0)
    if "random" in agg.get(dataset, {}).get(role, {}):
      ax.axhline(100 * agg[dataset][role]["random"]["final_mean"], color="k", ls=":", lw=0.8)
    ax.set_title(f"{role}: {targets[role].short_name()}", fontsize=10)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("eval accuracy (%)")
  order = [m for m in METHODS if m in handles]
  fig.legend([handles[m] for m in order], [LABELS[m] for m in order], loc="lower center", ncol=len(order),
             fontsize=9, frameon=False)
  n = budget["seeds"]
  fig.suptitle(f"{DATASET_LABELS[dataset]}: mean over {n} seed{'s' * (n > 1)}"
               f"{' (shaded: ± std)' if n > 1 else ''}; dotted: random init's final accuracy", fontsize=10)
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def machine() -> dict:
  cpu = platform.processor() or ""
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return dict(cpu=cpu, cores=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
              jax=jax.__version__, backend=jax.default_backend(), load_average=os.getloadavg())


def _json_safe(x):
  """Strict JSON: infinite speed-ups become the string 'inf', tuples lists."""
  if isinstance(x, dict):
    return {str(k): _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  return x


def write_report(args, agg: dict, results: list[dict], stages: dict, targets: dict, na: dict, info: dict) -> str:
  from weit_jax import models
  b = args.budget
  T = b["train_steps"]
  os.makedirs(args.out, exist_ok=True)
  roles = [role for role, _ in setup()["targets"]]
  report = setup()["report"]
  plots = {}
  for dataset in args.datasets:
    name = f"{report}_{dataset}.png"
    plot(agg, dataset, roles, targets, os.path.join(args.out, name), b)
    plots[dataset] = name
  raw = dict(command=info["command"], date=info["date"], machine=info["machine"], budget=b,
             wall_s=info["wall_s"], stages=stages, targets={r: models.to_record(c) for r, c in targets.items()},
             not_applicable={f"{m}/{r}": why for (m, r), why in na.items()}, aggregate=agg, runs=results)
  with open(os.path.join(args.out, f"{report}.json"), "w") as f:  # paths relative to the repo
    f.write(json.dumps(_json_safe(raw), indent=2).replace(ROOT + os.sep, ""))

  methods = [m for m in METHODS if m in args.methods]
  L = []
  w = L.append
  family_name = {"vit": "ViTs", "resnet": "ResNets"}.get(FAMILY, FAMILY)
  w(f"# Initialization quality of {family_name}: WeiT vs. baseline initializers\n")
  quick = " (**--quick smoke test: tiny budgets, not a result**)" if args.quick else ""
  w(f"Written by `benchmarks/init_quality.py` from its own results{quick}. Nothing in this file is typed by hand.\n")
  w("```\n" + info["command"] + "\n```\n")
  m = info["machine"]
  w(f"- Date: {info['date']}; this invocation's wall time: {info['wall_s'] / 60:.1f} min "
    f"(all stages, cached or not: {info['total_recorded_s'] / 60:.1f} min of recorded work).")
  w(f"- Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; JAX {m['jax']} ({m['backend']}); "
    f"load average at start / end: {info['load_start'][0]:.1f} / {m['load_average'][0]:.1f} "
    "(above the core count means the machine was shared and the times are pessimistic).")
  w(f"- Seeds: {', '.join(str(s) for s in range(b['seeds']))} (data order and every random choice of an "
    "initializer: random and mimetic weights, new heads). Spread: mean ± std over seeds.\n")

  w("## What was run\n")
  aux = aux_config()
  w(f"- **Pre-training** (all on Fashion-MNIST, {b['pretrain_steps']} steps of batch {b['pretrain_batch_size']} each, "
    "so the compute budget in steps and examples is the same):")
  for key, label in (("weit", "WeiT templates"), ("tleg", "TLEG auxiliary"),
                     ("dense", "dense source of weight selection")):
    if key in stages.get("pretrain", {}):
      r = stages["pretrain"][key]
      w(f"  - {label}: {FAMILY} {r['model']}, lr {r['lr']}, {r['wall_s'] / 60:.1f} min, eval accuracy "
        f"{100 * r['eval_accuracy']:.1f}%")
  if "init" in stages:
    r = stages["init"]
    w(f"- **WeiT initialization**: frozen templates, scalers of each target trained for {r['steps']} steps "
      f"(batch {b['pretrain_batch_size']}) on "
      f"{r['num_examples']} Fashion-MNIST training examples (lr {r['lr']}); {r['wall_s'] / 60:.1f} min for all "
      "targets. This is extra data and compute that only WeiT uses; the tables count downstream steps only.")
  w(f"- **Targets** (auxiliary of WeiT and TLEG: {aux.short_name()}; dense source: "
    f"{dense_source_config().short_name()}, the union of the targets so that weight selection applies to all):")
  for role, spec in setup()["targets"]:
    w(f"  - {role}: {targets[role].short_name()} (`{spec}`)")
  w("  " + setup()["tiles"])
  w(f"- **Downstream**: `programs/train.py` (configs/{FAMILY}_train.py:runlocal: AdamW lr 1e-3, weight decay 0.05, "
    f"cosine, {max(1, T // 10)} warmup steps) for {T} steps of batch {b['batch_size']}, eval every "
    f"{b['eval_every']} steps and at step 0. Fashion-MNIST eval on `{b['fmnist_eval']}` (a fixed subset keeps "
    "evals cheap); MNIST-5k eval on its 1,000 test digits. Same dataset: the pre-trained heads are kept "
    "(weight selection and mimetic use a fresh head, as their recipes say); transfer: every method gets a new "
    "(zero) head.")
  w("- **Speed-up**: training steps a method needs to reach the accuracy random init has at the end of the "
    f"budget (mean over seeds, linear interpolation between evals), as `{T} / steps`. "
    "'not reached' means below that accuracy for the whole budget; '∞ (at step 0)' means the initialization "
    "already beats it before training (same dataset, kept head): compare the step-0 and final tables there. "
    "In the transfer setting every method starts from a new head, so the speed-ups are finite and comparable.")
  if na:
    w("- **N/A** (the method cannot initialize that target): "
      + "; ".join(f"{LABELS[m]} on {r}: {why}" for (m, r), why in sorted(na.items())) + ".")
  w("")

  for dataset in args.datasets:
    d = agg.get(dataset, {})
    w(f"## {DATASET_LABELS[dataset]}\n")
    w(f"![accuracy vs step]({plots[dataset]})\n")
    w(f"### Speed-up over random init ({T}-step budget)\n")
    w("| target | " + " | ".join(LABELS[m] for m in methods) + " |")
    w("|---|" + "---|" * len(methods))
    for role in roles:
      cells = [fmt_speedup(d[role][m], T, m) if m in d.get(role, {}) else "N/A" for m in methods]
      w(f"| {role} {targets[role].short_name()} | " + " | ".join(cells) + " |")
    w("")
    for title, key in (("Accuracy at step 0 (%)", "step0"), (f"Accuracy after {T} steps (%)", "final")):
      w(f"### {title}\n")
      w("| target | " + " | ".join(LABELS[m] for m in methods) + " |")
      w("|---|" + "---|" * len(methods))
      for role in roles:
        cells = []
        for m in methods:
          e = d.get(role, {}).get(m)
          cells.append("N/A" if e is None else fmt_acc(e[f"{key}_mean"], e[f"{key}_std"], len(e["seeds"])))
        w(f"| {role} {targets[role].short_name()} | " + " | ".join(cells) + " |")
      w("")

  w("## Where WeiT does and does not win\n")
  w("Generated from the tables above (final accuracy, mean over seeds; 'ahead' means a higher mean, not "
    "necessarily beyond the spread).\n")
  acc = lambda v: fmt_acc(v["final_mean"], v["final_std"], len(v["seeds"]))
  for dataset in args.datasets:
    for role in roles:
      e = agg.get(dataset, {}).get(role, {})
      if "weit" not in e:
        continue
      others = sorted(((v["final_mean"], m) for m, v in e.items() if m != "weit"), reverse=True)
      better = [(a, m) for a, m in others if a > e["weit"]["final_mean"]]
      wa = acc(e["weit"])
      if better:
        w(f"- {DATASET_LABELS[dataset]}, {role} ({targets[role].short_name()}): WeiT ({wa}) is **behind** "
          + ", ".join(f"{LABELS[m]} ({acc(e[m])})" for _, m in better) + ".")
      else:
        nxt = (f" (next: {LABELS[others[0][1]]}, {acc(e[others[0][1]])})" if others else "")
        w(f"- {DATASET_LABELS[dataset]}, {role} ({targets[role].short_name()}): WeiT ({wa}) is ahead of every "
          f"other method{nxt}.")
  cells = [(d, r) for d in args.datasets for r in roles if "weit" in agg.get(d, {}).get(r, {})]
  if cells:
    best_final = sum(max(agg[d][r].items(), key=lambda kv: kv[1]["final_mean"])[0] == "weit" for d, r in cells)
    speed = lambda e: -1.0 if e.get("speedup") is None else e["speedup"]
    best_speed = sum(max(((m, e) for m, e in agg[d][r].items() if m != "random"), key=lambda kv: speed(kv[1]))[0]
                     == "weit" for d, r in cells)
    w(f"\nIn {len(cells)} (dataset, target) cells, WeiT has the best final accuracy in {best_final} and the "
      f"largest speed-up over random init in {best_speed} (ties count for whichever method is listed first).")
  w("")
  w("## Time per downstream run\n")
  w("Measured wall time of one downstream run (export, step-0 eval, training, evals), mean over its runs:\n")
  w("| target | " + " | ".join(DATASET_LABELS[d] for d in args.datasets) + " |")
  w("|---|" + "---|" * len(args.datasets))
  for role in roles:
    row = []
    for dataset in args.datasets:
      walls = [r["wall_s"] for r in results if r["role"] == role and r["dataset"] == dataset]
      row.append(f"{np.mean(walls):.0f} s ({len(walls)} runs)" if walls else "-")
    w(f"| {role} {targets[role].short_name()} | " + " | ".join(row) + " |")
  w("")
  w("## Why these sizes and budgets\n")
  w(f"- The auxiliary model ({aux_config().short_name()}) is a small runlocal size; the targets change one thing "
    "each (depth down, depth up, width down to a non-tile width, width up), so every row asks one question.")
  w("- The dense source is the smallest model that contains every target (every size field: "
    f"{', '.join(k for k in setup()['dense_source'] if k != 'variant')}), so weight selection applies everywhere; it is larger than WeiT's "
    "and TLEG's auxiliary model, so the same step budget costs it more compute (a favourable setting for "
    "weight selection).")
  if setup().get("budget"):
    w(f"- This family's budget differs from the ViT's ({setup()['budget']}): its convolutions are slower per "
      "example on a CPU, and the ViT's budget projects to about two hours here (`--estimate`).")
  w("- Budgets: the whole benchmark is meant to fit in about an hour on a 2-core CPU. "
    "`python benchmarks/init_quality.py --estimate` times one training step of every size on the machine at "
    "hand and projects the wall time of the chosen budgets; override any budget with its flag "
    "(`--train-steps`, `--pretrain-steps`, `--seeds`, ...). Short downstream budgets are where an "
    "initialization matters most.")
  w("")
  w("## Raw data\n")
  w(f"`{report}.json`: every run's curve (eval accuracy by step), its seed and wall time, the aggregates, "
    "the budgets and the pre-training records. Run folders (metrics.jsonl, curves.png) are under the "
    f"workdir `{os.path.relpath(args.workdir, ROOT)}`.")
  path = os.path.join(args.out, f"{report}.md")
  with open(path, "w") as f:
    f.write("\n".join(L) + "\n")
  return path


# ---------------------------------------------------------------------------------------------------
# --estimate: time one training step of every size
# ---------------------------------------------------------------------------------------------------

def time_steps(args) -> dict:
  """Seconds per training step (wall and process CPU) of every size, on random batches: targets at
  the downstream batch size, the pre-trained models at the pre-training batch size."""
  from weit_jax import models, sharding, train_loop
  from weit_jax.inits import tleg
  from weit_jax.programs import pretrain, train
  b = args.budget
  mesh = sharding.make_mesh({"data": -1})
  rng = np.random.default_rng(0)

  def plain_task(cfg, B):
    return train.make_task(train_config(b, dataset="fashion_mnist_local", steps=100, seed=0, model=cfg, batch_size=B),
                           models.build(cfg), cfg)

  def weit_task(cfg, B):
    c = unlocked(configs("pretrain").get_config("runlocal"))
    c.model = model_fields(**setup()["auxiliary"])
    c.total_steps, c.batch_size = 1000, B
    return pretrain.make_task(c, pretrain.build(c))

  def tleg_task(cfg, B):
    c = train_config(b, dataset="fashion_mnist_local", steps=100, seed=0, model=cfg, batch_size=B)
    return tleg.make_task(c, cfg)

  P = b["pretrain_batch_size"]
  sizes = {role: (cfg, b["batch_size"], plain_task) for role, cfg in target_configs().items()}
  sizes.update(weit_auxiliary=(aux_config(), P, weit_task), tleg_auxiliary=(aux_config(), P, tleg_task),
               dense_source=(dense_source_config(), P, plain_task))
  out = {}
  for name, (cfg, B, make) in sizes.items():
    batch = sharding.global_batch({"image": rng.standard_normal((B, 28, 28, 1)).astype(np.float32),
                                   "labels": np.eye(10, dtype=np.float32)[rng.integers(0, 10, B)]}, mesh)
    task = make(cfg, B)
    _, sh = train_loop.state_shardings(task, mesh)
    state = train_loop.make_init_state(task, sh)(jax.random.key(0))
    step = train_loop.make_train_step(task, sh, sharding.batch_sharding(mesh), mesh)
    for _ in range(3):
      state, o = step(state, batch, jax.random.key(1))
    jax.block_until_ready(o)
    n, t0, c0 = 15, time.time(), time.process_time()
    for _ in range(n):
      state, o = step(state, batch, jax.random.key(1))
    jax.block_until_ready(o)
    out[name] = dict(model=cfg.short_name(), batch=B, wall=(time.time() - t0) / n, cpu=(time.process_time() - c0) / n)
    log(f"{name:14s} {cfg.short_name():22s} batch {B:4d}: {1000 * out[name]['wall']:6.0f} ms/step wall, "
        f"{1000 * out[name]['cpu']:6.0f} ms CPU")
  return out


def projection(args, per_step: dict, key: str = "wall", overhead_s: float = 3.0) -> dict:
  """Projected seconds per stage from per-step times. An eval example costs about a third of a
  training example; ``overhead_s`` per downstream run (export, step-0 eval, setup, final save, plot)."""
  b = args.budget
  targets = target_configs()
  sources = {"dense_config": dense_source_config()}
  ratio = b["pretrain_batch_size"] / b["batch_size"]
  pre = b["pretrain_steps"] * sum(per_step[k][key] for k in ("weit_auxiliary", "tleg_auxiliary", "dense_source"))
  init = sum(b["init_steps"] * ratio * per_step[r][key] for r in targets)
  fm_eval = (int(b["fmnist_eval"].split(":")[1].rstrip("]")) if ":" in b["fmnist_eval"] else 10_000)
  runs, n_runs = 0.0, 0
  for role, cfg in targets.items():
    methods = [m for m in args.methods if not applies(m, cfg, sources)]
    for dataset in args.datasets:
      examples = (b["train_steps"] // b["eval_every"] + 2) * (fm_eval if dataset == "fashion_mnist_local" else 1000)
      one = (b["train_steps"] + examples / b["batch_size"] / 3) * per_step[role][key] + overhead_s
      runs += one * len(methods) * b["seeds"]
      n_runs += len(methods) * b["seeds"]
  return dict(pretrain_s=pre, init_s=init, downstream_s=runs, runs=n_runs, total_s=pre + init + runs)


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
  args = parse_args(argv)
  t_start = time.time()
  load_start = os.getloadavg()
  os.makedirs(args.workdir, exist_ok=True)
  enable_compilation_cache(args.workdir)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  b = args.budget
  log(f"budget: {b}; workdir {args.workdir}; report to {args.out}")

  if args.estimate:
    per_step = time_steps(args)
    for key in ("wall", "cpu"):
      p = projection(args, per_step, key)
      log(f"projection from {key} time per step: pre-training {p['pretrain_s'] / 60:.1f} min, WeiT init "
          f"{p['init_s'] / 60:.1f} min, {p['runs']} downstream runs {p['downstream_s'] / 60:.1f} min; total "
          f"{p['total_s'] / 60:.1f} min (+ compilation)")
    return

  from weit_jax import inits, input_pipeline
  for dataset in args.datasets:
    input_pipeline.prepare(data_config(dataset, b))
  targets = target_configs()

  # ----- stage 1 and 2: pre-training, WeiT init ------------------------------------------------------
  stages: dict = {"pretrain": {}}
  sources: dict = {"dense_config": dense_source_config()}
  if "weit" in args.methods:
    stages["pretrain"]["weit"] = pretrain_weit(args)
    stages["init"] = init_weit(args, stages["pretrain"]["weit"])
    sources["weit"] = {role: r["export"] for role, r in stages["init"]["targets"].items()}
  if "tleg" in args.methods:
    stages["pretrain"]["tleg"] = pretrain_tleg(args)
    sources["tleg"] = inits.TLEGSource.from_export(stages["pretrain"]["tleg"]["export"])
  if "weight_selection" in args.methods:
    stages["pretrain"]["dense"] = pretrain_dense(args)
    sources["dense"] = inits.DenseSource.from_export(stages["pretrain"]["dense"]["export"])

  # ----- stage 3: downstream runs ----------------------------------------------------------------------
  na = {}
  jobs = []
  for role, cfg in targets.items():
    for method in args.methods + (["mimetic"] if FAMILY != "vit" else []):
      why = applies(method, cfg, sources)
      if why:
        na[(method, role)] = why
        continue
      for dataset in args.datasets:
        for seed in range(b["seeds"]):
          jobs.append((dataset, seed, role, method))
  roles = [r for r, _ in setup()["targets"]]
  jobs.sort(key=lambda j: (j[1], DATASETS.index(j[0]), roles.index(j[2]), METHODS.index(j[3])))
  results = []
  for i, (dataset, seed, role, method) in enumerate(jobs):
    t0 = time.time()
    r = run_one(args, method, role, targets[role], dataset, seed, sources)
    results.append(r)
    log(f"[{i + 1}/{len(jobs)}] {dataset} {targets[role].short_name()} {method} seed {seed}: step 0 "
        f"{100 * r['step0_accuracy']:.1f}% -> {100 * r['final_accuracy']:.1f}% ({time.time() - t0:.0f}s)")

  # ----- report -------------------------------------------------------------------------------------------
  agg = aggregate(results, b)
  recorded = sum(r["wall_s"] for r in results) + sum(r["wall_s"] for r in stages["pretrain"].values()) + \
      stages.get("init", {}).get("wall_s", 0.0)
  info = dict(command=" ".join(["python", "benchmarks/init_quality.py", *(sys.argv[1:] if argv is None else argv)]),
              date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), machine=machine(),
              wall_s=time.time() - t_start, total_recorded_s=recorded, load_start=load_start)
  path = write_report(args, agg, results, stages, targets, na, info)
  log(f"report: {path}; wall time {info['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
  main()
