"""Image generation by rectified flow: the objective, the sampler (pure JAX) and the task.

Objective (rectified flow / flow matching with a straight path, velocity prediction): for data
``x0``, Gaussian noise ``e`` and a time ``t ~ U(0, 1)``, the model sees ``x_t = (1 - t) x0 + t e``
and predicts the velocity ``dx_t/dt = e - x0``; the loss is the mean squared error. Chosen over
DDPM's epsilon prediction because it needs no noise schedule (nothing to tune or to get wrong), and
its sampler is a plain ODE integration: Euler from ``t = 1`` (noise) to ``t = 0`` (data).

Classifier-free guidance: training replaces a fraction of labels by the null class (the DiT's extra
embedding row), and sampling mixes ``v = v_null + scale * (v_y - v_null)`` (scale 1: the
conditional model; 0: the unconditional one).

Models are called as ``model_fn(x_t, t * TIME_SCALE, y)``: the DiT's timestep embedding expects
times on the reference DiT's 0..1000 scale.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from weit_jax.tasks.base import ImageDataTask

TIME_SCALE = 1000.0  # times as the model sees them: t in [0, 1] -> [0, 1000]


def _bcast(t, x):
  return jnp.reshape(t, t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x0, noise, t):
  """``x_t = (1 - t) x0 + t noise``, with ``t`` per example (shape ``(N,)``)."""
  t = _bcast(t, x0)
  return (1 - t) * x0 + t * noise


def velocity(x0, noise):
  """``d x_t / dt``: the regression target."""
  return noise - x0


def drop_labels(y, key, prob: float, null_class: int):
  """Each label replaced by ``null_class`` with probability ``prob`` (classifier-free guidance)."""
  return jnp.where(jax.random.uniform(key, y.shape) < prob, null_class, y)


def training_inputs(x0, y, key, *, label_dropout: float, null_class: int):
  """What one training step feeds the model, and its target: ``((x_t, t * TIME_SCALE, y'), v)``."""
  k_t, k_e, k_y = jax.random.split(key, 3)
  t = jax.random.uniform(k_t, (x0.shape[0],), jnp.float32)
  noise = jax.random.normal(k_e, x0.shape, jnp.float32)
  return (interpolate(x0, noise, t), t * TIME_SCALE, drop_labels(y, k_y, label_dropout, null_class)), \
      velocity(x0, noise)


def loss(predicted, target):
  """Mean over examples of the per-example mean squared error."""
  return jnp.mean(jnp.square(predicted.astype(jnp.float32) - target))


def guided_velocity(model_fn: Callable, x, t, y, scale: float, null_class: int):
  """``v_null + scale * (v_y - v_null)`` in one model call on the doubled batch; ``t`` in [0, 1].
  Scale 1 is the conditional model alone: one call on the batch."""
  if float(scale) == 1.0:
    return model_fn(x, t * TIME_SCALE, y)
  n = x.shape[0]
  both = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]) * TIME_SCALE,
                  jnp.concatenate([y, jnp.full_like(y, null_class)]))
  cond, uncond = both[:n], both[n:]
  return uncond + scale * (cond - uncond)


def sample(model_fn: Callable, noise, y, *, steps: int, scale: float, null_class: int):
  """Euler integration of ``dx/dt = v(x, t)`` from ``t = 1`` (``noise``) to ``t = 0`` in ``steps``
  equal steps, with guidance ``scale``. Deterministic: the noise is the only randomness."""
  if int(steps) < 1:
    raise ValueError(f"sampling steps={steps}: use at least 1.")
  dt = 1.0 / int(steps)

  def step(i, x):
    t = jnp.full((x.shape[0],), 1.0 - i * dt, jnp.float32)
    return x - dt * guided_velocity(model_fn, x, t, y, scale, null_class)

  return jax.lax.fori_loop(0, int(steps), step, noise)


def _log(msg: str) -> None:
  from weit_jax import metrics
  metrics.log(msg)


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
      from weit_jax import feature_classifier
      feature_classifier.load(self.data.get("data_dir"), log=_log)  # built once, before the run writes anything

  def _check_sample_quality(self) -> None:
    from weit_jax import feature_classifier
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
    from weit_jax import feature_classifier, sample_quality, sharding
    q = self.sample_quality
    return sample_quality.SampleEval(
        feature_classifier.load(self.data.get("data_dir"), log=_log), model_fn, cfg, workdir,
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
