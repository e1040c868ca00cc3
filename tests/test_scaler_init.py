"""Scaler heuristics of the init program against hand-computed examples."""
import jax
import numpy as np
import pytest

from weit_jax import generator, scaler_init
from weit_jax.generator import Bank
from weit_jax.models import vit

TILES = dict(embed=8, mlp=8, heads=1, kv=8)


def bank(layers, grid, tile=(8, 8), n=2):
  shape = ((layers,) if layers else ()) + tuple(g * t for g, t in zip(grid, tile))
  axes = (("layers",) if layers else ()) + ("embed", "mlp")
  return Bank(("k",), shape, axes, tuple(grid), tuple(tile), n)


def test_same_size_is_the_identity():
  rng = np.random.default_rng(0)
  b = bank(3, (2, 4))
  s = rng.normal(size=b.scaler_shape)
  np.testing.assert_allclose(scaler_init.interpolate_scalers(s, b, b, 1.0), s, rtol=1e-6)


def test_depth_interpolation_by_hand():
  rng = np.random.default_rng(1)
  src, dst = bank(3, (1, 1)), bank(5, (1, 1))
  s = rng.normal(size=src.scaler_shape)
  got = scaler_init.interpolate_scalers(s, src, dst, 1.0)
  # Target layers 0..4 sit at source positions 0, 0.5, 1, 1.5, 2.
  want = np.stack([s[0], (s[0] + s[1]) / 2, s[1], (s[1] + s[2]) / 2, s[2]])
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_width_resampling_and_rescale_by_hand():
  rng = np.random.default_rng(2)
  src, dst = bank(None, (3, 2)), bank(None, (2, 3))
  s = rng.normal(size=src.scaler_shape)  # (N, 3, 2)
  got = scaler_init.interpolate_scalers(s, src, dst, 0.5)
  rows = np.stack([s[:, 0], s[:, 2]], axis=1)  # 3 -> 2: positions 0 and 2
  want = np.stack([rows[:, :, 0], (rows[:, :, 0] + rows[:, :, 1]) / 2, rows[:, :, 1]], axis=2)  # 2 -> 3
  np.testing.assert_allclose(got, 0.5 * want, rtol=1e-6)


def test_fit_constant_recovers_a_representable_constant():
  rng = np.random.default_rng(3)
  b = bank(2, (2, 3))
  t = rng.normal(size=b.template_shape)
  t[0] = 1.0
  s = scaler_init.fit_constant(t, b, 1.7)
  assert s.shape == b.scaler_shape
  np.testing.assert_allclose(s[:, 0], 1.7, rtol=1e-5)
  np.testing.assert_allclose(s[:, 1], 0.0, atol=1e-5)


@pytest.mark.parametrize("heuristic", ["interpolate", "random"])
def test_init_scalers_shapes_and_scale(heuristic):
  src_cfg = vit.make_config("mu/4", image_size=28, channels=1, num_classes=10)
  dst_cfg = vit.make_config("mu/4", depth=3, width=40, num_heads=5, image_size=28, channels=1, num_classes=10)
  src_model, dst_model = vit.ViT(src_cfg), vit.ViT(dst_cfg)
  src = generator.WeightGenerator.from_model(src_model, vit.dummy_input(src_cfg), tiles=TILES, num_templates=3)
  dst = generator.WeightGenerator.from_model(dst_model, vit.dummy_input(dst_cfg), tiles=TILES, num_templates=3)
  src_stats = generator.param_stats(src_model, vit.dummy_input(src_cfg))
  dst_stats = generator.param_stats(dst_model, vit.dummy_input(dst_cfg))
  t, s = src.init(jax.random.key(0), src_stats)
  out = scaler_init.init_scalers(heuristic, dst, t, key=jax.random.key(1), target_stats=dst_stats,
                                 source=src, source_scalers=s, source_stats=src_stats)
  assert jax.tree_util.tree_map(lambda x: x.shape, out) == jax.tree_util.tree_map(lambda x: x.shape, dst.scaler_shapes())
  params = dst.materialize(t, out)
  kernel = np.asarray(params["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"])
  want_std = float(dst_stats["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"][1])
  assert 0.5 * want_std < kernel.std() < 2.0 * want_std
  np.testing.assert_allclose(np.asarray(params["Transformer"]["encoder_norm"]["scale"]), 1.0, rtol=1e-4)
  with pytest.raises(ValueError, match="scaler_init='nope'; use one of"):
    scaler_init.init_scalers("nope", dst, t, key=jax.random.key(1), target_stats=dst_stats)


def test_nearest_trained_size_by_hand():
  """size_distance sums |log| of the length ratios axis by axis (depth included): a d3-w96 target is
  nearer the d3-w64 auxiliary (2 log 1.5) than a d8-w64 extra size (log 8/3 + 2 log 1.5), although the
  latter has about as many entries; a d6-w64 target is nearer the d8-w64 one (log 8/6 vs log 2)."""
  import types
  size = lambda layers, width: types.SimpleNamespace(banks={("k",): bank(layers, (width // 8, 4 * width // 8))})
  aux, deep = size(3, 64), size(8, 64)
  np.testing.assert_allclose(scaler_init.size_distance(size(3, 96), aux), 2 * np.log(1.5))
  np.testing.assert_allclose(scaler_init.size_distance(size(3, 96), deep), np.log(8 / 3) + 2 * np.log(1.5))
  assert scaler_init.nearest_size(size(3, 96), [aux, deep]) == 0
  assert scaler_init.nearest_size(size(6, 64), [aux, deep]) == 1
  assert scaler_init.nearest_size(size(3, 64), [aux, size(3, 64)]) == 0  # a tie: the auxiliary
