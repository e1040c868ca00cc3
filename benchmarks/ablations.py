r"""Ablations: WeiT's recipe one factor at a time, for the classifier families (ViT, ResNet) and policies.

  python benchmarks/ablations.py                     # ViT, every factor
  python benchmarks/ablations.py --family=resnet     # N, tiles, multi-size, templated parameters, scaler budget
  python benchmarks/ablations.py --family=policy     # N, templated parameters, scaler budget and lr (PPO, brax)
  python benchmarks/ablations.py --quick             # smoke test: tiny budgets, 1 seed, a few factors
  python benchmarks/ablations.py --factors=n2,n8     # a subset (rows already run stay in the report)
  python benchmarks/ablations.py --factors=n8+scaler-S400xE500   # factors at once (a 'combination' row)

Every row changes one thing from a reference recipe (``configs/<family>_pretrain.py`` and ``_init.py``
at ``runlocal``, at the budget of ``init_quality.py``, but for the templated parameters and the scaler
training's steps, examples and lr, pinned to those the table was measured around: ``REFERENCE``) and reports:

- the auxiliary model's eval accuracy after pre-training (Fashion-MNIST; a row that changes only
  the scaler training shares the default's pre-training);
- for one depth target and one width target (``ROLES``: the width is not a tile multiple): the
  Fashion-MNIST eval accuracy of WeiT's export (after scaler training: what the init program
  delivers), and on MNIST-5k (the transfer setting: 5,000 real digits, a new head for every method,
  so every step 0 is at chance) the accuracy after the downstream budget, mean ± std over seeds,
  and the speed-up over random init (the steps random init needs for its final accuracy over those
  WeiT needs).

Policies (``--family=policy``): the stages, budget and measures of ``control_quality.py`` (its
workdir: the reference recipe's pre-training, scaler training and runs are its own): pre-training on
hopper (the auxiliary's eval return), scaler training by PPO on walker2d (another morphology: the
transfer setting, which only WeiT serves) of a depth and a width target (``POLICY_ROLES``; the
export's deterministic return), and downstream PPO there: the final training return and the
speed-up to random init's (environment steps, as in control.md). Multi-size pre-training is not a
policy factor: PPO collects its experience with the one model it trains (the pre-training program
refuses ``weit.extra_sizes`` for it).

The classifiers' stages are ``init_quality.py``'s (``benchmarks/stages.py``: pre-training, scaler training;
``init_quality.run_one``: downstream runs), in the same ``--workdir``: the reference recipe's
pre-training, the dense source (the distillation teacher) and random init's runs are those of
``init_quality.py`` when it ran there with the same budget (its WeiT rows now use the recipe of the
``scaler-S400xE500+scaler-lr0.003`` row, run apart). Each row's
own stages are cached under their recipe; an interrupted run continues where it stopped. The
report (``docs/results/ablations.md``, a section per family, and a plot of the scaler budget) is
written from the results of every family run so far (``ablations_<family>.json``).
"""
from __future__ import annotations

import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # harness, stages, init_quality

import argparse  # noqa: E402

import control_quality  # noqa: E402  (the policies' stages, budget and measures)
import harness  # noqa: E402
import init_quality  # noqa: E402  (its setups, budgets and downstream runs)
import numpy as np  # noqa: E402
import stages as shared  # noqa: E402
from weit_jax import data_catalog  # noqa: E402  (no data library: the split sizes)

DATASET = "mnist_5k"  # transfer: a new head for every method
ROLES = ("deeper", "narrower")  # one depth target, one width target that is not a tile multiple
SEEDS = 2  # downstream seeds of the full budget (the quick one: 1)

# The scaler budget grid: init-program steps x the examples they draw from (the default: the budget's).
SCALER_STEPS = (0, 10, 25, 100, 400, 1000)  # 1000: past 400, where the first grid was still rising
SCALER_LRS = (3e-3, 3e-2)  # around the reference's 1e-2, at its scaler budget
SCALER_EXAMPLES = (500, 2000, 8000)
# Smaller scaler batches: as many steps for a fraction of the examples drawn (steps x batch), the
# compute the paper-scale budget is counted in (combine: 'scaler-S400xE500+scaler-B4').
SCALER_BATCHES = (2, 4, 8)
# The recipe every row changes one factor from: the defaults before this table chose new ones (its
# rows are keyed on it). Today's defaults are rows of it (CHOSEN).
REFERENCE = dict(pretrain={"weit.untemplated": ""},  # configs/<family>_pretrain.py overrides
                 init={"optim.lr": 1e-2},  # configs/<family>_init.py overrides
                 budget=dict(init_steps=100, init_examples=2000))  # init_quality.py's scaler budget

# The row each family's defaults now follow (configs/<family>_init.py, init_quality.py's budget).
CHOSEN = {"vit": ("scaler-S400xE500+scaler-lr0.003",
                  "it changes the scaler training only; adding `untemplated-embed-head`, a pre-training change, "
                  "moves neither target beyond the spread"),
          "resnet": ("untemplated-stem-head+scaler-S400xE500+scaler-lr0.003",
                     "each part helps the narrower target beyond the spread, and together they have the best "
                     "final accuracy on both targets and the best speed-up (tied on narrower with the stem and "
                     "head alone). What it costs: the auxiliary's and the exports' own accuracy (76.0 -> 61.8%; "
                     "exports 65.8 / 59.0% against 79.5 / 70.7%), the head kept with them. Kept out of "
                     "templates, the zero-initialized head is one template of ones with a zero scaler, whose "
                     "gradient the softmax makes zero: it trains only from rounding noise. Noise templates "
                     "(`zero-init-noise`) let it train (aux 74.5%, exports 78.1 / 71.5%) and lose the transfer "
                     "gain (37.0 / 28.1%, below the scaler training alone); a plain zero head (`zero-init-plain`: "
                     "T = 0, S = 1) trains (aux 67.8 / 71.7% over two draws) and transfers within the draws' "
                     "spread of this recipe (44.2 / 36.9% and 42.2 / 40.3% against 41.9 / 36.3% and 51.0 / 42.5%), "
                     "the candidate for the next default. A second draw of this recipe (`+recipe-seed1`) transfers "
                     "better still (51.0 / 42.5%): one draw is uncertain by several points, so the choice rests "
                     "on the large effects only")}

