"""Pre-training of a baseline initializer's auxiliary model (TLEG, FINE): a program beside the others.

The config is a ``configs/<family>_train.py`` config (the same data, step budget and optimizer as a
plain training run; ``configs/baseline_pretrain.py`` builds one, ``from_train_config``) with ``program='baseline_pretrain'``
and ``baseline``: its model is the auxiliary, trained in the baseline's factorized form (the
baseline's module in ``weit_jax/inits``: ``make_task``, ``EXPORT_FORM``, ``DESCRIPTION``), and
exported to ``WORKDIR/export`` with ``form`` the baseline's: the source its ``from_export`` reads.
"""
from __future__ import annotations

from etils import epath

from weit_jax import (config_checks, distributed, exports, metrics, models, optim, sharding, tasks, train_loop,
                      workdir_lock)
from weit_jax.inits import common, fine, tleg

BASELINES = {"tleg": tleg, "fine": fine}


def export_dir(workdir: str) -> str:
  return str(epath.Path(workdir) / "export")


def _baseline(config):
  if config.get("baseline") not in BASELINES:
    raise ValueError(f"baseline={config.get('baseline')!r}; use one of {sorted(BASELINES)}.")
  return BASELINES[config.baseline]


def validate(config, workdir: str):
  """Every check of the run before anything compiles or is written: ``(baseline module, task,
  auxiliary model config, mesh)``."""
  baseline = _baseline(config)
  if config.get("init"):
    raise ValueError(f"{config.baseline} pre-training starts from its own initialization; unset config.init.")
  config_checks.check_ranges(config)
  task = tasks.from_config(config)
  optim.schedule(optim.with_total_steps(config.optim, task.optimizer_steps(config.total_steps)))
  cfg = tasks.model_config(config)
  mesh = sharding.make_mesh(dict(config.mesh))
  distributed.process_batch_rows(mesh, int(config.batch_size))
  task.prepare()
  train_loop.check_workdir(config, workdir)
  return baseline, task, cfg, mesh


def run(config, workdir: str) -> dict:
  """Trains the auxiliary for ``config.total_steps`` (resuming like any run) and exports its
  factors; a later, longer run of the same workdir replaces the export."""
  baseline, task, cfg, mesh = validate(config, workdir)
  with workdir_lock.hold(workdir, "baseline_pretrain"):  # the first write: refused if another run holds it
    train_loop.guard_workdir(config, workdir)
    metrics.log(f"{config.baseline} auxiliary {models.family_of(cfg).name} {cfg.short_name()}: {baseline.DESCRIPTION}.")
    summary = train_loop.run(config, workdir, baseline.make_task(config, cfg), mesh=mesh,
                             train_iter=task.train_iterator(config.batch_size, config.seed, mesh),
                             make_eval_iter=lambda: task.eval_iterator(config.batch_size),
                             summary_extra=dict(program="baseline_pretrain", baseline=config.baseline),
                             title=f"{config.baseline} pre-training {cfg.short_name()}")
    out = epath.Path(export_dir(workdir))
    if (out / exports.META).exists() and exports.read_meta(str(out)).get("steps") != int(config.total_steps):
      out.rmtree()  # an export of a shorter run of this workdir
    if not (out / exports.META).exists():
      exports.write(str(out), common.to_numpy(summary["params"]),
                    dict(model=models.to_record(cfg), form=baseline.EXPORT_FORM, init=f"{config.baseline}_aux",
                         steps=int(config.total_steps),
                         **{k: v for k, v in summary.items() if k.startswith("eval_")},
                         **task.export_record(summary.get("carry"))))
    return summary
