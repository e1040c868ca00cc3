"""The interface every task implements (see the package docstring)."""
from __future__ import annotations

from typing import Any, Callable


class Task:
  """Subclasses define model_fields, prepare, train_iterator, eval_iterator, inputs, loss and
  eval_sums; ``loss_fn`` and ``eval_fn`` bind them to a model's forward function."""

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
