"""Baseline initializers (weit_jax.inits): shapes, weight selection against hand-computed indices,
TLEG's interpolation rule, mimetic factorizations, seeds, exports, and TLEG pre-training."""
import dataclasses
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from helpers import evenly, every_field_read
from configs import baseline_pretrain as baseline_pretrain_config
from weit_jax import checkpoint, exports, inits, models
from weit_jax.inits import common, mimetic, tleg, weight_selection
from weit_jax.models import vit
from weit_jax.programs import baseline_pretrain

FORMAT = dict(image_size=28, channels=1, num_classes=10)
TARGET = vit.make_config("mu/4", **FORMAT)  # d2-w32-h2-m64
SOURCE = vit.make_config("pico/4", **FORMAT)  # d3-w64-h2-m128: >= TARGET along every axis


def flat(tree):
  return traverse_util.flatten_dict(tree)


def own_shapes(cfg):
  boxed = jax.eval_shape(vit.ViT(cfg).init, jax.random.key(0), vit.dummy_input(cfg))
  return {k: v.shape for k, v in flat(nn.unbox(boxed)["params"]).items()}


def seeded_params(cfg, seed):
  """Seeded random values (never zeros) in every leaf of a ``cfg`` tree."""
  rng = np.random.default_rng(seed)
  return traverse_util.unflatten_dict({k: rng.standard_normal(s).astype(np.float32) + 0.1
                                       for k, s in own_shapes(cfg).items()})


def tleg_tree(cfg, seed):
  layers, dense = tleg.split(seeded_params(cfg, seed), cfg)
  rng = np.random.default_rng(seed + 100)
  A = jax.tree_util.tree_map(lambda x: x[0], layers)
  B = jax.tree_util.tree_map(lambda a: rng.standard_normal(a.shape).astype(np.float32), A)
  return {"A": A, "B": B, "dense": dense}


def fake_weit_export(directory, cfg, seed=3):
  """What programs/init.py writes: plain parameters plus export.json with ``model``."""
  params = seeded_params(cfg, seed)
  exports.write(directory, params, dict(model=dataclasses.asdict(cfg), template_source={}))
  return params


def sources(tmp_path, target):
  weit_dir = str(tmp_path / "weit_export")
  fake_weit_export(weit_dir, target)
  aux = dataclasses.replace(SOURCE, width=target.width, mlp_dim=target.mlp_dim, num_heads=target.num_heads)
  return {"random": None, "mimetic": None, "weight_selection": inits.DenseSource(SOURCE, seeded_params(SOURCE, 1)),
          "tleg": inits.TLEGSource(aux, tleg_tree(aux, 2)), "weit": weit_dir}


# --- one interface ---------------------------------------------------------------------------------

def test_registry_names_and_unknown_name():
  assert sorted(inits.INITIALIZERS) == ["fine", "mimetic", "random", "tleg", "weight_selection", "weit"]
  assert inits.get("tleg").name == "tleg"
  with pytest.raises(ValueError, match=r"unknown initializer 'xavier'; valid: \['fine', 'mimetic', 'random'"):
    inits.get("xavier")
  with pytest.raises(ValueError, match="needs a source"):
    inits.get("weight_selection")(None, TARGET)


@pytest.mark.parametrize("target", [TARGET, vit.make_config("mu/4", width=40, num_heads=2, mlp_dim=80, **FORMAT)],
                         ids=["mu", "w40"])
def test_every_initializer_gives_the_targets_own_shapes(target, tmp_path):
  want = own_shapes(target)
  for name, source in sources(tmp_path, target).items():
    params = inits.get(name)(source, target, seed=0)
    got = {k: np.shape(v) for k, v in flat(params).items()}
    assert got == want, name
    for k, v in flat(params).items():
      assert v.dtype == np.float32 and np.all(np.isfinite(v)), (name, k)
    logits = vit.ViT(target).apply({"params": params}, jax.random.normal(jax.random.key(1), (2, 28, 28, 1)))
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits))), name


def test_random_differs_by_seed_and_repeats_with_the_same_seed():
  a, b, a2 = (inits.get("random")(None, TARGET, seed=s) for s in (0, 1, 0))
  k = ("Transformer", "encoderblock", "MlpBlock_0", "Dense_0", "kernel")
  assert not np.allclose(flat(a)[k], flat(b)[k])
  assert not np.allclose(flat(a)[("pos_embedding",)], flat(b)[("pos_embedding",)])
  chex.assert_trees_all_equal(a, a2)


