"""Preemption, crashes and bad input lose nothing and explain themselves (issue 8).

The runs are real ``python main.py`` subprocesses on one CPU device (tiny models, tiny learnable
data, XLA backend optimizations off), killed and restarted the way a scheduler would. Subprocesses
share a persistent JAX compilation cache, so only the first run of each program compiles.

Tolerance: a resumed run reproduces the uninterrupted run *exactly* — every logged loss, accuracy,
gradient norm and the final eval metrics are compared with ``==`` (same compiled program, same
restored bits, same batches from the restored data-iterator state).
"""
import asyncio
import dataclasses
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import jax
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import vit_pretrain
from helpers import TIMEOUT, USER_ERRORS, assert_refused, committed_steps, ok, parse_main, run_main, snapshot
from weit_jax import checkpoint, exports, input_pipeline, losses, sharding, tasks, train_loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL, EVERY = 20, 5

PRETRAIN = ["--config=configs/vit_pretrain.py:runlocal", "--config.model.variant=mu/4",
            "--config.weit.tiles.embed=8", "--config.weit.tiles.mlp=8", "--config.weit.tiles.kv=8",
            "--config.batch_size=32", f"--config.total_steps={TOTAL}", f"--config.checkpoint_every={EVERY}",
            "--config.log_every=1", "--config.eval_every=0", "--config.optim.warmup_steps=2"]
TRAIN = ["--config=configs/vit_train.py:runlocal", "--config.batch_size=32", f"--config.total_steps={TOTAL}",
         f"--config.checkpoint_every={EVERY}", "--config.log_every=1", "--config.eval_every=0",
         "--config.optim.warmup_steps=2"]

# Runs main.py, but SIGKILLs the process inside orbax's commit of step $WEIT_TEST_KILL_IN_SAVE: every
# file of that step is written, only the final rename of its temporary folder is missing.
KILL_IN_SAVE = r'''
import os, runpy, signal, sys
from orbax.checkpoint._src.path import atomicity
_finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self):
  final = self._final_path
  if final.parent.name == "checkpoints" and final.name == os.environ["WEIT_TEST_KILL_IN_SAVE"]:
    os.kill(os.getpid(), signal.SIGKILL)
  return await _finalize(self)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
sys.argv[0] = "main.py"
runpy.run_path("main.py", run_name="__main__")
'''

# Runs main.py, but once the program holds the workdir lock and has claimed the workdir, touches
# $WEIT_TEST_READY and waits until $WEIT_TEST_GO exists: a run that is deterministically "live".
WAIT_AFTER_CLAIM = r'''
import os, runpy, sys, time
from weit_jax import train_loop
_guard = train_loop.guard_workdir
def guard(*args, **kwargs):
  _guard(*args, **kwargs)
  open(os.environ["WEIT_TEST_READY"], "w").close()
  while not os.path.exists(os.environ["WEIT_TEST_GO"]):
    time.sleep(0.05)
train_loop.guard_workdir = guard
sys.argv[0] = "main.py"
runpy.run_path("main.py", run_name="__main__")
'''


