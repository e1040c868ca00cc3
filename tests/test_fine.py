"""FINE (weit_jax.inits.fine): the composition U diag(sigma_l) V^T against a numpy loop, the matrix
split rule, the SVD start against the model's own init, depth expansion against numpy
interpolation, the depth-only check, and pre-training plus trained sigma through the shared loop."""
import dataclasses

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs import baseline_pretrain as baseline_pretrain_config
from helpers import every_field_read
from weit_jax import exports, inits, models
from weit_jax.inits import common, fine
from weit_jax.models import dit, vit
from weit_jax.programs import baseline_pretrain

DIT = dit.make_config(width=16, depth=3, num_heads=2, mlp_dim=32, patch_size=4, image_size=8, channels=1,
                      num_classes=3)
VIT = vit.make_config("mu/4", width=16, depth=3, num_heads=2, mlp_dim=32, image_size=8, channels=1, num_classes=3)
ATT = "blocks/MultiHeadDotProductAttention_0/"
# The matrix (m, n) of every factorized DiT block parameter, by hand from the rule: split after the
# first axis, before the last when the first axis is heads. The rest of the blocks is per layer.
DIT_MATRICES = {
    "blocks/Dense_0/kernel": (16, 32),  # (embed, mlp)
    "blocks/Dense_1/kernel": (32, 16),  # (mlp, embed)
    "blocks/Modulation_0/adaLN_modulation/kernel": (16, 96),  # (cond | modulation 6 x embed)
    "blocks/Modulation_0/adaLN_modulation/bias": (6, 16),  # (modulation | embed)
    **{ATT + f"{n}/kernel": (16, 16) for n in ("query", "key", "value")},  # (embed | heads x kv)
    **{ATT + f"{n}/bias": (2, 8) for n in ("query", "key", "value")},  # (heads | kv)
    ATT + "out/kernel": (16, 16),  # (heads x kv | embed), not (heads | kv x embed) = (2, 128)
}
DIT_PER_LAYER = {"blocks/Dense_0/bias", "blocks/Dense_1/bias", ATT + "out/bias"}


def flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def random_tree(cfg, seed):
  """Seeded random values (never zeros) in every leaf of a FINE tree of ``cfg``."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: (rng.standard_normal(shape) + 0.1).astype(np.float32)
  shapes, fac = common.shapes(cfg), fine.factors(cfg)
  tree = {"U": {}, "V": {}, "sigma": {}, "per_layer": {}, "dense": {}}
  for path, shape in sorted(shapes.items()):
    if path in fac:
      f = fac[path]
      tree["U"][path], tree["V"][path] = normal(f.m, f.r), normal(f.n, f.r)
      tree["sigma"][path] = normal(shape[0], f.r)
    else:
      tree["per_layer" if common.is_layer_param(path, cfg) else "dense"][path] = normal(*shape)
  return {k: traverse_util.unflatten_dict(v) for k, v in tree.items()}


def numpy_compose(tree, cfg, sigma=None):
  """Independent oracle: per layer l, ``U @ np.diag(sigma[l]) @ V.T`` reshaped to the parameter's shape."""
  out = {}
  sigmas = sigma if sigma is not None else flat(tree["sigma"])
  for path, U in flat(tree["U"]).items():
    U, V, s = np.float64(U), np.float64(flat(tree["V"])[path]), np.float64(sigmas[path])
    shape = common.shapes(cfg)[tuple(path.split("/"))]
    out[path] = np.stack([(U @ np.diag(s[l]) @ V.T).reshape(shape[1:]) for l in range(shape[0])])
  return out


def test_the_matrix_split_of_every_dit_block_parameter():
  fac = {"/".join(k): (f.m, f.n) for k, f in fine.factors(DIT).items()}
  assert fac == DIT_MATRICES
  per_layer = {"/".join(k) for k in common.shapes(DIT) if common.is_layer_param(k, DIT)} - set(fac)
  assert per_layer == DIT_PER_LAYER
  vit_fac = {"/".join(k[2:]): (f.m, f.n) for k, f in fine.factors(VIT).items()}
  assert vit_fac["MultiHeadDotProductAttention_0/out/kernel"] == (16, 16)
  assert vit_fac["MlpBlock_0/Dense_0/kernel"] == (16, 32)
  assert not any("LayerNorm" in k for k in vit_fac)  # (L, embed): per layer


