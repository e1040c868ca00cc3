"""The interface every task implements (see the package docstring)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from weit_jax import data_catalog, input_pipeline


class Task:
  """Subclasses define model_fields, prepare, train_iterator, eval_iterator, inputs, loss and
  eval_sums; ``loss_fn`` and ``eval_fn`` bind them to a model's forward function."""

  # True for a task whose data comes from the model it trains (``experience``: RL rollouts), so one
  # batch cannot train several models at once.
  collects_experience = False

  def loss_fn(self, forward: Callable[..., Any]):
    """``forward(params, *inputs) -> outputs`` -> ``(params, batch, key) -> (loss, metrics)``."""
    def loss_fn(params, batch, key):
      return self.loss(forward(params, *self.inputs(batch, key)), batch, key)
    return loss_fn

  def eval_fn(self, forward: Callable[..., Any]):
    """``forward`` -> ``(params, batch) -> per-batch sums with a count`` (what the loop evaluates)."""
    def eval_fn(params, batch):
      return self.eval_sums(forward(params, *self.eval_inputs(batch)), batch)
    return eval_fn

  def eval_inputs(self, batch) -> tuple:
    return self.inputs(batch, None)

  def optimizer_steps(self, total_steps: int) -> int:
    """Optimizer updates in a run of ``total_steps`` train steps (what a learning-rate schedule spans)."""
    return int(total_steps)

  def experience(self, forward: Callable[..., Any], **kwargs):
    """None, or the ``tasks.control.Experience`` of a task that makes its own data (RL rollouts)
    with the model ``forward(params, *inputs)``."""
    del forward, kwargs
    return None

  def export_hint(self) -> str:
    """What to do when an export was made for other data sizes than this task's (one clause)."""
    return "give an export made for this data"

  def check_teacher(self) -> None:
    """Refuses pre-training with a dense teacher (``distill.teacher``) where this task has no
    ``teacher_loss``."""
    raise ValueError(f"distillation from a teacher (distill.teacher) is for tasks whose model outputs a "
                     f"distribution to match (classification); {type(self).__name__} has none. Unset distill.teacher.")

  def teacher_loss(self, outputs, teacher_outputs, temperature: float):
    """The term pre-training adds with a dense teacher: how far the model's ``outputs`` are from the
    teacher's on the same inputs (see ``check_teacher``)."""
    raise NotImplementedError

  def check_distillation(self, source_config) -> None:
    """Refuses scaler training by distillation (the init program's ``adapt='distill'``: the target
    matches the auxiliary model's outputs on the auxiliary's own data) where this task has none, or
    where the auxiliary's run (``source_config``) cannot teach this one."""
    del source_config
    raise ValueError(f"adapt='distill' is for tasks whose data the model makes (control: rollouts of the auxiliary "
                     f"policy); {type(self).__name__} trains scalers on its own objective. Use --config.adapt=ppo.")

  def distillation(self, forward: Callable[..., Any], teacher: Callable[..., Any]):
    """``(loss_fn, experience)`` of training ``forward``'s model to match ``teacher(params, *inputs)``
    (see ``check_distillation``)."""
    raise NotImplementedError

  @classmethod
  def scaler_training_config(cls, config, init_config) -> None:
    """Turns ``config`` (a copy of pre-training's) into the config of the init program's scaler
    training, whose own config is ``init_config``."""
    raise NotImplementedError

  def export_record(self, carry) -> dict:
    """What an export of a model trained on this task records beside its parameters, from the run's
    ``experience`` carry (a control task's observation statistics); nothing by default."""
    del carry
    return {}

  def continuing(self, record) -> "Task":
    """This task for a model that starts from an export whose record is ``record`` (or from templates
    whose run left ``export_record``'s fields): itself by default."""
    del record
    return self

  def extra_eval_fn(self, model_fn: Callable[..., Any], cfg, workdir: str, mesh):
    """``(step, params) -> more eval metrics``, computed at a run's eval steps beside ``eval_fn``'s
    (a generative task's sample quality), or None. ``model_fn(params, *inputs)`` is the model."""
    del model_fn, cfg, workdir, mesh
    return None


@dataclasses.dataclass(frozen=True)
class ImageDataTask(Task):
  """The data half of a task on a labelled image dataset (``config.data``): the model fields the
  dataset fixes, preparing it, and its batches (``image``, one-hot ``labels``, eval ``mask``)."""
  data: Any  # config.data (data_catalog.default_data_config fields)

  @classmethod
  def scaler_training_config(cls, config, init_config) -> None:
    """Scalers train on the first ``init_config.num_examples`` training examples."""
    config.data.train_split = f"{config.data.train_split}[:{int(init_config.num_examples)}]"
    if "label_smoothing" in init_config:
      config.label_smoothing = init_config.label_smoothing

  def model_fields(self) -> dict[str, int]:
    info = data_catalog.dataset_info(self.data.name)
    return dict(image_size=int(self.data.image_size), channels=int(info.channels),
                num_classes=int(info.num_classes))

  def prepare(self) -> None:
    input_pipeline.prepare(self.data)

  def train_iterator(self, global_batch_size: int, seed: int, mesh):
    return input_pipeline.make_train_iterator(self.data, global_batch_size=global_batch_size, seed=seed, mesh=mesh)

  def eval_iterator(self, global_batch_size: int):
    return input_pipeline.make_eval_iterator(self.data, global_batch_size=global_batch_size)
