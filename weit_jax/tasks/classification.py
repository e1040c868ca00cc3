"""Image classification: cross-entropy on (soft) one-hot labels; eval accuracy and loss."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from weit_jax import input_pipeline, losses
from weit_jax.tasks.base import Task


@dataclasses.dataclass(frozen=True)
class Classification(Task):
  data: Any  # config.data (input_pipeline.default_data_config fields)
  label_smoothing: float = 0.0

  @classmethod
  def from_config(cls, config) -> "Classification":
    return cls(config.data, float(config.get("label_smoothing", 0.0)))

  def model_fields(self) -> dict[str, int]:
    info = input_pipeline.dataset_info(self.data.name)
    return dict(image_size=int(self.data.image_size), channels=int(info.channels),
                num_classes=int(info.num_classes))

  def prepare(self) -> None:
    input_pipeline.prepare(self.data)

  def train_iterator(self, global_batch_size: int, seed: int, mesh):
    return input_pipeline.make_train_iterator(self.data, global_batch_size=global_batch_size, seed=seed, mesh=mesh)

  def eval_iterator(self, global_batch_size: int):
    return input_pipeline.make_eval_iterator(self.data, global_batch_size=global_batch_size)

  def inputs(self, batch, key) -> tuple:
    del key
    return (batch["image"],)

  def loss(self, logits, batch, key):
    del key
    return losses.softmax_cross_entropy(logits, batch["labels"], self.label_smoothing), {
        "accuracy": jnp.mean(losses.accuracy(logits, batch["labels"]))}

  def eval_sums(self, logits, batch) -> dict[str, jax.Array]:
    mask = batch["mask"]
    per_example = -jnp.sum(batch["labels"] * jax.nn.log_softmax(logits), -1)
    return {"accuracy": jnp.sum(losses.accuracy(logits, batch["labels"]) * mask),
            "loss": jnp.sum(per_example * mask), "count": jnp.sum(mask)}
