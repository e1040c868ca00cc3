"""The ResNet family: names and shapes (ResNet-50's published count), the forward pass against a
second implementation, composed conv kernels against a numpy block-loop oracle, the family
registry, baselines on ResNets, and the three programs end to end (pre-train -> init -> train)."""
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs import resnet_init, resnet_pretrain, resnet_train
from helpers import every_field_read
from weit_jax import exports, generator, inits, models
from weit_jax.inits import common, tleg, weight_selection
from weit_jax.models import resnet, vit
from weit_jax.programs import init as init_program
from weit_jax.programs import pretrain, train


def randomized(params, seed, scale=0.3):
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      treedef, [jnp.asarray(rng.normal(scale=scale, size=x.shape), jnp.float32) for x in leaves])


def abstract_params(cfg):
  boxed = jax.eval_shape(resnet.ResNet(cfg).init, jax.random.key(0), resnet.dummy_input(cfg))
  return nn.unbox(boxed)["params"], nn.get_partition_spec(boxed)["params"]


# --- the plain model ---------------------------------------------------------------------------------

def test_resnet50_names_shapes_and_published_parameter_count():
  cfg = resnet.make_config("R50")
  flat = {k: v.shape for k, v in traverse_util.flatten_dict(abstract_params(cfg)[0], sep="/").items()}
  assert flat["conv_root/kernel"] == (7, 7, 3, 64)
  assert flat["gn_root/scale"] == (64,)
  assert flat["block1/unit1/conv_proj/kernel"] == (1, 1, 64, 256)
  assert flat["block1/units/conv2/kernel"] == (2, 3, 3, 64, 64)  # units 2-3 of stage 1, scanned
  assert flat["block3/units/conv1/kernel"] == (5, 1, 1, 1024, 256)
  assert flat["block4/unit1/conv2/kernel"] == (3, 3, 512, 512)
  assert flat["head/kernel"] == (2048, 1000)
  # ResNet-50 v1 with a 1000-class head: 25,557,032 parameters (GroupNorm has BatchNorm's scale and
  # bias per channel; no conv biases).
  assert sum(int(np.prod(v)) for v in flat.values()) == 25_557_032