def test_every_export_loads_for_the_target_and_trains_from_config_init(tmp_path):
  from weit_jax.programs import train
  for name, source in sources(tmp_path, TARGET).items():
    directory = str(tmp_path / "exports" / name)
    params = inits.get(name)(source, TARGET, seed=4)
    assert inits.get(name).export(directory, source, TARGET, seed=4) == directory
    meta = exports.read_meta(directory)
    assert meta["init"] == name and meta["model"] == models.to_record(TARGET) and meta["seed"] == 4
    loaded = jax.device_get(exports.load_params(directory, expected_model=TARGET))
    chex.assert_trees_all_close(loaded, params, rtol=0, atol=0)
    # What `--config.init=EXPORT` does in programs/train.py.
    config = ml_collections.ConfigDict(dict(init=directory, seed=0))
    chex.assert_trees_all_close(train.initial_params(config, TARGET), params, rtol=0, atol=0)
  with pytest.raises(checkpoint.CheckpointError, match="already holds an export"):
    inits.get("random").export(str(tmp_path / "exports" / "random"), None, TARGET)


# --- weight selection ------------------------------------------------------------------------------

@pytest.mark.parametrize("n_source,n_target,want", [
    (8, 4, [0, 2, 4, 6]), (6, 3, [0, 2, 4]), (4, 4, [0, 1, 2, 3]),  # divisible: step n_source // n_target
    (10, 4, [0, 3, 6, 9]), (9, 4, [0, 3, 5, 8]), (6, 4, [0, 2, 3, 5]), (5, 3, [0, 2, 4]),  # round(linspace)
])
def test_uniform_indices_hand_computed(n_source, n_target, want):
  np.testing.assert_array_equal(weight_selection.uniform_indices(n_source, n_target), want)


def arange_params(cfg):
  """Every leaf holds its own flat index: a selected value names the source element it came from."""
  return traverse_util.unflatten_dict({k: np.arange(np.prod(s), dtype=np.float32).reshape(s)
                                       for k, s in own_shapes(cfg).items()})


CASES = [
    # pico (d3 w64 h2 k32 m128) -> d2 w40 h2 k20 m80: nothing divides, first 2 of 3 layers.
    (SOURCE, vit.make_config("mu/4", width=40, num_heads=2, mlp_dim=80, **FORMAT)),
    # d3 w64 h4 k16 m128 -> d1 w24 h2 k12 m48: heads 0 and 2 of 4.
    (vit.make_config("pico/4", num_heads=4, **FORMAT),
     vit.make_config("mu/4", depth=1, width=24, mlp_dim=48, **FORMAT)),
    # pico -> mu: everything divides (step 2), heads all kept.
    (SOURCE, TARGET),
]


@pytest.mark.parametrize("source_cfg,target_cfg", CASES, ids=["w40", "heads", "divisible"])
def test_weight_selection_takes_the_same_evenly_spaced_indices_for_every_parameter(source_cfg, target_cfg):
  src = arange_params(source_cfg)
  params = inits.get("weight_selection")(inits.DenseSource(source_cfg, src), target_cfg, seed=0)
  expected = {"layers": list(range(target_cfg.depth)),  # the first N layers
              "embed": evenly(source_cfg.width, target_cfg.width),
              "mlp": evenly(source_cfg.mlp_dim, target_cfg.mlp_dim),
              "heads": evenly(source_cfg.num_heads, target_cfg.num_heads),
              "kv": evenly(source_cfg.head_dim, target_cfg.head_dim)}
  if source_cfg.num_heads == 4:
    assert expected["heads"] == [0, 2]
  src_flat, axes = flat(src), common.axes(target_cfg)
  checked = set()
  for path, w in flat(params).items():
    if path[0] == "head":  # re-initialized: the target's own init
      chex.assert_trees_all_equal(w, flat(common.own_init(target_cfg, 0))[path])
      continue
    source_index = np.unravel_index(w.astype(np.int64), src_flat[path].shape)  # where each value came from
    for axis, name in enumerate(axes[path]):
      grid = np.indices(w.shape)[axis]  # the target index along this axis
      want = np.asarray(expected[name])[grid] if name in expected else grid
      np.testing.assert_array_equal(source_index[axis], want, err_msg=f"{path} axis {axis} ({name})")
      checked.add(name)
  assert {"layers", "embed", "mlp", "heads", "kv", "tokens"} <= checked


