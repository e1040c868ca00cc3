r"""Control: how well do policies initialized from WeiT templates train by PPO, against other inits?

  python benchmarks/control_quality.py            # ~1 h on 2 CPU cores; writes docs/results/control.md
  python benchmarks/control_quality.py --quick    # smoke test: tiny budgets, report under the workdir

Stages (every one cached in --workdir, so a rerun resumes at the first unfinished one):

1. Pre-training on hopper (brax, spring backend), the same PPO budget for each: WeiT templates of
   an auxiliary policy d3-w64 (hard constraint, N=4, tiles hidden 16, obs/action 1); TLEG's
   auxiliary d3-w64 (layer l = A + (l/L) B); a dense d6-w96 policy, the source of weight selection;
   and, for the reference "pre-trained target", every hopper target itself.
2. WeiT init (programs/init.py) of every target: scalers trained by PPO with the templates frozen
   (``adapt=ppo``) on hopper and on walker2d (another morphology: 17 observations, 6 actions); on
   hopper also by distillation from the auxiliary policy (``adapt=distill``): which adapts better.
3. Downstream PPO training (programs/train.py, configs/policy_train.py:runlocal settings) of every
   target from each init, 3 seeds: the deterministic policy's mean return over 32 episodes
   (fixed initial states) against environment steps; the speed-up is the environment steps random
   init needs for its final return over those the method needs (interpolated).
4. PPO validation against a peer: brax's own ``ppo.train`` on hopper with the same budget and
   settings (256 environments, unroll 32, 4 minibatches x 4 epochs, Adam 3e-4, clip 0.2, GAE
   0.99/0.95, observation normalization, policy and value MLPs 3 x 64) against this project's PPO
   from random init. brax 0.14.2 calls ``jax.device_put_replicated``, which jax 0.10 removed: the
   benchmark (never the package) puts jax's private implementation back under that name.
"""
from __future__ import annotations

import functools
import math
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # harness

import harness  # noqa: E402
import jax  # noqa: E402
import stages as shared  # noqa: E402  (apply_overrides)
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from harness import LABELS, log, read_json  # noqa: E402

# "pretrained", not a competitor: every hopper target pre-trained itself on hopper at the pre-training
# budget (the cost WeiT avoids); its training-return speed-up is what that measure's lag leaves to a policy
# that already performs (reference_lines).
METHODS = ("random", "weit", "weight_selection", "tleg", "pretrained")
AUX = dict(width=64, depth=3)
DENSE_SOURCE = dict(width=96, depth=6)
TARGETS = {
    "hopper": (("shallower", "depth=2"), ("deeper", "depth=6"), ("narrower", "width=40"), ("wider", "width=96")),
    # The transfer setting (another morphology: only WeiT serves it) with a depth and a width target.
    "walker2d": (("same size", "depth=3"), ("deeper", "depth=6"), ("narrower", "width=40")),
}
ENV_LABELS = {"hopper": "hopper (the templates' morphology)", "walker2d": "walker2d (another morphology)"}
BUDGETS = {
    # updates: PPO updates of 256 environments x 32 steps (8,192 environment steps each)
    "full": dict(pretrain_updates=150, init_updates=20, train_updates=50, eval_every=10, seeds=3, peer_updates=150),
    "quick": dict(pretrain_updates=4, init_updates=2, train_updates=4, eval_every=2, seeds=1, peer_updates=4),
}


def parse_args(argv=None):
  p = harness.parser(__doc__, methods=METHODS)
  p.add_argument("--no-peer", action="store_true", help="skip brax's ppo.train (stage 4)")
  p.add_argument("--envs", default=",".join(TARGETS), help="comma-separated subset of " + ",".join(TARGETS))
  args = p.parse_args(argv)
  out_given = args.out is not None
  harness.resolve(p, args, BUDGETS, ("bench_control", "bench_control_quick"), METHODS)
  args.envs = [e for e in args.envs.split(",") if e]
  for env in args.envs:
    if env not in TARGETS:
      p.error(f"unknown environment {env!r}; valid: {', '.join(TARGETS)}")
  if (set(args.methods) != set(METHODS) or set(args.envs) != set(TARGETS)) and not out_given and not args.quick:
    p.error("--methods or --envs: a subset makes a partial report; give it its own --out (docs/results/control.md "
            "is the full run's)")
  return args


def config(program: str) -> ml_collections.ConfigDict:
  import importlib
  c = importlib.import_module(f"configs.policy_{program}").get_config("runlocal")
  return ml_collections.ConfigDict(c.to_dict())


def env_steps_per_update() -> int:
  c = config("train")
  return int(c.batch_size) * int(c.ppo.unroll_length)


def model_config(env: str, **fields):
  from weit_jax import models, tasks
  return models.get("policy").make_config(**fields, **dict(zip(("obs_size", "action_size"),
                                                               tasks.control.env_sizes(env, "spring"))))


