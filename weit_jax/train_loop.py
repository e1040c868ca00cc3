"""The one training loop every program uses: sharded state, jitted step, eval, checkpoints, resume,
progress, metrics, plots, SIGTERM handling and divergence checks.

A program describes *what* is trained with a ``Task``; this module does the rest.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from weit_jax import checkpoint, config_checks, input_pipeline, metrics, sharding


class DivergenceError(RuntimeError):
  """A non-finite loss, gradient norm or train state; the message names the step and the last good
  checkpoint."""


@dataclasses.dataclass
class Task:
  """What a program trains.

  init_params: key -> trainable tree (traced under jit).
  param_axes: logical axis names (PartitionSpec) per leaf of the trainable tree.
  loss_fn: (params, batch, key) -> (scalar loss, dict of scalar metrics).
  eval_fn: (params, eval batch) -> per-batch sums with a ``count`` (``tasks.Task.eval_fn``); the
    loop reports ``eval_<name>`` = sum / count over the eval set.
  optimizer: the optax transformation (with its schedule for logging).
  lr_schedule: step -> learning rate, for logging.
  extra_eval: (step, params) -> more eval metrics, reported as ``eval_<name>`` beside eval_fn's at
    eval steps and at the end (a generative task's sample quality; ``tasks.Task.extra_eval_fn``).
  experience: None, or a task that makes its own data (``tasks.control.Experience``: RL rollouts).
    Its carry (environment state, observation statistics) is part of the train state and of every
    checkpoint; a step collects a batch with the current parameters, then makes ``epochs`` passes
    of ``num_minibatches`` optimizer updates over it; evaluation adds its ``evaluate`` metrics.
  """
  init_params: Callable[[jax.Array], Any]
  param_axes: Any
  loss_fn: Callable[..., tuple[jnp.ndarray, Mapping[str, jnp.ndarray]]]
  eval_fn: Callable[[Any, Mapping[str, jnp.ndarray]], Mapping[str, jnp.ndarray]]
  optimizer: optax.GradientTransformation
  lr_schedule: Callable[[Any], Any]
  extra_eval: Callable[[int, Any], Mapping[str, float]] | None = None
  experience: Any = None

  @property
  def updates_per_step(self) -> int:
    return self.experience.updates_per_step if self.experience is not None else 1


# --- workdir guard --------------------------------------------------------------------------------

def check_workdir(config, workdir: str) -> bool:
  """Refuses a workdir that holds a run of a different config, unless ``config.overwrite``; writes
  nothing. Only run-defining fields count (``config_checks.run_defining``): a run may resume on
  another mesh or device count, or with another cadence or length. Returns whether an old run is
  there to be overwritten. Local or ``gs://`` paths."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    return False
  previous = config_checks.run_defining(json.loads(path.read_text()))
  current = config_checks.run_defining(json.loads(config.to_json_best_effort()))
  if previous == current:
    return False
  if not config.get("overwrite", False):
    diff = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
    raise ValueError(f"workdir {workdir} holds a run of a different config (fields {diff} differ); "
                     "use another --workdir, or --config.overwrite=True to start it over.")
  return True


def guard_workdir(config, workdir: str, also_remove: Sequence[str] = ()) -> None:
  """``check_workdir``, then claims the workdir: removes an old run that ``config.overwrite``
  replaces (its checkpoints, metrics, and ``also_remove``) and records this config. Call it after
  every other validation: it is the first write of a run."""
  overwrite = check_workdir(config, workdir)
  wd = epath.Path(workdir)
  if metrics.is_main():
    if overwrite:  # the old run must not be resumed or plotted
      for name in ("checkpoints", "metrics.jsonl", "summary.json", "tensorboard", *also_remove):
        if (wd / name).is_dir():
          (wd / name).rmtree()
        elif (wd / name).exists():
          (wd / name).unlink()
    wd.mkdir(parents=True, exist_ok=True)
    tmp = wd / "config.json.tmp"
    tmp.write_text(json.dumps(json.loads(config.to_json_best_effort()), indent=2, sort_keys=True))
    tmp.replace(wd / "config.json")


# --- state ----------------------------------------------------------------------------------------

def state_shardings(task: Task, mesh):
  """Abstract train state and its shardings: params from the logical rules, optimizer slots like
  their parameters, everything else replicated."""
  abstract_params = jax.eval_shape(task.init_params, jax.random.key(0))
  param_sh = sharding.shardings(abstract_params, task.param_axes, mesh)
  abstract_opt = jax.eval_shape(task.optimizer.init, abstract_params)
  repl = sharding.replicated(mesh)
  opt_sh = _like_params(abstract_opt, abstract_params, param_sh, repl)
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params, "opt_state": abstract_opt}
  shardings = {"step": repl, "params": param_sh, "opt_state": opt_sh}
  if task.experience is not None:
    carry = jax.eval_shape(task.experience.init, jax.random.key(0))
    abstract["carry"] = jax.tree_util.tree_leaves(carry)
    shardings["carry"] = jax.tree_util.tree_leaves(carry_shardings(task.experience, carry, mesh))
  return abstract, shardings


