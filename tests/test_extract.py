"""Closed-form template extraction: numpy.kron oracles, exact recovery, optimality, crop, rank bound."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from weit_jax import generator as G
from weit_jax.extract import extract_templates, rearrange
from weit_jax.models import vit

TILES = dict(embed=16, mlp=16, heads=1, kv=8)


def vit_generator(n=3, **sizes):
  cfg = vit.make_config(**{**dict(image_size=28, channels=1, num_classes=10, patch_size=7), **sizes})
  return G.WeightGenerator.from_model(vit.ViT(cfg), vit.dummy_input(cfg), tiles=TILES, num_templates=n)


def single_bank(shape, axes, tiles, n):
  """A generator with one parameter 'w', built from shapes alone."""
  return G.WeightGenerator({"w": jax.ShapeDtypeStruct(shape, jnp.float32)},
                           {"w": jax.sharding.PartitionSpec(*axes)}, tiles, n)


def draw(tree, rng):
  return jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape), tree)


def numpy_compose(bank, t, s, crop=True):
  """Oracle: a numpy.kron loop per layer, cropped (or not)."""
  def one(sl):
    full = sum(np.kron(sl[i], t[i]) for i in range(t.shape[0]))
    return full[tuple(slice(0, n) for n in bank.crop)] if crop else full
  return np.stack([one(sl) for sl in s]) if bank.layers else one(s)


def compose_tree(gen, t, s):
  ft, fs = traverse_util.flatten_dict(t), traverse_util.flatten_dict(s)
  return traverse_util.unflatten_dict({p: numpy_compose(b, ft[p], fs[p]) for p, b in gen.banks.items()})


def rel_err(gen, params, t, s):
  got = traverse_util.flatten_dict(gen.materialize(t, s))
  return {p: float(np.linalg.norm(np.asarray(got[p], np.float64) - w) / np.linalg.norm(w))
          for p, w in traverse_util.flatten_dict(params).items()}


def block_matrix(w, tile):
  """Independent Van Loan–Pitsianis matrix of a 2-d (or layers x 2-d) weight: one row per block."""
  w = w if w.ndim == 3 else w[None]
  a, b = tile
  return np.stack([w[l, i:i + a, j:j + b].ravel()
                   for l in range(w.shape[0]) for i in range(0, w.shape[1], a) for j in range(0, w.shape[2], b)])


@pytest.mark.parametrize("grid,tile", [
    ((3, 2), (4, 5)),
    ((2, 1, 3), (3, 4, 2)),
    ((2, 3, 1, 2), (2, 2, 3, 3)),
])
def test_rearrange_maps_kron_to_outer_product(grid, tile):
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=grid), rng.normal(size=tile)
  np.testing.assert_array_equal(rearrange(np.kron(s, t), grid, tile), np.outer(s.ravel(), t.ravel()))
  # A leading layers axis stacks the layers' row blocks.
  s2 = rng.normal(size=grid)
  stacked = rearrange(np.stack([np.kron(s, t), np.kron(s2, t)]), grid, tile)
  np.testing.assert_array_equal(stacked, np.concatenate([np.outer(s.ravel(), t.ravel()), np.outer(s2.ravel(), t.ravel())]))


def test_known_templates_are_recovered_exactly():
  n = 3
  gen = vit_generator(n=n, depth=2, width=32, num_heads=2, mlp_dim=64)  # tile multiples: no padding
  rng = np.random.default_rng(1)
  t0, s0 = draw(gen.template_shapes(), rng), draw(gen.scaler_shapes(), rng)
  params = jax.tree_util.tree_map(jnp.asarray, compose_tree(gen, t0, s0))  # jax arrays in
  t, s, errors = extract_templates(gen, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(t, gen.template_shapes())
  chex.assert_trees_all_equal_shapes_and_dtypes(s, gen.scaler_shapes())
  assert set(errors) == {"/".join(p) for p in gen.banks}
  assert max(errors.values()) < 1e-6, errors  # the float32 inputs are rank N up to rounding
  for path, e in rel_err(gen, params, t, s).items():  # float32 factors through gen.materialize
    assert e < 1e-5, (path, e)
  # Templates are unique only up to an invertible mix: the true ones lie in the extracted span.
  ft0, ft = traverse_util.flatten_dict(t0), traverse_util.flatten_dict(t)
  checked = 0
  for path, b in gen.banks.items():
    if n > min((b.layers or 1) * math.prod(b.grid), math.prod(b.tile)):
      continue  # rank bound below N: the true templates are not identifiable
    a, c = np.asarray(ft[path], np.float64).reshape(n, -1), ft0[path].reshape(n, -1)
    q, _ = np.linalg.qr(a.T)
    np.testing.assert_allclose(q @ (q.T @ c.T), c.T, atol=1e-5 * np.abs(c).max(), err_msg=str(path))
    checked += 1
  assert checked >= 8


def test_rank_one_extraction_is_optimal():
  gen = single_bank((3, 24, 40), ("layers", "embed", "mlp"), dict(embed=8, mlp=8), 1)
  rng = np.random.default_rng(2)
  w = rng.normal(size=(3, 24, 40))  # dense, far from a Kronecker product
  t, s, errors = extract_templates(gen, {"w": w})
  sv = np.linalg.svd(block_matrix(w, (8, 8)), compute_uv=False)
  closed_form = math.sqrt((sv[1:] ** 2).sum()) / math.sqrt((sv ** 2).sum())
  np.testing.assert_allclose(errors["w"], closed_form, rtol=1e-12)
  np.testing.assert_allclose(rel_err(gen, {"w": w}, t, s)[("w",)], closed_form, rtol=1e-5)

  with jax.enable_x64(True):
    tw, sw = jnp.asarray(t["w"], jnp.float64), jnp.asarray(s["w"], jnp.float64)
    err = jax.jit(lambda tw, sw: jnp.linalg.norm(gen.materialize({"w": tw}, {"w": sw})["w"] - w) / np.linalg.norm(w))
    grad = jax.jit(jax.grad(err, argnums=(0, 1)))
    # A stationary point: the gradient vanishes (relative to the factors' scale) ...
    gt, gs = grad(tw, sw)
    assert float(jnp.linalg.norm(gt) * jnp.linalg.norm(tw)) < 1e-5
    assert float(jnp.linalg.norm(gs) * jnp.linalg.norm(sw)) < 1e-5
    # ... no random alternative, near or far, is better ...
    noise = lambda x, scale: x + scale * jnp.abs(x).mean() * rng.normal(size=x.shape)
    for scale in (1e-3, 1e-1, 1.0):
      for _ in range(3):
        assert float(err(noise(tw, scale), noise(sw, scale))) >= closed_form * (1 - 1e-9)
    # ... and gradient descent (which does descend from a perturbed start) cannot improve it.
    def descend(tw, sw, steps=20, lr=10.0):
      for _ in range(steps):
        gt, gs = grad(tw, sw)
        tw, sw = tw - lr * gt, sw - lr * gs
      return float(err(tw, sw))
    perturbed = noise(tw, 0.1), sw
    assert closed_form * (1 - 1e-9) <= descend(*perturbed) < float(err(*perturbed))
    assert descend(tw, sw) >= closed_form * (1 - 1e-9)


def test_widths_that_are_not_tile_multiples():
  n = 2
  gen = vit_generator(n=n, depth=2, width=40, num_heads=5, mlp_dim=100)  # 40, 100: not multiples of 16
  rng = np.random.default_rng(3)
  t0, s0 = draw(gen.template_shapes(), rng), draw(gen.scaler_shapes(), rng)
  params = compose_tree(gen, t0, s0)
  t, s, errors = extract_templates(gen, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(t, gen.template_shapes())
  chex.assert_trees_all_equal_shapes_and_dtypes(s, gen.scaler_shapes())
  np.testing.assert_allclose([rel_err(gen, params, t, s)[p] for p in gen.banks],
                             [errors["/".join(p)] for p in gen.banks], rtol=1e-3, atol=1e-6)
  # The padding the crop cut off is unknown, so zero-padding cannot recover the weights exactly. But
  # the true (uncropped) composition is a rank-N candidate for the padded matrix, so the error is at
  # most the norm of what the crop removed, relative to the cropped weight.
  ft0, fs0, fp = (traverse_util.flatten_dict(x) for x in (t0, s0, params))
  padded = 0
  for path, b in gen.banks.items():
    full = numpy_compose(b, ft0[path], fs0[path], crop=False)
    bound = math.sqrt(max(np.linalg.norm(full) ** 2 - np.linalg.norm(fp[path]) ** 2, 0.0)) / np.linalg.norm(fp[path])
    assert errors["/".join(path)] <= bound + 1e-9, (path, errors["/".join(path)], bound)
    padded += bound > 0
  assert padded >= 5
  mlp = "Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"
  assert 0 < errors[mlp] < 0.5, errors[mlp]
  # Refilling the padding with the reconstruction (hard impute) only lowers the cropped error.
  _, _, refined = extract_templates(gen, params, refine_steps=30)
  for name, e in errors.items():
    assert refined[name] <= e + 1e-12, (name, refined[name], e)
  assert refined[mlp] < 0.5 * errors[mlp], (refined[mlp], errors[mlp])


def test_more_templates_than_the_rank_bound():
  # 'w': grid (2, 1) x tile (3, 4): R is 2 x 12. 'v': 3 layers x grid (2,) x tile (3,): R is 6 x 3.
  n = 4
  gen = G.WeightGenerator(
      {"w": jax.ShapeDtypeStruct((6, 4), jnp.float32), "v": jax.ShapeDtypeStruct((3, 6), jnp.float32)},
      {"w": jax.sharding.PartitionSpec("embed", None), "v": jax.sharding.PartitionSpec("layers", "embed")},
      dict(embed=3), n)
  rng = np.random.default_rng(4)
  params = {"w": rng.normal(size=(6, 4)), "v": rng.normal(size=(3, 6))}
  t, s, errors = extract_templates(gen, params, key=jax.random.key(5))
  chex.assert_trees_all_equal_shapes_and_dtypes(t, gen.template_shapes())
  chex.assert_trees_all_equal_shapes_and_dtypes(s, gen.scaler_shapes())
  assert errors["w"] < 1e-12 and errors["v"] < 1e-12, errors
  chex.assert_trees_all_close(gen.materialize(t, s), jax.tree_util.tree_map(jnp.float32, params), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(s["w"][2:]), 0.0)  # templates 2, 3 of 'w' unused
  np.testing.assert_array_equal(np.asarray(s["v"][:, 3:]), 0.0)  # template 3 of 'v' unused
  extra = np.asarray(t["w"][2:])
  assert np.all(np.isfinite(extra)) and 0.3 < extra.std() < 3  # unit-scale noise: scalers get gradient
  # Seeded: the same key gives the same templates.
  t2, _, _ = extract_templates(gen, params, key=jax.random.key(5))
  chex.assert_trees_all_equal(t, t2)


def test_constant_and_zero_parameters():
  # A LayerNorm-like constant extracts to T_0 = 1, S_0 = value (the convention of WeightGenerator.init).
  gen = single_bank((2, 12), ("layers", "embed"), dict(embed=4), 2)
  t, s, errors = extract_templates(gen, {"w": np.full((2, 12), 0.5)})
  np.testing.assert_allclose(np.asarray(t["w"][0]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(s["w"][:, 0]), 0.5, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(s["w"][:, 1]), 0.0, atol=1e-7)
  assert errors["w"] < 1e-12
  _, s, errors = extract_templates(gen, {"w": np.zeros((2, 12))})
  assert errors["w"] == 0.0 and not np.any(np.asarray(s["w"]))


def test_mismatched_params_are_explained():
  gen = single_bank((6, 4), ("embed", None), dict(embed=3), 1)
  with pytest.raises(ValueError, match=r"parameter w has shape \(6, 5\), but the generator expects \(6, 4\)"):
    extract_templates(gen, {"w": np.ones((6, 5))})
  with pytest.raises(ValueError, match=r"differ at \['u', 'w'\]"):
    extract_templates(gen, {"u": np.ones((6, 4))})
