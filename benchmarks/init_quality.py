r"""Initialization quality: WeiT against baseline initializers, on targets of several sizes.

  python benchmarks/init_quality.py                  # the full run (~60 min on a 2-core machine alone)
  python benchmarks/init_quality.py --quick          # smoke test: tiny budgets, 1 seed, a few minutes
  python benchmarks/init_quality.py --estimate       # time one step of each size; print the projection
  python benchmarks/init_quality.py --long           # full training: until random init plateaus (LONG),
                                                     # and every method on shorter schedules (--shorter)

Stages (each cached in ``--workdir``; an interrupted run continues where it stopped):

1. Pre-training, all on Fashion-MNIST (``fashion_mnist_local``) for the same number of steps with
   the same batch size: WeiT templates (``programs/pretrain.py``, the family's auxiliary model), the
   TLEG auxiliary model (``inits/tleg.py``, the same size) and the dense source of weight selection
   (a plain model trained from random init by ``programs/train.py``; as large as the largest target
   along every axis, so weight selection applies to every target).
2. WeiT initialization of every target (``programs/init.py``: frozen templates, scaler training).
   "WeiT (extracted)": templates extracted in closed form from the dense source of weight selection
   (``programs/pretrain.py`` with ``init_templates_from`` and ``total_steps=0``: no constrained
   pre-training), then the same scaler training; and the sweep over N of those extractions
   (reconstruction error, accuracy of the dense source composed from them).
3. For every target, method, dataset and seed: an export (``weit_jax.inits``), its eval accuracy
   at step 0, and a fixed training budget with ``programs/train.py`` (eval every k steps).
   Datasets: Fashion-MNIST (the pre-training data: same-dataset setting) and ``mnist_5k`` (5,000 real
   MNIST digits, train 4,000 / test 1,000: the transfer setting; every method gets a new head).
4. ``docs/results/init_quality.{md,json}`` and plots, written from the results only.
"""
from __future__ import annotations

import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # harness, stages

import harness  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import stages as shared  # noqa: E402  (stages 1-2, shared with generation_quality.py)
from harness import LABELS, log  # noqa: E402
from stages import FamilySetup  # noqa: E402

METHODS = ("random", "weit", "weit_extracted", "weight_selection", "tleg", "mimetic", "pretrained")
# Not a competitor: every target pre-trained itself at the pre-training budget (the cost WeiT avoids), so
# what a pre-training of the target's own size buys from this data; left out of the "where WeiT wins"
# comparison and compared apart.
REFERENCES = ("pretrained",)
EXTRACTION_NS = (1, 2, 4, 8, 16)  # the sweep over N of templates extracted from the dense source
DATASETS = ("fashion_mnist_local", "mnist_5k")
DATASET_LABELS = {"fashion_mnist_local": "Fashion-MNIST (same dataset)", "mnist_5k": "MNIST-5k (transfer)"}

# The targets' specs leave the auxiliary's other fields (a ViT's MLP keeps its ratio 2).
SETUPS = {
    "vit": FamilySetup(
        family="vit",
        auxiliary=dict(variant="pico/4"),  # d3-w64-h2-m128
        targets=(("shallower", "depth=2"),  # d2-w64
                 ("deeper", "depth=6"),  # d6-w64
                 ("narrower", "width=40,heads=2"),  # d3-w40: 40 is not a multiple of the embed tile (16)
                 ("wider", "width=96,heads=3")),  # d3-w96
        dense_source=dict(depth=6, width=96, num_heads=3, mlp_dim=192, patch_size=4),
        report="init_quality",
        tiles="Runlocal tiles are embed 16, mlp 16, heads 1, kv 8: width 40 (and MLP 80) is not a tile multiple."),
    "resnet": FamilySetup(
        family="resnet",
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
        budget=dict(pretrain_steps=600, train_steps=60, eval_every=20, early_every=4),
        tiles="Tiles are stem 4, mid{s} 4, res{s} 16 (conv kernels: both channel axes; the spatial kernel "
              "whole in the template): width 6 (stage channels 6/24, 12/48, 24/96) is not a tile multiple."),
}

# --long: downstream runs until random init has plateaued, on fewer cells (init_quality_long.md,
# init_quality_resnet_long.md): over the family's full budget, and the defaults of --datasets,
# --roles and --methods (the transfer setting, one depth and one width target, the best baselines).
# The ResNet's 600 steps left random init at 77 / 60% on deeper / narrower (`--long --family=resnet
# --train-steps=600 --eval-every=50`, seed 0): flat at the end of its cosine decay, far from its plateau.
LONG = {"vit": dict(train_steps=2000, eval_every=100, early_every=0, seeds=2),
        "resnet": dict(train_steps=2000, eval_every=100, early_every=0, seeds=2)}
LONG_DEFAULTS = dict(datasets="mnist_5k", roles="deeper,narrower", methods="random,weit,weight_selection,tleg")
PLATEAU_POINTS = 0.01  # random init has plateaued when its final accuracy is within 1 point of its best
                       # over the last quarter of the run
# --long also trains every method on whole schedules of T / k steps (warmup and cosine decay scaled with
# them). Why: under one cosine schedule every method gains its last points as the learning rate decays,
# so the steps to random init's plateau *on T's schedule* are bound to the schedule's end whatever the
# init; the question a user asks is how short a training run may be and still reach it.
SHORTER = "2,3,5,10"

SCALER_BUDGET = ("init_steps", "init_examples")  # the budget entries only WeiT's runs depend on
BUDGETS = {
    # pretrain_*: each pre-training run (WeiT, TLEG, dense source) and WeiT's scaler training;
    # init_*: WeiT's scaler-training steps / examples; train_steps, batch_size: every downstream run,
    # evaluated every `eval_every` steps on `fmnist_eval` (Fashion-MNIST) or the 1,000 MNIST-5k digits,
    # and every `early_every` steps before the first of those (0: not; stages.early_evals).
    "full": dict(pretrain_steps=1000, pretrain_batch_size=128, init_steps=400, init_examples=500,
                 train_steps=150, batch_size=64, eval_every=25, early_every=5, seeds=3, fmnist_eval="test[:1000]"),
    "quick": dict(pretrain_steps=30, pretrain_batch_size=64, init_steps=5, init_examples=256,
                  train_steps=20, batch_size=32, eval_every=10, early_every=5, seeds=1, fmnist_eval="test[:500]"),
}