def carry_shardings(exp, carry, mesh):
  """The experience's per-environment state split over the batch axes of the mesh along its
  environment axis, as a batch is (each device steps its own environments); the rest replicated."""
  per_env, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  return {k: jax.tree_util.tree_map(
      lambda x, k=k: per_env if k in exp.PER_ENV and x.ndim and x.shape[0] == exp.num_envs else repl, v)
      for k, v in carry.items()}


def _carry_def(task: Task):
  return jax.tree_util.tree_structure(jax.eval_shape(task.experience.init, jax.random.key(0)))


def carry_of(task: Task, state):
  """The experience's carry (a pytree) from a train state, which holds it as a list of leaves (an
  environment's state is a tree of flax dataclasses; a checkpoint keeps plain lists)."""
  return jax.tree_util.tree_unflatten(_carry_def(task), state["carry"])


def _like_params(tree, abstract_params, param_sh, default):
  """Shardings for optimizer state: a leaf whose path ends with a parameter's path and has its
  shape (Adam's moments, under any wrapper) is sharded like it; the rest (counts) get ``default``."""
  by_path = {}
  for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                              jax.tree_util.tree_leaves(param_sh)):
    by_path[jax.tree_util.keystr(path)] = (leaf.shape, sh)

  def pick(path, leaf):
    key = jax.tree_util.keystr(path)
    for suffix, (shape, sh) in by_path.items():
      if key.endswith(suffix) and tuple(leaf.shape) == tuple(shape):
        return sh
    return default
  return jax.tree_util.tree_map_with_path(pick, tree)


def make_init_state(task: Task, shardings):
  """``(key, params=None) -> state``, jitted with the state's shardings. Given params (host arrays
  from an export or an extraction) are placed onto their shardings first, then passed as
  arguments: never baked into the program as constants; ``device_put`` also takes host arrays for
  shardings that span processes, which ``jit`` refuses."""
  def init(key, params):
    params = task.init_params(key) if params is None else params
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": task.optimizer.init(params)}
    if task.experience is not None:
      state["carry"] = jax.tree_util.tree_leaves(task.experience.init(jax.random.fold_in(key, 1)))
    return state
  init = jax.jit(init, out_shardings=shardings)

  def make(key, params=None):
    if params is not None:
      params = jax.device_put(params, shardings["params"])
    return init(key, params)
  return make