def test_weight_selection_keeps_a_same_size_model_and_reads_an_export(tmp_path):
  src = seeded_params(SOURCE, 7)
  directory = str(tmp_path / "dense")
  exports.write(directory, src, dict(model=dataclasses.asdict(SOURCE)))
  params = inits.get("weight_selection")(directory, SOURCE, seed=0)
  src["head"] = common.own_init(SOURCE, 0)["head"]
  chex.assert_trees_all_close(params, src, rtol=0, atol=0)


@pytest.mark.parametrize("source_cfg,target_cfg,larger", [
    # Named by logical axis: embed = width, mlp = mlp_dim, heads = num_heads, kv = head dim, layers = depth.
    (TARGET, SOURCE, r"embed \(64 > 32\), kv \(32 > 16\), mlp \(128 > 64\), layers \(3 > 2\);"),
    (SOURCE, vit.make_config("pico/4", depth=4, **FORMAT), r"layers \(4 > 3\); source d3-w64"),
    (SOURCE, vit.make_config("pico/4", mlp_dim=192, **FORMAT), r"mlp \(192 > 128\);"),
    (vit.make_config("pico/4", num_heads=4, **FORMAT), vit.make_config("mu/4", num_heads=1, **FORMAT),
     r"kv \(32 > 16\);"),
    (SOURCE, vit.make_config("mu/4", width=48, num_heads=3, **FORMAT), r"heads \(3 > 2\);"),
], ids=["everything", "depth", "mlp", "head_dim", "heads"])
def test_weight_selection_refuses_to_grow(source_cfg, target_cfg, larger):
  with pytest.raises(ValueError, match="weight selection cannot grow a model: the target is larger than the "
                     "source along " + larger):
    inits.get("weight_selection")(inits.DenseSource(source_cfg, seeded_params(source_cfg, 0)), target_cfg)


def test_weight_selection_refuses_another_patch_size():
  target = vit.make_config("mu/7", **FORMAT)
  with pytest.raises(ValueError, match=r"same 'patch_h' axis in source and target.*source 4, target 7"):
    inits.get("weight_selection")(inits.DenseSource(SOURCE, seeded_params(SOURCE, 0)), target)


# --- TLEG ------------------------------------------------------------------------------------------