def target_configs(env: str) -> dict:
  """role -> the target's config, as programs/init.py builds it from the auxiliary."""
  from weit_jax import models
  aux = model_config("hopper", **AUX)
  sizes = model_config(env, **AUX)
  out = {}
  for role, spec in TARGETS[env]:
    (fields,) = models.parse_targets(spec, models.get("policy"))
    out[role] = models.target_config(fields, aux, dict(obs_size=sizes.obs_size, action_size=sizes.action_size))
  return out


def train_config(*, env: str, updates: int, seed: int, eval_every: int, model=None, init=None):
  """Every update is logged (its training return), evaluated every ``eval_every``."""
  c = config("train")
  if model is not None:
    c.model.width, c.model.depth, c.model.variant = model.width, model.depth, None
  c.init, c.env, c.seed, c.total_steps = init, env, int(seed), int(updates)
  c.eval_every, c.log_every, c.checkpoint_every = int(eval_every), 1, int(updates)
  return c


def write(path: str, record: dict) -> dict:
  """Control's records are strict JSON (a return can be nan)."""
  harness.write_json(path, harness.json_safe(record))
  return record


# --- stage 1: pre-training ---------------------------------------------------------------------------

def pretrain_weit(args, variant: str = "", overrides: dict | None = None) -> dict:
  """WeiT's templates of the auxiliary d3-w64 on hopper (configs/policy_pretrain.py:runlocal);
  ``variant`` (a folder suffix) with ``overrides`` (dotted config keys -> values) for an ablation."""
  from weit_jax.programs import pretrain
  P = args.budget["pretrain_updates"]
  workdir = os.path.join(args.workdir, "pretrain", "weit" + (f"-{variant}" if variant else "") + f"_P{P}")
  if (r := read_json(os.path.join(workdir, "bench.json"))):
    return r
  c = config("pretrain")
  shared.apply_overrides(c, overrides)
  c.total_steps, c.eval_every, c.checkpoint_every = P, max(1, P // 5), max(1, P // 3)
  log(f"pre-training WeiT templates (d3-w64, {P} PPO updates{', ' + variant if variant else ''}) in {workdir}")
  t0 = time.time()
  summary = pretrain.run(c, workdir)
  return write(os.path.join(workdir, "bench.json"), dict(
      workdir=workdir, updates=P, eval_return=summary.get("eval_return"), wall_s=round(time.time() - t0, 1),
      weit=c.weit.to_dict(), params=dict(templates=summary.get("templates_params"),
                                         scalers=summary.get("scalers_params"))))


def pretrain_all(args) -> dict:
  from configs import baseline_pretrain as baseline_config
  from weit_jax.programs import baseline_pretrain, train
  P = args.budget["pretrain_updates"]
  out = {"weit": pretrain_weit(args)} if "weit" in args.methods else {}
  # Plain policies trained by PPO from random init: weight selection's source and the reference's targets.
  plain = {"dense": ("the dense source", model_config("hopper", **DENSE_SOURCE))} \
      if "weight_selection" in args.methods else {}
  if "pretrained" in args.methods and "hopper" in args.envs:
    plain.update({f"target-{role}": (f"the {role} target itself", cfg)
                  for role, cfg in target_configs("hopper").items()})
  for name in ("tleg",) * ("tleg" in args.methods) + tuple(plain):
    workdir = os.path.join(args.workdir, "pretrain", f"{name}_P{P}")
    if (r := read_json(os.path.join(workdir, "bench.json"))):
      out[name] = r
      continue
    t0 = time.time()
    if name == "tleg":
      c = train_config(env="hopper", updates=P, seed=0, eval_every=max(1, P // 5), model=model_config("hopper", **AUX))
      log(f"pre-training the TLEG auxiliary (d3-w64, {P} PPO updates) in {workdir}")
      summary = baseline_pretrain.run(baseline_config.from_train_config(c, "tleg"), workdir)
      record = dict(workdir=workdir, export=baseline_pretrain.export_dir(workdir))
    else:
      what, cfg = plain[name]
      c = train_config(env="hopper", updates=P, seed=0, eval_every=max(1, P // 5), model=cfg)
      log(f"pre-training {what} ({cfg.short_name()}, {P} PPO updates) in {workdir}")
      summary = train.run(c, workdir)
      record = dict(workdir=workdir, export=os.path.join(workdir, "export"))
    out[name] = write(os.path.join(workdir, "bench.json"), dict(
        record, updates=P, eval_return=summary.get("eval_return"), wall_s=round(time.time() - t0, 1)))
  return out


# --- stage 2: WeiT init ------------------------------------------------------------------------------

def init_weit(args, templates: str, env: str, adapt: str, variant: str = "", overrides: dict | None = None,
              roles: list[str] | None = None) -> dict:
  """programs/init.py for ``env``'s targets (or ``roles``) from ``templates``; ``variant`` (a folder
  suffix: the templates' variant) with ``overrides`` (init config fields, e.g. ``{'steps': 40}``)
  for an ablation."""
  from weit_jax import exports
  from weit_jax.programs import init as init_program
  b = args.budget
  c = config("init")
  c.templates, c.env, c.adapt, c.steps = templates, env, adapt, b["init_updates"]
  shared.apply_overrides(c, overrides)
  chosen = [(role, spec) for role, spec in TARGETS[env] if roles is None or role in roles]
  # Keyed by the scaler budget and lr by value (a default that changes must not reuse old stages).
  workdir = os.path.join(args.workdir, "init", f"{env}_{adapt}_P{b['pretrain_updates']}_S{c.steps}_lr{c.optim.lr:g}"
                         + (f"_{variant}" if variant else "")
                         + ("" if roles is None else "_" + "-".join(role for role, _ in chosen)))
  if (r := read_json(os.path.join(workdir, "bench.json"))):
    return r
  c.targets = ";".join(spec for _, spec in chosen)
  c.log_every, c.checkpoint_every = max(1, c.steps // 4), max(1, c.steps)
  log(f"WeiT init ({adapt}) of {len(chosen)} {env} targets, {c.steps} updates each, in {workdir}")
  t0 = time.time()
  init_program.run(c, workdir)
  targets = {}
  for role, cfg in target_configs(env).items():
    if role not in dict(chosen):
      continue
    export = os.path.join(workdir, cfg.short_name(), "export")
    st = exports.read_meta(export)["scaler_training"]
    targets[role] = dict(export=export, return_before=st.get("return_before"), return_after=st.get("return_after"))
  return write(os.path.join(workdir, "bench.json"), dict(targets=targets, wall_s=round(time.time() - t0, 1),
                                                         steps=c.steps, lr=c.optim.lr))


# --- stage 3: downstream runs ------------------------------------------------------------------------

def applies(method: str, cfg, env: str) -> str | None:
  """None if ``method`` initializes ``cfg`` here, else why not."""
  from weit_jax.inits import tleg, weight_selection
  if method == "pretrained" and env != "hopper":
    return "the reference is pre-trained on hopper; another morphology has other observation and action sizes"
  try:
    if method == "tleg":
      tleg.check_sizes(model_config("hopper", **AUX), cfg)
    elif method == "weight_selection":
      weight_selection.check_sizes(model_config("hopper", **DENSE_SOURCE), cfg)
  except ValueError as e:
    return str(e).split(";")[0]
  return None


def initial_export(method: str, role: str, cfg, env: str, seed: int, sources: dict, path: str) -> None:
  """The method's parameters for ``cfg`` as an export, with the observation statistics of its
  source when the observation size matches (the train program starts from them)."""
  from weit_jax import exports, inits, models
  if method == "weit":
    source = sources["weit_init"][env]["targets"][role]["export"]
  elif method in ("weight_selection", "tleg"):
    source = sources["dense" if method == "weight_selection" else "tleg"]["export"]
  elif method == "pretrained":
    source = sources[f"target-{role}"]["export"]
  else:
    source = None
  params = inits.get(shared.INITIALIZERS.get(method, method))(source, cfg, seed=seed)
  meta = dict(model=models.to_record(cfg), init=method, seed=seed)
  stats = exports.read_meta(source).get("observation_stats") if source else None
  if stats is not None and len(stats["mean"]) == cfg.obs_size:
    meta["observation_stats"] = stats
  exports.write(path, params, meta)


def step0_eval(c, cfg) -> dict:
  """The evaluation (deterministic and sampled returns) of exactly what train.run starts from
  (parameters and statistics)."""
  from weit_jax import models
  from weit_jax.programs import train
  task = train.task_with_export(c)
  model = models.build(cfg)
  exp = task.experience(lambda p, obs: model.apply({"params": p}, obs))
  carry = jax.jit(exp.init)(jax.random.key(int(c.seed)))
  return {k: float(v) for k, v in jax.device_get(exp.evaluate(train.initial_params(c, cfg), carry)).items()}


def training_returns(workdir: str) -> dict[str, float]:
  """Update -> the training return logged at it (the mean return of the episodes that ended in it,
  else the last one known), from the first update in which an episode ended (before it: none)."""
  from weit_jax import metrics
  out, seen = {}, 0.0
  for rec in metrics.read_metrics(workdir):
    if "episode_return" in rec:
      seen += float(rec["episodes"])
      if seen > 0:
        out[str(int(rec["step"]))] = float(rec["episode_return"])
  return out


def run_one(args, method: str, env: str, role: str, cfg, seed: int, sources: dict, variant: str = "") -> dict:
  """One downstream PPO run (cached); ``variant``: an ablation row's name, for WeiT's runs from its
  recipe (``sources``). Only WeiT's runs depend on the scaler training (its updates and lr, from the
  init's record): the others are keyed without it."""
  from weit_jax import metrics
  from weit_jax.programs import train
  b = args.budget
  if method == "weit":
    init = sources["weit_init"][env]
    scalers = f"_S{init['steps']}_lr{init['lr']:g}"
  else:
    scalers = ""
  tag = f"P{b['pretrain_updates']}{scalers}_T{b['train_updates']}_k{b['eval_every']}"
  name = method + (f"-{variant}" if variant else "")
  run_dir = os.path.join(args.workdir, "runs", tag, env, cfg.short_name(), name, f"seed{seed}")
  r = read_json(os.path.join(run_dir, "result.json"))
  if r and "sampled_curve" in r:  # results of before the sampled evaluation are run again
    return dict(r, train_curve=training_returns(os.path.join(run_dir, "train")))
  shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts over
  t0 = time.time()
  export = os.path.join(run_dir, "init_export")
  initial_export(method, role, cfg, env, seed, sources, export)
  c = train_config(env=env, updates=b["train_updates"], seed=seed, eval_every=b["eval_every"], init=export)
  ev0 = step0_eval(c, cfg)
  curve, sampled = {0: ev0["return"]}, {0: ev0["sampled_return"]}
  summary = train.run(c, os.path.join(run_dir, "train"))
  for rec in metrics.read_metrics(os.path.join(run_dir, "train")):
    if "eval_return" in rec:
      curve[int(rec["step"])] = float(rec["eval_return"])
      sampled[int(rec["step"])] = float(rec["eval_sampled_return"])
  train_curve = training_returns(os.path.join(run_dir, "train"))
  for sub in ("train/checkpoints", "train/export", "init_export"):
    shutil.rmtree(os.path.join(run_dir, sub), ignore_errors=True)  # only the curve is kept
  return write(os.path.join(run_dir, "result.json"), dict(
      method=method, env=env, role=role, target=cfg.short_name(), seed=seed,
      curve={str(k): curve[k] for k in sorted(curve)}, final_return=summary["eval_return"],
      sampled_curve={str(k): sampled[k] for k in sorted(sampled)}, train_curve=train_curve,
      wall_s=round(time.time() - t0, 1)))


# --- stage 4: the peer --------------------------------------------------------------------------------

def ours_peer_run(args, seed: int) -> dict:
  from weit_jax import metrics
  from weit_jax.programs import train
  b = args.budget
  run_dir = os.path.join(args.workdir, "peer", f"ours_U{b['peer_updates']}", f"seed{seed}")
  if (r := read_json(os.path.join(run_dir, "result.json"))):
    return r
  shutil.rmtree(run_dir, ignore_errors=True)
  c = train_config(env="hopper", updates=b["peer_updates"], seed=seed, eval_every=max(1, b["peer_updates"] // 10),
                   model=model_config("hopper", **AUX))
  t0 = time.time()
  train.run(c, run_dir)
  wall = time.time() - t0
  curve = {int(r["step"]) * env_steps_per_update(): float(r["eval_return"])
           for r in metrics.read_metrics(run_dir) if "eval_return" in r}
  shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
  return write(os.path.join(run_dir, "result.json"), dict(curve={str(k): v for k, v in sorted(curve.items())},
                                                           wall_s=round(wall, 1)))


def brax_peer_run(args, seed: int) -> dict:
  """brax's ppo.train with this project's PPO settings (module docstring)."""
  b = args.budget
  run_dir = os.path.join(args.workdir, "peer", f"brax_U{b['peer_updates']}", f"seed{seed}")
  if (r := read_json(os.path.join(run_dir, "result.json"))):
    return r
  if not hasattr(jax, "device_put_replicated"):  # removed in jax 0.10; brax 0.14.2 still calls it
    from jax._src import api
    jax.device_put_replicated = api.device_put_replicated
  from brax.training.agents.ppo import networks as ppo_networks
  from brax.training.agents.ppo import train as ppo
  from weit_jax.tasks import control
  c = config("train")
  per_update = env_steps_per_update()
  curve = {}

  def progress(step, m):
    if "eval/episode_reward" in m:
      curve[int(step)] = float(m["eval/episode_reward"])

  t0 = time.time()
  ppo.train(environment=control.make_env("hopper", "spring"), num_timesteps=b["peer_updates"] * per_update,
            episode_length=int(c.episode_length), num_envs=int(c.batch_size), unroll_length=int(c.ppo.unroll_length),
            batch_size=int(c.batch_size) // int(c.ppo.num_minibatches), num_minibatches=int(c.ppo.num_minibatches),
            num_updates_per_batch=int(c.ppo.epochs), learning_rate=float(c.optim.lr),
            entropy_cost=float(c.ppo.entropy_coef), discounting=float(c.ppo.discounting),
            gae_lambda=float(c.ppo.gae_lambda), clipping_epsilon=float(c.ppo.clip_eps),
            vf_loss_coefficient=float(c.ppo.value_coef), reward_scaling=float(c.ppo.reward_scaling),
            max_grad_norm=float(c.optim.clip_norm), normalize_observations=True,
            num_evals=11, num_eval_envs=int(c.eval_episodes), deterministic_eval=True, seed=int(seed),
            network_factory=functools.partial(ppo_networks.make_ppo_networks, policy_hidden_layer_sizes=(64,) * 3,
                                              value_hidden_layer_sizes=(64,) * 3),
            progress_fn=progress)
  return write(os.path.join(run_dir, "result.json"), dict(curve={str(k): v for k, v in sorted(curve.items())},
                                                           wall_s=round(time.time() - t0, 1)))


# --- analysis ----------------------------------------------------------------------------------------

SMOOTH = 5  # updates: training returns are averaged over a trailing window of this many updates


def smooth(values: np.ndarray, window: int = SMOOTH) -> np.ndarray:
  """Trailing mean over ``window`` entries (fewer at the start)."""
  return np.array([values[max(0, i - window + 1):i + 1].mean() for i in range(len(values))])


def aggregate(results: list[dict]) -> dict:
  """env -> role -> method -> the deterministic evaluation curve (x, mean, std, final, step0), the
  sampled one (smean, sstd, sfinal, s0: the policy PPO trains, on the same fixed episodes) and the
  training-return curve (tx, tmean: the stochastic policy's returns of the episodes that ended in
  each update, mean over seeds, smoothed over SMOOTH updates; tfinal), and the speed-ups to random
  init's final on the training return (``speedup``) and on the sampled evaluation (``sspeedup``)."""
  per_update = env_steps_per_update()
  out: dict = {}
  for env, roles in harness.group(results, "env", "role", "method").items():
    for role, methods in roles.items():
      entry = out.setdefault(env, {}).setdefault(role, {})
      for method, runs in methods.items():
        steps = sorted(int(s) for s in runs[0]["curve"])
        ev = harness.curve_stats(harness.seed_curves([r["curve"] for r in runs], steps))
        # (runs of before the sampled evaluation, kept in ablation records, have none)
        sv = (harness.curve_stats(harness.seed_curves([r["sampled_curve"] for r in runs], steps))
              if all("sampled_curve" in r for r in runs) else dict.fromkeys(("mean", "std", "final_mean",
                                                                          "final_std", "step0_mean")))
        # Training returns of the seeds where an episode ended (a --quick budget can end before any).
        finished = [r["train_curve"] for r in runs if r["train_curve"]] or [{}]
        tsteps = sorted({int(s) for c in finished for s in c})  # seeds' first episodes differ
        tvalues = np.array([[c.get(str(s), np.nan) for s in tsteps] for c in finished]).reshape(len(finished), -1)
        tlast = tvalues[:, -SMOOTH:].mean(1) if tsteps else np.full(len(finished), np.nan)
        first = [c[min(c, key=int)] if c else np.nan for c in finished]
        entry[method] = dict(x=[s * per_update for s in steps], mean=ev["mean"], std=ev["std"],
                             final=ev["final_mean"], final_std=ev["final_std"], step0=ev["step0_mean"],
                             smean=sv["mean"], sstd=sv["std"], sfinal=sv["final_mean"], sfinal_std=sv["final_std"],
                             s0=sv["step0_mean"],
                             tx=[s * per_update for s in tsteps], tmean=smooth(np.nanmean(tvalues, 0)).tolist(),
                             tstd=smooth(np.nanstd(tvalues, 0)).tolist(), tfinal=float(tlast.mean()),
                             tfinal_std=float(tlast.std()), tfirst=float(np.mean(first)),
                             seeds=len(runs), target=runs[0]["target"])
      if "random" in entry:
        goal = entry["random"]["tfinal"]
        reach_random = harness.steps_to_reach(entry["random"]["tx"], entry["random"]["tmean"], goal)
        for method, e in entry.items():
          reach = harness.steps_to_reach(e["tx"], e["tmean"], goal)
          e["steps_to_random_final"] = reach
          e["speedup"] = None if reach_random is None else harness.speedup(reach, reach_random)
          # Above the goal at its first measured point: the first finished episodes bound it, not the method.
          e["speedup_is_lower_bound"] = reach is not None and reach <= e["tx"][0]
        # The sampled evaluation needs no finished training episode: its first point is the init's own.
        sgoal = entry["random"]["sfinal"]
        sreach_random = None if sgoal is None else harness.steps_to_reach(entry["random"]["x"],
                                                                          entry["random"]["smean"], sgoal)
        for method, e in entry.items():
          e["ssteps_to_random_final"] = None if e["smean"] is None else harness.steps_to_reach(e["x"], e["smean"],
                                                                                               sgoal)
          e["sspeedup"] = (None if sreach_random is None
                           else harness.speedup(e["ssteps_to_random_final"], sreach_random))
  return out


def fmt_speedup(e: dict) -> str:
  if e.get("speedup") is None:
    return "not reached"
  if e.get("speedup_is_lower_bound"):
    return f">= {e['speedup']:.1f}x (above it from its first finished episodes)"
  return f"{e['speedup']:.1f}x"


def fmt_sampled_speedup(e: dict, method: str) -> str:
  if method == "random":
    return "1x"
  if e["sspeedup"] is None:
    return "not reached"
  return "above it at step 0" if math.isinf(e["sspeedup"]) else f"{e['sspeedup']:.1f}x"


def plot(agg: dict, env: str, path: str) -> None:
  """Per target: the training return (top), the sampled and the deterministic evaluations."""
  roles = [role for role, _ in TARGETS[env] if role in agg.get(env, {})]
  panels = [[dict(title=f"{role}: {next(iter(agg[env][role].values()))['target']}" if xk == "tx" else None,
                  curves={m: (np.array(e[xk]) / 1e6, e[mk], e[sk]) for m, e in agg[env][role].items()
                          if e[mk] is not None})
             for role in roles]
            for xk, mk, sk in (("tx", "tmean", "tstd"), ("x", "smean", "sstd"), ("x", "mean", "std"))]
  harness.plot_curves(path, panels, xlabel="environment steps (millions)", title_size=11,
                      ylabels=[f"training return\n(stochastic; {SMOOTH}-update mean)",
                               "sampled policy,\n32 fixed episodes", "deterministic policy,\n32 fixed episodes"],
                      suptitle=f"PPO on {ENV_LABELS[env]}: mean of seeds, band = 1 std")


def plot_peer(peer: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for name, color in (("ours", "tab:red"), ("brax", "tab:blue")):
    for i, run in enumerate(peer[name]):
      xs = sorted(int(k) for k in run["curve"])
      ax.plot(np.array(xs) / 1e6, [run["curve"][str(k)] for k in xs], color=color, alpha=0.8,
              label=("weit_jax PPO" if name == "ours" else "brax ppo.train") if i == 0 else None)
  ax.set_xlabel("environment steps (millions)")
  ax.set_ylabel("mean return, deterministic policy")
  ax.set_title("hopper, random init, same settings: one line per seed", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def reference_lines(entries: dict, env: str, budget: dict) -> list[str]:
  """What the training-return measure leaves to any initialization: the pre-trained target (already
  trained on this environment) against WeiT, per target."""
  cells = [(role, e) for role, e in entries.items() if {"random", "weit", "pretrained"} <= set(e)]
  if not cells:
    return []
  lines = ["", f"Against the reference (each target pre-trained itself on {env} for {budget['pretrain_updates']} "
           f"updates, then trained like every method for {budget['train_updates']}): a policy already trained on "
           "this environment, at or past random init's final before training where its sampled return says so, "
           "still starts its training-return curve from the episodes that end first; its speed-up on that measure "
           "shows what the measure's lag leaves to such a policy.", ""]
  for role, e in cells:
    ref, weit, rnd = e["pretrained"], e["weit"], e["random"]
    past = ref["s0"] is not None and rnd["sfinal"] is not None and ref["s0"] >= rnd["sfinal"]
    lines.append(f"- {role}: training return, WeiT {fmt_speedup(weit)} against the reference's {fmt_speedup(ref)} "
                 f"(its sampled return before training {ref['s0']:.1f}, {'at or past' if past else 'short of'} random "
                 f"init's final {rnd['sfinal']:.1f}; its first episodes {ref['tfirst']:.1f}); sampled return, WeiT "
                 f"{fmt_sampled_speedup(weit, 'weit')}, the reference {fmt_sampled_speedup(ref, 'pretrained')}.")
  return lines


def write_report(args, agg: dict, stages: dict, peer: dict | None, na: dict, info: dict) -> str:
  b = args.budget
  per_update = env_steps_per_update()
  quick = " (**--quick smoke test: tiny budgets, not a result**)" if args.quick else ""
  lines = [
      "# Control: policies initialized from WeiT templates, trained by PPO on brax",
      "",
      f"Written by `benchmarks/control_quality.py` from its own results{quick}. Returns depend on the seeds, not on "
      "the machine's load; wall times do.\n",
      *harness.header(info, b["seeds"], "the init and programs/train.py's seed: environments and PPO's sampling",
                      recorded_s=info["recorded_s"]),
      "Setup (every number below comes from this command; its stages are cached under its workdir):",
      f"- brax environments on the spring backend, episodes of at most 1,000 steps; PPO of weit_jax/tasks/control.py "
      f"with configs/policy_*.py `:runlocal` settings: 256 environments x unroll 32 = {per_update:,} environment "
      "steps per update, 4 minibatches x 4 epochs, Adam 3e-4 (constant), gradient norm clip 0.5, clip 0.2, "
      "discount 0.99, GAE lambda 0.95, value coefficient 0.5, entropy 1e-3, observation normalization.",
      f"- Pre-training on hopper, {b['pretrain_updates']} updates each ({b['pretrain_updates'] * per_update / 1e6:.2f}M "
      "steps): WeiT templates of an auxiliary d3-w64 policy (hard constraint, N=4, tiles hidden 16, obs 1, action "
      "1); TLEG's auxiliary d3-w64; a dense d6-w96 policy (weight selection's source); and every hopper target "
      "itself, the reference **pre-trained target** (a pre-training per size, the cost WeiT avoids; not an "
      "initializer of other sizes, compared apart below).",
      f"- WeiT init: {b['init_updates']} scaler-only updates per target (templates frozen), by PPO, and on hopper "
      "also by distillation from the auxiliary policy.",
      f"- Downstream: {b['train_updates']} PPO updates ({b['train_updates'] * per_update / 1e6:.2f}M steps) per run, "
      f"{b['seeds']} seed(s), evaluated every {b['eval_every']} updates and before training: the deterministic "
      "policy's mean return over 32 episodes from fixed initial states. Each init starts with its source's "
      "observation statistics when the observation size matches (random init and walker2d: fresh).",
      f"- Three measures. *Training return*: the stochastic policy's return over the episodes that ended in an update "
      f"(what PPO optimizes; from the first update in which an episode ended), mean over seeds, final = mean of the "
      f"last {SMOOTH} updates. *Deterministic return*: the "
      "mean action's return over 32 fixed episodes (the programs' `eval_return`). On hopper an untrained policy's mean "
      "action is near zero, and a hopper that does not move collects the healthy reward (1 per step) for up to "
      "1,000 steps: deterministic returns before training are high (a standing policy), and first *fall* while PPO's "
      "noisy policy learns to hop. The speed-up therefore uses the training return: the environment steps random "
      f"init needs to reach its own final training return, over the steps the method needs ({SMOOTH}-update trailing "
      "mean, linear interpolation). *Sampled return*: the policy PPO trains (sampled actions, a fixed key) over the "
      "same 32 fixed episodes (`eval_sampled_return`), at the same evaluation points. The training return lags: all "
      f"environments start together and an episode of L steps ends L / {config('train').ppo.unroll_length} updates "
      "after it starts, so in the first updates only the episodes that fell early are counted, whatever the init; the sampled return "
      "measures the init itself at step 0, and its speed-up (to random init's final sampled return, interpolated "
      f"between evaluations every {b['eval_every']} updates) has no such floor but the evaluation's spacing.",
      "", "## Pre-training and WeiT init", "",
      "| stage | return (deterministic) | wall |", "|---|---|---|"]
  for name, label in (("weit", "WeiT templates (aux d3-w64)"), ("tleg", "TLEG auxiliary d3-w64"),
                      ("dense", "dense d6-w96 (WS source)"),
                      *((f"target-{role}", f"the {role} target {cfg.short_name()} itself (the reference)")
                        for role, cfg in target_configs("hopper").items())):
    if (s := stages["pretrain"].get(name)):
      lines.append(f"| {label} | {s['eval_return']:.1f} | {s['wall_s']:.0f} s |")
  lines += ["", "Scaler training of every WeiT target (return of the deterministic policy before -> after):", "",
            "| env | target | adapt = PPO | adapt = distillation |", "|---|---|---|---|"]
  for env in stages["init"]:
    for role, cfg in target_configs(env).items():
      ppo_t = stages["init"][env]["ppo"]["targets"][role]
      dist = stages["init"][env].get("distill")
      dist_txt = (f"{dist['targets'][role]['return_before']:.1f} -> {dist['targets'][role]['return_after']:.1f}"
                  if dist else "n/a (the auxiliary acts on hopper only)")
      lines.append(f"| {env} | {role} {cfg.short_name()} | {ppo_t['return_before']:.1f} -> "
                   f"{ppo_t['return_after']:.1f} | {dist_txt} |")
  for env in args.envs:
    lines += ["", f"## Downstream PPO: {ENV_LABELS[env]}", "", f"![curves](control_{env}.png)", "",
              "| target | method | training return: first episodes -> final (+- std over seeds) | speed-up to random's "
              "final training return | sampled return: before -> final | speed-up to random's final sampled return "
              "| deterministic return: before -> final |",
              "|---|---|---|---|---|---|---|"]
    for role, cfg in target_configs(env).items():
      for method in METHODS:
        if method in agg.get(env, {}).get(role, {}):
          e = agg[env][role][method]
          returns = (f"{e['tfirst']:.1f} -> {e['tfinal']:.1f} +- {e['tfinal_std']:.1f} ({e['seeds']} seeds)"
                     if e["tx"] else "no episode ended within the budget")
          sampled = (f"{e['s0']:.1f} -> {e['sfinal']:.1f} +- {e['sfinal_std']:.1f} | "
                     + fmt_sampled_speedup(e, method)
                     if e["s0"] is not None else "- | -")
          lines.append(f"| {role} {cfg.short_name()} | {LABELS[method]} | {returns} | {fmt_speedup(e)} | {sampled} | "
                       f"{e['step0']:.1f} -> {e['final']:.1f} +- {e['final_std']:.1f} |")
        elif (why := na.get((env, role, method))):
          lines.append(f"| {role} {cfg.short_name()} | {LABELS[method]} | n/a | {why} | n/a | n/a | n/a |")
    lines += reference_lines(agg.get(env, {}), env, b)
  if peer:
    lines += ["", "## PPO validation: brax's ppo.train on the same budget", "", "![peer](control_peer.png)", "",
              "| implementation | final return per seed | mean | wall per run (incl. compile) |", "|---|---|---|---|"]
    for name, label in (("ours", "weit_jax PPO (random init, policy d3-w64)"),
                        ("brax", "brax 0.14.2 ppo.train (MLPs 3 x 64, tanh-Normal)")):
      finals = [run["curve"][max(run["curve"], key=int)] for run in peer[name]]
      walls = [run["wall_s"] for run in peer[name]]
      lines.append(f"| {label} | {', '.join(f'{f:.1f}' for f in finals)} | {np.mean(finals):.1f} | "
                   f"{np.mean(walls):.0f} s |")
    lines += ["", "Differences that remain by design: brax squashes actions with tanh (a tanh-Normal, entropy "
              "estimated by sampling), weit_jax clips a Gaussian's samples to [-1, 1] and uses its closed-form "
              "entropy; brax's policy and value networks use swish and LeCun-uniform init, weit_jax's tanh and "
              "orthogonal init; brax evaluates on its own episode schedule (11 evaluations)."]
  lines.append("")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "control.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def main(argv=None) -> None:
  args = parse_args(argv)
  t_start = time.time()
  load_start = os.getloadavg()
  from weit_jax import distributed
  os.environ.setdefault("WEIT_COMPILATION_CACHE", os.path.join(args.workdir, "jax_cache"))
  distributed.enable_compilation_cache()
  os.makedirs(args.workdir, exist_ok=True)
  b = args.budget
  pre = pretrain_all(args)
  stages = {"pretrain": pre, "init": {}}
  if "weit" in args.methods:
    for env in args.envs:
      stages["init"][env] = {"ppo": init_weit(args, pre["weit"]["workdir"], env, "ppo")}
    if "hopper" in args.envs:
      stages["init"]["hopper"]["distill"] = init_weit(args, pre["weit"]["workdir"], "hopper", "distill")
  sources = dict(pre, weit_init={env: i["ppo"] for env, i in stages["init"].items()})  # (dense, tleg, target-*)
  targets = {env: target_configs(env) for env in args.envs}
  pairs, na = {}, {}
  for env in args.envs:
    pairs[env], ruled_out = harness.applicable(targets[env], args.methods, lambda m, cfg: applies(m, cfg, env))
    na.update({(env, role, method): why for (method, role), why in ruled_out.items()})
  results = []
  for seed in range(b["seeds"]):  # seed-major: every configuration has a result early
    for env in args.envs:
      for role, method in pairs[env]:
        cfg = targets[env][role]
        log(f"{env} {role} {cfg.short_name()} {method} seed {seed}")
        results.append(run_one(args, method, env, role, cfg, seed, sources))
  peer = None
  if not args.no_peer:
    peer = {"ours": [ours_peer_run(args, s) for s in range(b["seeds"])],
            "brax": [brax_peer_run(args, s) for s in range(b["seeds"])]}
  agg = aggregate(results)
  os.makedirs(args.out, exist_ok=True)
  for env in args.envs:
    plot(agg, env, os.path.join(args.out, f"control_{env}.png"))
  if peer:
    plot_peer(peer, os.path.join(args.out, "control_peer.png"))
  stage_s = (sum(p["wall_s"] for p in pre.values()) + sum(i["wall_s"] for e in stages["init"].values()
                                                          for i in e.values())
             + sum(r["wall_s"] for r in results) + sum(r["wall_s"] for runs in (peer or {}).values() for r in runs))
  info = harness.run_info("benchmarks/control_quality.py", argv, t_start, load_start, recorded_s=stage_s)
  path = write_report(args, agg, stages, peer, na, info)
  harness.write_json(os.path.join(args.out, "control.json"), harness.json_safe(dict(
      budget=b, aggregate=agg, peer=peer, info=info, not_applicable={"/".join(k): v for k, v in na.items()})))
  log(f"wrote {path}")


if __name__ == "__main__":
  main()