def make_train_step(task: Task, shardings, batch_sharding, mesh):
  repl = sharding.replicated(mesh)

  def update(params, opt_state, batch, key):
    (loss, aux), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(params, batch, key)
    updates, opt_state = task.optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, dict(aux, loss=loss, grad_norm=optax.tree.norm(grads))

  def step_fn(state, batch, key):
    key = jax.random.fold_in(key, state["step"])
    params, opt_state, out = update(state["params"], state["opt_state"], batch, key)
    out = dict(out, lr=task.lr_schedule(state["step"]))
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, out

  def experience_step_fn(state, batch, key):
    del batch
    exp = task.experience
    k_collect, k_epochs = jax.random.split(jax.random.fold_in(key, state["step"]))
    carry, data, collected = exp.collect(state["params"], carry_of(task, state), k_collect)
    data = jax.lax.with_sharding_constraint(data, batch_sharding)  # the rollout's examples split like a batch
    n = jax.tree_util.tree_leaves(data)[0].shape[0]

    def epoch(c, k):
      k_perm, k_loss = jax.random.split(k)
      perm = jax.random.permutation(k_perm, n)
      minibatches = jax.tree_util.tree_map(
          lambda x: x[perm].reshape((exp.num_minibatches, n // exp.num_minibatches) + x.shape[1:]), data)
      if (n // exp.num_minibatches) % batch_ways == 0:  # each minibatch split like a batch
        minibatches = jax.lax.with_sharding_constraint(minibatches, minibatch_sharding)

      def minibatch(c, x):
        mb, i = x
        params, opt_state, out = update(*c, mb, jax.random.fold_in(k_loss, i))
        return (params, opt_state), out
      return jax.lax.scan(minibatch, c, (minibatches, jnp.arange(exp.num_minibatches)))

    (params, opt_state), outs = jax.lax.scan(epoch, (state["params"], state["opt_state"]),
                                             jax.random.split(k_epochs, exp.epochs))
    out = dict(jax.tree_util.tree_map(jnp.mean, outs), **collected,
               env_steps=(state["step"] + 1).astype(jnp.float32) * exp.env_steps_per_update,
               lr=task.lr_schedule(state["step"] * exp.updates_per_step))
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
            "carry": jax.tree_util.tree_leaves(carry)}, out

  minibatch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *batch_sharding.spec))
  batch_ways = sharding.batch_ways(mesh)
  if task.experience is not None:
    return jax.jit(experience_step_fn, in_shardings=(shardings, None, repl), out_shardings=(shardings, repl),
                   donate_argnums=0)
  return jax.jit(step_fn, in_shardings=(shardings, batch_sharding, repl),
                 out_shardings=(shardings, repl), donate_argnums=0)


def make_eval_step(task: Task, param_shardings, batch_sharding, mesh):
  return jax.jit(task.eval_fn, in_shardings=(param_shardings, batch_sharding),
                 out_shardings=sharding.replicated(mesh))


def evaluate(eval_step, params, eval_batches: Iterable[Mapping[str, np.ndarray]], mesh) -> dict[str, float]:
  """``eval_<name>``: each of ``eval_step``'s sums over the whole eval set, divided by its count."""
  totals: dict[str, float] = {}
  for local in eval_batches:
    out = jax.device_get(eval_step(params, sharding.global_batch(local, mesh)))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  n = max(totals.pop("count", 0.0), 1.0)
  return {f"eval_{k}": v / n for k, v in totals.items()}


def evaluate_all(task: Task, eval_step, step: int, state, eval_batches, mesh) -> dict[str, float]:
  """``evaluate`` of the state's params, the experience's ``evaluate`` (with the state's carry), and
  the task's ``extra_eval`` metrics at ``step``, all as ``eval_<name>``."""
  params = state["params"]
  ev = evaluate(eval_step, params, eval_batches, mesh)
  if task.experience is not None:
    out = jax.device_get(task.experience.evaluate(params, carry_of(task, state)))
    ev.update({f"eval_{k}": float(v) for k, v in out.items()})
  if task.extra_eval is not None:
    ev.update({f"eval_{k}": float(v) for k, v in task.extra_eval(step, params).items()})
  return ev


def format_eval(ev: Mapping[str, float]) -> str:
  return ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in sorted(ev.items()))


def _resume_data_at(data_iter, step: int, saved_by: int) -> None:
  """One batch per step: the data resumes at global batch ``step`` (input_pipeline.seek), or, for
  an iterator that cannot seek, from its start, with a warning."""
  try:
    input_pipeline.seek(data_iter, step)
    metrics.log(f"The data state was saved by {saved_by} process(es), this run has {jax.process_count()}: "
                f"the data resumes at global batch {step}.")
  except ValueError as e:
    metrics.log(f"warning: the data state was saved by {saved_by} process(es), this run has "
                f"{jax.process_count()}, and {e} The data restarts from its first batch.")