# ---------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------

def parse_args(argv=None):
  """The flags; ``args.setup`` is the chosen family's ``FamilySetup``."""
  p = harness.parser(__doc__, BUDGETS, METHODS)
  p.add_argument("--family", default="vit", choices=sorted(SETUPS), help="the model family to benchmark")
  p.add_argument("--estimate", action="store_true", help="time one training step of every size and "
                 "print the projected wall time of the chosen budgets; trains nothing")
  p.add_argument("--datasets", default=None, help="comma-separated subset of " + ",".join(DATASETS)
                 + f" (default: all; --long: {LONG_DEFAULTS['datasets']})")
  p.add_argument("--roles", default=None, help="comma-separated subset of the targets (default: all; --long: "
                 f"{LONG_DEFAULTS['roles']})")
  p.add_argument("--long", action="store_true", help="full training: downstream runs until random init "
                 "plateaus (LONG), reported apart (<report>_long.md) with the steps each method needs to reach "
                 f"random init's plateau; default methods {LONG_DEFAULTS['methods']}")
  p.add_argument("--shorter", default=SHORTER, help="with --long: comma-separated divisors k; every method "
                 "also trains on a whole schedule of T/k steps (its own warmup and cosine decay), and the report "
                 f"gives the shortest schedule that reaches random init's plateau (default {SHORTER}; '' for none)")
  p.add_argument("--train-lr", type=float, default=None, help="the downstream runs' peak learning rate, for "
                 "every method (default: the train recipe's, 1e-3); runs and report keyed by it")
  p.add_argument("--draw", type=int, default=0, help="another draw of the pre-training stages: every "
                 "pre-training and WeiT's scaler training with this seed (stage folders and the report "
                 "keyed by it: <report>_draw<N>.md); a report lists every draw of its budget found beside it")
  args = p.parse_args(argv)
  args.setup = SETUPS[args.family]
  if args.draw < 0:
    p.error(f"--draw={args.draw}: use a seed >= 0 (0: the default draw)")
  if args.long and args.quick:
    p.error("--long and --quick: choose one budget")
  if args.shorter != SHORTER and not args.long:
    p.error("--shorter: only with --long (the schedules are divisors of the long run's)")
  try:
    args.shorter = sorted({int(k) for k in args.shorter.split(",") if k.strip()} if args.long else set())
  except ValueError:
    p.error(f"--shorter={args.shorter!r}: comma-separated integers > 1, e.g. {SHORTER}")
  if any(k < 2 for k in args.shorter):
    p.error(f"--shorter={','.join(map(str, args.shorter))}: divisors of the schedule must be > 1 (1 is the long run itself)")
  if args.long:
    args.datasets = args.datasets or LONG_DEFAULTS["datasets"]
    args.roles = args.roles or LONG_DEFAULTS["roles"]
    if args.methods == p.get_default("methods"):
      args.methods = LONG_DEFAULTS["methods"]
  args.datasets = args.datasets or ",".join(DATASETS)
  args.roles = [r for r in (args.roles or ",".join(args.setup.roles)).split(",") if r]
  for r in args.roles:
    if r not in args.setup.roles:
      p.error(f"unknown role {r!r}; valid: {', '.join(args.setup.roles)}")
  if args.train_lr is not None and not args.train_lr > 0:
    p.error(f"--train-lr={args.train_lr}: a learning rate > 0")
  suffix = "" if args.family == "vit" else f"_{args.family}"
  harness.resolve(p, args, BUDGETS, ("bench" + suffix, "bench_quick" + suffix), METHODS,
                  {**args.setup.budget, **(LONG[args.family] if args.long else {})})
  if args.shorter and args.budget["train_steps"] // max(args.shorter) < 1:
    p.error(f"--shorter={','.join(map(str, args.shorter))}: a schedule of {args.budget['train_steps']} // "
            f"{max(args.shorter)} steps is empty; use smaller divisors or a longer --train-steps")
  if args.train_lr is not None:  # in the budget (so in the run tags and the report's name) only when given
    args.budget["train_lr"] = args.train_lr
  if args.family != "vit" and "mimetic" in args.methods:
    args.methods.remove("mimetic")  # sets self-attention weights; reported as N/A
  args.datasets = [d for d in args.datasets.split(",") if d]
  for d in args.datasets:
    if d not in DATASETS:
      p.error(f"unknown dataset {d!r}; valid: {DATASETS}")
  return args


# ---------------------------------------------------------------------------------------------------
# Stage 3: downstream runs (stages 1-2: stages.py)
# ---------------------------------------------------------------------------------------------------

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