@pytest.mark.parametrize("cfg", [DIT, VIT], ids=["dit", "vit"])
def test_composition_equals_the_numpy_loop(cfg):
  tree = random_tree(cfg, 1)
  got = flat(inits.get("fine")(inits.FINESource(cfg, tree), cfg))  # its own depth: sigma as it is
  want = numpy_compose(tree, cfg)
  assert set(want) | set(flat(tree["per_layer"])) | set(flat(tree["dense"])) == set(got)
  for path, w in want.items():
    np.testing.assert_allclose(got[path], w, rtol=1e-5, atol=1e-5, err_msg=path)
  for group in ("per_layer", "dense"):
    for path, v in flat(tree[group]).items():
      np.testing.assert_array_equal(got[path], v, err_msg=path)
  plain = flat(fine.to_plain(tree, cfg))  # the traced composition the training step uses
  for path, w in want.items():
    np.testing.assert_allclose(plain[path], w, rtol=1e-5, atol=1e-5, err_msg=path)


def test_the_start_is_the_models_own_first_layer_and_zero_weights_are_exactly_zero():
  tree = jax.device_get(jax.jit(lambda k: fine.initial_tree(DIT, k))(jax.random.key(4)))
  own = flat(models.init_params(DIT, 4))  # the model's own initializers, same key
  plain = flat(fine.to_plain(tree, DIT))
  zero = set()
  for path, f in fine.factors(DIT).items():
    path = "/".join(path)
    first = own[path][0]
    for l in range(DIT.depth):  # every layer starts as the first
      if not np.any(first):
        zero.add(path)
        np.testing.assert_array_equal(plain[path][l], 0.0, err_msg=path)
      else:
        np.testing.assert_allclose(plain[path][l], first, rtol=1e-5, atol=1e-6, err_msg=path)
    U, V = flat(tree["U"])[path], flat(tree["V"])[path]
    np.testing.assert_allclose(U.T @ U, np.eye(f.r), atol=1e-5, err_msg=path)  # orthonormal, random ones too
    np.testing.assert_allclose(V.T @ V, np.eye(f.r), atol=1e-5, err_msg=path)
    if path in zero:
      np.testing.assert_array_equal(flat(tree["sigma"])[path], 0.0)
      assert np.abs(U - np.eye(*U.shape)).max() > 0.1  # a random basis, not the SVD's of zero
  assert {"blocks/Modulation_0/adaLN_modulation/kernel", "blocks/Modulation_0/adaLN_modulation/bias",
          ATT + "query/bias"} <= zero
  for path in DIT_PER_LAYER:
    for l in range(DIT.depth):
      np.testing.assert_array_equal(plain[path][l], own[path][0])
  for path, v in own.items():
    if not path.startswith("blocks/"):
      np.testing.assert_array_equal(plain[path], v, err_msg=path)
  np.testing.assert_array_equal(plain["final_linear/kernel"], 0.0)


def interp(x, size):
  """Independent oracle: np.interp of every column over positions linspace(0, L - 1, size)."""
  L = x.shape[0]
  cols = x.reshape(L, -1)
  pos = np.linspace(0, L - 1, size)
  return np.stack([np.interp(pos, np.arange(L), cols[:, j]) for j in range(cols.shape[1])], 1).reshape(
      (size,) + x.shape[1:])