def test_logical_axes_name_both_channel_axes_and_keep_the_spatial_kernel():
  cfg = resnet.make_config("pico")
  axes = {k: tuple(v) for k, v in traverse_util.flatten_dict(
      jax.tree_util.tree_map(tuple, abstract_params(cfg)[1], is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
      sep="/").items()}
  assert axes["conv_root/kernel"] == ("conv_h", "conv_w", "channels", "stem")
  assert axes["block1/unit1/conv1/kernel"] == ("conv_h", "conv_w", "stem", "mid1a")
  assert axes["block2/unit1/conv_proj/kernel"] == ("conv_h", "conv_w", "res1", "res2")
  assert axes["block2/units/conv2/kernel"] == ("layers", "conv_h", "conv_w", "mid2a", "mid2b")
  assert axes["block2/units/conv3/kernel"] == ("layers", "conv_h", "conv_w", "mid2b", "res2")
  assert axes["block3/units/gn3/scale"] == ("layers", "res3")
  assert axes["head/kernel"] == ("res3", "classes")
  assert set(resnet.width_axes(cfg)) == {a for ax in axes.values() for a in ax} - models.FIXED_AXES


def reference_forward(params, images, cfg):
  """A ResNet written from its equations with jax.lax convolutions in float64 numpy-fed arrays,
  independently of the Flax modules: standardized kernels, GroupNorm by reshaping, bottlenecks."""
  p = traverse_util.flatten_dict(jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params), sep="/")

  def conv(x, w, stride):
    w = (w - w.mean((0, 1, 2))) / (w.std((0, 1, 2)) + 1e-5)
    return np.asarray(jax.lax.conv_general_dilated(
        jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), (stride, stride), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"), np.float64)

  def gn(x, scale, bias):
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, cfg.num_groups, c // cfg.num_groups)
    mu = g.mean((1, 2, 4), keepdims=True)
    var = g.var((1, 2, 4), keepdims=True)
    return ((g - mu) / np.sqrt(var + 1e-6)).reshape(n, h, w, c) * scale + bias

  relu = lambda v: np.maximum(v, 0)

  def unit(x, get, stride):
    out = get("conv3/kernel").shape[-1]
    res = x
    if x.shape[-1] != out or stride != 1:
      res = gn(conv(x, get("conv_proj/kernel"), stride), get("gn_proj/scale"), get("gn_proj/bias"))
    y = relu(gn(conv(x, get("conv1/kernel"), 1), get("gn1/scale"), get("gn1/bias")))
    y = relu(gn(conv(y, get("conv2/kernel"), stride), get("gn2/scale"), get("gn2/bias")))
    y = gn(conv(y, get("conv3/kernel"), 1), get("gn3/scale"), get("gn3/bias"))
    return relu(res + y)

  root_stride = {"small": 1, "strided": 2}[cfg.stem]
  x = relu(gn(conv(np.asarray(images, np.float64), p["conv_root/kernel"], root_stride), p["gn_root/scale"],
              p["gn_root/bias"]))
  for s, depth in enumerate(cfg.depth, 1):
    x = unit(x, lambda k: p[f"block{s}/unit1/{k}"], 1 if s == 1 else 2)
    for l in range(depth - 1):
      x = unit(x, lambda k: p[f"block{s}/units/{k}"][l], 1)
  return x.mean((1, 2)) @ p["head/kernel"] + p["head/bias"]


@pytest.mark.parametrize("stem", ["strided", "small"])
def test_forward_matches_reference(stem):
  """Two stages (a stride-2 transition with a projection), stages of unequal depth."""
  cfg = resnet.make_config("pico", depth="2-3", width=12, image_size=12, channels=2, num_classes=5, stem=stem)
  model = resnet.ResNet(cfg)
  images = jax.random.normal(jax.random.key(1), (2, 12, 12, 2))
  params = randomized(nn.unbox(jax.jit(model.init)(jax.random.key(0), images))["params"], seed=3)
  got = jax.jit(model.apply)({"params": params}, images)
  chex.assert_shape(got, (2, 5))
  np.testing.assert_allclose(np.asarray(got), reference_forward(params, images, cfg), rtol=2e-3, atol=2e-3)


def test_remat_wraps_the_scanned_units():
  """The policy reaches the scanned units (values and memory under remat: tests/test_vit.py, the
  same ``models.remat.wrap``)."""
  import dataclasses
  cfg = resnet.make_config("pico", depth="2-3", width=12, image_size=12, channels=2, num_classes=5)
  images = jax.random.normal(jax.random.key(1), (4, 12, 12, 2))
  params = nn.unbox(jax.eval_shape(resnet.ResNet(cfg).init, jax.random.key(0), images))["params"]
  params = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), params)

  def backward(c):
    return str(jax.make_jaxpr(jax.grad(lambda p: jnp.sum(resnet.ResNet(c).apply({"params": p}, images))))(params))
  assert "remat" not in backward(cfg) and "remat" in backward(dataclasses.replace(cfg, remat_policy="nothing_saveable"))
  # How, not what: a record (export, run) matches whatever the policy.
  remat = dataclasses.replace(cfg, remat_policy="dots_saveable")
  assert models.runtime_of(remat) == dict(dtype="float32", remat_policy="dots_saveable")
  assert models.target_config({"depth": 2}, remat).remat_policy == "dots_saveable"


def test_every_unit_starts_as_the_identity_on_its_shortcut():
  """gn3's scale starts at zero: a unit without projection maps its (non-negative) input to itself."""
  unit = resnet.ResidualUnit(16, ("res2", "mid2a", "mid2b", "res2"), groups=4)
  x = jax.nn.relu(jax.random.normal(jax.random.key(2), (2, 4, 4, 64)))
  params = nn.unbox(unit.init(jax.random.key(0), x))["params"]
  assert "conv_proj" not in params and float(np.abs(params["conv1"]["kernel"]).max()) > 0
  y, _ = unit.apply({"params": params}, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(variant="R7"), "unknown ResNet variant 'R7'"),
    (dict(variant="pico", num_groups=3), r"GroupNorm num_groups=3 does not divide the 16 channels of stage 1"),
    (dict(variant="pico", depth="2-1-2"), r"every stage needs at least 2 units"),
    (dict(variant="pico", depth="two"), r"depth='two'; give blocks per stage"),
    (dict(variant="pico", stem="huge"), r"stem='huge'"),
    (dict(width=16), r"ResNet sizes \['depth'\] are not set"),
])
def test_bad_config_is_explained(kwargs, match):
  with pytest.raises(ValueError, match=match):
    resnet.make_config(**kwargs)


