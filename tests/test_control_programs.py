"""The control programs as a user runs them (``python main.py``, one CPU device, tiny settings):
bad input is refused before anything compiles, with one ``error:`` line and nothing written; the
persistent compilation cache fills; that run, resumed in process on 8 devices from its step-2
checkpoint with the environments split over the mesh, logs what it logged; and, in process from
that run's templates, the init program for the templates' environment and for another
morphology, and the train program's use of such an export.

Every run shares one persistent compilation cache (``WEIT_COMPILATION_CACHE``, the programs' own
setting), so only the first run compiles the rollout and the update.

Tolerance: the resumed run reproduces the uninterrupted one from the restored bits of the train
state (parameters, optimizer state, and the experience's carry: environment states, observation
statistics, running returns) and per-step keys that depend only on the seed and the step; on 8
devices the sums over devices come in another order, so to float tolerance.
"""
import os
import re

import jax
import ml_collections
import numpy as np
import pytest

from helpers import assert_refused, committed_steps, every_field_read, ok, refused_in_process, run_main, snapshot
from weit_jax import checkpoint, exports, metrics, models

# inverted_pendulum: the cheapest brax system to compile (about half of hopper's compile time).
TINY = ["--config.env=inverted_pendulum", "--config.batch_size=8", "--config.ppo.unroll_length=4", "--config.ppo.num_minibatches=2",
        "--config.ppo.epochs=1", "--config.episode_length=20", "--config.eval_episodes=2"]
TOTAL = 6
PRETRAIN = ["--config=configs/policy_pretrain.py:runlocal", "--config.model.variant=mu", "--config.model.width=16",
            "--config.model.depth=2", "--config.weit.tiles.hidden=8", "--config.weit.tiles.hidden_in=8",
            "--config.weit.num_templates=2", *TINY, f"--config.total_steps={TOTAL}", "--config.checkpoint_every=2",
            "--config.eval_every=0", "--config.log_every=1"]
TRAIN = ["--config=configs/policy_train.py:runlocal", "--config.model.variant=mu", *TINY, "--config.total_steps=2"]

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("control_xla_cache"))


