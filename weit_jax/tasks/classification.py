"""Image classification: cross-entropy on (soft) one-hot labels; eval accuracy and loss."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from weit_jax import losses
from weit_jax.tasks.base import ImageDataTask


@dataclasses.dataclass(frozen=True)
class Classification(ImageDataTask):
  label_smoothing: float = 0.0

  @classmethod
  def from_config(cls, config) -> "Classification":
    return cls(config.data, float(config.get("label_smoothing", 0.0)))

  def inputs(self, batch, key) -> tuple:
    del key
    return (batch["image"],)

  def loss(self, logits, batch, key):
    del key
    return losses.softmax_cross_entropy(logits, batch["labels"], self.label_smoothing), {
        "accuracy": jnp.mean(losses.accuracy(logits, batch["labels"]))}

  def check_teacher(self) -> None:
    pass

  def teacher_loss(self, logits, teacher_logits, temperature: float):
    return losses.distillation(logits, teacher_logits, temperature)

  def eval_sums(self, logits, batch) -> dict[str, jax.Array]:
    mask = batch["mask"]
    per_example = -jnp.sum(batch["labels"] * jax.nn.log_softmax(logits), -1)
    return {"accuracy": jnp.sum(losses.accuracy(logits, batch["labels"]) * mask),
            "loss": jnp.sum(per_example * mask), "count": jnp.sum(mask)}