# --- divergence -----------------------------------------------------------------------------------

def _diverged(ckpt, step: int, what: str) -> DivergenceError:
  ckpt.wait()  # a save in flight (of a good state) completes first
  good = ckpt.latest_step()
  kept = (f"the last good checkpoint, step {good} in {ckpt.directory}, stays the latest" if good is not None
          else "no checkpoint had been saved yet")
  return DivergenceError(
      f"training diverged at step {step}: {what}; {kept}. Lower --config.optim.lr, raise "
      "--config.optim.warmup_steps or set --config.optim.clip_norm, and start over (a new --workdir, or "
      "--config.overwrite=True); the same command would resume from the last good checkpoint with the "
      "same settings.")


def _check_finite(pending, ckpt) -> dict[str, float]:
  """Host values of the last step's outputs; raises DivergenceError at the first step of
  ``pending`` whose loss or gradient norm is not finite."""
  host = jax.device_get([out for _, out in pending])
  for (step, _), out in zip(pending, host):
    if not (np.isfinite(out["loss"]) and np.isfinite(out["grad_norm"])):
      raise _diverged(ckpt, step, f"loss={float(out['loss'])}, grad_norm={float(out['grad_norm'])}")
  return {k: float(v) for k, v in host[-1].items()}


def _finite_flags(tree):
  return jax.tree_util.tree_map(
      lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True), tree)


def _make_nonfinite_paths(mesh) -> Callable[[Any], list[str]]:
  """``state -> paths of its leaves that hold a NaN or an infinity`` (one jitted reduction per leaf,
  the flags replicated so every process reads them)."""
  finite = jax.jit(_finite_flags, out_shardings=sharding.replicated(mesh))

  def nonfinite_paths(state) -> list[str]:
    flags = jax.device_get(finite(state))
    return [jax.tree_util.keystr(path) for path, ok in jax.tree_util.tree_flatten_with_path(flags)[0] if not ok]
  return nonfinite_paths


# --- the loop -------------------------------------------------------------------------------------

