"""compose() against a numpy.kron loop, the independent oracle."""
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from weit_jax.kron import compose


def numpy_oracle(scalers, templates, shape=None):
  out = sum(np.kron(scalers[t], templates[t]) for t in range(scalers.shape[0]))
  if shape is not None:
    out = out[tuple(slice(0, n) for n in shape)]
  return out


CASES = [  # (N, grid, tile)
    (1, (3,), (4,)),
    (2, (2, 3), (5, 4)),
    (4, (1, 3), (7, 2)),
    (3, (2, 1, 3), (3, 4, 2)),
    (2, (2, 2, 1, 3), (2, 3, 3, 2)),
    (5, (3, 2), (1, 6)),
]


@pytest.mark.parametrize("n,grid,tile", CASES)
@pytest.mark.parametrize("crop", [False, True])
def test_compose_matches_numpy_kron_float32(n, grid, tile, crop):
  rng = np.random.default_rng(hash((n, grid, tile)) % 2**32)
  s = rng.normal(size=(n, *grid)).astype(np.float32)
  t = rng.normal(size=(n, *tile)).astype(np.float32)
  full = tuple(g * w for g, w in zip(grid, tile))
  shape = tuple(max(1, f - rng.integers(0, w)) for f, w in zip(full, tile)) if crop else None
  want = numpy_oracle(s.astype(np.float64), t.astype(np.float64), shape)
  got = compose(jnp.asarray(s), jnp.asarray(t), shape)
  chex.assert_shape(got, want.shape)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  got_jit = jax.jit(compose, static_argnums=2)(jnp.asarray(s), jnp.asarray(t), shape)
  np.testing.assert_allclose(np.asarray(got_jit), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,grid,tile", CASES)
def test_rowwise_axes_compose_the_same_values(n, grid, tile):
  """Any set of axes composed row by row (as a sharded parameter's split axes are) gives the
  numpy.kron values, cropped or not."""
  rng = np.random.default_rng(hash(("rowwise", n, grid, tile)) % 2**32)
  s = rng.normal(size=(n, *grid)).astype(np.float32)
  t = rng.normal(size=(n, *tile)).astype(np.float32)
  full = tuple(g * w for g, w in zip(grid, tile))
  shape = tuple(max(1, f - rng.integers(0, w)) for f, w in zip(full, tile))
  for crop in (None, shape):
    want = numpy_oracle(s.astype(np.float64), t.astype(np.float64), crop)
    for k in range(1, len(grid) + 1):
      for rowwise in itertools.combinations(range(len(grid)), k):
        got = jax.jit(compose, static_argnums=(2, 3))(jnp.asarray(s), jnp.asarray(t), crop, rowwise)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=f"rowwise={rowwise}")


@pytest.mark.parametrize("n,grid,tile", CASES[:4])
def test_compose_matches_numpy_kron_bfloat16(n, grid, tile):
  rng = np.random.default_rng(7)
  s = jnp.asarray(rng.normal(size=(n, *grid)), jnp.bfloat16)
  t = jnp.asarray(rng.normal(size=(n, *tile)), jnp.bfloat16)
  want = numpy_oracle(np.asarray(s, np.float64), np.asarray(t, np.float64))
  got = compose(s, t)
  assert got.dtype == jnp.bfloat16
  # bfloat16 keeps 8 significant bits; a sum of n products of O(1) values.
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-2, atol=2e-2 * n)


def test_compose_vmaps_over_layers():
  rng = np.random.default_rng(3)
  layers, n, grid, tile = 5, 3, (2, 3), (4, 2)
  s = rng.normal(size=(layers, n, *grid)).astype(np.float32)
  t = rng.normal(size=(n, *tile)).astype(np.float32)
  shape = (7, 5)
  got = jax.jit(jax.vmap(lambda si, ti: compose(si, ti, shape), in_axes=(0, None)))(s, t)
  want = np.stack([numpy_oracle(s[l], t, shape) for l in range(layers)])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_block_structure_is_kron_s_t():
  """Block (i, j) of the result is sum_t S[t, i, j] * T[t]: blocks are templates."""
  rng = np.random.default_rng(11)
  s, t = rng.normal(size=(2, 3, 2)), rng.normal(size=(2, 4, 5))
  w = np.asarray(compose(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)))
  for i, j in itertools.product(range(3), range(2)):
    block = w[i * 4:(i + 1) * 4, j * 5:(j + 1) * 5]
    np.testing.assert_allclose(block, s[0, i, j] * t[0] + s[1, i, j] * t[1], rtol=1e-5, atol=1e-5)


def test_compose_rejects_mismatched_inputs():
  with pytest.raises(ValueError, match="same N"):
    compose(jnp.ones((2, 3)), jnp.ones((3, 3)))
  with pytest.raises(ValueError, match="crop shape"):
    compose(jnp.ones((2, 3)), jnp.ones((2, 4)), shape=(13,))
  with pytest.raises(ValueError, match="rowwise axes"):
    compose(jnp.ones((2, 3)), jnp.ones((2, 4)), rowwise=(1,))