def run_one(args, method: str, role: str, cfg, dataset: str, seed: int, sources: dict, variant: str = "",
            budget: dict | None = None) -> dict:
  """One (method, target, dataset, seed): export, step-0 accuracy, training. Cached in its folder
  (``variant``: a recipe of the method's, e.g. an ablation's, in a folder of its own; ``budget``:
  another than ``args.budget``, e.g. a shorter schedule)."""
  from weit_jax import exports, inits, models
  from weit_jax.programs import train
  b = budget or args.budget
  # Everything a run's result depends on: the scaler budget only where the method trains scalers (WeiT's
  # exports), so a new scaler budget reruns WeiT's rows alone.
  trains_scalers = shared.INITIALIZERS.get(method, method) == "weit"
  budget_key = {k: v for k, v in b.items() if k != "seeds" and (trains_scalers or k not in SCALER_BUDGET)}
  tag = (f"P{b['pretrain_steps']}xB{b['pretrain_batch_size']}"
         + (f"_S{b['init_steps']}xE{b['init_examples']}" if trains_scalers else "")
         + f"_T{b['train_steps']}xB{b['batch_size']}_k{b['eval_every']}"
         + (f"e{b['early_every']}" if b.get("early_every") else "")
         + (f"_lr{b['train_lr']:g}" if b.get("train_lr") else ""))
  source = shared.source_for(method, role, sources)
  drawn = shared.draw(args) if source is not None else 0  # a method with no pre-training has one draw
  run_dir = os.path.join(args.workdir, "runs", tag, dataset, cfg.short_name(), method + (f"-{variant}" if variant else "")
                         + (f"-draw{drawn}" if drawn else ""), f"seed{seed}")
  result_path = os.path.join(run_dir, "result.json")
  described = inits.describe_source(source)
  if (result := harness.read_json(result_path)) and result.get("budget") == budget_key \
     and result.get("source", described) == described:  # (results of before the source was recorded: kept)
    return result
  if os.path.exists(run_dir):
    shutil.rmtree(run_dir)  # an interrupted run starts over (runs are short)
  t0 = time.time()
  export = os.path.join(run_dir, "export")
  init = inits.get(shared.INITIALIZERS.get(method, method))
  params = init(source, cfg, seed=seed)
  if dataset != "fashion_mnist_local":  # transfer: a new task gets a new head, whatever the method
    params = models.with_fresh_classifier(params, cfg, seed)
  exports.write(export, params, dict(model=models.to_record(cfg), init=method, seed=seed,
                                     source=inits.describe_source(source),
                                     head="new" if dataset != "fashion_mnist_local" else "kept"))
  c = shared.train_config(args.setup, b, dataset=dataset, steps=b["train_steps"], seed=seed, init=export,
                          eval_every=b["eval_every"])
  if b.get("train_lr"):  # --train-lr: the downstream recipe's learning rate, for every method
    c.optim.lr = b["train_lr"]
  acc0 = step0_accuracy(c, cfg)
  t_train = time.time()
  summary = train.run(c, os.path.join(run_dir, "train"))
  t_end = time.time()
  curve = eval_curve(os.path.join(run_dir, "train"))
  curve[0] = acc0
  result = dict(method=method, target=cfg.short_name(), role=role, dataset=dataset, seed=seed, budget=budget_key,
                source=described,
                curve={str(s): curve[s] for s in sorted(curve)}, final_accuracy=summary["eval_accuracy"],
                step0_accuracy=acc0, wall_s=round(t_end - t0, 2), train_wall_s=round(t_end - t_train, 2))
  shutil.rmtree(os.path.join(run_dir, "train", "checkpoints"), ignore_errors=True)  # only the curve is kept
  shutil.rmtree(export, ignore_errors=True)
  return harness.write_json(result_path, result)


# ---------------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------------

def aggregate(results: list[dict], budget: dict) -> dict:
  """dataset -> role -> method -> {steps, mean, std, final mean/std, step0 mean/std, seeds, speedup}."""
  out: dict = {}
  T = budget["train_steps"]
  for dataset, roles in harness.group(results, "dataset", "role", "method").items():
    for role, methods in roles.items():
      entry = {}
      for method, runs in methods.items():
        steps = sorted(int(s) for s in runs[0]["curve"])
        acc = harness.curve_stats(harness.seed_curves([r["curve"] for r in runs], steps))
        final = np.array([r["final_accuracy"] for r in runs])
        entry[method] = dict(target=runs[0]["target"], steps=steps, mean=acc["mean"], std=acc["std"],
                             final_mean=float(final.mean()), final_std=float(final.std()),
                             step0_mean=acc["step0_mean"], step0_std=acc["step0_std"],
                             seeds=sorted(r["seed"] for r in runs), wall_s=float(sum(r["wall_s"] for r in runs)))
      if "random" in entry:
        threshold = entry["random"]["final_mean"]
        for method, e in entry.items():
          e["steps_to_random_final"] = harness.steps_to_reach(e["steps"], e["mean"], threshold)
          e["speedup"] = harness.speedup(e["steps_to_random_final"], T)
        # Random init's plateau: its best (mean over seeds) over the last quarter of the run; the steps
        # each method needs to reach it, against the steps random init needs.
        r = entry["random"]
        last = [m for s, m in zip(r["steps"], r["mean"]) if s >= 0.75 * T]
        plateau = max(last)
        r_steps = harness.steps_to_reach(r["steps"], r["mean"], plateau)
        for method, e in entry.items():
          e["plateau"] = dict(value=plateau, random_plateaued=bool(r["final_mean"] >= plateau - PLATEAU_POINTS),
                              steps=harness.steps_to_reach(e["steps"], e["mean"], plateau))
          e["plateau"]["speedup"] = harness.speedup(e["plateau"]["steps"], r_steps)
      out.setdefault(dataset, {})[role] = entry
  return out


def aggregate_shorter(results: list[dict], agg: dict, T: int) -> None:
  """--long: into ``agg``'s entries, each method's final accuracy per whole schedule (``results``:
  the shorter schedules' runs; the long run's from ``agg``) and the shortest schedule whose final
  (mean over seeds), and every longer one's, reaches random init's final of the long run; the
  speed-up is random init's shortest such schedule over the method's."""
  for dataset, roles in agg.items():
    for role, entry in roles.items():
      if "random" not in entry:
        continue
      bar = entry["random"]["final_mean"]
      for method, e in entry.items():
        by_steps = {T: dict(mean=e["final_mean"], std=e["final_std"], seeds=len(e["seeds"]))}
        mine = [r for r in results if (r["dataset"], r["role"], r["method"]) == (dataset, role, method)]
        for steps in sorted({r["budget"]["train_steps"] for r in mine}):
          finals = np.array([r["final_accuracy"] for r in mine if r["budget"]["train_steps"] == steps])
          by_steps[steps] = dict(mean=float(finals.mean()), std=float(finals.std()), seeds=len(finals))
        e["schedules"] = {str(k): by_steps[k] for k in sorted(by_steps)}
        e["shortest_schedule"], e["shortest_below_grid"] = shortest_schedule(by_steps, bar)
      shortest_random = entry["random"]["shortest_schedule"]  # T at most: its own long run sets the bar
      lengths = [int(n) for n in entry["random"]["schedules"]]
      random_means = [v["mean"] for v in entry["random"]["schedules"].values()]
      for e in entry.values():
        e["schedule_speedup"] = harness.speedup(e["shortest_schedule"], shortest_random)
        # At every length: the schedule random init needs to match this final, over the length (None
        # where random init's longest falls short).
        e["random_schedule_ratio"] = {
            n: (None if (m := harness.steps_to_reach(lengths, random_means, v["mean"])) is None else m / int(n))
            for n, v in e["schedules"].items()}