# --- subprocess plumbing ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
  e = dict(os.environ)
  # One CPU device; XLA's backend optimizations off: the cold compile of the pre-training step
  # drops from ~40 s to ~10 s (every run of a comparison uses the same flags, so the same program).
  flags = [f for f in e.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  e["XLA_FLAGS"] = " ".join(flags + ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"])
  e.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
           JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  e.pop("WEIT_DEBUG", None)
  return e


@pytest.fixture(scope="module")
def data_flags(learnable_data):
  c = learnable_data(ml_collections.ConfigDict(vit_pretrain.get_config("runlocal").to_dict()))
  return [f"--config.data.idx_dir={c.data.idx_dir}", f"--config.data.data_dir={c.data.data_dir}",
          "--config.data.read_threads=2", "--config.data.prefetch_buffer_size=16",
          "--config.data.flip=False", "--config.data.crop_padding=0"]


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def assert_same_as_reference(workdir, reference):
  """Every record logged in ``workdir`` (killed runs and resumed ones alike) equals the uninterrupted
  run's record of the same step, exactly; every step of the reference was logged."""
  ref = {}
  for r in metrics(reference):
    ref.setdefault(r["step"], {}).update(r)
  records = metrics(workdir)
  for r in records:
    want = {k: ref[r["step"]][k] for k in r}
    assert r == want, f"step {r['step']}: {r} != uninterrupted {want}"
  assert {r["step"] for r in records} == set(ref)
  return records


def locked(workdir) -> bool:
  return os.path.exists(os.path.join(workdir, "lock.json"))


# --- 1. preemption is invisible -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrain_reference(tmp_path_factory, env, data_flags):
  workdir = str(tmp_path_factory.mktemp("pretrain_ref") / "wd")
  ok(run_main(PRETRAIN + data_flags, workdir, env))
  assert not locked(workdir)  # released at a normal exit
  return workdir


@pytest.fixture(scope="module")
def pretrain_interrupted(tmp_path_factory, env, data_flags, pretrain_reference):
  """Pre-training SIGKILLed at an arbitrary step, restarted, SIGKILLed again in the middle of a save,
  and restarted to the end: the same command every time."""
  workdir = str(tmp_path_factory.mktemp("pretrain_kill") / "wd")
  args = PRETRAIN + data_flags
  # Killed once step 11 is logged: the save of step 10 waited for step 5's to commit, so at least
  # one checkpoint is committed; step 10's may or may not be.
  runs = {"sigkill": run_main(args, workdir, env, signal_after_step=2 * EVERY + 1)}
  runs["committed_at_sigkill"] = committed_steps(workdir)
  runs["kill_in_save"] = run_main(args, workdir, env, wrapper=KILL_IN_SAVE,
                                  extra_env={"WEIT_TEST_KILL_IN_SAVE": str(3 * EVERY)})
  runs["listing_after_kill_in_save"] = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  runs["final"] = ok(run_main(args, workdir, env))
  return workdir, runs


def test_pretrain_resumes_exactly_after_sigkill(pretrain_interrupted, pretrain_reference):
  workdir, runs = pretrain_interrupted
  killed = runs["sigkill"]
  assert killed.returncode == -signal.SIGKILL and killed.signalled_at is not None, killed.stdout[-2000:]
  assert killed.signalled_at < TOTAL
  last = runs["committed_at_sigkill"][-1]  # the last checkpoint committed before the kill
  assert last <= killed.signalled_at
  assert runs["kill_in_save"].resumed_from() == last
  # Each restart took over the lock the SIGKILLed process left, with one line saying so.
  for name in ("kill_in_save", "final"):
    assert len(re.findall(r"Took over the lock of .* no longer exists on this host", runs[name].stdout)) == 1, name
  assert not locked(workdir)
  assert_same_as_reference(workdir, pretrain_reference)
  assert "Done: step 20" in runs["final"].stdout


def test_checkpoint_killed_during_save_is_never_used(pretrain_interrupted, pretrain_reference):
  workdir, runs = pretrain_interrupted
  dying = runs["kill_in_save"]
  assert dying.returncode == -signal.SIGKILL, dying.stdout[-2000:] + dying.stderr[-2000:]
  # Orbax left step 15 as a temporary folder; the committed steps are those before it.
  listing = runs["listing_after_kill_in_save"]
  assert "15" not in listing and any(n.startswith("15.orbax-checkpoint-tmp") for n in listing), listing
  assert runs["final"].resumed_from() == 10
  # The restarted run removed the half-written folder and saved step 15 anew.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "15", "20"]
  assert_same_as_reference(workdir, pretrain_reference)


@pytest.fixture(scope="module")
def train_reference(tmp_path_factory, env, data_flags):
  workdir = str(tmp_path_factory.mktemp("train_ref") / "wd")
  ok(run_main(TRAIN + data_flags, workdir, env))
  return workdir


def test_train_program_survives_sigterm(tmp_path, env, data_flags, train_reference):
  """(SIGKILL and its resume: the pre-training program above, on the same train loop.)"""
  workdir = str(tmp_path / "wd")
  args = TRAIN + data_flags
  term = run_main(args, workdir, env, signal_after_step=2 * EVERY + 2, sig=signal.SIGTERM)
  assert term.returncode == 143, term.stdout[-2000:] + term.stderr[-2000:]
  saved = _saved_at(term)
  assert term.signalled_at <= saved < TOTAL
  assert committed_steps(workdir)[-1] == saved
  assert max(r["step"] for r in metrics(workdir)) == saved  # it stopped right after the save
  assert not locked(workdir)  # released at SIGTERM
  final = ok(run_main(args, workdir, env))
  assert final.resumed_from() == saved
  assert_same_as_reference(workdir, train_reference)


# --- 2. a damaged checkpoint explains itself, and the previous one works ------------------------------

def test_damaged_checkpoint_names_itself_and_falls_back(pretrain_interrupted, pretrain_reference, tmp_path,
                                                        env, data_flags):
  workdir = str(tmp_path / "wd")
  shutil.copytree(pretrain_interrupted[0], workdir)
  step_dir = os.path.join(workdir, "checkpoints", str(TOTAL))
  data_files = [os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
                if os.sep + "d" + os.sep in os.path.join(dp, f)]
  assert data_files, step_dir
  for path in data_files:  # data files cut short (a full disk, a bad copy); every one, since which
    with open(path, "r+b") as f:  # of them the manifest references depends on orbax's layout
      f.truncate(os.path.getsize(path) // 3)
  args = PRETRAIN + data_flags
  broken = run_main(args, workdir, env)
  assert broken.returncode == 2, broken.stderr[-3000:]
  # No stack trace at all: not from orbax, and none from tensorstore reads still in flight.
  assert "Traceback" not in broken.stderr and "Event loop is closed" not in broken.stderr, broken.stderr[-3000:]
  error = [line for line in broken.stderr.splitlines() if line.startswith("error: ")]
  assert len(error) == 1 and step_dir in error[0] and f"--config.resume_step={TOTAL - EVERY}" in error[0], error
  assert broken.stderr.splitlines()[-1] == error[0]  # the error is the last line, not lost in logs
  # The fallback it names works: resume from step 15, the damaged step 20 is discarded and redone.
  fallback = ok(run_main(args + [f"--config.resume_step={TOTAL - EVERY}"], workdir, env))
  assert fallback.resumed_from() == TOTAL - EVERY
  assert f"Discarded the later checkpoints [{TOTAL}]" in fallback.stdout
  assert committed_steps(workdir)[-1] == TOTAL
  assert_same_as_reference(workdir, pretrain_reference)


def test_a_sigterm_after_the_last_step_still_stops_the_process():
  """Between the last step's check and the end of a run (final save, eval, export) a SIGTERM used to
  be recorded and dropped: a multi-stage process (init's targets, a benchmark) went on to its next
  stage. Delivered synchronously here, inside the guard, after the loop would have read it."""
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(SystemExit) as stopped:
    with train_loop._Preemption():
      signal.raise_signal(signal.SIGTERM)
  assert stopped.value.code == 143 and signal.getsignal(signal.SIGTERM) is before
  with train_loop._Preemption() as p:  # no signal: nothing happens
    pass
  assert not p.requested


def test_a_failed_restore_leaves_no_read_in_flight():
  """The race behind late tracebacks after a damaged checkpoint's error, with a deterministic
  trigger: one read fails while another is still in flight in a foreign thread (as tensorstore's
  are) and completes only after the failure. Orbax's ``run_sync`` (the restore's own runner) must
  not return before that read has delivered its result to the loop, so nothing is left running."""
  from orbax.checkpoint._src import asyncio_utils
  failed = threading.Event()
  late_errors, tasks = [], []

  def late_read(loop, future):
    failed.wait(30)  # completes only once the other read has failed
    try:
      loop.call_soon_threadsafe(future.set_result, "late")
    except RuntimeError as e:  # "Event loop is closed": what tensorstore's threads would print
      late_errors.append(e)

  async def restore():
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    threading.Thread(target=late_read, args=(loop, future), daemon=True).start()

    async def in_flight():
      return await future

    async def damaged():
      failed.set()
      raise ValueError("OUT_OF_RANGE: damaged chunk")
    tasks.append(asyncio.ensure_future(in_flight()))
    await asyncio.gather(damaged(), tasks[0])

  policy = asyncio.get_event_loop_policy()
  with pytest.raises(ValueError, match="damaged chunk"):
    with checkpoint._settled_event_loops():
      asyncio_utils.run_sync(restore())
  assert tasks[0].done() and tasks[0].result() == "late"
  assert not late_errors
  assert asyncio.get_event_loop_policy() is policy  # put back


# --- 2b. a preempted run resumes on another mesh and device count ------------------------------------

def _eight_devices(env):
  return {"XLA_FLAGS": env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8"}


def _saved_at(result) -> int:
  m = re.search(r"SIGTERM received: saved a checkpoint at step (\d+)", result.stdout)
  assert m, result.stdout[-2000:] + result.stderr[-2000:]
  return int(m.group(1))


def test_pretraining_resumes_on_another_mesh_and_device_count(tmp_path, env, data_flags):
  """8 devices as fsdp=8, stopped (SIGTERM, as a pod's maintenance event); resumed on 1 device to
  the end with rematerialization (``model.remat_policy``: how, not what). The workdir guard accepts
  the restart, and every logged loss and gradient norm equals the uninterrupted 8-device run's (to
  float tolerance: another mesh sums in another order; observed at most 1.2e-7, relative, while
  consecutive batches' losses differ by ~3e-4 from step 3 on, so a batch out of place would show).
  (A data=2 x fsdp=4 mesh sums the gradient in yet another order: its gradient norm differs up to
  5.5e-5 relative at step 5, too close to that 3e-4 to compare.)"""
  args = PRETRAIN + data_flags
  reference = str(tmp_path / "reference")
  ok(run_main(args + ["--config.mesh.fsdp=8", "--config.mesh.data=1"], reference, env, extra_env=_eight_devices(env)))
  workdir = str(tmp_path / "wd")
  first = run_main(args + ["--config.mesh.fsdp=8", "--config.mesh.data=1"], workdir, env,
                   extra_env=_eight_devices(env), signal_after_step=2 * EVERY + 1, sig=signal.SIGTERM)
  assert first.returncode == 143, first.stdout[-2000:] + first.stderr[-2000:]
  second = ok(run_main(args + ["--config.model.remat_policy=nothing_saveable"], workdir, env))  # one device
  assert second.resumed_from() == _saved_at(first) and "Done: step 20" in second.stdout
  ref = {r["step"]: r for r in metrics(reference) if "loss" in r}
  logged = [r for r in metrics(workdir) if "loss" in r]
  assert sorted({r["step"] for r in logged}) == sorted(ref)
  for r in logged:
    np.testing.assert_allclose([r["loss"], r["grad_norm"]], [ref[r["step"]]["loss"], ref[r["step"]]["grad_norm"]],
                               rtol=1e-5, atol=1e-6, err_msg=f"step {r['step']}")
    assert r["lr"] == ref[r["step"]]["lr"]


# --- 3. bad input is refused before compiling, with nothing written -----------------------------------

@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
  """A plain ViT export (depth 1, 28x28 images) written the way the init program writes one."""
  import flax.linen as nn
  from weit_jax.models import vit
  cfg = vit.make_config("mu/4", depth=1, image_size=28, channels=1, num_classes=10)
  params = nn.unbox(jax.jit(vit.ViT(cfg).init)(jax.random.key(0), vit.dummy_input(cfg)))["params"]
  path = str(tmp_path_factory.mktemp("export") / "export")
  exports.write(path, jax.device_get(params), {"model": dataclasses.asdict(cfg)})
  return path


# (name, args builder, expected message). ``W`` is a fresh workdir unless the case says otherwise.
BAD_INPUT = {
    "unknown variant": (lambda f: PRETRAIN + f["data"] + ["--config.model.variant=zz/4"], r"unknown ViT variant 'zz/4'"),
    "unknown dataset": (lambda f: PRETRAIN + ["--config.data.name=nope"], r"unknown dataset 'nope'"),
    "heads do not divide width": (lambda f: PRETRAIN + f["data"] + ["--config.model.num_heads=5"],
                                  r"num_heads=5 does not divide width=32"),
    "templates of another patch size": (
        lambda f: ["--config=configs/vit_init.py:runlocal", f"--config.templates={f['pretrain']}",
                   "--config.targets=patch=7"], r"template bank .* has tile shape"),
    "templates from a run that is not pre-training": (
        lambda f: ["--config=configs/vit_init.py:runlocal", f"--config.templates={f['train']}"],
        r"holds a 'train' run, not pre-training"),
    "export into a model of another shape": (
        lambda f: TRAIN + f["data"] + [f"--config.init={f['export']}", "--config.data.image_size=32"],
        r"export was exported for other data sizes than this run's: \{'image_size': \(28, 32\)\}"),
    "init that is not an export": (lambda f: TRAIN + f["data"] + [f"--config.init={f['pretrain']}"],
                                   r"is not an export \(no export.json\)"),
    "workdir of a different config": (lambda f: PRETRAIN + f["data"] + ["--config.seed=1"],
                                      r"holds a run of a different config \(fields \['seed'\] differ\)"),
    "missing Fashion-MNIST files": (
        lambda f: PRETRAIN + ["--config.data.idx_dir=/nonexistent", f"--config.data.data_dir={f['empty']}"],
        r"IDX files missing in /nonexistent.*sudo apt-get install dataset-fashion-mnist"),
    "unknown config field": (lambda f: PRETRAIN + f["data"] + ["--config.model.heads=2"],
                             r"unknown config field --config.model.heads: config.model has no field 'heads'; "
                             r"its fields are \[.*'num_heads'"),
    "value of the wrong type": (lambda f: PRETRAIN + f["data"] + ["--config.batch_size=abc"],
                                r"flag --config.batch_size=abc: invalid literal for int"),
    "dataset not prepared": (lambda f: ["--config=configs/vit_pretrain.py", f"--config.data.data_dir={f['empty']}"],
                             r"dataset 'imagenet2012' is not prepared .*tfds build imagenet2012"),
}
# Cases that must restore a checkpoint's abstract state first (which compiles the auxiliary model's
# init statistics) before they can tell; the rest are refused before anything of the model compiles.
NEEDS_CHECKPOINT = {"templates of another patch size", "templates from a run that is not pre-training"}


# Checked through ``python main.py`` (exit code, one last ``error:`` line, no traceback, nothing compiled
# or written): a flag error, a model mismatch found from a checkpoint, missing data. The others are
# checked in process: the same exception, message and untouched files, without a process start each.
THROUGH_MAIN = ("unknown config field", "templates of another patch size", "missing Fashion-MNIST files")


def bad_input(case, tmp_path, data_flags, small_export, pretrain_interrupted, train_reference):
  """The case's command line, its workdir, and the folders it must leave as they were."""
  build, _ = BAD_INPUT[case]
  (tmp_path / "empty").mkdir()
  flags = dict(data=data_flags, pretrain=pretrain_interrupted[0], train=train_reference, export=small_export,
               empty=str(tmp_path / "empty"))
  if case == "workdir of a different config":
    workdir = str(tmp_path / "existing")
    shutil.copytree(pretrain_interrupted[0], workdir)
  else:
    workdir = str(tmp_path / "new" / "wd")
  return build(flags), workdir, [workdir, pretrain_interrupted[0], train_reference, small_export]


@pytest.mark.parametrize("case", sorted(set(BAD_INPUT) - set(THROUGH_MAIN)))
def test_bad_input_is_refused_before_anything_is_written(case, tmp_path, data_flags, small_export,
                                                         pretrain_interrupted, train_reference):
  argv, workdir, watched = bad_input(case, tmp_path, data_flags, small_export, pretrain_interrupted, train_reference)
  before = [snapshot(p) for p in watched]
  with pytest.raises(USER_ERRORS) as e:
    config, workdir = parse_main(argv, workdir)
    importlib.import_module(f"weit_jax.programs.{config.program}").run(config, workdir)
  assert re.search(BAD_INPUT[case][1], " ".join(str(e.value).split())), str(e.value)
  assert [snapshot(p) for p in watched] == before  # nothing written: a new workdir is not even created


@pytest.mark.parametrize("case", THROUGH_MAIN)
def test_bad_input_is_refused_with_one_line_and_nothing_written(case, tmp_path, env, data_flags, small_export,
                                                                 pretrain_interrupted, train_reference):
  argv, workdir, watched = bad_input(case, tmp_path, data_flags, small_export, pretrain_interrupted, train_reference)
  pattern = BAD_INPUT[case][1]
  before = [snapshot(p) for p in watched]
  result = run_main(argv, workdir, dict(env, JAX_LOG_COMPILES="1"), timeout=120)
  assert_refused(result, pattern, case)
  assert [snapshot(p) for p in watched] == before  # nothing written: a new workdir is not even created
  compiled = set(re.findall(r"(?:Compiling jit\(|compilation cache hit for '?jit_)(\w+)", result.stderr))
  assert not compiled & {"step_fn", "init", "eval_fn", "materialize"}, compiled
  if case not in NEEDS_CHECKPOINT:
    assert "stats" not in compiled, compiled


# --- 4. divergence is caught -----------------------------------------------------------------------------

def _nan_from_update(k: int) -> optax.GradientTransformation:
  """Turns the updates NaN from the ``k``-th update on (1-based): the state after step k is NaN."""
  def update(updates, count, params=None):
    bad = count + 1 >= k
    return jax.tree_util.tree_map(lambda u: jax.numpy.where(bad, jax.numpy.nan, u), updates), count + 1
  return optax.GradientTransformation(lambda params: jax.numpy.zeros((), jax.numpy.int32), update)


def _linear_task(nan_from: int) -> train_loop.Task:
  """A linear classifier on the images: compiles in a blink."""
  def logits_fn(params, images):
    return images.reshape(images.shape[0], -1) @ params["w"] + params["b"]

  def loss_fn(params, batch, key):
    del key
    return losses.softmax_cross_entropy(logits_fn(params, batch["image"]), batch["labels"]), {}
  return train_loop.Task(
      init_params=lambda key: {"w": 0.01 * jax.random.normal(key, (28 * 28, 10)), "b": jax.numpy.zeros(10)},
      param_axes={"w": P(None, None), "b": P(None)}, loss_fn=loss_fn,
      eval_fn=tasks.Classification(None).eval_fn(logits_fn),
      optimizer=optax.chain(optax.sgd(0.01), _nan_from_update(nan_from)), lr_schedule=lambda step: 0.01)


@pytest.mark.parametrize("nan_from, log_every, every, message, good", [
    # Logged every step: the first NaN loss (the step after the NaN update) stops the run.
    (5, 1, 2, r"at step 6: loss=nan, grad_norm=nan", 4),
    # Logged rarely: the unlogged steps are checked too, at the next save, and the exact step named.
    (4, 100, 3, r"at step 5: loss=nan, grad_norm=nan", 3),
    # Finite loss and gradient, but the state to save is NaN: it is not saved.
    (6, 100, 3, r"at step 6: the train state has non-finite values in \[\"\['params'\]\['b'\]\"", 3),
])
def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(nan_from, log_every, every, message,
                                                                           good, learnable_data, tmp_path):
  config = learnable_data(ml_collections.ConfigDict(vit_pretrain.get_config("runlocal").to_dict()))
  config.update(dict(total_steps=12, log_every=log_every, checkpoint_every=every, eval_every=0, seed=0))
  mesh = sharding.make_mesh({"data": -1})
  train_iter = input_pipeline.make_train_iterator(config.data, global_batch_size=32, seed=0, mesh=mesh)
  with pytest.raises(train_loop.DivergenceError, match=message) as e:
    train_loop.run(config, str(tmp_path), _linear_task(nan_from), mesh=mesh, train_iter=train_iter,
                   make_eval_iter=lambda: [])
  assert f"the last good checkpoint, step {good} in {tmp_path}/checkpoints, stays the latest" in str(e.value)
  assert committed_steps(str(tmp_path)) == list(range(every, good + 1, every))


def test_divergence_from_the_command_line_exits_2_with_one_line(tmp_path, env, data_flags, pretrain_reference):
  # NaN injected through the input normalization (std 0): a non-finite loss from the first step on.
  result = run_main(PRETRAIN + data_flags + ["--config.data.std=(0.0,)"], str(tmp_path / "wd"), env)
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.splitlines()
  assert lines[-1].startswith("error: training diverged at step 1: loss=nan"), lines[-5:]
  assert "no checkpoint had been saved yet" in lines[-1] and "Traceback" not in result.stderr
  assert committed_steps(str(tmp_path / "wd")) == []
  assert not locked(str(tmp_path / "wd"))  # released at an error exit


# --- 5. a workdir belongs to one live run ----------------------------------------------------------------

def test_a_second_run_on_a_live_workdir_is_refused_and_the_first_is_untouched(tmp_path, env, data_flags):
  """The same pre-training command started twice: the second exits 2 with one line naming the holder
  before it writes anything; the first, held on a trigger file meanwhile, then finishes normally."""
  workdir, ready, go = str(tmp_path / "wd"), str(tmp_path / "ready"), str(tmp_path / "go")
  args = PRETRAIN + data_flags
  first = subprocess.Popen([sys.executable, "-c", WAIT_AFTER_CLAIM] + args + [f"--workdir={workdir}"], cwd=ROOT,
                           env=dict(env, WEIT_TEST_READY=ready, WEIT_TEST_GO=go), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
  try:
    for _ in range(TIMEOUT * 20):  # waits for the trigger; the outcome does not depend on when it comes
      if os.path.exists(ready) or first.poll() is not None:
        break
      threading.Event().wait(0.05)
    assert os.path.exists(ready), first.communicate()[0][-3000:]
    before = snapshot(workdir)
    second = run_main(args, workdir, env)
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    last = second.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: workdir {re.escape(workdir)} is in use by another run: host \S+, pid {first.pid}, "
                        r"program pretrain, since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, last heartbeat \d+ s ago "
                        r"\(command: .*\)\. Wait for that run to end or stop it .*", last), last
    assert "Traceback" not in second.stderr and second.stdout.strip() == ""
    assert snapshot(workdir) == before  # nothing written, not even to the lock
    open(go, "w").close()
    out, _ = first.communicate(timeout=TIMEOUT)
  finally:
    if first.poll() is None:
      first.kill()
      first.wait()
  assert first.returncode == 0 and "Done: step 20" in out, out[-3000:]
  assert not locked(workdir)