def test_tleg_params_is_a_plus_l_over_big_l_times_b():
  rng = np.random.default_rng(0)
  A = {"x": {"w": rng.standard_normal((3, 5)).astype(np.float32)}, "b": rng.standard_normal(4).astype(np.float32)}
  B = {"x": {"w": rng.standard_normal((3, 5)).astype(np.float32)}, "b": rng.standard_normal(4).astype(np.float32)}
  out = tleg.tleg_params(A, B, 4)
  for l, c in enumerate([0.25, 0.5, 0.75, 1.0]):  # l = 1..4 over L = 4
    np.testing.assert_allclose(out["x"]["w"][l], A["x"]["w"] + c * B["x"]["w"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["b"][l], A["b"] + c * B["b"], rtol=1e-6, atol=1e-6)
  assert out["x"]["w"].shape == (4, 3, 5)


def test_tleg_expands_the_auxiliary_to_any_depth():
  aux = SOURCE  # depth 3
  tree = tleg_tree(aux, 5)
  for depth in (1, 3, 5):
    target = vit.make_config("pico/4", depth=depth, **FORMAT)
    params = inits.get("tleg")(inits.TLEGSource(aux, tree), target)
    got = flat(params)
    for path, a in flat(tree["A"]).items():
      b = flat(tree["B"])[path]
      for l in range(depth):
        np.testing.assert_allclose(got[path][l], a + (l + 1) / depth * b, rtol=1e-6, atol=1e-6,
                                   err_msg=f"{path} layer {l + 1} of {depth}")
    for path, d in flat(tree["dense"]).items():
      np.testing.assert_array_equal(got[path], d)
  # The auxiliary's own depth reproduces its layers: l = 3 of 3 is A + B.
  last = flat(inits.get("tleg")(inits.TLEGSource(aux, tree), aux))
  k = ("Transformer", "encoderblock", "MlpBlock_0", "Dense_0", "kernel")
  np.testing.assert_allclose(last[k][2], flat(tree["A"])[k] + flat(tree["B"])[k], rtol=1e-6)


def test_tleg_refuses_another_width_and_renews_a_head_of_other_classes():
  source = inits.TLEGSource(SOURCE, tleg_tree(SOURCE, 0))
  with pytest.raises(ValueError, match=r"TLEG expands depth only: the target differs from the auxiliary model along embed \(32 vs 64\)"):
    inits.get("tleg")(source, vit.make_config("pico/4", width=32, num_heads=2, **FORMAT))
  five = vit.make_config("pico/4", depth=2, image_size=28, channels=1, num_classes=5)
  params = inits.get("tleg")(source, five, seed=0)
  assert params["head"]["kernel"].shape == (64, 5)


def unlocked(config):
  return ml_collections.ConfigDict(config.to_dict())


def test_tleg_pretraining_trains_a_and_b_and_exports(learnable_data, tmp_path):
  from configs import vit_train
  c = unlocked(vit_train.get_config("runlocal,variant=mu/4"))
  c.total_steps, c.batch_size, c.log_every, c.eval_every, c.checkpoint_every = 6, 32, 3, 0, 6
  c.optim.warmup_steps = 1
  learnable_data(c)
  workdir = str(tmp_path / "tleg")
  config = baseline_pretrain_config.from_train_config(c, "tleg")
  with every_field_read(config):
    summary = baseline_pretrain.run(config, workdir)
  assert summary["final_step"] == 6 and summary["program"] == "baseline_pretrain" and summary["baseline"] == "tleg"
  source = inits.TLEGSource.from_export(baseline_pretrain.export_dir(workdir))
  assert source.config.short_name() == "d2-w32-h2-m64-p4"
  k = ("Transformer", "encoderblock", "MlpBlock_0", "Dense_0", "kernel")
  assert float(np.abs(flat(source.tree["B"])[k]).max()) > 0  # B started at 0 and was trained
  start = common.to_numpy(tleg.initial_tree(source.config, jax.random.key(0)))
  assert not np.allclose(flat(source.tree["A"])[k], flat(start["A"])[k])
  # The trained auxiliary's function is the TLEG model's: expand to its own depth and compare.
  images = jax.random.normal(jax.random.key(2), (4, 28, 28, 1))
  want = vit.ViT(source.config).apply({"params": tleg.to_plain(source.tree, source.config)}, images)
  got = vit.ViT(source.config).apply({"params": inits.get("tleg")(source, source.config)}, images)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert float(jnp.std(got)) > 0


# --- mimetic ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("width,heads", [(32, 2), (40, 2), (48, 3)])
def test_mimetic_qk_is_the_best_rank_k_approximation_and_vo_is_exact(width, heads):
  w = mimetic.attention_layer(np.random.default_rng(11), width, heads)
  d, k = width, width // heads
  eye = np.eye(d)
  for h in range(heads):
    target = w["qk_targets"][h]
    z = (target - 0.7 * eye) / 0.7 * np.sqrt(d)  # the Gaussian behind the target, unit variance
    assert abs(z.mean()) < 0.15 and 0.85 < z.std() < 1.15
    qk = w["query"][:, h, :] @ w["key"][:, h, :].T
    assert np.linalg.matrix_rank(qk) == k
    s = np.linalg.svd(target, compute_uv=False)
    # Eckart-Young: the error of the best rank-k approximation is the discarded singular values.
    np.testing.assert_allclose(np.linalg.norm(target - qk) ** 2, np.sum(s[k:] ** 2), rtol=1e-8)
    cos = np.sum(qk * target) / np.linalg.norm(qk) / np.linalg.norm(target)
    assert cos > 0.8
    assert np.trace(qk) / d > 0.3  # the identity part survives the truncation
  assert not np.allclose(w["qk_targets"][0], w["qk_targets"][1])  # independent per head
  vo = np.einsum("dhk,hke->de", w["value"], w["out"])  # sum over heads of W_v^h W_o^h
  np.testing.assert_allclose(vo, w["vo_target"], atol=1e-10)
  z2 = (w["vo_target"] + 0.4 * eye) / 0.4 * np.sqrt(d)
  assert abs(z2.mean()) < 0.15 and 0.85 < z2.std() < 1.15


def test_mimetic_model_init_sets_attention_and_keeps_the_rest():
  cfg = vit.make_config("mu/4", depth=3, width=48, num_heads=3, mlp_dim=96, **FORMAT)
  params = inits.get("mimetic")(None, cfg, seed=5)
  own = common.own_init(cfg, 5)
  att = params["Transformer"]["encoderblock"]["MultiHeadDotProductAttention_0"]
  d = cfg.width
  rng = np.random.default_rng([5, 0x313])
  for l in range(cfg.depth):
    vo = np.einsum("dhk,hke->de", att["value"]["kernel"][l], att["out"]["kernel"][l])
    z2 = (vo + 0.4 * np.eye(d)) / 0.4 * np.sqrt(d)  # exact up to float32 rounding
    assert abs(np.diag(vo).mean() + 0.4) < 0.05 and abs(z2.mean()) < 0.15 and 0.85 < z2.std() < 1.15
    for h in range(cfg.num_heads):
      qk = att["query"]["kernel"][l][:, h] @ att["key"]["kernel"][l][:, h].T
      assert np.trace(qk) / d > 0.3
    want = mimetic.attention_layer(rng, d, cfg.num_heads)  # the documented per-layer stream
    for name in ("query", "key", "value", "out"):
      np.testing.assert_allclose(att[name]["kernel"][l], want[name], rtol=1e-6, atol=1e-6)
      np.testing.assert_array_equal(att[name]["bias"][l], 0.0)
  assert not np.allclose(att["query"]["kernel"][0], att["query"]["kernel"][1])  # every layer its own Z
  for path, v in flat(own).items():
    if "MultiHeadDotProductAttention_0" not in path:
      np.testing.assert_array_equal(flat(params)[path], v, err_msg=str(path))
  other = inits.get("mimetic")(None, cfg, seed=6)
  assert not np.allclose(other["Transformer"]["encoderblock"]["MultiHeadDotProductAttention_0"]["query"]["kernel"],
                         att["query"]["kernel"])


# --- weit --------------------------------------------------------------------------------------------

def test_weit_passes_an_export_through_and_refuses_another_size(tmp_path):
  directory = str(tmp_path / "weit")
  params = fake_weit_export(directory, TARGET, seed=9)
  chex.assert_trees_all_close(inits.get("weit")(directory, TARGET), params, rtol=0, atol=0)
  with pytest.raises(checkpoint.CheckpointError, match="is a vit d2-w32-h2-m64-p4 but the model asked for is a vit d3"):
    inits.get("weit")(directory, vit.make_config("mu/4", depth=3, **FORMAT))
  five = vit.make_config("mu/4", image_size=28, channels=1, num_classes=5)
  renewed = inits.get("weit")(directory, five)
  assert renewed["head"]["kernel"].shape == (32, 5)
  np.testing.assert_array_equal(renewed["embedding"]["kernel"], params["embedding"]["kernel"])


def test_baseline_pretrain_config_and_refusals(tmp_path):
  """configs/baseline_pretrain.py is the family's training config with the program and baseline
  set; the program refuses an unknown baseline and a set init before writing anything."""
  from configs import dit_train
  c = baseline_pretrain_config.get_config("family=dit,baseline=fine,runlocal")
  train_c = dit_train.get_config("runlocal")
  assert (c.program, c.baseline) == ("baseline_pretrain", "fine") and "sample_quality" not in c
  assert c.model == train_c.model and c.optim == train_c.optim and "init" not in c
  assert baseline_pretrain_config.get_config("family=vit,baseline=tleg,variant=mu/4").model.variant == "mu/4"
  bad = unlocked(c)
  bad.baseline = "lora"
  with pytest.raises(ValueError, match=r"baseline='lora'; use one of \['fine', 'tleg'\]"):
    baseline_pretrain.validate(bad, str(tmp_path / "wd"))
  with pytest.raises(ValueError, match="tleg pre-training starts from its own initialization; unset config.init"):
    baseline_pretrain.validate(baseline_pretrain_config.from_train_config(dict_config(train_c, init="/some/export"), "tleg"),
                               str(tmp_path / "wd"))
  assert not os.path.exists(tmp_path / "wd")


def dict_config(config, **fields):
  c = unlocked(config)
  c.update(fields)
  return c
