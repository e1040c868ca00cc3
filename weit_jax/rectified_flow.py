"""Rectified flow: the objective and the sampler, in pure JAX (nothing else of the project).

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

from typing import Callable

import jax
import jax.numpy as jnp

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