# Per family: the alternatives that name the family's own fields.
FAMILY_FACTORS = {
    "vit": dict(
        tiles={"tiles-embed-8": {"weit.tiles.embed": 8}, "tiles-embed-32": {"weit.tiles.embed": 32},
               "tiles-mlp-8": {"weit.tiles.mlp": 8}, "tiles-mlp-32": {"weit.tiles.mlp": 32}},
        extra_sizes="depth=2,width=32,heads=1;depth=6,width=96,heads=3",
        untemplated={"untemplated-embed-head": "^(embedding|head)/",
                     "untemplated-all-outside-blocks": "^(embedding|head|pos_embedding|cls|Transformer/encoder_norm)"}),
    "resnet": dict(
        tiles={"tiles-2": ("resnet_tiles", 2), "tiles-8": ("resnet_tiles", 8)},
        extra_sizes="depth=2,width=6,groups=2;depth=5,width=12",
        untemplated={"untemplated-stem-head": "^(conv_root|head)/"}),
}


def factors(setup, budget: dict) -> dict:
  """name -> (group, label, pre-training overrides, init overrides) for ``setup``'s family."""
  fam = FAMILY_FACTORS[setup.family]
  out = {}
  for n in (2, 8, 16):
    out[f"n{n}"] = ("templates", f"N={n} templates per bank", {"weit.num_templates": n}, {})
  for name, change in fam["tiles"].items():
    if isinstance(change, tuple):  # a ResNet's tiles: one tile for every channel axis (4x on stage outputs)
      tiles = shared.configs(setup, "pretrain").tiles(setup.weit_tiles[0], change[1])
      out[name] = ("tiles", f"tile {change[1]} on every channel axis ({4 * change[1]} on stage outputs)",
                   {"weit.tiles": tiles}, {})
    else:
      (key, value), = change.items()
      out[name] = ("tiles", f"{key.rsplit('.', 1)[1]} tile {value}", change, {})
  if setup.family == "vit":  # the constraint's form on one family: ResNet steps are the slow ones here (init_quality.py)
    out["soft"] = ("constraint", "soft constraint (constraint.mode=soft: dense weights, a penalty)",
                   {"constraint.mode": "soft"}, {})
    out["diversity"] = ("constraint", "template-diversity term 0.1 (constraint.diversity)",
                        {"constraint.diversity": 0.1}, {})
  out["multi-size"] = ("multi-size", f"multi-size pre-training: also {fam['extra_sizes']} (weit.extra_sizes)",
                       {"weit.extra_sizes": fam["extra_sizes"]}, {})
  if setup.family == "vit":  # the dense source of weight selection as the teacher (classification only)
    out["distill"] = ("distillation", "distillation from the dense source of weight selection (weight 1)",
                      {"distill.teacher": "DENSE_SOURCE", "distill.weight": 1.0}, {})
  for name, pattern in fam["untemplated"].items():
    out[name] = ("templated parameters", f"kept out of templates: `{pattern}` (weit.untemplated)",
                 {"weit.untemplated": pattern}, {})
  # A zero-initialized parameter's first template is ones and its scalers zero ('ones'); kept out of
  # templates (one template), a classifier head's scaler then gets no gradient (the softmax's
  # gradients sum to zero over classes). 'noise' starts every template from noise instead.
  out["zero-init-noise"] = ("templated parameters", "zero-initialized parameters from noise templates "
                            "(weit.zero_init=noise)", {"weit.zero_init": "noise"}, {})
  out["zero-init-plain"] = ("templated parameters", "zero-initialized parameters kept out of templates as plain "
                            "ones, T = 0 and S = 1 (weit.zero_init=plain)", {"weit.zero_init": "plain"}, {})
  # Not a knob: another draw of the whole recipe (pre-training's and the scaler training's seeds), the
  # noise a row's single pre-training carries (combine: 'untemplated-stem-head+recipe-seed1').
  out["recipe-seed1"] = ("seed", "another draw of the recipe: pre-training and scaler-training seed 1 (the "
                         "reference: 0)", {"seed": 1}, {"seed": 1})
  out.update(scaler_seed_factors((1,)))
  out["scaler-S0"] = ("scaler budget", "no scaler training (the heuristic scalers only)", {}, {"steps": 0})
  for steps in (s for s in SCALER_STEPS if s):  # 0 steps read no examples: one row
    for examples in SCALER_EXAMPLES:
      if (steps, examples) != (budget["init_steps"], budget["init_examples"]):
        out[f"scaler-S{steps}xE{examples}"] = ("scaler budget", f"{steps} scaler steps on {examples:,} examples",
                                               {}, {"steps": steps, "num_examples": examples})
  for batch in SCALER_BATCHES:
    out[f"scaler-B{batch}"] = ("scaler budget", f"scaler batch {batch} (the budget's: {budget['pretrain_batch_size']})",
                               {}, {"batch_size": batch})
  out["scaler-init-random"] = ("scaler budget", "random scaler initialization (scaler_init=random)", {},
                               {"scaler_init": "random"})
  for lr in SCALER_LRS:
    out[f"scaler-lr{lr:g}"] = ("scaler lr", f"scaler-training lr {lr:g} (optim.lr of the init config)", {},
                               {"optim.lr": lr})
  return out