@pytest.mark.parametrize("stem,image_size,root_size", [("strided", 32, 16), ("small", 16, 16)])
def test_train_flops_count_every_convolution(stem, image_size, root_size):
  """Against XLA's own count of the forward pass (3x for a training step, 2x for the root conv);
  sizes where the convolutions dominate the norms and the weight standardization."""
  cfg = resnet.make_config("mu", image_size=image_size, channels=1, num_classes=10, stem=stem)
  model = resnet.ResNet(cfg)
  params = jax.eval_shape(model.init, jax.random.key(0), resnet.dummy_input(cfg))
  lowered = jax.jit(model.apply).lower(params, resnet.dummy_input(cfg, batch=4))
  xla = lowered.compile().cost_analysis()
  xla = xla[0] if isinstance(xla, list) else xla
  root = 4 * 2 * root_size ** 2 * 9 * 1 * cfg.width  # batch 4, 3x3 kernel, 1 channel
  convs_fwd = (resnet.train_flops(cfg, 4) + root) / 3  # every conv once
  assert xla["flops"] == pytest.approx(convs_fwd, rel=0.1)  # + norms, relus, standardization


# --- the registry -------------------------------------------------------------------------------------

def test_registry_records_round_trip_and_old_records_are_vits():
  for cfg in (resnet.make_config("pico", image_size=28, channels=1, num_classes=10),
              vit.make_config("mu/4", image_size=28, channels=1, num_classes=10)):
    record = models.to_record(cfg)
    assert models.from_record(record) == cfg
  old = {k: v for k, v in models.to_record(vit.make_config("mu/4")).items() if k != "family"}
  assert models.from_record(old) == vit.make_config("mu/4")
  with pytest.raises(ValueError, match="unknown model family 'cnn'"):
    models.from_config({"family": "cnn", "variant": "x"}, {})


def test_targets_derive_what_they_do_not_name():
  source = resnet.make_config("nano", image_size=28, channels=1, num_classes=10)
  family = models.get("resnet")
  t = [models.target_config(f, source) for f in models.parse_targets("depth=2;width=12;depth=2-3-4,groups=2", family)]
  assert [c.depth for c in t] == [(2, 2, 2), (3, 3, 3), (2, 3, 4)]
  assert [c.width for c in t] == [24, 12, 24] and t[2].num_groups == 2 and t[0].stem == "strided"
  with pytest.raises(ValueError, match=r"unknown resnet field 'heads'"):
    models.parse_targets("heads=2", family)


# --- templates -----------------------------------------------------------------------------------------

TILES = resnet_pretrain.tiles(3, 4)


def conv_oracle(scalers, templates, shape):
  """crop(sum_t kron(S_t, T_t)) over the two channel axes only, by explicit block loops in float64:
  block (i, j) of the kernel is sum_t S[t, 0, 0, i, j] * T[t] (the whole spatial kernel)."""
  n, kh, kw, ti, to = templates.shape
  gi, go = scalers.shape[-2:]
  out = np.zeros((kh, kw, gi * ti, go * to))
  for i in range(gi):
    for j in range(go):
      for t in range(n):
        out[:, :, i * ti:(i + 1) * ti, j * to:(j + 1) * to] += scalers[t, 0, 0, i, j] * templates[t]
  return out[:, :, :shape[-2], :shape[-1]]