def shortest_schedule(by_steps: dict, bar: float) -> tuple[float | None, bool]:
  """The schedule length from which on every longer schedule's final (mean over seeds) reaches
  ``bar``, linearly interpolated between the last length that misses it and the next (a lucky short
  run below a longer one that misses is noise, not a shorter training); None if the longest misses.
  Second: True when every length of the grid reaches it (the shortest is then at most the grid's)."""
  lengths = sorted(by_steps)
  means = [by_steps[n]["mean"] for n in lengths]
  misses = [i for i, a in enumerate(means) if a < bar]
  start = misses[-1] if misses else 0
  return harness.steps_to_reach(lengths[start:], means[start:], bar), not misses


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------

def fmt_plateau(e: dict | None) -> str:
  """A method's cell of the full-training table: the steps to random init's plateau, the speed-up."""
  if e is None:
    return "N/A"
  if e["steps"] is None:
    return "not reached"
  return f"{e['steps']:.0f}, " + ("∞" if np.isinf(e["speedup"]) else f"{e['speedup']:.1f}×")


def shorter_section(args, d: dict, methods: list[str], targets: dict, w) -> None:
  """--long: every method's final accuracy on whole schedules of T/k steps, and the shortest that
  reaches random init's final of the long run."""
  T = args.budget["train_steps"]
  lengths = [T] + [T // k for k in args.shorter]
  w("### Shorter schedules: how short a training run may be\n")
  w(f"Every method also trained on whole schedules of T/k steps (k = {', '.join(map(str, args.shorter))}; the same "
    "recipe with its warmup (a tenth) and cosine decay scaled to the length). Under one cosine schedule every method "
    f"gains its last points as the learning rate decays, so the steps to a plateau on the {T}-step schedule are bound "
    "to that schedule's end; these runs ask instead how long a run each initialization needs. Bar: random init's final "
    f"accuracy after {T} steps; **bold**: a final (mean over seeds) at or above it. Shortest: the length from which "
    "on every longer schedule reaches the bar, interpolated linearly between the longest schedule that misses it and "
    "the next ('≤' when every schedule of the grid reaches it). Speed-up: random init's shortest over the method's "
    "('≥' with '≤').\n")
  w("| target | method | " + " | ".join(f"{n} steps" for n in lengths) + " | shortest reaching the bar, speed-up |")
  w("|---|---|" + "---|" * (len(lengths) + 1))
  for role in args.roles:
    entry = d.get(role, {})
    if "random" not in entry:
      continue
    bar = entry["random"]["final_mean"]
    for m in methods:
      e = entry.get(m)
      if e is None or "schedules" not in e:
        continue
      cells = []
      for n in lengths:
        v = e["schedules"].get(str(n))
        cell = "-" if v is None else fmt_acc(v["mean"], v["std"], v["seeds"])
        cells.append(f"**{cell}**" if v is not None and v["mean"] >= bar else cell)
      short, bound = e["shortest_schedule"], e["shortest_below_grid"]
      last = ("not reached" if short is None else f"{'≤ ' * bound}{short:.0f}, " + (
          "1×" if m == "random" else '≥ ' * bound + fmt_speed(e["schedule_speedup"])))
      w(f"| {role} {targets[role].short_name()} (bar {100 * bar:.1f}%) | {LABELS[m]} | " + " | ".join(cells)
        + f" | {last} |")
  w("")
  for role in args.roles:
    for m in methods:
      ratios = d.get(role, {}).get(m, {}).get("random_schedule_ratio")
      if m == "random" or not ratios:
        continue
      w(f"- {role}, {LABELS[m]}: the schedule random init needs to match its final (interpolated between random "
        "init's lengths), over its own: " + ", ".join(
            f"{'beyond the grid' if r is None else f'{r:.1f}×'} at {n}" for n, r in ratios.items()) + " steps.")
  # The plateau test above passes at the end of any cosine decay; the length test asks whether the bar
  # is random init's asymptote: its final should not climb much from a schedule half as long.
  halves = {role: half for role in args.roles
            if (half := d.get(role, {}).get("random", {}).get("schedules", {}).get(str(T // 2)))}
  for role, half in halves.items():
    final, gain = d[role]["random"]["final_mean"], d[role]["random"]["final_mean"] - half["mean"]
    w(f"- {role}: random init's final accuracy gains {100 * gain:.1f} points from the {T // 2}-step schedule to the "
      f"{T}-step one ({100 * half['mean']:.1f} -> {100 * final:.1f}%): " + (
          "the bar is the end of this schedule, not random init's asymptote; a longer `--train-steps` raises it."
          if gain > PLATEAU_POINTS else f"within {100 * PLATEAU_POINTS:.0f} point: near random init's asymptote "
          "for this recipe."))
  if halves:
    w("")


def fmt_acc(mean: float, std: float, n: int) -> str:
  return f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}"


def ranked_speedup(e: dict) -> float:
  """A speed-up to compare: inf at step 0, -1 where random init's final is not reached."""
  return -1.0 if e.get("speedup") is None else e["speedup"]


def fmt_speedup(e: dict, T: int, method: str) -> str:
  return harness.fmt_speedup(e, T, method, final=f"{100 * e['final_mean']:.1f}%")


def plot(agg: dict, dataset: str, roles: list[str], targets: dict, path: str, budget: dict) -> None:
  """Eval accuracy against the step, a panel per target; with shorter schedules (--long), a second
  row: each schedule's final accuracy against its length."""
  panels, finals = [], []
  for role in roles:
    entry = agg.get(dataset, {}).get(role, {})
    line = [(100 * entry["random"]["final_mean"], "k", ":")] if "random" in entry else []
    title = f"{role}: {targets[role].short_name()}"
    panels.append(dict(title=title, lines=line, curves={
        m: (e["steps"], 100 * np.array(e["mean"]), 100 * np.array(e["std"])) for m, e in entry.items()}))
    finals.append(dict(title=title, lines=line, curves={
        m: ([int(k) for k in e["schedules"]], [100 * v["mean"] for v in e["schedules"].values()],
            [100 * v["std"] for v in e["schedules"].values()]) for m, e in entry.items() if "schedules" in e}))
  rows, ylabels, xlabels = [panels], ["eval accuracy (%)"], ["training step"]
  if any(f["curves"] for f in finals):
    rows.append(finals)
    ylabels.append("final eval accuracy (%)")
    xlabels.append("length of the whole schedule (steps)")
  harness.plot_curves(path, rows, ylabels=ylabels, xlabels=xlabels,
                      suptitle=f"{DATASET_LABELS[dataset]}: {harness.seeds_text(budget['seeds'])}; dotted: random "
                      "init's final accuracy")


def report_name(args, draw: int | None = None) -> str:
  d = shared.draw(args) if draw is None else draw
  lr = args.budget.get("train_lr")
  # A schedule other than the budget's (--train-steps=N) is reported beside its report, not over it.
  steps = args.budget["train_steps"]
  return (args.setup.report + ("_long" if args.long else "")
          + (f"_{steps}steps" if steps != args.default_budget["train_steps"] else "")
          + (f"_lr{lr:g}" if lr else "") + (f"_draw{d}" if d else ""))


def draws_section(args, report: str, w) -> None:
  """Every draw of the pre-training stages reported beside this one (``--draw``) with the same budget:
  per dataset, target and method, the final accuracy and the speed-up of each draw and their mean.
  One draw's ± is over downstream seeds only; this is the spread a method's pre-training adds."""
  import glob
  base = report_name(args, 0)
  found = {}
  for path in sorted(glob.glob(os.path.join(args.out, base + ".json")) +
                     glob.glob(os.path.join(args.out, base + "_draw*.json"))):
    raw = harness.read_json(path)
    if raw and raw.get("budget") == args.budget and raw.get("aggregate"):
      found[int(raw.get("draw", 0))] = raw["aggregate"]
  if len(found) < 2:
    return
  draws = sorted(found)
  w("## Pre-training draws\n")
  w(f"The same command with `--draw=N` (every pre-training and WeiT's scaler training seeded N; random init's "
    f"runs are shared): draws {', '.join(map(str, draws))}, from `{base}.json` and its `_draw<N>` siblings with this "
    "budget. Each cell: the final accuracy (mean over downstream seeds) and the speed-up over random init "
    "(the same runs for every draw), per draw; then the final's mean over draws ± their std and the mean "
    "speed-up.\n")
  w("| dataset | target | method | " + " | ".join(f"draw {d}" for d in draws) + " | over draws |")
  w("|---|---|---|" + "---|" * (len(draws) + 1))
  for dataset in args.datasets:
    for role in args.roles:
      for m in (m for m in METHODS if m in args.methods and m != "random"):
        es = [found[d].get(dataset, {}).get(role, {}).get(m) for d in draws]
        if not all(es):
          continue
        finals = np.array([100 * e["final_mean"] for e in es])
        speeds = [None if e.get("speedup") is None else float(e["speedup"]) for e in es]  # 'inf' in JSON
        cells = [f"{f:.1f}%, {fmt_speed(x)}" for f, x in zip(finals, speeds)]
        ok = [x for x in speeds if x is not None and np.isfinite(x)]
        mean_speed = f"{np.mean(ok):.1f}×" if len(ok) == len(speeds) else "-"
        w(f"| {DATASET_LABELS[dataset]} | {role} | {LABELS[m]} | " + " | ".join(cells)
          + f" | {finals.mean():.1f} ± {finals.std():.1f}%, {mean_speed} |")
  w("")


def fmt_speed(x) -> str:
  return "not reached" if x is None else ("∞" if not np.isfinite(float(x)) else f"{float(x):.1f}×")


def early_text(b: dict) -> str:
  early = shared.early_evals(b, b["eval_every"])
  return (f" and at steps {', '.join(map(str, early))} (every {b['early_every']} before the first periodic eval: "
          "where a good initialization passes random init's final accuracy)" if early else "")


def write_report(args, agg: dict, results: list[dict], stages: dict, targets: dict, na: dict, info: dict) -> str:
  import json
  from weit_jax import models
  setup, b = args.setup, args.budget
  T = b["train_steps"]
  os.makedirs(args.out, exist_ok=True)
  roles = args.roles
  report = report_name(args)
  plots = {}
  for dataset in args.datasets:
    name = f"{report}_{dataset}.png"
    plot(agg, dataset, roles, targets, os.path.join(args.out, name), b)
    plots[dataset] = name
  raw = dict(command=info["command"], date=info["date"], machine=info["machine"], budget=b, draw=shared.draw(args),
             wall_s=info["wall_s"], stages=stages, targets={r: models.to_record(c) for r, c in targets.items()},
             not_applicable={f"{m}/{r}": why for (m, r), why in na.items()}, aggregate=agg, runs=results)
  with open(os.path.join(args.out, f"{report}.json"), "w") as f:
    f.write(json.dumps(harness.json_safe(raw, relative_paths=True), indent=2))

  methods = [m for m in METHODS if m in args.methods]
  L = []
  w = L.append
  family_name = {"vit": "ViTs", "resnet": "ResNets"}.get(setup.family, setup.family)
  w(f"# Initialization quality of {family_name}: WeiT vs. baseline initializers\n")
  quick = " (**--quick smoke test: tiny budgets, not a result**)" if args.quick else ""
  w(f"Written by `benchmarks/init_quality.py` from its own results{quick}. Nothing in this file is typed by hand.\n")
  L.extend(harness.header(info, b["seeds"], "data order and every random choice of an initializer: random and "
                          "mimetic weights, new heads", recorded_s=info["total_recorded_s"]))
  if shared.draw(args):
    w(f"- Draw {shared.draw(args)} (`--draw`): every pre-training and WeiT's scaler training with seed "
      f"{shared.draw(args)} (the default report's: 0); random init's runs are the default report's.\n")

  w("## What was run\n")
  aux = shared.aux_config(setup)
  w(f"- **Pre-training** (all on Fashion-MNIST, {b['pretrain_steps']} steps of batch {b['pretrain_batch_size']} each, "
    "so the compute budget in steps and examples is the same):")
  for key, label in (("weit", "WeiT templates"), ("tleg", "TLEG auxiliary"),
                     ("dense", "dense source of weight selection")):
    if key in stages.get("pretrain", {}):
      r = stages["pretrain"][key]
      w(f"  - {label}: {setup.family} {r['model']}, lr {r['lr']}, {r['wall_s'] / 60:.1f} min, eval accuracy "
        f"{100 * r['eval_accuracy']:.1f}%")
  for role in (r for r in roles if f"target-{r}" in stages.get("pretrain", {})):
    r = stages["pretrain"][f"target-{role}"]
    w(f"  - the {role} target itself (the reference **pre-trained target**: a pre-training per size, which WeiT "
      f"avoids): {r['model']}, lr {r['lr']}, {r['wall_s'] / 60:.1f} min, eval accuracy {100 * r['eval_accuracy']:.1f}%")
  if "extracted" in stages:
    r, e = stages["extracted"], stages["init_extracted"]
    w(f"- **WeiT (extracted)**: N={r['num_templates']} templates and the source's scalers extracted in closed form "
      f"(Van Loan-Pitsianis + SVD, `programs/pretrain.py` with `init_templates_from` and `total_steps=0`) from the "
      f"dense source {r['model']} (the model weight selection starts from; no constrained pre-training), "
      f"{r['wall_s']:.0f} s; relative reconstruction error {r['reconstruction_error']['mean']:.3f} (mean over banks), "
      f"{r['reconstruction_error']['max']:.3f} (max); the dense source composed from them: eval accuracy "
      f"{100 * r['eval_accuracy']:.1f}%. Then the same scaler training as WeiT ({e['steps']} steps), "
      f"{e['wall_s'] / 60:.1f} min for all targets.")
  if "init" in stages:
    r = stages["init"]
    w(f"- **WeiT initialization**: frozen templates, scalers of each target trained for {r['steps']} steps "
      f"(batch {b['pretrain_batch_size']}) on "
      f"{r['num_examples']} Fashion-MNIST training examples (lr {r['lr']}); {r['wall_s'] / 60:.1f} min for all "
      "targets. This is extra data and compute that only WeiT uses; the tables count downstream steps only.")
  w(f"- **Targets** (auxiliary of WeiT and TLEG: {aux.short_name()}; dense source: "
    f"{shared.dense_source_config(setup).short_name()}, the union of the targets so that weight selection applies to all):")
  for role, spec in setup.targets:
    w(f"  - {role}: {targets[role].short_name()} (`{spec}`)")
  w("  " + setup.tiles)
  w(f"- **Downstream**: `programs/train.py` (configs/{setup.family}_train.py:runlocal: AdamW lr "
    f"{'%g (--train-lr; the recipe: 1e-3)' % b['train_lr'] if b.get('train_lr') else '1e-3'}, weight decay 0.05, "
    f"cosine, {max(1, T // 10)} warmup steps) for {T} steps of batch {b['batch_size']}, eval every "
    f"{b['eval_every']} steps, at step 0{early_text(b)}. Fashion-MNIST eval on `{b['fmnist_eval']}` (a fixed subset keeps "
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
    if args.long:
      w("### Full training: the steps to random init's plateau\n")
      w(f"Random init's plateau: its best accuracy (mean over seeds) over the last quarter of the {T} steps; it "
        f"has plateaued when its final accuracy is within {100 * PLATEAU_POINTS:.0f} point of it. Speed-up: the "
        "steps random init needs to reach its plateau over the steps the method needs.\n")
      w("| target | random init's plateau (%) | plateaued | " + " | ".join(
          f"{LABELS[m]}: steps, speed-up" for m in methods if m != "random") + " |")
      w("|---|---|---|" + "---|" * (len(methods) - 1))
      for role in roles:
        entry = d.get(role, {})
        if "random" not in entry:
          continue
        pl = entry["random"]["plateau"]
        cells = []
        for m in methods:
          if m == "random":
            continue
          e = entry.get(m, {}).get("plateau")
          cells.append(fmt_plateau(e))
        w(f"| {role} {targets[role].short_name()} | {100 * pl['value']:.1f} | {'yes' if pl['random_plateaued'] else 'no'} | "
          + " | ".join(cells) + " |")
      w("")
      if args.shorter:
        shorter_section(args, d, methods, targets, w)
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

  if stages.get("extraction_sweep"):
    sweep = stages["extraction_sweep"]
    name = f"{report}_extraction.png"
    plot_extraction(sweep, stages["pretrain"]["dense"], os.path.join(args.out, name))
    w("## Templates extracted from the dense source, against N\n")
    w(f"The dense source ({sweep[0]['model']}, eval accuracy {100 * stages['pretrain']['dense']['eval_accuracy']:.1f}%) "
      "composed from N extracted templates per bank and its own extracted scalers, before any training: the "
      "relative reconstruction error ||W - W_N||/||W|| over the banks, and the eval accuracy of the composed "
      f"model on `{b['fmnist_eval']}`.\n")
    w(f"![reconstruction error and accuracy against N]({name})\n")
    w("| N | mean error | max error | eval accuracy (%) |")
    w("|---|---|---|---|")
    for r in sweep:
      w(f"| {r['num_templates']} | {r['reconstruction_error']['mean']:.3f} | {r['reconstruction_error']['max']:.3f} | "
        f"{100 * r['eval_accuracy']:.1f} |")
    w("")

  draws_section(args, report, w)
  w("## Where WeiT does and does not win\n")
  w("Generated from the tables above (final accuracy, mean over seeds; 'ahead' means a higher mean, not "
    "necessarily beyond the spread).\n")
  acc = lambda v: fmt_acc(v["final_mean"], v["final_std"], len(v["seeds"]))
  for dataset in args.datasets:
    for role in roles:
      e = agg.get(dataset, {}).get(role, {})
      if "weit" not in e:
        continue
      others = sorted(((v["final_mean"], m) for m, v in e.items() if m != "weit" and m not in REFERENCES),
                      reverse=True)
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
    initializers = lambda d, r: [(m, e) for m, e in agg[d][r].items() if m not in REFERENCES]
    best_final = sum(max(initializers(d, r), key=lambda kv: kv[1]["final_mean"])[0] == "weit" for d, r in cells)
    best_speed = sum(max(((m, e) for m, e in initializers(d, r) if m != "random"),
                         key=lambda kv: ranked_speedup(kv[1]))[0] == "weit" for d, r in cells)
    w(f"\nIn {len(cells)} (dataset, target) cells, WeiT has the best final accuracy in {best_final} and the "
      f"largest speed-up over random init in {best_speed} (ties count for whichever method is listed first; the "
      "reference is left out).")
  reference_section(args, agg, targets, T, w)
  w("")
  w("## Time per downstream run\n")
  w("Measured wall time of one downstream run (export, step-0 eval, training, evals), mean over its runs:\n")
  w("| target | " + " | ".join(DATASET_LABELS[d] for d in args.datasets) + " |")
  w("|---|" + "---|" * len(args.datasets))
  for role in roles:
    row = []
    for dataset in args.datasets:
      walls = [r["wall_s"] for r in results if r["role"] == role and r["dataset"] == dataset
               and r["budget"]["train_steps"] == T]  # (not --long's shorter schedules)
      row.append(f"{np.mean(walls):.0f} s ({len(walls)} runs)" if walls else "-")
    w(f"| {role} {targets[role].short_name()} | " + " | ".join(row) + " |")
  w("")
  w("## Why these sizes and budgets\n")
  w(f"- The auxiliary model ({aux.short_name()}) is a small runlocal size; the targets change one thing "
    "each (depth down, depth up, width down to a non-tile width, width up), so every row asks one question.")
  w("- The dense source is the smallest model that contains every target (every size field: "
    f"{', '.join(k for k in setup.dense_source if k != 'variant')}), so weight selection applies everywhere; it is larger than WeiT's "
    "and TLEG's auxiliary model, so the same step budget costs it more compute (a favourable setting for "
    "weight selection).")
  if setup.budget:
    w(f"- This family's budget differs from the ViT's ({setup.budget}): its convolutions are slower per "
      "example on a CPU, and the ViT's budget projects to about two hours here (`--estimate`).")
  w("- Budgets: the whole benchmark is meant to fit in about an hour on a 2-core CPU. "
    "`python benchmarks/init_quality.py --estimate` times one training step of every size on the machine at "
    "hand and projects the wall time of the chosen budgets; override any budget with its flag "
    "(`--train-steps`, `--pretrain-steps`, `--seeds`, ...; another `--train-steps` is reported beside this report, "
    f"as `{args.setup.report}[_long]_<N>steps.md`). Short downstream budgets are where an "
    "initialization matters most.")
  w("")
  w("## Raw data\n")
  w(f"`{report}.json`: every run's curve (eval accuracy by step), its seed and wall time, the aggregates, "
    "the budgets and the pre-training records. Run folders (metrics.jsonl, curves.png) are under the "
    f"workdir `{harness.in_checkout(args.workdir)}`.")
  path = os.path.join(args.out, f"{report}.md")
  with open(path, "w") as f:
    f.write("\n".join(L) + "\n")
  return path


def reference_section(args, agg: dict, targets: dict, T: int, w) -> None:
  """WeiT against the pre-trained target, per cell: how much of what a pre-training of the target's own
  size gets from this data WeiT delivers from templates."""
  cells = [(d, r) for d in args.datasets for r in args.roles
           if {"weit", "pretrained"} <= set(agg.get(d, {}).get(r, {}))]
  if not cells:
    return
  w("\n### Against the reference: the target pre-trained itself\n")
  w("The pre-trained target is each target trained from random init on the pre-training data at the "
    "pre-training budget, then trained downstream like every method: a pre-training per size, the cost WeiT "
    "avoids (WeiT's templates get the same pre-training steps, then its scaler training). It is not a ceiling: "
    "WeiT at or above it gives a target of that size what a pre-training of its own would, without paying for "
    "it; where both fall short of a goal, the goal asks more than a pre-training of the target's own size gets "
    "from this data.\n")
  w("| dataset | target | WeiT: speed-up, final (%) | pre-trained target: speed-up, final (%) |")
  w("|---|---|---|---|")
  for d, r in cells:
    e = agg[d][r]
    cell = lambda m: (f"{fmt_speedup(e[m], T, m)}, "
                      f"{fmt_acc(e[m]['final_mean'], e[m]['final_std'], len(e[m]['seeds']))}")
    w(f"| {DATASET_LABELS[d]} | {r} {targets[r].short_name()} | {cell('weit')} | {cell('pretrained')} |")
  faster = sum(ranked_speedup(agg[d][r]["weit"]) >= ranked_speedup(agg[d][r]["pretrained"]) for d, r in cells)
  higher = sum(agg[d][r]["weit"]["final_mean"] >= agg[d][r]["pretrained"]["final_mean"] for d, r in cells)
  w(f"\nWeiT's speed-up is at or above the reference's in {faster} of {len(cells)} cells, its final accuracy in "
    f"{higher}.")


def plot_extraction(sweep: list[dict], dense: dict, path: str) -> None:
  """Reconstruction error (mean and max over banks) and the composed dense source's accuracy against N."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  n = [r["num_templates"] for r in sweep]
  fig, (ax_err, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.6))
  ax_err.plot(n, [r["reconstruction_error"]["mean"] for r in sweep], marker="o", label="mean over banks")
  ax_err.plot(n, [r["reconstruction_error"]["max"] for r in sweep], marker="s", ls="--", label="max")
  ax_err.set_ylabel("relative reconstruction error")
  ax_err.legend()
  ax_acc.plot(n, [100 * r["eval_accuracy"] for r in sweep], marker="o", color="tab:brown", label="composed from N")
  ax_acc.axhline(100 * dense["eval_accuracy"], color="k", ls=":", lw=0.8, label="the dense source")
  ax_acc.set_ylabel("eval accuracy (%)")
  ax_acc.legend()
  for ax in (ax_err, ax_acc):
    ax.set_xscale("log", base=2)
    ax.set_xticks(n, [str(v) for v in n])
    ax.set_xlabel("templates per bank (N)")
    ax.grid(alpha=0.3)
  fig.suptitle(f"Templates extracted in closed form from the dense source {sweep[0]['model']}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# --estimate: time one training step of every size
# ---------------------------------------------------------------------------------------------------

def time_steps(args) -> dict:
  """Seconds per training step (wall and process CPU) of every size, on random batches: targets at
  the downstream batch size, the pre-trained models at the pre-training batch size."""
  from weit_jax import models, sharding, train_loop
  from weit_jax.inits import tleg
  from weit_jax.programs import pretrain, train
  setup, b = args.setup, args.budget
  mesh = sharding.make_mesh({"data": -1})
  rng = np.random.default_rng(0)

  def plain_task(cfg, B):
    c = shared.train_config(setup, b, dataset="fashion_mnist_local", steps=100, seed=0, model=cfg, batch_size=B)
    return train.make_task(c, models.build(cfg), cfg)

  def weit_task(cfg, B):
    c = shared.unlocked(shared.configs(setup, "pretrain").get_config("runlocal"))
    c.model = shared.model_fields(setup, **setup.auxiliary)
    c.total_steps, c.batch_size = 1000, B
    return pretrain.make_task(c, pretrain.build(c))

  def tleg_task(cfg, B):
    c = shared.train_config(setup, b, dataset="fashion_mnist_local", steps=100, seed=0, model=cfg, batch_size=B)
    return tleg.make_task(c, cfg)

  P = b["pretrain_batch_size"]
  aux = shared.aux_config(setup)
  sizes = {role: (cfg, b["batch_size"], plain_task) for role, cfg in shared.target_configs(setup).items()}
  sizes.update(weit_auxiliary=(aux, P, weit_task), tleg_auxiliary=(aux, P, tleg_task),
               dense_source=(shared.dense_source_config(setup), P, plain_task))
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
  targets = shared.target_configs(args.setup)
  sources = {"dense_config": shared.dense_source_config(args.setup)}
  ratio = b["pretrain_batch_size"] / b["batch_size"]
  pre = b["pretrain_steps"] * sum(per_step[k][key] for k in ("weit_auxiliary", "tleg_auxiliary", "dense_source"))
  init = sum(b["init_steps"] * ratio * per_step[r][key] for r in targets)
  fm_eval = (int(b["fmnist_eval"].split(":")[1].rstrip("]")) if ":" in b["fmnist_eval"] else 10_000)
  runs, n_runs = 0.0, 0
  for role, cfg in targets.items():
    methods = [m for m in args.methods if not shared.applies(args.setup, m, cfg, sources)]
    for dataset in args.datasets:
      evals = b["train_steps"] // b["eval_every"] + 2 + len(shared.early_evals(b, b["eval_every"]))
      examples = evals * (fm_eval if dataset == "fashion_mnist_local" else 1000)
      one = (b["train_steps"] + examples / b["batch_size"] / 3) * per_step[role][key] + overhead_s
      runs += one * len(methods) * b["seeds"]
      n_runs += len(methods) * b["seeds"]
  return dict(pretrain_s=pre, init_s=init, downstream_s=runs, runs=n_runs, total_s=pre + init + runs)


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------

def main(argv=None) -> None:
  args = parse_args(argv)
  t_start, load_start = harness.start(args)
  b = args.budget

  if args.estimate:
    per_step = time_steps(args)
    for key in ("wall", "cpu"):
      p = projection(args, per_step, key)
      log(f"projection from {key} time per step: pre-training {p['pretrain_s'] / 60:.1f} min, WeiT init "
          f"{p['init_s'] / 60:.1f} min, {p['runs']} downstream runs {p['downstream_s'] / 60:.1f} min; total "
          f"{p['total_s'] / 60:.1f} min (+ compilation)")
    return

  from weit_jax import input_pipeline
  setup = args.setup
  for dataset in args.datasets:
    input_pipeline.prepare(shared.data_config(setup, dataset, b))
  targets = shared.target_configs(setup)

  # ----- stage 1 and 2: pre-training, WeiT init ------------------------------------------------------
  stages: dict = {"pretrain": {}}
  sources = shared.pretrain_sources(args, stages)
  if "weit_extracted" in args.methods:  # the sweep over N (no training: seconds each)
    stages["extraction_sweep"] = [shared.extract_weit(args, stages["pretrain"]["dense"], n) for n in EXTRACTION_NS]

  # ----- stage 3: downstream runs ----------------------------------------------------------------------
  why_not = lambda method, cfg: shared.applies(setup, method, cfg, sources)
  pairs, na = harness.applicable(targets, args.methods + (["mimetic"] if setup.family != "vit" else []), why_not)
  jobs = [(dataset, seed, role, method) for role, method in pairs if role in args.roles for dataset in args.datasets
          for seed in range(b["seeds"])]
  jobs.sort(key=lambda j: (j[1], DATASETS.index(j[0]), setup.roles.index(j[2]), METHODS.index(j[3])))
  results = []
  for i, (dataset, seed, role, method) in enumerate(jobs):
    t0 = time.time()
    r = run_one(args, method, role, targets[role], dataset, seed, sources)
    results.append(r)
    log(f"[{i + 1}/{len(jobs)}] {dataset} {targets[role].short_name()} {method} seed {seed}: step 0 "
        f"{100 * r['step0_accuracy']:.1f}% -> {100 * r['final_accuracy']:.1f}% ({time.time() - t0:.0f}s)")

  shorter = []  # --long: whole schedules of T/k steps
  short_jobs = [(k, seed, dataset, role, method) for k in args.shorter for (dataset, seed, role, method) in jobs]
  for i, (k, seed, dataset, role, method) in enumerate(short_jobs):
    t0 = time.time()
    budget = dict(b, train_steps=b["train_steps"] // k)
    r = run_one(args, method, role, targets[role], dataset, seed, sources, budget=budget)
    shorter.append(r)
    log(f"[{i + 1}/{len(short_jobs)}] schedule of {budget['train_steps']} steps: {dataset} "
        f"{targets[role].short_name()} {method} seed {seed}: {100 * r['final_accuracy']:.1f}% ({time.time() - t0:.0f}s)")

  # ----- report -------------------------------------------------------------------------------------------
  agg = aggregate(results, b)
  if shorter:
    aggregate_shorter(shorter, agg, b["train_steps"])
  results = results + shorter
  recorded = sum(r["wall_s"] for r in results) + sum(r["wall_s"] for r in stages["pretrain"].values()) + \
      stages.get("init", {}).get("wall_s", 0.0) + stages.get("init_extracted", {}).get("wall_s", 0.0) + \
      sum(r["wall_s"] for r in stages.get("extraction_sweep", []))
  info = harness.run_info("benchmarks/init_quality.py", argv, t_start, load_start, total_recorded_s=recorded)
  path = write_report(args, agg, results, stages, targets, na, info)
  log(f"report: {path}; wall time {info['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
  main()