# Policies: the transfer setting and its targets (control_quality.TARGETS), the scaler budget grid
# (PPO updates of 8,192 environment steps; the reference: control_quality's init_updates) and lrs
# (around configs/policy_init.py's 1e-3).
POLICY_ENV = "walker2d"
POLICY_ROLES = ("deeper", "narrower")
POLICY_SCALER_UPDATES = (0, 5, 40, 80)
POLICY_SCALER_LRS = (3e-4, 3e-3)
POLICY_UNTEMPLATED = "^(actor|critic)/(input|head)/"  # the observation and output layers
POLICY_SCALER_SEEDS = (1, 2)  # the reference's scaler training uses seed 0


def policy_factors(budget: dict) -> dict:
  """name -> (group, label, pre-training overrides, init overrides) for policies."""
  out = {}
  for n in (2, 8, 16):
    out[f"n{n}"] = ("templates", f"N={n} templates per bank", {"weit.num_templates": n}, {})
  out["untemplated-input-head"] = ("templated parameters", f"kept out of templates: `{POLICY_UNTEMPLATED}` "
                                   "(weit.untemplated)", {"weit.untemplated": POLICY_UNTEMPLATED}, {})
  per_update = control_quality.env_steps_per_update()
  for updates in POLICY_SCALER_UPDATES:
    if updates != budget["init_updates"]:
      out[f"scaler-U{updates}"] = ("scaler budget", f"{updates} scaler-training PPO updates "
                                   f"({updates * per_update:,} environment steps)" if updates else
                                   "no scaler training (the heuristic scalers only)", {}, {"steps": updates})
  for lr in POLICY_SCALER_LRS:
    out[f"scaler-lr{lr:g}"] = ("scaler lr", f"scaler-training lr {lr:g} (optim.lr of the init config)", {},
                               {"optim.lr": lr})
  out.update(scaler_seed_factors(POLICY_SCALER_SEEDS))
  return out


def scaler_seed_factors(seeds) -> dict:
  """Not knobs: other draws of the scaler training alone (the init config's seed: the examples or
  experience it draws, their order), to tell a recipe's effect from one scaler training's luck;
  they combine with a row ('scaler-lr0.003+scaler-seed1')."""
  return {f"scaler-seed{seed}": ("seed", f"another draw of the scaler training only: its seed {seed} (the "
                                 "reference: 0)", {}, {"seed": seed}) for seed in seeds}


def combined(known: dict, name: str):
  """``known[name]``, or for ``a+b+...`` the factors a, b, ... at once (group 'combination'; their
  overrides merged, so they must change different fields). None if a part is unknown."""
  parts = name.split("+")
  if any(p not in known for p in parts):
    return None
  if len(parts) == 1:
    return known[name]
  pre, init = {}, {}
  for p in parts:
    for merged, changes in ((pre, known[p][2]), (init, known[p][3])):
      if set(merged) & set(changes):
        raise ValueError(f"factors of {name!r} change the same fields: {sorted(set(merged) & set(changes))}")
      merged.update(changes)
  return ("combination", " + ".join(known[p][1] for p in parts), pre, init)


QUICK_FACTORS = ("n2", "scaler-S10xE500")
POLICY_QUICK_FACTORS = ("n2", "scaler-U0")


FAMILIES = (*FAMILY_FACTORS, "policy")


def parse_args(argv=None):
  first = argparse.ArgumentParser(add_help=False)
  first.add_argument("--family", default="vit", choices=FAMILIES)
  policy = first.parse_known_args(argv)[0].family == "policy"
  budgets = control_quality.BUDGETS if policy else init_quality.BUDGETS  # its budget flags
  p = harness.parser(__doc__, budgets)
  p.add_argument("--family", default="vit", choices=FAMILIES, help="the model family (the budget flags: the "
                 "family's benchmark's, init_quality.py or, for policy, control_quality.py)")
  p.add_argument("--factors", default=None, help="comma-separated subset of the family's factors (default: "
                 "all; --quick: " + ",".join(QUICK_FACTORS) + ")")
  args = p.parse_args(argv)
  if policy:
    args.setup = None
    harness.resolve(p, args, budgets, ("bench_control", "bench_control_quick"))
    known = policy_factors(args.budget)
  else:
    args.setup = init_quality.SETUPS[args.family]
    suffix = "" if args.family == "vit" else f"_{args.family}"
    harness.resolve(p, args, budgets, ("bench" + suffix, "bench_quick" + suffix), None, args.setup.budget)
    if not args.quick:
      args.budget.update(REFERENCE["budget"])
    # The table's rows were measured with evals every eval_every only; every row shares one schedule.
    args.budget.pop("early_every", None)
    known = factors(args.setup, args.budget)
  args.budget["seeds"] = min(args.budget["seeds"], SEEDS)
  quick = POLICY_QUICK_FACTORS if policy else QUICK_FACTORS
  chosen = args.factors.split(",") if args.factors else (quick if args.quick else list(known))
  for name in chosen:
    try:
      ok = combined(known, name)
    except ValueError as e:
      p.error(str(e))
    if ok is None:
      p.error(f"unknown factor {name!r} for {args.family}; valid: {', '.join(known)}, or several joined by '+'")
  args.factors = [n for n in chosen if n]
  return args


