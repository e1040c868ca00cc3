"""The weight generator: shapes for any depth/width, other annotated models, gradients, sharding."""
import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from helpers import numpy_materialize
from weit_jax import generator as G
from weit_jax import sharding
from weit_jax.models import vit

TILES = dict(embed=16, mlp=16, heads=1, kv=8)


def vit_generator(tiles=TILES, n=3, whole=None, **sizes):
  cfg = vit.make_config(**{**dict(image_size=28, channels=1, num_classes=10, patch_size=7), **sizes})
  model = vit.ViT(cfg)
  return model, cfg, G.WeightGenerator.from_model(model, vit.dummy_input(cfg), tiles=tiles, num_templates=n,
                                                  whole=whole)


def random_state(gen, seed):
  rng = np.random.default_rng(seed)
  draw = lambda tree: jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), tree)
  return draw(gen.template_shapes()), draw(gen.scaler_shapes())


@pytest.mark.parametrize("sizes", [
    dict(depth=1, width=64, num_heads=2, mlp_dim=128),   # tile multiples
    dict(depth=3, width=40, num_heads=5, mlp_dim=100),   # neither width nor mlp a tile multiple
    dict(depth=12, width=48, num_heads=3, mlp_dim=72),
])
def test_materialized_shapes_equal_model_init(sizes):
  model, cfg, gen = vit_generator(**sizes)
  t, s = random_state(gen, 0)
  params = jax.jit(gen.materialize)(t, s)
  own = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), vit.dummy_input(cfg)))["params"]
  chex.assert_trees_all_equal_shapes(params, own)
  for path, tmpl in traverse_util.flatten_dict(t).items():
    bank = gen.banks[path]
    assert tmpl.shape[1:] == bank.tile, path
    if bank.layers:  # shared by every layer: no layers axis on templates, one on scalers
      assert bank.layers == cfg.depth and tmpl.ndim == len(bank.shape)
      assert traverse_util.flatten_dict(s)[path].shape[0] == cfg.depth
  # Values against the numpy oracle.
  flat_t, flat_s, flat_p = (traverse_util.flatten_dict(x) for x in (t, s, params))
  for path, bank in gen.banks.items():
    want = numpy_materialize(bank, np.asarray(flat_t[path], np.float64), np.asarray(flat_s[path], np.float64))
    np.testing.assert_allclose(np.asarray(flat_p[path]), want, rtol=1e-4, atol=1e-4, err_msg=str(path))
  logits = model.apply({"params": params}, jnp.ones((2, 28, 28, 1)))
  chex.assert_shape(logits, (2, 10))


def test_gradients_match_finite_differences():
  _, cfg, gen = vit_generator(depth=2, width=24, num_heads=2, mlp_dim=40, tiles=dict(embed=8, mlp=16, heads=1, kv=4), n=2)
  with jax.enable_x64(True):
    t, s = random_state(gen, 1)
    t, s = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), (t, s))
    rng = np.random.default_rng(2)
    probe = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape)), gen.param_shapes())

    def loss(t, s):  # a nonlinear scalar of every materialized weight
      p = gen.materialize(t, s)
      return sum(jnp.sum(jnp.sin(w) * c) for w, c in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(probe)))

    gt, gs = jax.jit(jax.grad(loss, argnums=(0, 1)))(t, s)
    f = jax.jit(loss)
    for which, tree, grads in (("templates", t, gt), ("scalers", s, gs)):
      direction = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape)), tree)
      eps = 1e-5
      shift = lambda sign: jax.tree_util.tree_map(lambda x, d: x + sign * eps * d, tree, direction)
      if which == "templates":
        fd = (f(shift(1), s) - f(shift(-1), s)) / (2 * eps)
      else:
        fd = (f(t, shift(1)) - f(t, shift(-1))) / (2 * eps)
      analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(direction)))
      np.testing.assert_allclose(float(analytic), float(fd), rtol=1e-6, err_msg=which)