class _Preemption:
  """SIGTERM (a TPU maintenance event, a scheduler) -> save a checkpoint, then exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. inside some test runners): nothing to install
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, exc_type, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    if self.requested and exc_type is None:
      # It arrived after the last step was read (the final save or eval): the run is complete and
      # saved, and the process still stops rather than go on to its next stage.
      metrics.log("SIGTERM received after the last step: the run is complete and saved; stopping.")
      raise SystemExit(143)


def run(config, workdir: str, task: Task, *, mesh, train_iter, make_eval_iter, initial_params=None,
        summary_extra: Mapping[str, Any] | None = None, title: str = "") -> dict:
  """Trains ``task`` for ``config.total_steps`` steps in ``workdir``; resumes if a checkpoint exists.

  ``total_steps=0``: the initial state (e.g. templates extracted from a checkpoint) is saved as
  step 0 and evaluated, without a train step. Returns the summary dict (also written to
  ``workdir/summary.json``) with ``params`` added.
  """
  t_start = time.time()
  total = int(config.total_steps)
  abstract, shardings = state_shardings(task, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  ckpt = checkpoint.Checkpointer(workdir, every=int(config.checkpoint_every),
                                 keep=int(config.get("keep_checkpoints", 3)))
  data_iter = iter(train_iter) if train_iter is not None else None  # None: the experience makes the data

  # ----- state: resume or start ------------------------------------------------------------------
  resume_step = config.get("resume_step") or ckpt.latest_step()
  if resume_step is not None and resume_step not in ckpt.all_steps():
    raise ValueError(f"resume_step={resume_step} is not a checkpoint in {ckpt.directory}; "
                     f"available: {ckpt.all_steps()}.")
  if resume_step is not None:
    try:
      state = ckpt.restore(resume_step, checkpoint.abstract_with_shardings(abstract, shardings), data_iter)
    except Exception:
      ckpt.close()  # stop orbax's background threads, so the error is the last thing printed
      raise
    metrics.log(f"Resuming from step {resume_step} (checkpoint {ckpt.directory / str(resume_step)}).")
    later = ckpt.discard_after(resume_step)  # an explicit earlier resume_step rewinds the run
    if later:
      metrics.log(f"Discarded the later checkpoints {later}: the run continues from step {resume_step}. "
                  "Drop --config.resume_step for later reruns.")
    saved_by = ckpt.data_process_count(resume_step)
    if saved_by not in (None, jax.process_count()):  # data state of another number of processes
      _resume_data_at(data_iter, resume_step, saved_by)
  else:
    key = jax.random.key(int(config.seed))
    state = make_init_state(task, shardings)(key, initial_params)
    metrics.log(f"Starting a new run in {workdir}.")
  start = int(jax.device_get(state["step"]))

  train_step = make_train_step(task, shardings, batch_sh, mesh)
  eval_step = make_eval_step(task, shardings["params"], batch_sh, mesh)
  nonfinite_paths = _make_nonfinite_paths(mesh)
  writer = metrics.MetricWriter(workdir, total, start)
  log_every, eval_every = int(config.log_every), int(config.get("eval_every") or 0)
  eval_at = config_checks.eval_steps(config)
  step_key = jax.random.key(int(config.seed) + 1)
  last = {}

  # ----- train -----------------------------------------------------------------------------------
  # Divergence: every step's loss and gradient norm stay on device (no per-step host sync) and are
  # checked together on log, eval and save steps, so the first non-finite step is reported exactly;
  # a state with a non-finite value is never saved, so the last good checkpoint stays the latest.
  pending = []  # (step, device outputs) not yet checked
  try:
    if total == 0 and resume_step is None:  # nothing to train: the initial state is the run's step 0
      ckpt.save(0, state, data_iter, force=True)
    with _Preemption() as preemption:
      step = start
      while step < total:
        batch = sharding.global_batch(next(data_iter), mesh) if data_iter is not None else None
        state, out = train_step(state, batch, step_key)
        step += 1
        pending.append((step, out))
        stop = preemption.requested  # read once: a SIGTERM arriving later is handled after the next step
        log_now = step % log_every == 0 or step == total or step == start + 1
        eval_now = ((bool(eval_every) and step % eval_every == 0) or step in eval_at) and step != total
        save_now = step % ckpt.every == 0 or step == total or stop
        if log_now or eval_now or save_now:
          out = _check_finite(pending, ckpt)
          pending.clear()
        if log_now:
          writer.write(step, out)
          writer.progress(step, out)
          last.update(out)
        if eval_now:
          ev = evaluate_all(task, eval_step, step, state, make_eval_iter(), mesh)
          writer.write(step, ev)
          metrics.log(f"  eval @ {step}: {format_eval(ev)}")
        if save_now:
          bad = nonfinite_paths(state)
          if bad:
            raise _diverged(ckpt, step, f"the train state has non-finite values in {bad[:3]} and is not saved")
          ckpt.save(step, state, data_iter, force=True)
        if stop:
          ckpt.wait()
          metrics.log(f"SIGTERM received: saved a checkpoint at step {step}; rerun the same command to resume.")
          raise SystemExit(143)
  finally:
    ckpt.close()
    writer.close()

  # ----- summary ---------------------------------------------------------------------------------
  ev = evaluate_all(task, eval_step, total, state, make_eval_iter(), mesh)
  writer = metrics.MetricWriter(workdir, total, total)
  writer.write(total, ev)
  writer.close()
  wall = time.time() - t_start
  summary = dict(summary_extra or {}, final_step=total, **ev, final_train_loss=last.get("loss"),
                 wall_time_s=round(wall, 1), resumed_from=resume_step)
  if metrics.is_main():
    (epath.Path(workdir) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
  plot = metrics.plot_curves(workdir, title)
  metrics.log(f"Done: step {total}, eval {format_eval(ev)}, wall time {wall:.0f}s. Curves: {plot}")
  return dict(summary, params=state["params"], **({"carry": carry_of(task, state)} if task.experience else {}))