@pytest.mark.parametrize("width", [8, 10])  # 10: no channel count is a tile multiple
def test_every_composed_conv_kernel_equals_the_block_oracle(width):
  cfg = resnet.make_config("mu", width=width, num_groups=2, image_size=8, channels=1, num_classes=3)
  gen = generator.WeightGenerator.from_model(resnet.ResNet(cfg), resnet.dummy_input(cfg), tiles=TILES,
                                             num_templates=3)
  rng = np.random.default_rng(0)
  templates = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32), gen.template_shapes())
  scalers = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32), gen.scaler_shapes())
  params = traverse_util.flatten_dict(jax.device_get(jax.jit(gen.materialize)(templates, scalers)))
  flat_t, flat_s = traverse_util.flatten_dict(templates), traverse_util.flatten_dict(scalers)
  kernels = [p for p in params if p[-1] == "kernel" and p[0] != "head"]
  assert len(kernels) == 1 + 3 * (4 + 3)  # root; per stage: unit1 (3 convs + proj), units (3 convs)
  for path in kernels:
    bank = gen.banks[path]
    assert bank.tile[:2] == bank.shape[-4:-2]  # the spatial kernel lives whole in the template
    for l in range(bank.layers or 1):
      s = flat_s[path][l] if bank.layers else flat_s[path]
      want = conv_oracle(np.asarray(s, np.float64), np.asarray(flat_t[path], np.float64), bank.crop)
      got = params[path][l] if bank.layers else params[path]
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=str(path))


# --- baselines on ResNets ------------------------------------------------------------------------------