def run_row(args, name: str, pre_variant: str, pre_overrides: dict, init_overrides: dict, stages: dict,
            targets: dict) -> dict:
  """One recipe: its pre-training (or the default's; ``pre_variant``: its folder's name), scaler
  training for ``ROLES``, downstream runs."""
  if pre_overrides.get("distill.teacher") == "DENSE_SOURCE":
    pre_overrides = dict(pre_overrides, **{"distill.teacher": stages.setdefault("dense", shared.pretrain_dense(args))
                                           ["export"]})
  pre = shared.pretrain_weit(args, pre_variant, {**REFERENCE["pretrain"], **pre_overrides})
  # The reference recipe: init_quality.py's scaler training of every target when it ran with the reference's
  # budget (the same exports, so its runs are reused).
  roles = list(ROLES) if pre_overrides or init_overrides else None
  init = shared.init_weit(args, pre, roles=roles, overrides={**REFERENCE["init"], **init_overrides})
  sources = {"weit": {role: r["export"] for role, r in init["targets"].items()}}
  runs = [init_quality.run_one(args, "weit", role, targets[role], DATASET, seed, sources, variant=name)
          for role in ROLES for seed in range(args.budget["seeds"])]
  return dict(aux_accuracy=pre.get("eval_accuracy"), params=pre.get("params"), pretrain_wall_s=pre["wall_s"],
              init={role: {k: v for k, v in r.items() if k != "export"} for role, r in init["targets"].items()
                    if role in ROLES},
              init_steps=init["steps"], init_examples=init["num_examples"],
              init_batch=init.get("batch_size", args.budget["pretrain_batch_size"]), runs=runs)


def summarize(runs: list[dict], reference: dict | None, T: int) -> dict:
  """role -> step-0 / final mean and std, speed-up over ``reference`` (random init's role -> final mean)."""
  out = {}
  for role, rs in harness.group(runs, "role").items():
    steps = sorted(int(s) for s in rs[0]["curve"])
    st = harness.curve_stats(harness.seed_curves([r["curve"] for r in rs], steps))
    e = dict(step0_mean=st["step0_mean"], step0_std=st["step0_std"], final_mean=st["final_mean"],
             final_std=st["final_std"], seeds=len(rs))
    if reference and role in reference:
      e["steps_to_random_final"] = harness.steps_to_reach(steps, st["mean"], reference[role])
      e["speedup"] = harness.speedup(e["steps_to_random_final"], T)
    out[role] = e
  return out


def classifier_rows(args, argv) -> dict:
  """The record of a classifier family's rows (``init_quality.py``'s stages): random init's runs,
  the reference recipe's row and every ``--factors`` row."""
  from weit_jax import input_pipeline
  setup, b = args.setup, args.budget
  for dataset in ("fashion_mnist_local", DATASET):
    input_pipeline.prepare(shared.data_config(setup, dataset, b))
  targets = shared.target_configs(setup)
  known = factors(setup, b)
  stages: dict = {}

  # Random init's runs (the speed-up's reference) and the reference recipe.
  random_runs = [init_quality.run_one(args, "random", role, targets[role], DATASET, seed, {})
                 for role in ROLES for seed in range(b["seeds"])]
  reference = {role: e["final_mean"] for role, e in summarize(random_runs, None, b["train_steps"]).items()}
  rows = {"default": dict(group="default", label="the reference recipe",
                          **run_row(args, "", "", {}, {}, stages, targets))}
  for i, name in enumerate(args.factors):
    group, label, pre_overrides, init_overrides = combined(known, name)
    # A combination's pre-training is cached under its parts that change pre-training.
    pre_variant = "+".join(p for p in name.split("+") if known[p][2])
    t0 = time.time()
    rows[name] = dict(group=group, label=label, overrides=overrides_of(pre_overrides, init_overrides),
                      **run_row(args, name, pre_variant, pre_overrides, init_overrides, stages, targets))
    s = summarize(rows[name]["runs"], reference, b["train_steps"])
    harness.log(f"[{i + 1}/{len(args.factors)}] {name}: " + "; ".join(
        f"{r} {100 * e['step0_mean']:.1f}% -> {100 * e['final_mean']:.1f}%" for r, e in s.items())
        + f" ({time.time() - t0:.0f}s)")
  return dict(
      family=setup.family, budget=b, roles={r: targets[r].short_name() for r in ROLES}, dataset=DATASET,
      random=dict(runs=random_runs, summary=summarize(random_runs, reference, b["train_steps"])),
      rows={name: dict({k: v for k, v in row.items() if k != "runs"},
                       summary=summarize(row["runs"], reference, b["train_steps"]),
                       runs=[{k: r[k] for k in ("role", "seed", "step0_accuracy", "final_accuracy", "curve")}
                             for r in row["runs"]])
            for name, row in rows.items()})


def overrides_of(pre_overrides: dict, init_overrides: dict) -> dict:
  """A row's changes as one dict (the init program's fields prefixed ``init.``)."""
  return dict(pre_overrides, **{f"init.{k}": v for k, v in init_overrides.items()})


