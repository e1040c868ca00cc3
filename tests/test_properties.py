"""Property-based tests of the composition math (hypothesis), against an independent oracle: a
``numpy.kron`` loop over templates in float64, and explicit per-block loops for gradients.

Examples are small and derandomized (the same examples on every run, so CI is stable).
"""
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

from weit_jax import generator, kron

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def oracle(scalers: np.ndarray, templates: np.ndarray, crop=None) -> np.ndarray:
  """crop(sum_t kron(S_t, T_t)) with numpy, in float64."""
  out = sum(np.kron(scalers[t].astype(np.float64), templates[t].astype(np.float64))
            for t in range(scalers.shape[0]))
  return out if crop is None else out[tuple(slice(0, n) for n in crop)]


def randn(seed: int, shape) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --- kron.compose ----------------------------------------------------------------------------------

@st.composite
def compose_cases(draw):
  k = draw(st.integers(1, 3))  # axes
  n = draw(st.integers(1, 3))  # templates
  grid = draw(st.lists(st.integers(1, 3), min_size=k, max_size=k))
  tile = draw(st.lists(st.integers(1, 4), min_size=k, max_size=k))
  crop = draw(st.none() | st.tuples(*[st.integers(1, g * w) for g, w in zip(grid, tile)]))
  return n, tuple(grid), tuple(tile), crop, draw(st.integers(0, 2**31 - 1))


@SETTINGS
@given(compose_cases())
def test_compose_equals_a_sum_of_numpy_krons(case):
  n, grid, tile, crop, seed = case
  s, t = randn(seed, (n, *grid)), randn(seed + 1, (n, *tile))
  got = np.asarray(kron.compose(jnp.asarray(s), jnp.asarray(t), crop))
  want = oracle(s, t, crop)
  assert got.shape == want.shape == (crop or tuple(g * w for g, w in zip(grid, tile)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@settings(SETTINGS, max_examples=20)
@given(compose_cases())
def test_compose_gradients_are_block_sums(case):
  """d<R, compose(S, T)>/dS[t, i] = sum_j R[i*w + j] T[t, j] and d/dT[t, j] = sum_i R[i*w + j] S[t, i]
  (R zero outside the crop), computed block by block."""
  n, grid, tile, crop, seed = case
  s, t = randn(seed, (n, *grid)), randn(seed + 1, (n, *tile))
  full = tuple(g * w for g, w in zip(grid, tile))
  shape = crop or full
  r = randn(seed + 2, shape)
  gs, gt = jax.jit(jax.grad(lambda s_, t_: jnp.sum(kron.compose(s_, t_, crop) * r), argnums=(0, 1)))(
      jnp.asarray(s), jnp.asarray(t))
  r_full = np.zeros(full)
  r_full[tuple(slice(0, m) for m in shape)] = r
  want_s, want_t = np.zeros(s.shape), np.zeros(t.shape)
  for i in np.ndindex(*grid):
    block = r_full[tuple(slice(a * w, (a + 1) * w) for a, w in zip(i, tile))]
    for k in range(n):
      want_s[(k, *i)] = np.sum(block * t[k])
      want_t[k] += block * s[(k, *i)]
  np.testing.assert_allclose(np.asarray(gs), want_s, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(gt), want_t, rtol=1e-4, atol=1e-4)


# --- WeightGenerator.materialize ------------------------------------------------------------------

WIDTH_AXES = ("embed", "mlp", "heads")


@st.composite
def generator_cases(draw):
  """A random model: 1-3 parameters (some stacked on a leading ``layers`` axis, one nested), each
  with 1-3 axes that are width axes (with a tile) or not; sizes need not be tile multiples."""
  tiles = {name: draw(st.integers(1, 4)) for name in WIDTH_AXES}
  params, axes = {}, {}
  for p in range(draw(st.integers(1, 3))):
    layers = draw(st.none() | st.integers(1, 3))
    names = draw(st.lists(st.sampled_from(WIDTH_AXES + (None,)), min_size=1, max_size=3))
    sizes = [draw(st.integers(tiles[a], 3 * tiles[a] + 2)) if a else draw(st.integers(1, 4)) for a in names]
    if layers:
      names, sizes = ["layers"] + names, [layers] + sizes
    path = ("block", f"p{p}") if p == 1 else (f"p{p}",)
    node_p, node_a = params, axes
    for key in path[:-1]:
      node_p, node_a = node_p.setdefault(key, {}), node_a.setdefault(key, {})
    node_p[path[-1]] = jax.ShapeDtypeStruct(tuple(sizes), jnp.float32)
    node_a[path[-1]] = P(*names)
  used = {a for spec in jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, P)) for a in spec}
  tiles = {a: w for a, w in tiles.items() if a in used}
  return params, axes, tiles, draw(st.integers(1, 3)), draw(st.integers(0, 2**31 - 1))


def _leaves(tree):
  return jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, (P, jax.ShapeDtypeStruct)))[0]


@SETTINGS
@given(generator_cases())
def test_materialize_equals_numpy_kron_per_layer(case):
  params, axes, tiles, num_templates, seed = case
  gen = generator.WeightGenerator(params, axes, tiles, num_templates)
  noise = lambda offset: lambda path, s: randn(seed + offset + zlib.crc32(jax.tree_util.keystr(path).encode()), s.shape)
  templates = jax.tree_util.tree_map_with_path(noise(0), gen.template_shapes())
  scalers = jax.tree_util.tree_map_with_path(noise(1), gen.scaler_shapes())
  out = jax.jit(gen.materialize)(templates, scalers)

  flat_t, flat_s, flat_o = (dict((jax.tree_util.keystr(k), v) for k, v in _leaves(tree))
                            for tree in (templates, scalers, out))
  for path, leaf in _leaves(params):
    key = jax.tree_util.keystr(path)
    names = tuple(dict(_leaves(axes))[path])
    layered = names[0] == "layers"
    body = zip(leaf.shape[1:] if layered else leaf.shape, names[1:] if layered else names)
    # The spec, independently: a tile (or the whole axis) per template axis, ceil(n / tile) scalers.
    want_tile = tuple(tiles[a] if a in tiles else n for n, a in body)
    body = zip(leaf.shape[1:] if layered else leaf.shape, names[1:] if layered else names)
    want_grid = tuple(math.ceil(n / tiles[a]) if a in tiles else 1 for n, a in body)
    t, s, o = flat_t[key], flat_s[key], np.asarray(flat_o[key])
    assert t.shape == (num_templates, *want_tile)
    assert s.shape == ((leaf.shape[0],) if layered else ()) + (num_templates, *want_grid)
    assert o.shape == leaf.shape
    if layered:
      want = np.stack([oracle(s[l], t, leaf.shape[1:]) for l in range(leaf.shape[0])])
    else:
      want = oracle(s, t, leaf.shape)
    np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-5, err_msg=key)


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 6))
def test_a_tile_larger_than_its_axis_is_refused(size, tile):
  params = {"w": jax.ShapeDtypeStruct((size, 3), jnp.float32)}
  axes = {"w": P("embed", None)}
  if tile > size:
    with pytest.raises(ValueError, match=rf"tile {tile} for axis 'embed' is larger than that axis"):
      generator.WeightGenerator(params, axes, {"embed": tile}, 2)
  else:
    gen = generator.WeightGenerator(params, axes, {"embed": tile}, 2)
    assert gen.banks[("w",)].grid == (math.ceil(size / tile), 1)