def test_weight_selection_keeps_first_units_and_evenly_spaced_channels():
  source = resnet.make_config("nano", depth="3-3", image_size=8, channels=1, num_classes=3)  # width 24
  target = resnet.make_config("mu", depth="2-2", width=12, image_size=8, channels=1, num_classes=3)
  src_params = common.to_numpy(randomized(common.own_init(source, 0), seed=5))
  out = weight_selection.select(weight_selection.DenseSource(source, src_params), target)
  idx = lambda n_src, n_tgt: np.arange(n_tgt) * (n_src // n_tgt)  # 24 -> 12: every other channel
  w = src_params["block2"]["units"]["conv2"]["kernel"]  # (2, 3, 3, 48, 48) in the source
  want = w[:1][:, :, :, idx(48, 24)][:, :, :, :, idx(48, 24)]
  np.testing.assert_array_equal(out["block2"]["units"]["conv2"]["kernel"], want)
  want_proj = src_params["block2"]["unit1"]["conv_proj"]["kernel"][:, :, idx(96, 48)][:, :, :, idx(192, 96)]
  np.testing.assert_array_equal(out["block2"]["unit1"]["conv_proj"]["kernel"], want_proj)
  np.testing.assert_array_equal(out["head"]["kernel"], np.zeros((96, 3)))  # re-initialized (zero init)
  with pytest.raises(ValueError, match=r"cannot grow a model: .*stem \(24 > 12\)"):
    weight_selection.select(weight_selection.DenseSource(target, common.own_init(target, 0)), source)


def test_tleg_expands_each_stage_and_mimetic_does_not_apply():
  aux = resnet.make_config("pico", depth="3-3", image_size=8, channels=1, num_classes=3)
  target = resnet.make_config("pico", depth="2-5", image_size=8, channels=1, num_classes=3)
  tree = jax.device_get(jax.jit(lambda k: tleg.initial_tree(aux, k))(jax.random.key(0)))
  tree["B"] = randomized(tree["B"], seed=1)
  out = tleg.expand(tleg.TLEGSource(aux, common.to_numpy(tree)), target)
  for s, depth in enumerate(target.depth, 1):
    a = np.asarray(tree["A"][f"block{s}"]["units"]["conv1"]["kernel"])
    b = np.asarray(tree["B"][f"block{s}"]["units"]["conv1"]["kernel"])
    got = out[f"block{s}"]["units"]["conv1"]["kernel"]
    assert got.shape[0] == depth - 1
    for l in range(depth - 1):  # stack length L = depth - 1 (unit1 is dense)
      np.testing.assert_allclose(got[l], a + (l + 1) / (depth - 1) * b, rtol=1e-6)
  with pytest.raises(ValueError, match=r"TLEG expands depth only: .*stem \(12 vs 16\)"):
    tleg.expand(tleg.TLEGSource(aux, common.to_numpy(tree)), resnet.make_config(
        "pico", depth="3-3", width=12, image_size=8, channels=1, num_classes=3))
  with pytest.raises(ValueError, match="a resnet model has none"):
    inits.get("mimetic")(None, target)


# --- the three programs ------------------------------------------------------------------------------

def unlocked(config):
  return ml_collections.ConfigDict(config.to_dict())


@pytest.fixture(scope="module")
def resnet_runs(learnable_data, tmp_path_factory):
  """pre-train -> init (deeper, and narrower to a width that is not a tile multiple) -> train; a
  few steps each, on the one-stage ``femto`` (a three-stage ResNet's step takes ~13 s to compile
  here, one stage ~4 s; stage transitions are covered by the forward and oracle tests)."""
  root = tmp_path_factory.mktemp("resnet")
  c = learnable_data(unlocked(resnet_pretrain.get_config("runlocal")))
  c.model.variant = "femto"
  c.weit.tiles = resnet_pretrain.tiles(1, 4)
  c.weit.num_templates = 2
  c.batch_size, c.total_steps, c.optim.warmup_steps = 32, 2, 1
  c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 2
  with every_field_read(c):
    pretrain.run(c, str(root / "pretrain"))
  i = unlocked(resnet_init.get_config("runlocal"))
  i.templates = str(root / "pretrain")
  i.targets = "depth=3,width=10,groups=2"  # deeper and narrower: 10 is not a multiple of the tile 4
  i.steps, i.num_examples, i.batch_size, i.optim.warmup_steps, i.log_every = 1, 64, 32, 0, 1
  with every_field_read(i):
    results = init_program.run(i, str(root / "init"))
  t = learnable_data(unlocked(resnet_train.get_config("runlocal")))
  t.init = str(root / "init" / "r3-w10-g2" / "export")
  t.batch_size, t.total_steps, t.optim.warmup_steps = 32, 2, 1
  t.log_every, t.eval_every, t.checkpoint_every = 1, 0, 2
  with every_field_read(t, {"model.*": "config.init unset (an export names its model)"}):
    summary = train.run(t, str(root / "train"))
  return root, results, summary


def test_resnet_pipeline_exports_loads_and_trains(resnet_runs):
  root, results, summary = resnet_runs
  assert sorted(results) == ["r3-w10-g2"]
  for name in results:
    export = str(root / "init" / name / "export")
    meta = exports.read_meta(export)
    cfg = models.from_record(meta["model"])
    assert meta["model"]["family"] == "resnet" and cfg.short_name() == name
    params = exports.load_params(export)
    common.check_tree(jax.device_get(params), cfg, name)
    # The export computes what the template model computes: materialize(compact) -> same params.
    logits = models.build(cfg).apply({"params": params}, jnp.ones((2, 28, 28, 1)))
    assert np.all(np.isfinite(np.asarray(logits)))
  assert summary["final_step"] == 2 and 0.0 <= summary["eval_accuracy"] <= 1.0
  assert os.path.exists(root / "train" / "curves.png")


def test_resnet_templates_refuse_a_vit_target_and_another_family_export(resnet_runs, learnable_data, tmp_path):
  root, _, _ = resnet_runs
  from configs import vit_init, vit_train
  i = unlocked(vit_init.get_config("runlocal"))
  i.templates = str(root / "pretrain")
  with pytest.raises(ValueError, match=r"this init config makes vit models, but the templates .* are of the resnet family"):
    init_program.validate(i, str(tmp_path / "wd"))
  t = learnable_data(unlocked(vit_train.get_config("runlocal")))
  t.init = str(root / "init" / "r3-w10-g2" / "export")
  with pytest.raises(ValueError, match=r"is an export of a resnet model, but this config trains a vit; use "
                                       r"configs/resnet_train.py"):
    train.validate(t, str(tmp_path / "wd"))
  assert not os.path.exists(tmp_path / "wd")