class AnnotatedMLP(nn.Module):
  """A policy-style MLP: two hidden layers, logical axes on every parameter."""
  @nn.compact
  def __call__(self, x):
    for i, width in enumerate((50, 30)):
      x = nn.tanh(nn.Dense(width, name=f"dense_{i}",
                           kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed" if i == 0 else "hidden", "hidden")),
                           bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("hidden",)))(x))
    return nn.Dense(4, name="out", kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("hidden", "actions")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("actions",)))(x)


class AnnotatedCNN(nn.Module):
  """Channel axes are width axes; the 3x3 spatial kernel lives whole in the template."""
  @nn.compact
  def __call__(self, x):
    for i, ch in enumerate((12, 20)):
      x = nn.relu(nn.Conv(ch, (3, 3), name=f"conv_{i}",
                          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("kh", "kw", "in_ch", "out_ch")),
                          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("out_ch",)))(x))
    return x.mean((1, 2))


@pytest.mark.parametrize("model,x,tiles", [
    (AnnotatedMLP(), jnp.ones((2, 17)), dict(hidden=8, embed=4)),
    (AnnotatedCNN(), jnp.ones((2, 9, 9, 3)), dict(in_ch=3, out_ch=8)),
])
def test_other_annotated_models(model, x, tiles):
  gen = G.WeightGenerator.from_model(model, x, tiles=tiles, num_templates=2)
  t, s = random_state(gen, 3)
  params = gen.materialize(t, s)
  own = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x))["params"]
  chex.assert_trees_all_equal_shapes(params, own)
  flat_t, flat_s, flat_p = (traverse_util.flatten_dict(v) for v in (t, s, params))
  for path, bank in gen.banks.items():
    want = numpy_materialize(bank, np.asarray(flat_t[path]), np.asarray(flat_s[path]))
    np.testing.assert_allclose(np.asarray(flat_p[path]), want, rtol=1e-5, atol=1e-5)
  if isinstance(model, AnnotatedCNN):  # spatial axes stay whole in the template
    assert gen.banks[("conv_1", "kernel")].tile == (3, 3, 3, 8)
    assert gen.banks[("conv_1", "kernel")].grid == (1, 1, 4, 3)
  assert model.apply({"params": params}, x).shape[0] == 2


@pytest.mark.parametrize("zero_init", ["ones", "noise"])
def test_init_matches_model_scale_and_constants(zero_init):
  model, cfg, gen = vit_generator(depth=2, width=64, num_heads=2, mlp_dim=128, n=4)
  stats = G.param_stats(model, vit.dummy_input(cfg))
  t, s = gen.init(jax.random.key(0), stats, zero_init=zero_init)
  params = traverse_util.flatten_dict(gen.materialize(t, s))
  flat_stats, flat_t = traverse_util.flatten_dict(stats), traverse_util.flatten_dict(t)
  zeros = 0
  for path, w in params.items():
    mean, std = flat_stats[path]
    if std == 0:  # LayerNorm scales, zero biases, the zero head: exactly the model's constant
      np.testing.assert_array_equal(np.asarray(w), np.full(w.shape, mean, np.float32))
      first = np.asarray(flat_t[path][0])
      if mean == 0 and zero_init == "noise":  # every template noise (unit scale), none all-ones
        zeros += 1
        assert 0.5 < float(np.std(np.asarray(flat_t[path]))) < 1.5 and not np.all(first == 1.0), path
      else:
        np.testing.assert_array_equal(first, np.ones_like(first))
    elif w.size > 1000:
      assert 0.7 * std < float(jnp.std(w)) < 1.3 * std, (path, float(jnp.std(w)), std)
  assert zeros > 0 or zero_init == "ones"  # the head and the biases are zero-initialized
  with pytest.raises(ValueError, match="weit.zero_init='zeros'"):
    gen.init(jax.random.key(0), stats, zero_init="zeros")


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_param_stats_equal_numpy_statistics_of_the_models_own_init(family):
  from weit_jax import models
  from weit_jax.models import resnet
  cfg = (vit.make_config("mu/4", image_size=28, channels=1, num_classes=10) if family == "vit"
         else resnet.make_config("femto", image_size=16, channels=1, num_classes=10))
  model = models.build(cfg)
  stats = traverse_util.flatten_dict(G.param_stats(model, *models.dummy_inputs(cfg), key=jax.random.key(3)))
  params = traverse_util.flatten_dict(models.init_params(cfg, 3))
  assert stats.keys() == params.keys()
  for path, w in params.items():
    w = np.asarray(w, np.float64)
    np.testing.assert_allclose(stats[path], [w.mean(), w.std()], rtol=1e-4, atol=1e-6, err_msg=str(path))
    if w.std() == 0:
      assert stats[path][1] == 0.0, path  # constants stay exactly constant (init() relies on it)