def policy_rows(args, argv) -> dict:
  """The record of the policies' rows (``control_quality.py``'s stages and measures, on
  ``POLICY_ENV``'s ``POLICY_ROLES``): random init's runs, the reference recipe's row (today's
  defaults: control_quality's own stages) and every ``--factors`` row."""
  b = args.budget
  targets = control_quality.target_configs(POLICY_ENV)
  known = policy_factors(b)
  random_runs = [control_quality.run_one(args, "random", POLICY_ENV, role, targets[role], seed, {})
                 for role in POLICY_ROLES for seed in range(b["seeds"])]

  def row(name: str, pre_variant: str, pre_overrides: dict, init_overrides: dict) -> dict:
    pre = control_quality.pretrain_weit(args, pre_variant, pre_overrides)
    # The reference recipe: control_quality's scaler training of every walker2d target (its runs reused).
    init = control_quality.init_weit(args, pre["workdir"], POLICY_ENV, "ppo", variant=name, overrides=init_overrides,
                                     roles=list(POLICY_ROLES) if name else None)
    sources = {"weit_init": {POLICY_ENV: init}}
    runs = [control_quality.run_one(args, "weit", POLICY_ENV, role, targets[role], seed, sources, variant=name)
            for role in POLICY_ROLES for seed in range(b["seeds"])]
    return dict(aux_return=pre.get("eval_return"), params=pre.get("params"), pretrain_wall_s=pre["wall_s"],
                init={role: {k: v for k, v in r.items() if k != "export"} for role, r in init["targets"].items()
                      if role in POLICY_ROLES},
                init_steps=init.get("steps", b["init_updates"]), runs=runs)

  rows = {"default": dict(group="default", label="the reference recipe (today's defaults)", **row("", "", {}, {}))}
  for i, name in enumerate(args.factors):
    group, label, pre_overrides, init_overrides = combined(known, name)
    pre_variant = "+".join(p for p in name.split("+") if known[p][2])
    t0 = time.time()
    rows[name] = dict(group=group, label=label, overrides=overrides_of(pre_overrides, init_overrides),
                      **row(name, pre_variant, pre_overrides, init_overrides))
    s = policy_summary(random_runs, rows[name]["runs"])
    harness.log(f"[{i + 1}/{len(args.factors)}] {name}: " + "; ".join(
        f"{r} {e['step0_mean']:.1f} -> {e['final_mean']:.1f}" for r, e in s.items()) + f" ({time.time() - t0:.0f}s)")
  keep = ("role", "seed", "curve", "final_return", "train_curve")
  return dict(
      family="policy", budget=b, roles={r: targets[r].short_name() for r in POLICY_ROLES}, dataset=POLICY_ENV,
      random=dict(runs=[{k: r[k] for k in keep} for r in random_runs],
                  summary=policy_summary(random_runs, random_runs)),
      rows={name: dict({k: v for k, v in row.items() if k != "runs"}, summary=policy_summary(random_runs, row["runs"]),
                       runs=[{k: r[k] for k in keep} for r in row["runs"]])
            for name, row in rows.items()})


def policy_summary(random_runs: list[dict], runs: list[dict]) -> dict:
  """role -> the summary ``summarize`` gives classifiers, from control_quality's measures: step 0 =
  the deterministic return before training, final = the training return (mean of the last updates),
  the speed-up to random init's final training return (environment steps)."""
  mine = [dict(r, method="weit") for r in runs]  # random init's own runs summarize against themselves
  agg = control_quality.aggregate([dict(r, method="random") for r in random_runs] + mine)[POLICY_ENV]
  out = {}
  for role, methods in agg.items():
    e = methods["weit"]
    out[role] = dict(step0_mean=e["step0"], step0_std=0.0, final_mean=e["tfinal"], final_std=e["tfinal_std"],
                     seeds=e["seeds"], steps_to_random_final=e["steps_to_random_final"], speedup=e["speedup"],
                     speedup_is_lower_bound=e["speedup_is_lower_bound"])
  return out


def main(argv=None) -> None:
  args = parse_args(argv)
  t_start, load_start = harness.start(args)
  family = args.family
  record = (policy_rows if family == "policy" else classifier_rows)(args, argv)
  info = harness.run_info("benchmarks/ablations.py", argv, t_start, load_start)
  for row in record["rows"].values():
    row["command"] = info["command"]
    row["machine"] = info["machine"]["cpu"]  # a stage recomputed elsewhere need not reproduce (write_report)
  record["info"] = info
  os.makedirs(args.out, exist_ok=True)
  previous = harness.read_json(os.path.join(args.out, f"ablations_{family}.json"))
  if previous and previous.get("budget") == args.budget:  # rows of earlier invocations (other --factors) stay
    record["rows"] = {**{k: v for k, v in previous["rows"].items() if k not in record["rows"]}, **record["rows"]}
  harness.write_json(os.path.join(args.out, f"ablations_{family}.json"),
                     harness.json_safe(record) if family == "policy" else record)  # a return can be nan
  path = write_report(args.out)
  harness.log(f"report: {path}; wall time {(time.time() - t_start) / 60:.1f} min")


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------

# Per kind of family: the record's keys and the report's words (classifiers: accuracies in %;
# policies: returns).
MEASURES = {
    "classifier": dict(aux="aux_accuracy", after="accuracy_after", scale=100, aux_label="aux eval accuracy",
                       export="export (F-MNIST)", final="MNIST-5k final"),
    "policy": dict(aux="aux_return", after="return_after", scale=1, aux_label="aux eval return (hopper)",
                   export="export return (walker2d)", final="walker2d final training return"),
}


def measures(family: str) -> dict:
  return MEASURES["policy" if family == "policy" else "classifier"]