@pytest.fixture(scope="module")
def env(cache_dir):
  e = dict(os.environ)
  # One CPU device; XLA's backend optimizations off (the runs are compile-bound).
  flags = [f for f in e.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  e["XLA_FLAGS"] = " ".join(flags + ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"])
  e.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", WEIT_COMPILATION_CACHE=cache_dir)
  e.pop("WEIT_DEBUG", None)
  return e


# --- the compilation cache ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory, env, cache_dir):
  """The uninterrupted pre-training run (the first run of the module: it fills the cache)."""
  workdir = str(tmp_path_factory.mktemp("ctl_ref") / "wd")
  ok(run_main(PRETRAIN, workdir, env))
  return workdir, sorted(os.listdir(cache_dir))


def test_the_persistent_compilation_cache_fills(reference):
  _, cached = reference
  # The rollout-and-update step and the evaluation (each compiles for seconds) are persisted.
  assert any(n.startswith("jit_experience_step_fn") for n in cached), cached
  assert any(n.startswith("jit_evaluate") for n in cached), cached


# --- bad input is refused before compiling, with nothing written ---------------------------------------

@pytest.fixture(scope="module")
def hopper_export(tmp_path_factory):
  """A plain policy export for hopper's sizes (11 observations, 3 actions), as an init writes one."""
  cfg = models.get("policy").make_config("mu", width=16, obs_size=11, action_size=3)
  path = str(tmp_path_factory.mktemp("policy_export") / "export")
  exports.write(path, models.init_params(cfg, 0), dict(model=models.to_record(cfg)))
  return path


@pytest.fixture(scope="module")
def vit_templates(tmp_path_factory):
  """A ViT pre-training workdir as far as an init run reads one: its config and one checkpoint of
  its initial train state (no training step is compiled)."""
  from configs import vit_pretrain
  from weit_jax import sharding, train_loop
  from weit_jax.programs import pretrain
  workdir = str(tmp_path_factory.mktemp("vit_templates") / "wd")
  config = ml_collections.ConfigDict(vit_pretrain.get_config("runlocal").to_dict())
  config.model.variant = "mu/4"
  config.weit.tiles = dict(embed=8, mlp=8, kv=8, heads=1)
  setup = pretrain.build(config)
  task = pretrain.make_task(config, setup)
  _, shardings = train_loop.state_shardings(task, sharding.make_mesh({"data": -1}))
  state = train_loop.make_init_state(task, shardings)(jax.random.key(0))
  train_loop.guard_workdir(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, every=1)
  ckpt.save(1, state, None, force=True)
  ckpt.close()
  return workdir


# (args builder, expected message, fixtures that must stay unchanged).
BAD_INPUT = {
    "unknown env": (lambda f: TRAIN + ["--config.env=nosuchenv"],
                    r"env='nosuchenv' is not a brax environment; use one of \[.*'hopper'.*'walker2d'"),
    "unknown backend": (lambda f: TRAIN + ["--config.backend=warp9"],
                        r"backend='warp9'; use one of \('spring', 'positional', 'generalized', 'mjx'\)"),
    "discounting out of range": (lambda f: TRAIN + ["--config.ppo.discounting=1.5"],
                                 r"--config\.ppo\.discounting=1\.5 is out of range"),
    "export of another morphology": (
        lambda f: TRAIN + [f"--config.init={f['export']}", "--config.env=inverted_double_pendulum"],
        r"(?=.*'action_size': \(3, 1\))(?=.*'obs_size': \(11, 8\))export was exported for other data sizes than "
        r"this run's: .* initialize a policy for inverted_double_pendulum with configs/policy_init\.py "
        r"--config\.env=inverted_double_pendulum"),
    "environments that do not split over the mesh": (  # 8 devices here: each steps its own environments
        lambda f: PRETRAIN + ["--config.batch_size=12"],
        r"global batch size 12 must be a positive multiple of the 8 batch shards of the mesh"),
    "multi-size pre-training of a policy": (
        lambda f: PRETRAIN + ["--config.weit.extra_sizes=depth=3"],
        r"weit\.extra_sizes is for tasks trained on a dataset; the 'control' task collects its own experience"),
    "policy init from ViT templates": (
        lambda f: ["--config=configs/policy_init.py:runlocal", f"--config.templates={f['vit']}", *TINY],
        r"(?i)\bvit\b.*\bpolicy\b|\bpolicy\b.*\bvit\b"),
    "ViT init from policy templates": (
        lambda f: ["--config=configs/vit_init.py:runlocal", f"--config.templates={f['policy']}"],
        r"(?i)\bvit\b.*\bpolicy\b|\bpolicy\b.*\bvit\b"),
}
# Cases that restore a checkpoint's abstract state (compiling the auxiliary model's statistics).
NEEDS_CHECKPOINT = {"policy init from ViT templates", "ViT init from policy templates"}
# Through main.py in a subprocess: exit 2, one error: line, nothing compiled. The other cases are
# checked in this process (the same parse, the same program run, the error main.py would print).
IN_SUBPROCESS = {"unknown env", "export of another morphology"}
HEAVY = {"experience_step_fn", "init", "evaluate", "collect", "materialize"}


def _fixtures_for(case, request, hopper_export):
  flags = dict(export=hopper_export)
  if case == "policy init from ViT templates":
    flags["vit"] = request.getfixturevalue("vit_templates")
  if case == "ViT init from policy templates":
    flags["policy"] = request.getfixturevalue("reference")[0]
  return flags


def _check_compiled(compiled, case):
  assert not compiled & HEAVY, compiled
  if case not in NEEDS_CHECKPOINT:
    assert "stats" not in compiled, compiled


@pytest.mark.parametrize("case", sorted(IN_SUBPROCESS))
def test_bad_input_is_refused_by_main_with_one_line_and_nothing_written(case, request, tmp_path, env,
                                                                       hopper_export):
  build, pattern = BAD_INPUT[case]
  flags = _fixtures_for(case, request, hopper_export)
  workdir = str(tmp_path / "new" / "wd")
  watched = sorted(flags.values())
  before = [snapshot(p) for p in watched]
  result = run_main(build(flags), workdir, dict(env, JAX_LOG_COMPILES="1"), timeout=180)
  assert_refused(result, pattern, case)
  assert not os.path.exists(workdir)  # nothing written: the workdir is not even created
  assert [snapshot(p) for p in watched] == before  # the export or templates read, never written
  _check_compiled(set(re.findall(r"(?:Compiling jit\(|compilation cache hit for '?jit_)(\w+)", result.stderr)), case)


@pytest.mark.parametrize("case", sorted(set(BAD_INPUT) - IN_SUBPROCESS))
def test_bad_input_is_refused_with_one_line_and_nothing_written(case, request, tmp_path, hopper_export, caplog):
  build, pattern = BAD_INPUT[case]
  flags = _fixtures_for(case, request, hopper_export)
  workdir = str(tmp_path / "new" / "wd")
  watched = sorted(flags.values())
  before = [snapshot(p) for p in watched]
  message, compiled = refused_in_process(build(flags), workdir, caplog)
  assert "\n" not in message and re.search(pattern, message), message
  assert not os.path.exists(workdir)
  assert [snapshot(p) for p in watched] == before
  _check_compiled(compiled, case)


# --- the pipeline in process, from the reference run's templates -----------------------------------

TINY_FIELDS = dict(env="inverted_pendulum", batch_size=8, episode_length=20, eval_episodes=2, log_every=1)


def _config(module, **overrides):
  c = ml_collections.ConfigDict(module.get_config("runlocal").to_dict())
  c.update(dict(TINY_FIELDS, **overrides))
  c.ppo.update(dict(unroll_length=4, num_minibatches=2, epochs=1))
  if "model" in c:
    c.model.variant, c.model.width, c.model.depth = None, 16, 2
  return c


def test_environments_are_split_over_the_mesh(reference, tmp_path):
  """On 8 devices (mesh data=8) each device steps its own environments: the compiled PPO step's
  per-device arguments hold 1/8 of the carry's per-environment state (memory analysis of the step
  compiled with the carry split and with it replicated, against the bytes of those arrays). The
  1-device run (the reference, a main.py subprocess), stopped after step 2, resumes here on 8
  devices (its carry restored onto the split layout) and logs what the uninterrupted run logged,
  to float tolerance (sums over devices come in another order; observed 2.2e-7 relative). (SIGKILL
  and a resume on its heels: tests/test_reliability.py, on the same train loop.)"""
  import shutil
  from helpers import parse_main
  from weit_jax import sharding, train_loop
  from weit_jax.programs import pretrain
  ref_dir, _ = reference
  workdir = str(tmp_path / "wd")
  shutil.copytree(ref_dir, workdir)
  for step in committed_steps(workdir)[1:]:  # the run as it stood after step 2's checkpoint
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
  assert committed_steps(workdir) == [2]
  config, workdir = parse_main(PRETRAIN, workdir)
  task = pretrain.make_task(config, pretrain.build(config))
  mesh = sharding.make_mesh(dict(config.mesh))
  assert sharding.batch_ways(mesh) == 8
  abstract, split = train_loop.state_shardings(task, mesh)
  replicated = dict(split, carry=[sharding.replicated(mesh)] * len(split["carry"]))
  carry = jax.eval_shape(task.experience.init, jax.random.key(0))
  per_env = sum(x.size * x.dtype.itemsize for k in task.experience.PER_ENV for x in jax.tree_util.tree_leaves(carry[k]))
  key = jax.eval_shape(lambda: jax.random.key(0))

  def argument_bytes(shardings):
    step = train_loop.make_train_step(task, shardings, sharding.batch_sharding(mesh), mesh)
    return step.lower(abstract, None, key).compile().memory_analysis().argument_size_in_bytes

  saved = argument_bytes(replicated) - argument_bytes(split)
  assert per_env > 1000 and abs(saved - per_env * 7 / 8) <= 0.02 * per_env, (saved, per_env)

  summary = pretrain.run(config, workdir)
  assert summary["resumed_from"] == 2 and summary["final_step"] == TOTAL
  ref = {r["step"]: r for r in metrics.read_metrics(ref_dir) if "loss" in r}
  resumed = [r for r in metrics.read_metrics(workdir) if "loss" in r][TOTAL:]  # appended after the reference's
  assert [r["step"] for r in resumed] == list(range(3, TOTAL + 1))
  for r in resumed:
    np.testing.assert_allclose([r[k] for k in ("loss", "episode_return", "grad_norm")],
                               [ref[r["step"]][k] for k in ("loss", "episode_return", "grad_norm")], rtol=1e-5,
                               err_msg=f"step {r['step']}")


def test_templates_record_returns_and_observation_statistics(reference):
  from weit_jax.programs import pretrain
  workdir, _ = reference
  steps = [r for r in metrics.read_metrics(workdir) if "episode_return" in r]
  assert [r["step"] for r in steps] == list(range(1, TOTAL + 1))
  assert [r["env_steps"] for r in steps] == [32.0 * s for s in range(1, TOTAL + 1)]  # 8 envs x unroll 4 per update
  _, _, state, step = pretrain.restore_state(workdir)
  stats = state["carry"]["obs_stats"]
  assert step == TOTAL and float(stats["count"]) == TOTAL * 32  # every observation of every rollout, once
  assert stats["mean"].shape == (4,)  # inverted_pendulum observes 4 values


def test_init_for_both_morphologies_and_train_from_an_export(reference, tmp_path):
  """The init program in process: a target for the templates' environment by distillation (its
  statistics continue the templates'), one for another morphology (inverted_double_pendulum, 8
  observations: statistics anew; heuristic scalers only, steps=0), and the train program's use of
  the latter's export (its statistics; refused for another morphology before anything is written)."""
  from configs import policy_init, policy_train
  from weit_jax import tasks
  from weit_jax.programs import init as init_program
  from weit_jax.programs import pretrain, train
  workdir, _ = reference
  _, _, state, _ = pretrain.restore_state(workdir)
  template_stats = jax.device_get(state["carry"]["obs_stats"])

  c = _config(policy_init, templates=workdir, targets="width=12", steps=2, adapt="distill", checkpoint_every=2)
  with every_field_read(c):
    init_program.run(c, str(tmp_path / "distill"))
  meta = exports.read_meta(str(tmp_path / "distill" / "d2-w12-o4-a1" / "export"))
  assert meta["scaler_training"]["adapt"] == "distill" and np.isfinite(meta["scaler_training"]["return_after"])
  assert meta["observation_stats"]["count"] == float(template_stats["count"]) + 2 * 32

  c = _config(policy_init, templates=workdir, targets="depth=3", steps=0, env="inverted_double_pendulum")
  init_program.run(c, str(tmp_path / "other"))
  export = str(tmp_path / "other" / "d3-w16-o8-a1" / "export")
  meta = exports.read_meta(export)
  cfg = models.from_record(meta["model"])
  assert (cfg.obs_size, cfg.action_size) == (8, 1) and np.isfinite(meta["scaler_training"]["return_before"])
  assert meta["observation_stats"]["count"] == 0 and len(meta["observation_stats"]["mean"]) == 8
  c.adapt = "distill"
  with pytest.raises(ValueError, match="needs the auxiliary policy's environment"):
    init_program.validate(c, str(tmp_path / "other_distill"))

  tc = _config(policy_train, env="inverted_double_pendulum", init=export, total_steps=1)
  train.validate(tc, str(tmp_path / "train"))
  assert train.task_with_export(tc).obs_stats == meta["observation_stats"]
  carry = {"obs_stats": jax.tree_util.tree_map(np.asarray, tasks.control.stats_from_record(meta["observation_stats"]))}
  assert tasks.from_config(tc).export_record(carry) == {"observation_stats": meta["observation_stats"]}
  assert tasks.from_config(tc).export_record(None) == {}  # a run without a carry records none
  tc.env = "inverted_pendulum"
  with pytest.raises(ValueError, match=r"exported for other data sizes .*policy_init.py --config.env=inverted_pendulum"):
    train.validate(tc, str(tmp_path / "train_ip"))
  assert not (tmp_path / "train_ip").exists()
