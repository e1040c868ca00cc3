"""Tasks: what a program trains a model *for*, behind one small interface (docs/design.md section 3).

A task (``config.task``; default ``classification``) gives the programs:

  model_fields()              the model config fields the data fixes (image size, channels, classes)
  prepare()                   checks (and, for the embedded datasets, builds) the data; no workdir write
  train_iterator(batch, seed, mesh) / eval_iterator(batch)
                              this process's batches (dicts of numpy arrays)
  inputs(batch, key)          the model's positional inputs for a batch
  loss(outputs, batch, key)   ``(scalar loss, dict of scalar metrics)`` from the model's outputs
  eval_sums(outputs, batch)   per-batch sums with a ``count``; the loop reports ``eval_<name>`` =
                              sum / count over the eval set
  extra_eval_fn(model_fn, cfg, workdir, mesh)
                              None, or ``(step, params) -> metrics`` computed on the host at eval
                              steps (diffusion: sample quality and a grid, weit_jax/evaluators/sample_quality.py)

``pretrain``, ``init`` and ``train`` are written once against it and a model family
(``weit_jax.models``): the constraint regularizer, scaler training, materialize, export and
checkpointing are the same for every task. ``Task.loss_fn(forward)`` and ``Task.eval_fn(forward)``
bind a task to a model's ``forward(params, *inputs)``. ``diffusion``: image generation (a DiT);
``control``: PPO on brax environments (a ``policy``), whose ``experience(forward)`` makes the data
(rollouts with the current parameters; ``train_iterator`` is None) and evaluates episode returns;
``optimizer_steps(total_steps)``: the optimizer updates of a run (PPO: several per step).
"""
from __future__ import annotations

from weit_jax import models
from weit_jax.tasks.base import Task
from weit_jax.tasks.classification import Classification
from weit_jax.tasks.control import Control
from weit_jax.tasks.diffusion import Diffusion

TASKS = {"classification": Classification, "diffusion": Diffusion, "control": Control}


def task_class(config) -> type:
  """The task class a program config names (``config.task``, default classification)."""
  name = config.get("task", "classification")
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; use one of {sorted(TASKS)} (config.task).")
  return TASKS[name]


def from_config(config):
  """The task of a program config (``config.task``, default classification) over ``config.data``."""
  return task_class(config).from_config(config)


def model_config(config, model_fields=None):
  """The model config of ``config.model`` (or ``model_fields``) with the fields its task's data fixes
  (image size, channels, classes; a control task's observation and action sizes), refused if the
  family does not serve the task."""
  fields = model_fields if model_fields is not None else config.model
  cfg = models.from_config(fields, from_config(config).model_fields())
  check_family(config.get("task", "classification"), models.family_of(cfg))
  return cfg


def check_family(task: str, family) -> None:
  """Refuses a model family that does not serve ``task`` (``models.Family.tasks``)."""
  if task not in family.tasks:
    raise ValueError(f"config.task={task!r} trains models of another kind than the {family.name} family, "
                     f"which serves {list(family.tasks)}; use configs/<family>_*.py of a family for {task!r} "
                     f"(e.g. {dict(diffusion='dit', control='policy').get(task, 'vit')}).")


__all__ = ["Classification", "Control", "Diffusion", "TASKS", "Task", "check_family", "from_config", "model_config",
           "task_class"]