def test_counts():
  _, _, gen = vit_generator(depth=3, width=40, num_heads=5, mlp_dim=100)
  c = gen.counts()
  assert c["materialized"] == sum(math.prod(b.shape) for b in gen.banks.values())
  bank = gen.banks[("Transformer", "encoderblock", "MlpBlock_0", "Dense_0", "kernel")]
  assert bank.grid == (3, 7) and bank.tile == (16, 16)  # ceil(40/16), ceil(100/16)
  assert c["templates"] == sum(math.prod(b.template_shape) for b in gen.banks.values())
  assert c["scalers"] == sum(math.prod(b.scaler_shape) for b in gen.banks.values())


def test_materialize_sharded_on_eight_devices():
  _, _, gen = vit_generator(depth=2, width=64, num_heads=4, mlp_dim=128)
  t, s = random_state(gen, 4)
  single = jax.jit(gen.materialize)(t, s)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "model": 2})
  out_shardings = sharding.shardings(gen.param_shapes(), gen.param_axes(), mesh)
  t_shard = sharding.shardings(gen.template_shapes(), gen.template_axes(), mesh)
  t = jax.device_put(t, t_shard)
  sharded = jax.jit(gen.materialize, out_shardings=out_shardings)(t, s)
  kernel = sharded["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]  # (layers, embed, mlp)
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "model")
  assert {sh.data.shape for sh in kernel.addressable_shards} == {(2, 16, 64)}
  query = sharded["Transformer"]["encoderblock"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
  assert {sh.data.shape for sh in query.addressable_shards} == {(2, 16, 2, 16)}
  templ = t["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]  # (N, 16, 16): tiles sharded
  assert {sh.data.shape for sh in templ.addressable_shards} == {(3, 4, 8)}
  chex.assert_trees_all_close(jax.device_get(sharded), jax.device_get(single), rtol=1e-6, atol=1e-6)
  local = jax.jit(functools.partial(gen.materialize, shardings=out_shardings), out_shardings=out_shardings)(t, s)
  chex.assert_trees_all_close(jax.device_get(local), jax.device_get(single), rtol=1e-6, atol=1e-6)



def test_sharding_falls_back_to_a_dimension_that_divides():
  """Width 12 does not split over fsdp=8: the MLP dimension (48) takes fsdp instead of every device
  holding the whole weight; the values are the numpy oracle's."""
  _, _, gen = vit_generator(tiles=dict(embed=4, mlp=16, heads=1), depth=2, width=12, num_heads=2, mlp_dim=48)
  t, s = random_state(gen, 6)
  mesh = sharding.make_mesh({"fsdp": 8})
  out_sh = sharding.shardings(gen.param_shapes(), gen.param_axes(), mesh)
  t_sh = sharding.shardings(gen.template_shapes(), gen.template_axes(), mesh)
  mlp = ("Transformer", "encoderblock", "MlpBlock_0")
  flat_sh, flat_tsh = traverse_util.flatten_dict(out_sh), traverse_util.flatten_dict(t_sh)
  assert flat_sh[mlp + ("Dense_0", "kernel")].spec == P(None, None, "fsdp")  # (layers, embed 12, mlp 48)
  assert flat_sh[mlp + ("Dense_1", "kernel")].spec == P(None, "fsdp", None)  # (layers, mlp 48, embed 12)
  assert flat_tsh[mlp + ("Dense_0", "kernel")].spec == P(None, None, "fsdp")  # tiles (N, 4, 16)
  # Nothing of 'layers' (2), 'heads' (2) or 'kv' (6) divides 8, and 'layers', 'kv' are never split.
  assert flat_sh[("Transformer", "encoderblock", "MultiHeadDotProductAttention_0", "query", "kernel")].spec == P(
      None, None, None, None)
  t = jax.device_put(t, t_sh)
  fn = jax.jit(functools.partial(gen.materialize, shardings=out_sh), out_shardings=out_sh)
  params = fn(t, s)
  kernel = traverse_util.flatten_dict(params)[mlp + ("Dense_0", "kernel")]
  assert len(kernel.sharding.device_set) == 8
  assert {sh.data.shape for sh in kernel.addressable_shards} == {(2, 12, 6)}
  got = traverse_util.flatten_dict(jax.device_get(params))
  flat_t, flat_s = traverse_util.flatten_dict(jax.device_get(t)), traverse_util.flatten_dict(s)
  for path, bank in gen.banks.items():
    want = numpy_materialize(bank, np.asarray(flat_t[path], np.float64), np.asarray(flat_s[path], np.float64))
    np.testing.assert_allclose(got[path], want, rtol=1e-5, atol=1e-5, err_msg="/".join(path))


def test_weights_left_whole_are_named_with_a_mesh_that_splits_them():
  """ViT-G/14's case in small: width 12 and 2 heads leave the attention kernels (2, 12, 2, 6) whole
  on fsdp=8 (no dimension divides 8). Oracle: the shard shapes of jax's own shardings on the 8
  devices, over every fsdp x model mesh; the advice names the first (most fsdp) mesh that splits
  every weight with more than ``min_size`` elements per device."""
  _, _, gen = vit_generator(tiles=dict(embed=4, mlp=16, heads=1), depth=2, width=12, num_heads=2, mlp_dim=48)
  shapes, axes, min_size = gen.param_shapes(), gen.param_axes(), 150

  def oracle(mesh_shape):  # path -> ways, for the weights split fewer than 8 ways with >= min_size per device
    mesh = sharding.make_mesh(mesh_shape)
    out = {}
    for path, (sh, leaf) in zip(traverse_util.flatten_dict(shapes), zip(
        jax.tree_util.tree_leaves(sharding.shardings(shapes, axes, mesh)), jax.tree_util.tree_leaves(shapes))):
      ways = math.prod(leaf.shape) // math.prod(sh.shard_shape(leaf.shape))
      if ways < 8 and math.prod(leaf.shape) / ways >= min_size:
        out["/".join(path)] = ways
    return out

  meshes = [dict(data=1, fsdp=8 // m, model=m) for m in (1, 2, 4, 8)]
  for mesh_shape in meshes:
    got = sharding.unsplit_weights(shapes, axes, mesh_shape, min_size=min_size)
    assert {p: w for p, _, w in got} == oracle(mesh_shape), mesh_shape
  whole = oracle(meshes[0])
  assert whole["Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"] == 1
  want = next(m for m in meshes if not oracle(m))
  assert want == dict(data=1, fsdp=4, model=2)  # width 12 over 4, heads 2 over 2
  assert sharding.mesh_splitting_every_weight(shapes, axes, 8, min_size=min_size) == want
  assert sharding.split_advice(shapes, axes, sharding.make_mesh(meshes[0])) is None  # 2^22 elements by default
  assert sharding.split_advice(shapes, axes, sharding.make_mesh(want), min_size=min_size) is None
  advice = sharding.split_advice(shapes, axes, sharding.make_mesh(meshes[0]), min_size=min_size)
  assert f"{len(whole)} weights are not split over all 8 devices" in advice
  assert "query/kernel (2, 12, 2, 6) (1 of 8 ways)" in advice
  assert "--config.mesh.fsdp=4 --config.mesh.model=2" in advice


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 8}, {"fsdp": 4, "model": 2}])
def test_sharding_of_dimensions_that_divide_is_the_rules(mesh_shape):
  """Where every named dimension divides its mesh axes, each spec is the rules' own mapping (flax's
  ``logical_to_mesh_axes``, axes of size 1 left out): the fallback changes nothing."""
  _, _, gen = vit_generator(depth=2, width=64, num_heads=4, mlp_dim=128)
  mesh = sharding.make_mesh(mesh_shape)
  out_sh = traverse_util.flatten_dict(sharding.shardings(gen.param_shapes(), gen.param_axes(), mesh))
  for path, bank in gen.banks.items():
    rules = nn.logical_to_mesh_axes(bank.axes, sharding.DEFAULT_RULES)
    want = [a if a is not None and mesh.shape[a] > 1 else None for a in tuple(rules) + (None,) * len(bank.shape)]
    assert all(n % mesh.shape[a] == 0 for n, a in zip(bank.shape, want) if a), path  # all divide
    assert out_sh[path].spec == P(*want[:len(bank.shape)]), path
  kernel = out_sh[("Transformer", "encoderblock", "MlpBlock_0", "Dense_0", "kernel")].spec
  assert kernel == (P(None, "fsdp", None) if "model" not in mesh_shape else P(None, "fsdp", "model"))

def resnet_generator(width):
  from weit_jax.models import resnet
  cfg = resnet.make_config("pico", image_size=28, channels=1, num_classes=10, width=width)
  model = resnet.ResNet(cfg)
  tiles = {name: 4 for name in ["stem"] + [f"{k}{s}" for s in (1, 2, 3) for k in ("mid", "res")]}
  tiles = {k + ("a" if k.startswith("mid") else ""): v for k, v in tiles.items()}
  tiles.update({k[:-1] + "b": 4 for k in tiles if k.startswith("mid")})
  return G.WeightGenerator.from_model(model, resnet.dummy_input(cfg), tiles=tiles, num_templates=3)


VIT_W120 = lambda: vit_generator(depth=4, width=120, num_heads=4, mlp_dim=480)[2]  # 15 embed entries per device: not whole tiles of 16
VIT_W256 = lambda: vit_generator(depth=4, width=256, num_heads=4, mlp_dim=1024)[2]  # whole tiles per device


@pytest.mark.parametrize("make,mesh_shape", [
    (VIT_W120, {"fsdp": 8}), (VIT_W120, {"fsdp": 4, "model": 2}),  # two split axes (embed; mlp and heads)
    (VIT_W256, {"fsdp": 8}), (VIT_W256, {"fsdp": 4, "model": 2}),
    (lambda: resnet_generator(width=32), {"fsdp": 8}),  # a CNN: its channel axes split over fsdp
], ids=["vit-w120-fsdp", "vit-w120-fsdp-model", "vit-w256-fsdp", "vit-w256-fsdp-model", "resnet-w32-fsdp"])
def test_materialize_computes_only_each_devices_shard(make, mesh_shape):
  """With the parameters' shardings, the compiled materialize (the init program's export step) needs
  per device at most one shard of temporaries (the CPU compiler reports its buffer assignment as
  the TPU one does), and composes the numpy.kron oracle's values."""
  gen = make()
  t, s = random_state(gen, 5)
  mesh = sharding.make_mesh(mesh_shape)
  out_sh = sharding.shardings(gen.param_shapes(), gen.param_axes(), mesh)
  t = jax.device_put(t, sharding.shardings(gen.template_shapes(), gen.template_axes(), mesh))
  fn = jax.jit(functools.partial(gen.materialize, shardings=out_sh), out_shardings=out_sh)
  memory = fn.lower(t, s).compile().memory_analysis()
  shard = sum(4 * math.prod(sh.shard_shape(p.shape)) for sh, p in zip(
      jax.tree_util.tree_leaves(out_sh), jax.tree_util.tree_leaves(gen.param_shapes())))
  assert shard < 0.3 * 4 * gen.counts()["materialized"]  # the shardings split the model
  assert shard <= memory.output_size_in_bytes < shard + 2048  # plus the output tuple's table
  assert memory.temp_size_in_bytes <= shard
  got = traverse_util.flatten_dict(jax.device_get(fn(t, s)))
  flat_t, flat_s = traverse_util.flatten_dict(jax.device_get(t)), traverse_util.flatten_dict(s)
  for path, bank in gen.banks.items():
    want = numpy_materialize(bank, np.asarray(flat_t[path], np.float64), np.asarray(flat_s[path], np.float64))
    np.testing.assert_allclose(got[path], want, rtol=1e-5, atol=1e-5, err_msg="/".join(path))



def test_materialize_composes_one_layer_at_a_time():
  """Under shardings the scanned blocks' weights are composed layer by layer into the output, so the
  temporaries do not grow with depth (all layers at once they were 0.5-0.7 shards here, and 1.4-2.4
  shards with the TPU's tile padding on small slices: docs/scale.md)."""
  gen = vit_generator(depth=8, width=256, num_heads=4, mlp_dim=1024)[2]
  t, s = random_state(gen, 7)
  mesh = sharding.make_mesh({"fsdp": 8})
  out_sh = sharding.shardings(gen.param_shapes(), gen.param_axes(), mesh)
  fn = jax.jit(functools.partial(gen.materialize, shardings=out_sh), out_shardings=out_sh)
  memory = fn.lower(t, s).compile().memory_analysis()
  shard = sum(4 * math.prod(sh.shard_shape(p.shape)) for sh, p in zip(
      jax.tree_util.tree_leaves(out_sh), jax.tree_util.tree_leaves(gen.param_shapes())))
  assert memory.temp_size_in_bytes < 0.2 * shard, (memory.temp_size_in_bytes, shard)

@pytest.mark.parametrize("kwargs,match", [
    (dict(tiles=dict(embed=128)), r"tile 128 for axis 'embed' is larger than that axis .* \(size 64\)"),
    (dict(tiles=dict(embd=16)), r"tile axis 'embd' is not a logical axis of this model; its axes are \["),
    (dict(n=0), "num_templates=0 must be at least 1"),
])
def test_bad_generator_config_is_explained(kwargs, match):
  with pytest.raises(ValueError, match=match):
    vit_generator(depth=1, width=64, num_heads=2, mlp_dim=128, **kwargs)


def test_check_templates_refuses_other_family():
  _, _, gen = vit_generator(depth=1, width=64, num_heads=2, mlp_dim=128)
  _, _, other = vit_generator(depth=1, width=64, num_heads=2, mlp_dim=128, patch_size=4)
  t, _ = random_state(other, 5)
  with pytest.raises(ValueError, match=r"template bank embedding/kernel has tile shape \(4, 4, 1, 16\), but this model needs \(7, 7, 1, 16\)"):
    gen.check_templates(t)


# --- parameters kept out of templates (weit.untemplated) ------------------------------------------

UNTEMPLATED = r"^(embedding|head|pos_embedding|cls)/?"


@pytest.mark.parametrize("target", [dict(width=40, num_heads=5, mlp_dim=100),  # narrower: cropped
                                    dict(width=96, num_heads=3, mlp_dim=144)])  # wider: tiled copies
def test_untemplated_parameters_crop_or_tile_the_auxiliary_ones(target):
  _, _, aux = vit_generator(depth=2, width=64, num_heads=2, mlp_dim=128)
  whole = aux.whole_banks(UNTEMPLATED)
  assert set("/".join(p) for p in whole) == {"embedding/kernel", "embedding/bias", "head/kernel", "head/bias",
                                              "pos_embedding", "cls"}
  _, _, aux = vit_generator(depth=2, width=64, num_heads=2, mlp_dim=128, whole=whole)
  _, _, tgt = vit_generator(depth=3, whole=aux.whole_shapes(), **target)
  t, _ = random_state(aux, 3)
  tgt.check_templates(t)  # the auxiliary's templates feed the other size
  _, s = random_state(tgt, 4)
  params = traverse_util.flatten_dict(jax.jit(tgt.materialize)(t, s))
  flat_t, flat_s = traverse_util.flatten_dict(t), traverse_util.flatten_dict(s)
  for path in whole:
    bank, w_aux = tgt.banks[path], np.asarray(flat_t[path][0], np.float64)  # N = 1: the whole parameter
    assert bank.whole and bank.num_templates == 1 and bank.tile == aux.banks[path].shape
    sc = np.asarray(flat_s[path][0], np.float64)
    # Oracle: the grid of scaled copies of the auxiliary's parameter, written out block by block.
    full = np.zeros([g * w for g, w in zip(bank.grid, bank.tile)])
    for idx in np.ndindex(*bank.grid):
      full[tuple(slice(i * w, (i + 1) * w) for i, w in zip(idx, bank.tile))] = sc[idx] * w_aux
    want = full[tuple(slice(0, n) for n in bank.shape)]
    np.testing.assert_allclose(np.asarray(params[path]), want, rtol=1e-5, atol=1e-6, err_msg=str(path))
  # The others are still composed from shared templates.
  assert not tgt.banks[("Transformer", "encoderblock", "MlpBlock_0", "Dense_0", "kernel")].whole


@pytest.mark.parametrize("zero_init", ["ones", "plain"])
def test_zero_initialized_head_kept_out_of_templates_trains_only_when_plain(zero_init):
  """A zero head kept whole: with 'ones' (T = 1, S = 0) its scaler's gradient is the sum of dL/dW,
  which a softmax makes zero (closed form: the logits' gradients sum to zero over classes), and its
  template's is S dL/dW = 0; with 'plain' (T = 0, S = 1) the template's gradient is the dense
  model's own dL/dW (oracle: the gradient through model.apply with the materialized parameters)."""
  model, cfg, gen = vit_generator(depth=2, width=32, num_heads=2, mlp_dim=64)
  whole = gen.whole_banks("^head/")
  _, cfg, gen = vit_generator(depth=2, width=32, num_heads=2, mlp_dim=64, whole=whole)
  stats = G.param_stats(model, vit.dummy_input(cfg))
  t, s = gen.init(jax.random.key(1), stats, zero_init=zero_init)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(6, 28, 28, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=6))

  def loss_of_params(params):
    logits = model.apply({"params": params}, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

  params = gen.materialize(t, s)
  np.testing.assert_array_equal(np.asarray(params["head"]["kernel"]), 0.0)  # exactly the model's zero head
  # Jitted: one compilation each instead of hundreds of op-by-op dispatches over 8 devices.
  g_t, g_s = jax.jit(jax.grad(lambda t, s: loss_of_params(gen.materialize(t, s)), argnums=(0, 1)))(t, s)
  dense = np.asarray(jax.jit(jax.grad(loss_of_params))(params)["head"]["kernel"])
  assert np.abs(dense).max() > 1e-3  # the head does get a gradient in the dense model
  head_t, head_s = np.asarray(g_t["head"]["kernel"][0]), np.asarray(g_s["head"]["kernel"])
  if zero_init == "ones":
    np.testing.assert_allclose(head_s, dense.sum(), atol=1e-6)
    np.testing.assert_allclose(head_s, 0.0, atol=1e-6)
    np.testing.assert_array_equal(head_t, 0.0)
  else:
    np.testing.assert_allclose(head_t, dense, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(t["head"]["kernel"]), 0.0)
    np.testing.assert_array_equal(np.asarray(s["head"]["kernel"]), 1.0)
  # Templated zero banks (LayerNorm biases, ...) are 'ones' either way.
  flat_t, flat_stats = traverse_util.flatten_dict(t), traverse_util.flatten_dict(stats)
  templated_zeros = [p for p, b in gen.banks.items() if not b.whole and tuple(flat_stats[p]) == (0.0, 0.0)]
  assert templated_zeros
  for path in templated_zeros:
    first = np.asarray(flat_t[path][0])
    np.testing.assert_array_equal(first, np.ones_like(first), err_msg=str(path))


def test_untemplated_pattern_refusals():
  _, _, gen = vit_generator(depth=2, width=64, num_heads=2, mlp_dim=128)
  with pytest.raises(ValueError, match="scanned blocks"):
    gen.whole_banks("MlpBlock")
  with pytest.raises(ValueError, match="matches no parameter"):
    gen.whole_banks("^nothing_like_this$")
  with pytest.raises(ValueError, match="not a regular expression"):
    gen.whole_banks("head(")
  # Another number of classes: a fixed axis differs from the auxiliary's whole parameter.
  whole = gen.whole_banks("^head/")
  with pytest.raises(ValueError, match="only width axes"):
    vit_generator(depth=2, width=64, num_heads=2, mlp_dim=128, num_classes=7, whole=whole)
