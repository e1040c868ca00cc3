"""Image generation as a task: rectified-flow velocity regression on a classification dataset's
(image, label) batches (``weit_jax/rectified_flow.py``: the objective and the sampler), and the
sample quality measured at eval steps (``weit_jax/evaluators``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from weit_jax import metrics, sharding
from weit_jax.evaluators import feature_classifier, sample_quality
from weit_jax.rectified_flow import loss, training_inputs
from weit_jax.tasks.base import ImageDataTask


@dataclasses.dataclass(frozen=True)
class Diffusion(ImageDataTask):
  """Class-conditional image generation on a classification dataset's (image, label) batches:
  rectified-flow velocity regression, with label dropout for classifier-free guidance. Images should
  be scaled to about [-1, 1] (the configs set ``data.mean = data.std = 0.5``). The model is a DiT
  (``weit_jax.models.dit``): ``model(x_t, t, y)``, the null class being ``num_classes``."""
  label_dropout: float = 0.1
  sample_quality: dict | None = None  # config.sample_quality; per_class 0 or absent: not measured

  @classmethod
  def from_config(cls, config) -> "Diffusion":
    quality = config.get("sample_quality")
    return cls(config.data, float(config.get("diffusion", {}).get("label_dropout", 0.1)),
               quality.to_dict() if quality is not None and int(quality.get("per_class", 0)) else None)

  def prepare(self) -> None:
    if float(self.data.get("mixup_alpha", 0.0)):
      raise ValueError("data.mixup_alpha must be 0 for image generation: mixup blends images of two classes.")
    if not 0.0 <= self.label_dropout < 1.0:
      raise ValueError(f"diffusion.label_dropout={self.label_dropout}: use a probability in [0, 1).")
    super().prepare()
    if self.sample_quality:
      self._check_sample_quality()
      feature_classifier.load(self.data.get("data_dir"), log=metrics.log)  # built once, before the run writes anything

  def _check_sample_quality(self) -> None:
    recipe = feature_classifier.RECIPE  # (the numeric fields are checked by config_checks.RANGES)
    wanted = feature_classifier.data_config()
    if (self.data.name, int(self.data.image_size), tuple(self.data.mean), tuple(self.data.std)) != (
        recipe["dataset"], int(wanted.image_size), tuple(wanted.mean), tuple(wanted.std)):
      raise ValueError(
          f"sample_quality is measured with a {recipe['dataset']} classifier on 28x28 images in [-1, 1] "
          f"(data.mean = data.std = 0.5); this run generates {self.data.name} at {self.data.image_size}x"
          f"{self.data.image_size} (mean {tuple(self.data.mean)}, std {tuple(self.data.std)}). Set "
          "--config.sample_quality.per_class=0 to train without it.")

  def extra_eval_fn(self, model_fn, cfg, workdir: str, mesh):
    """Sample quality (``sample_quality.SampleEval``) if ``config.sample_quality.per_class`` > 0."""
    if not self.sample_quality:
      return None
    q = self.sample_quality
    return sample_quality.SampleEval(
        feature_classifier.load(self.data.get("data_dir"), log=metrics.log), model_fn, cfg, workdir,
        per_class=int(q["per_class"]), steps=int(q.get("steps", 20)), guidance=float(q.get("guidance", 1.0)),
        seed=int(q.get("seed", 0)), out_sharding=sharding.replicated(mesh))

  @property
  def null_class(self) -> int:
    return self.model_fields()["num_classes"]  # the DiT's extra embedding row

  def _draw(self, batch, key, label_dropout):
    # Called by inputs and by loss with the same key (the Task interface hands each the key): the
    # same random draws inside one jitted step, which XLA computes once.
    labels = jnp.argmax(batch["labels"], axis=-1).astype(jnp.int32)
    return training_inputs(batch["image"], labels, key, label_dropout=label_dropout, null_class=self.null_class)

  def inputs(self, batch, key) -> tuple:
    return self._draw(batch, key, self.label_dropout)[0]

  def loss(self, outputs, batch, key):
    return loss(outputs, self._draw(batch, key, self.label_dropout)[1]), {}

  def eval_inputs(self, batch) -> tuple:
    # The same times and noise for every eval pass (a fixed key): eval losses compare across steps.
    return self._draw(batch, jax.random.key(0), 0.0)[0]

  def eval_sums(self, outputs, batch) -> dict[str, jax.Array]:
    target = self._draw(batch, jax.random.key(0), 0.0)[1]
    per_example = jnp.mean(jnp.square(outputs - target), axis=tuple(range(1, target.ndim)))
    mask = batch["mask"]
    return {"loss": jnp.sum(per_example * mask), "count": jnp.sum(mask)}
