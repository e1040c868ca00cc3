"""Rectified flow (weit_jax/rectified_flow.py): the objective and the sampler against closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from weit_jax import rectified_flow


def rng_arrays(seed, *shapes):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]


def test_the_target_is_the_time_derivative_of_the_path():
  x0, noise = rng_arrays(0, (3, 4, 4, 1), (3, 4, 4, 1))
  t = jnp.asarray([0.1, 0.5, 0.9])
  h = 1e-3
  fd = (rectified_flow.interpolate(x0, noise, t + h) - rectified_flow.interpolate(x0, noise, t - h)) / (2 * h)
  np.testing.assert_allclose(np.asarray(fd), np.asarray(rectified_flow.velocity(x0, noise)), atol=2e-3)
  np.testing.assert_allclose(np.asarray(rectified_flow.interpolate(x0, noise, jnp.zeros(3))), np.asarray(x0))
  np.testing.assert_allclose(np.asarray(rectified_flow.interpolate(x0, noise, jnp.ones(3))), np.asarray(noise))


def test_training_inputs_and_loss_on_a_closed_form_case():
  """A model that knows the noise has zero loss; one that predicts zero has E||e - x0||^2 / d."""
  x0, = rng_arrays(1, (5, 6, 6, 2))
  y = jnp.arange(5) % 3
  (x_t, t_model, y_in), target = rectified_flow.training_inputs(x0, y, jax.random.key(2), label_dropout=0.0, null_class=3)
  t = t_model / rectified_flow.TIME_SCALE
  assert np.all((0 <= t) & (t < 1)) and np.array_equal(y_in, y)
  noise = (x_t - (1 - t)[:, None, None, None] * x0) / t[:, None, None, None]
  np.testing.assert_allclose(np.asarray(target), np.asarray(noise - x0), rtol=1e-4, atol=1e-4)
  assert float(rectified_flow.loss(target, target)) == 0.0
  want = np.mean((np.asarray(target, np.float64)) ** 2)
  assert float(rectified_flow.loss(jnp.zeros_like(target), target)) == pytest.approx(want, rel=1e-6)


def test_label_dropout_uses_the_null_class_at_its_rate():
  y = jnp.zeros((20_000,), jnp.int32)
  dropped = rectified_flow.drop_labels(y, jax.random.key(3), 0.1, null_class=10)
  assert set(np.unique(dropped)) == {0, 10}
  assert float(jnp.mean(dropped == 10)) == pytest.approx(0.1, abs=0.01)


def test_one_euler_step_by_hand():
  """v(x, t) = a x + b t (a linear field); one step from t = 1: x - (a x + b)."""
  a, b = 0.5, 2.0
  model_fn = lambda x, t, y: a * x + b * (t / rectified_flow.TIME_SCALE)[:, None, None, None]
  noise, = rng_arrays(4, (2, 3, 3, 1))
  y = jnp.zeros((2,), jnp.int32)
  got = rectified_flow.sample(model_fn, noise, y, steps=1, scale=1.0, null_class=1)
  np.testing.assert_allclose(np.asarray(got), np.asarray(noise - (a * noise + b)), rtol=1e-6)
  # Two steps: x_half = x - (a x + b) / 2, then x_half - (a x_half + b / 2) / 2.
  half = noise - (a * noise + b) / 2
  got = rectified_flow.sample(model_fn, noise, y, steps=2, scale=1.0, null_class=1)
  np.testing.assert_allclose(np.asarray(got), np.asarray(half - (a * half + b / 2) / 2), rtol=1e-6)


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_the_exact_field_of_a_point_mass_lands_on_it(steps):
  """For data concentrated at x*, the true velocity is (x_t - x*) / t; Euler follows the straight
  path and reaches x* exactly, with any number of steps."""
  target, noise = rng_arrays(5, (1, 4, 4, 1), (3, 4, 4, 1))
  model_fn = lambda x, t, y: (x - target) / (t / rectified_flow.TIME_SCALE)[:, None, None, None]
  got = jax.jit(lambda n: rectified_flow.sample(model_fn, n, jnp.zeros((3,), jnp.int32), steps=steps, scale=1.0,
                                           null_class=1))(noise)
  np.testing.assert_allclose(np.asarray(got), np.broadcast_to(np.asarray(target), got.shape), atol=1e-5)


def test_guidance_mixes_conditional_and_null_predictions():
  """Class c's field points at c; the null class's at 0: scale 0 is unconditional, 1 conditional,
  2 extrapolates. The sampler is deterministic for its noise."""
  model_fn = lambda x, t, y: jnp.broadcast_to(-y.astype(jnp.float32)[:, None, None, None] * (y < 9)[:, None, None, None], x.shape)
  noise, = rng_arrays(6, (2, 2, 2, 1))
  y = jnp.asarray([1, 2])
  x, t = noise, jnp.full((2,), 0.5)
  for scale in (0.0, 1.0, 2.0):
    v = rectified_flow.guided_velocity(model_fn, x, t, y, scale, null_class=9)
    np.testing.assert_allclose(np.asarray(v[:, 0, 0, 0]), -scale * np.asarray([1.0, 2.0]))
  run = jax.jit(lambda n: rectified_flow.sample(model_fn, n, y, steps=4, scale=1.5, null_class=9))
  np.testing.assert_array_equal(np.asarray(run(noise)), np.asarray(run(noise)))
  with pytest.raises(ValueError, match="steps=0"):
    rectified_flow.sample(model_fn, noise, y, steps=0, scale=1.0, null_class=9)