@pytest.mark.parametrize("depth", [5, 2])
def test_depth_expansion_interpolates_sigma_over_relative_depth(depth):
  tree = random_tree(DIT, 2)
  target = dataclasses.replace(DIT, depth=depth)
  expanded = fine.expand_tree(inits.FINESource(DIT, tree), target)
  sigma = {k: interp(np.float64(v), depth) for k, v in flat(tree["sigma"]).items()}
  for k, v in sigma.items():
    np.testing.assert_allclose(flat(expanded["sigma"])[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
  got = flat(inits.get("fine")(inits.FINESource(DIT, tree), target))
  for k, w in numpy_compose(tree, target, sigma).items():
    np.testing.assert_allclose(got[k], w, rtol=1e-4, atol=1e-4, err_msg=k)
  for k, v in flat(tree["per_layer"]).items():
    np.testing.assert_allclose(got[k], interp(np.float64(v), depth), rtol=1e-5, atol=1e-6, err_msg=k)
  for k, v in flat(tree["dense"]).items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  for group in ("U", "V"):
    for k, v in flat(tree[group]).items():
      np.testing.assert_array_equal(flat(expanded[group])[k], v)


def test_depth_only_and_a_fresh_class_table_for_other_classes():
  source = inits.FINESource(DIT, random_tree(DIT, 3))
  wider = dataclasses.replace(DIT, width=24, mlp_dim=48)
  with pytest.raises(ValueError, match=r"FINE expands depth only: the target differs from the auxiliary model "
                                       r"along .*embed \(24 vs 16\)"):
    inits.get("fine")(source, wider)
  five = dataclasses.replace(DIT, num_classes=5)
  got = flat(inits.get("fine")(source, five, seed=1))
  np.testing.assert_array_equal(got["y_embedder"], flat(models.init_params(five, 1))["y_embedder"])
  np.testing.assert_array_equal(got["t_embedder_0/kernel"], flat(source.tree["dense"])["t_embedder_0/kernel"])


def test_pretrain_exports_and_adapt_trains_only_sigma(learnable_data, tmp_path):
  from configs import dit_train
  c = ml_collections.ConfigDict(dit_train.get_config("runlocal").to_dict())
  c.model.update(dict(variant=None, width=16, depth=3, num_heads=2, mlp_dim=32, patch_size=7))
  c.update(dict(total_steps=3, batch_size=32, log_every=3, eval_every=0, checkpoint_every=3))
  c.optim.warmup_steps = 0  # adaLN-Zero: the blocks' MLP gets gradient from the third update on
  c.sample_quality.per_class = 0  # (the loops never measure it; off here too, so nothing builds its classifier)
  learnable_data(c)
  config = baseline_pretrain_config.from_train_config(c, "fine")
  with every_field_read(config, {"sample_quality.*": "sample_quality.per_class > 0"}):
    summary = baseline_pretrain.run(config, str(tmp_path / "pre"))
  assert summary["final_step"] == 3 and summary["program"] == "baseline_pretrain" and summary["baseline"] == "fine"
  meta = exports.read_meta(baseline_pretrain.export_dir(str(tmp_path / "pre")))
  assert meta["form"] == "fine" and meta["steps"] == 3
  source = fine.FINESource.from_export(baseline_pretrain.export_dir(str(tmp_path / "pre")))
  assert source.config.short_name() == "d3-w16-h2-m32-p7"
  trained = common.to_numpy(summary["params"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, source.tree, trained)
  start = common.to_numpy(jax.jit(lambda k: fine.initial_tree(source.config, k))(jax.random.key(0)))
  for k in ("blocks/Dense_0/kernel", "blocks/Modulation_0/adaLN_modulation/kernel"):  # trained; the latter from 0
    assert not np.allclose(flat(trained["sigma"])[k], flat(start["sigma"])[k]), k

  target = dataclasses.replace(source.config, depth=4)
  out = fine.adapt(source, target, c, str(tmp_path / "adapt"), steps=2, num_examples=64)
  assert out == str(tmp_path / "adapt" / "export")
  meta = exports.read_meta(out)
  assert meta["init"] == "fine" and meta["model"] == models.to_record(target)
  st = meta["sigma_training"]
  assert (st["steps"], st["num_examples"]) == (2, 64) and "loss_before" in st and "loss_after" in st
  factors = fine.FINESource.from_export(fine.factors_dir(str(tmp_path / "adapt")))
  begin = fine.expand_tree(source, target)
  for group in ("U", "V", "dense"):  # frozen
    jax.tree_util.tree_map(np.testing.assert_array_equal, factors.tree[group], begin[group])
  changed = [k for k, v in flat(factors.tree["sigma"]).items() if not np.allclose(v, flat(begin["sigma"])[k])]
  assert {"blocks/Dense_0/kernel", "blocks/Modulation_0/adaLN_modulation/kernel", ATT + "out/kernel"} <= set(changed)
  plain = flat(jax.device_get(exports.load_params(out, expected_model=target)))
  for k, w in numpy_compose(factors.tree, target).items():
    np.testing.assert_allclose(plain[k], w, rtol=1e-5, atol=1e-5, err_msg=k)
  for k, v in flat(factors.tree["per_layer"]).items():
    np.testing.assert_array_equal(plain[k], v)
  assert fine.adapt(source, target, c, str(tmp_path / "adapt"), steps=2, num_examples=64) == out  # done: kept