def fmt(e: dict, key: str, scale: float = 100) -> str:
  m, s = scale * float(e[f"{key}_mean"]), scale * float(e[f"{key}_std"])  # float: strict JSON's 'nan' is a string
  return f"{m:.1f} ± {s:.1f}" if e["seeds"] > 1 else f"{m:.1f}"


def fmt_speedup(e: dict) -> str:
  x = e.get("speedup")
  if x is None:
    return "not reached"
  x = float(x)
  if np.isinf(x):
    return "∞ (step 0)"
  return f"≥ {x:.1f}× (above it from its first finished episodes)" if e.get("speedup_is_lower_bound") else f"{x:.1f}×"


def plot_policy_scaler_budget(rec: dict, path: str) -> None:
  """Per target: the final training return against the scaler-training updates (the rows that
  change only them), random init's final dotted."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = sorted((r for r in rec["rows"].values() if set(r.get("overrides", {})) <= {"init.steps"}),
                key=lambda r: r["init_steps"])
  fig, axes = plt.subplots(1, len(rec["roles"]), figsize=(4.6 * len(rec["roles"]), 3.6), squeeze=False)
  for ax, (role, name) in zip(axes[0], rec["roles"].items()):
    x = [r["init_steps"] for r in rows]
    m = np.array([float(r["summary"][role]["final_mean"]) for r in rows])
    sd = np.array([float(r["summary"][role]["final_std"]) for r in rows])
    ax.plot(x, m, "-o", ms=4, color="tab:red", label="WeiT")
    ax.fill_between(x, m - sd, m + sd, color="tab:red", alpha=0.15, linewidth=0)
    ax.axhline(float(rec["random"]["summary"][role]["final_mean"]), color="k", ls=":", lw=0.8, label="random init")
    ax.set_title(f"{role}: {name}", fontsize=10)
    ax.set_xlabel("scaler-training PPO updates")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel(f"{rec['dataset']} final training return")
  axes[0][-1].legend(fontsize=8)
  fig.suptitle("policy: the scaler budget (mean ± std over seeds)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_scaler_budget(rec: dict, path: str) -> None:
  """Against scaler-training examples seen (steps x batch; log axis, 0 steps drawn at 1), one line
  per example pool and scaler lr (solid: the reference's lr): MNIST-5k accuracy after the downstream
  budget (top; dotted: random init's) and the export's Fashion-MNIST accuracy after scaler training
  (bottom)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  colors = dict(zip(sorted({r["init_examples"] for r in rec["rows"].values()}),
                    ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")))
  fig, axes = plt.subplots(2, len(rec["roles"]), figsize=(4.6 * len(rec["roles"]), 6.8), squeeze=False)
  for col, (role, name) in enumerate(rec["roles"].items()):
    for lr in scaler_lrs(rec):
      rows = scaler_budget_rows(rec, lr).values()
      style = "-o" if lr == REFERENCE["init"]["optim.lr"] else "--s"
      for pool in sorted({r["init_examples"] for r in rows if r["init_steps"]}):
        pts = sorted(((r["init_steps"] * r["init_batch"], r) for r in rows  # 0 steps: every pool's start
                      if r["init_examples"] == pool or r["init_steps"] == 0), key=lambda p: p[0])
        if len(pts) < 2:
          continue
        x = np.array([max(seen, 1) for seen, _ in pts], dtype=float)
        m = np.array([100 * r["summary"][role]["final_mean"] for _, r in pts])
        sd = np.array([100 * r["summary"][role]["final_std"] for _, r in pts])
        axes[0][col].plot(x, m, style, ms=4, color=colors[pool], label=f"{pool:,} examples, lr {lr:g}")
        axes[0][col].fill_between(x, m - sd, m + sd, color=colors[pool], alpha=0.12, linewidth=0)
        after = [r["init"].get(role, {}).get("accuracy_after") for _, r in pts]
        axes[1][col].plot(x, [100 * a if a is not None else np.nan for a in after], style, ms=4, color=colors[pool])
    axes[0][col].axhline(100 * rec["random"]["summary"][role]["final_mean"], color="k", ls=":", lw=0.8)
    axes[0][col].set_title(f"{role}: {name}", fontsize=10)
    axes[1][col].set_xlabel("scaler-training examples seen (steps x batch; 0 steps at 1)")
    for ax in axes[:, col]:
      ax.set_xscale("log")
      ax.grid(alpha=0.3, which="both")
  axes[0][0].set_ylabel(f"{rec['dataset']} accuracy, final (%)")
  axes[1][0].set_ylabel("Fashion-MNIST accuracy of the export (%)")
  axes[0][-1].legend(fontsize=7, title="scaler examples, lr", title_fontsize=8)
  fig.suptitle(f"{rec['family']}: the scaler budget (dotted: random init's final accuracy)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def scaler_budget_rows(rec: dict, lr: float) -> dict:
  """The rows that change only the scaler budget (steps, examples, batch) from the reference, at scaler
  lr ``lr`` (no scaler training: at every lr; the scaler-init row excluded), with results on every target."""
  budget_only = {"init.steps", "init.num_examples", "init.batch_size", "init.optim.lr"}
  return {n: r for n, r in rec["rows"].items()
          if set(r.get("overrides", {})) <= budget_only
          and (r.get("overrides", {}).get("init.optim.lr", REFERENCE["init"]["optim.lr"]) == lr or r["init_steps"] == 0)
          and all(role in r["summary"] for role in rec["roles"])}


def scaler_lrs(rec: dict) -> list[float]:
  """The scaler lrs with at least two trained budgets in the table (largest first)."""
  lrs = {r.get("overrides", {}).get("init.optim.lr", REFERENCE["init"]["optim.lr"]) for r in rec["rows"].values()}
  return sorted((lr for lr in lrs if sum(r["init_steps"] > 0 for r in scaler_budget_rows(rec, lr).values()) >= 2),
                reverse=True)


def smallest_scaler_budget(rec: dict, epoch: int, lr: float) -> list[str]:
  """The smallest scaler budget (examples drawn: steps x batch) at scaler lr ``lr`` whose transfer
  accuracy is within the spread of the best budget's on every target (mean + std reaches the best's
  mean - std), as a fraction of an epoch of the pre-training data (``epoch`` examples): the evidence
  for the paper-scale init config's budget."""
  rows = scaler_budget_rows(rec, lr)
  seen = lambda r: r["init_steps"] * r["init_batch"]
  top = {role: max(rows, key=lambda n: rows[n]["summary"][role]["final_mean"]) for role in rec["roles"]}
  best = {role: rows[n]["summary"][role] for role, n in top.items()}
  within = lambda e, role: e["final_mean"] + e["final_std"] >= best[role]["final_mean"] - best[role]["final_std"]
  ok = [(n, r) for n, r in rows.items() if all(within(r["summary"][role], role) for role in rec["roles"])]
  if not ok:  # the best rows of the targets differ, and none is within the other's spread
    return [f"No scaler budget at scaler lr {lr:g} is within the spread of the best on every target (best: "
            + "; ".join(f"{role} `{n}` {fmt(best[role], 'final')}" for role, n in top.items()) + ").\n"]
  name, row = min(ok, key=lambda nr: (seen(nr[1]), nr[1]["init_examples"]))
  L = [f"Smallest scaler budget at scaler lr {lr:g} within the spread of the best (generated from the {len(rows)} "
       "rows above that change only the scaler budget at that lr; 'within': the row's mean + std reaches the best "
       "row's mean - std on MNIST-5k, on every target):\n"]
  for role, e in best.items():
    export = lambda n: f"{100 * rows[n]['init'][role]['accuracy_after']:.1f}%"
    L.append(f"- {role}: best `{top[role]}` {fmt(e, 'final')} (its export on Fashion-MNIST {export(top[role])}); "
             f"`{name}` {fmt(row['summary'][role], 'final')} (export {export(name)})")
  L.append(f"- `{name}`: {row['init_steps']} steps x batch {row['init_batch']} = {seen(row):,} examples drawn "
           f"(from {row['init_examples']:,}), {100 * seen(row) / epoch:.2f}% of an epoch of the pre-training data "
           f"({epoch:,} examples); the reference ({rec['budget']['init_steps']} steps) draws "
           f"{100 * rec['budget']['init_steps'] * rec['budget']['pretrain_batch_size'] / epoch:.1f}%.\n")
  return L


SEED_FACTOR = re.compile(r"^(scaler|recipe)-seed\d+$")


def draws(rec: dict, M: dict) -> list[str]:
  """Per recipe run more than once (rows that differ only by a seed factor, the recipe's own draws):
  each role's final over its draws, mean ± std (each draw's final is its mean over downstream seeds),
  the noise a one-draw row carries. Empty when no recipe has two draws."""
  recipes = {}
  for name in rec["rows"]:
    parts = [] if name == "default" else name.split("+")
    recipes.setdefault("+".join(p for p in parts if not SEED_FACTOR.match(p)), []).append(name)
  out = []
  for recipe, names in recipes.items():
    if len(names) < 2:
      continue
    cells = []
    for role, label in rec["roles"].items():
      finals = [M["scale"] * rec["rows"][n]["summary"][role]["final_mean"] for n in names]
      cells.append(f"{label} {np.mean(finals):.1f} ± {np.std(finals):.1f} ({', '.join(f'{v:.1f}' for v in finals)})")
    out.append(f"- `{recipe or 'default'}` over {len(names)} draws ({', '.join(names)}): " + "; ".join(cells))
  if out:
    out = ["Recipes run more than once (rows that differ only by a seed: another draw of the same recipe), "
           f"{M['final']} over the draws, mean ± std (each draw: its mean over downstream seeds). Two one-draw rows "
           "that differ by less than this spread may differ by their draws alone:\n", *out, ""]
  return out


def write_report(out: str) -> str:
  L = ["# Ablations: WeiT's recipe one factor at a time\n",
       "Each row changes one thing from the reference recipe (the defaults before this table chose new ones: "
       "`benchmarks/ablations.py`'s `REFERENCE`). Columns: the auxiliary model's eval accuracy "
       "after pre-training (Fashion-MNIST); per target, the Fashion-MNIST accuracy of WeiT's export after "
       "scaler training (head kept), and on MNIST-5k (transfer: a new head, so step 0 is at chance) the accuracy "
       "after the downstream budget (mean ± std over seeds) and the speed-up over random init (steps random "
       "init needs for its final accuracy / steps WeiT needs). The stages are `benchmarks/init_quality.py`'s; "
       "the method, budgets and caching are in `benchmarks/ablations.py`. Policies (the last section): the "
       "same columns in returns, from `benchmarks/control_quality.py`'s stages; the reference recipe is today's "
       "defaults, and the transfer setting is walker2d (another morphology).\n"]
  for family in FAMILIES:
    rec = harness.read_json(os.path.join(out, f"ablations_{family}.json"))
    if not rec:
      continue
    b, info = rec["budget"], rec["info"]
    L.append(f"## {family}\n")
    L += harness.header(info, b["seeds"], "downstream seeds; one pre-training and scaler training per recipe")
    made = {}  # invocations with other --factors add their rows (same budget): each row's command
    for name, row in rec["rows"].items():
      made.setdefault(row["command"], []).append(name)
    if len(made) > 1:
      L.append("The rows come from these invocations (the default and random init's rows are shared):\n")
      L += [f"- `{cmd}`: {', '.join(n for n in names if n != 'default') or 'default'}" for cmd, names in made.items()]
      L.append("")
    machines = {}
    for name, row in rec["rows"].items():
      machines.setdefault(row.get("machine"), []).append(name)
    if len(machines) > 1:
      L.append(f"Rows by the machine that ran them (the default row's: {rec['rows']['default'].get('machine')}). "
               "A stage recomputed on another machine need not reproduce bit for bit, and one pre-training is "
               "one draw: a row measured against another machine's reference pre-training differs from the "
               "default row by that draw as well, so compare rows of one machine first:\n")
      L += [f"- {m or 'unrecorded (earlier sessions)'}: {', '.join(names)}" for m, names in machines.items()]
      L.append("")
    M = measures(family)
    scale = M["scale"]
    if family == "policy":
      L.append(f"Budget (control_quality.py's): pre-training {b['pretrain_updates']} PPO updates on hopper; scaler "
               f"training (reference) {b['init_updates']} PPO updates on {rec['dataset']}; downstream "
               f"{b['train_updates']} PPO updates on {rec['dataset']}, evaluated every {b['eval_every']}; "
               f"{control_quality.env_steps_per_update():,} environment steps per update. Export: the deterministic "
               f"return after scaler training; final: the training return (mean of the last {control_quality.SMOOTH} "
               "updates); speed-up: environment steps to random init's final training return, as in control.md.\n")
    else:
      L.append(f"Budget: pre-training {b['pretrain_steps']} steps x batch {b['pretrain_batch_size']}; scaler "
               f"training (reference) {b['init_steps']} steps x batch {b['pretrain_batch_size']} on "
               f"{b['init_examples']:,} examples; downstream {b['train_steps']} steps x batch {b['batch_size']}, "
               f"eval every {b['eval_every']}.\n")
    roles = rec["roles"]
    L.append(f"| factor | recipe | {M['aux_label']} | " + " | ".join(
        f"{name}: {M['export']} | {M['final']} | speed-up" for name in roles.values()) + " |")
    L.append("|---|---|---|" + "---|---|---|" * len(roles))
    rand = rec["random"]["summary"]
    L.append("| - | random init | - | " + " | ".join(f"- | {fmt(rand[r], 'final', M['scale'])} | 1×"
                                                   for r in roles) + " |")
    order = ("default", "templates", "tiles", "constraint", "multi-size", "distillation", "templated parameters",
             "scaler budget", "scaler lr", "seed", "combination")
    for name, row in sorted(rec["rows"].items(), key=lambda nr: order.index(nr[1]["group"])):  # stable
      aux = row.get(M["aux"])
      cells = []
      for r in roles:
        e, after = row["summary"].get(r), row["init"].get(r, {}).get(M["after"])
        cells.append(f"{'-' if after is None else f'{scale * float(after):.1f}'} | "
                     + (f"{fmt(e, 'final', M['scale'])} | {fmt_speedup(e)}" if e else "- | -"))
      label = row["label"].replace("|", "\\|")  # a regular expression's alternatives, inside a table
      L.append(f"| {row['group']} | {label} | {'-' if aux is None else f'{scale * float(aux):.1f}'} | "
               + " | ".join(cells) + " |")
    L.append("")
    L += draws(rec, M)
    if family == "policy":
      L.append("Not a policy factor: multi-size pre-training (PPO collects its experience with the one model it "
               "trains: the pre-training program refuses `weit.extra_sizes` for the control task).\n")
      if any(r["group"] == "scaler budget" for r in rec["rows"].values()):
        plot_policy_scaler_budget(rec, os.path.join(out, "ablations_policy_scaler_budget.png"))
        L.append("![scaler budget](ablations_policy_scaler_budget.png)\n")
      continue
    epoch = data_catalog.dataset_info("fashion_mnist_local").splits["train"]
    for lr in scaler_lrs(rec):  # an lr with one trained budget has nothing to choose
      L += smallest_scaler_budget(rec, epoch, lr)
    if family in CHOSEN and CHOSEN[family][0] in rec["rows"]:
      name, why = CHOSEN[family]
      if any(not any(row in r for r in rec["rows"]) for row in re.findall(r"`([a-z0-9.+-]+)`", why)):
        why = "why, the full table says (docs/results/ablations.md; it has the rows this one lacks)"
      best = {r: max(rec["rows"], key=lambda n: rec["rows"][n]["summary"][r]["final_mean"]) for r in roles}
      L.append(f"Today's defaults are the `{name}` row (" + "; ".join(
          f"{r} {fmt(rec['rows'][name]['summary'][r], 'final')}, the best row `{n}` "
          f"{fmt(rec['rows'][n]['summary'][r], 'final')}" for r, n in best.items()) + f"): {why}.\n")
    plot = f"ablations_{family}_scaler_budget.png"
    if any(r["group"] == "scaler budget" for r in rec["rows"].values()):
      plot_scaler_budget(rec, os.path.join(out, plot))
      L.append(f"![scaler budget]({plot})\n")
  path = os.path.join(out, "ablations.md")
  with open(path, "w") as f:
    f.write("\n".join(L) + "\n")
  return path


if __name__ == "__main__":
  main()
