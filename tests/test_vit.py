"""The plain ViT: shapes and names, and its forward pass against a second implementation."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from helpers import big_vision_tree, posemb_sincos_2d, randomized
from weit_jax.models import vit


def reference_forward(params, images, cfg):
  """big_vision's ``vit._Model.__call__`` in numpy (einsum attention), written from its equations,
  independently of the Flax module: the position embedding is added to the patch tokens before
  the class token is prepended (``tok``); the head reads token 0 (``tok``) or the mean (``gap``)."""
  p = traverse_util.flatten_dict(jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params), sep="/")
  x = np.asarray(images, np.float64)
  n, hh, ww, c = x.shape
  ps = cfg.patch_size
  patches = x.reshape(n, hh // ps, ps, ww // ps, ps, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, -1, ps * ps * c)
  tok = patches @ p["embedding/kernel"].reshape(-1, cfg.width) + p["embedding/bias"]
  pos = p["pos_embedding"] if cfg.posemb == "learn" else posemb_sincos_2d(hh // ps, ww // ps, cfg.width)
  cls = lambda: np.broadcast_to(p["cls"], (n, 1, cfg.width))
  tok = tok + pos
  if cfg.pool_type == "tok":
    tok = np.concatenate([cls(), tok], 1)

  def ln(v, scale, bias):
    mu = v.mean(-1, keepdims=True)
    var = ((v - mu) ** 2).mean(-1, keepdims=True)
    return (v - mu) / np.sqrt(var + 1e-6) * scale + bias

  def gelu(v):  # tanh approximation, as flax's nn.gelu default (big_vision's MlpBlock calls it)
    return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))

  blk = "Transformer/encoderblock/"
  for l in range(cfg.depth):
    g = lambda name: p[blk + name][l]
    y = ln(tok, g("LayerNorm_0/scale"), g("LayerNorm_0/bias"))
    att = "MultiHeadDotProductAttention_0/"
    q = np.einsum("btd,dhk->bthk", y, g(att + "query/kernel")) + g(att + "query/bias")
    k = np.einsum("btd,dhk->bthk", y, g(att + "key/kernel")) + g(att + "key/bias")
    v = np.einsum("btd,dhk->bthk", y, g(att + "value/kernel")) + g(att + "value/bias")
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(cfg.head_dim)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bhqs,bshk->bqhk", w, v)
    tok = tok + np.einsum("bqhk,hkd->bqd", o, g(att + "out/kernel")) + g(att + "out/bias")
    y = ln(tok, g("LayerNorm_1/scale"), g("LayerNorm_1/bias"))
    y = gelu(y @ g("MlpBlock_0/Dense_0/kernel") + g("MlpBlock_0/Dense_0/bias"))
    tok = tok + y @ g("MlpBlock_0/Dense_1/kernel") + g("MlpBlock_0/Dense_1/bias")
  tok = ln(tok, p["Transformer/encoder_norm/scale"], p["Transformer/encoder_norm/bias"])
  pooled = tok[:, 0] if cfg.pool_type == "tok" else tok.mean(axis=1)
  return pooled @ p["head/kernel"] + p["head/bias"]


OPTIONS = [dict(pool_type=pool, posemb=posemb) for pool in ("tok", "gap") for posemb in ("learn", "sincos2d")]


@pytest.mark.parametrize("overrides", [dict(variant="mu/4"), dict(variant="pico/7", depth=2, width=48, num_heads=3)]
                         + [dict(variant="mu/7", **o) for o in OPTIONS[1:]])
def test_forward_matches_reference(overrides):
  cfg = vit.make_config(image_size=28, channels=2, num_classes=5, **overrides)
  model = vit.ViT(cfg)
  images = jax.random.normal(jax.random.key(1), (3, 28, 28, 2))
  params = randomized(nn.unbox(jax.jit(model.init)(jax.random.key(0), images))["params"], seed=2)
  got = jax.jit(model.apply)({"params": params}, images)
  want = reference_forward(params, images, cfg)
  chex.assert_shape(got, (3, 5))
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


def test_big_vision_names_and_shapes():
  cfg = vit.make_config("B/16")
  abstract = jax.eval_shape(vit.ViT(cfg).init, jax.random.key(0), vit.dummy_input(cfg))
  flat = traverse_util.flatten_dict(nn.unbox(abstract)["params"], sep="/")
  flat = {k: v.shape for k, v in flat.items()}
  assert flat["embedding/kernel"] == (16, 16, 3, 768)
  assert flat["pos_embedding"] == (1, 196, 768)  # patches only, as big_vision
  assert flat["cls"] == (1, 1, 768)
  assert flat["Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"] == (12, 768, 12, 64)
  assert flat["Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"] == (12, 768, 3072)
  assert flat["Transformer/encoder_norm/scale"] == (768,)
  assert flat["head/kernel"] == (768, 1000)
  total = sum(int(np.prod(v)) for v in flat.values())
  assert total == 86_566_888  # big_vision's ViT-B/16 with a 1000-class head (the class token has no position embedding)


@pytest.mark.parametrize("options", OPTIONS)
def test_parameter_tree_is_big_visions(options):
  cfg = vit.make_config("mu/4", image_size=12, channels=3, num_classes=5, **options)
  abstract = jax.eval_shape(vit.ViT(cfg).init, jax.random.key(0), vit.dummy_input(cfg))
  flat = traverse_util.flatten_dict(nn.unbox(abstract)["params"], sep="/")
  assert {k: v.shape for k, v in flat.items()} == big_vision_tree(cfg)


def test_sincos_table_is_big_visions():
  np.testing.assert_allclose(np.asarray(vit.posemb_sincos_2d(3, 4, 16)), posemb_sincos_2d(3, 4, 16), atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(variant="Q/16"), "unknown ViT variant .Q/16."),
    (dict(variant="23B/14"), "unknown ViT variant .23B/14.*22B"),
    (dict(variant="S/16", num_heads=7), "num_heads=7 does not divide width=384"),
    (dict(variant="S/16", patch_size=15), "patch_size=15 does not divide image_size=224"),
    (dict(width=64, depth=2), r"ViT sizes \['mlp_dim', 'num_heads', 'patch_size'\] are not set"),
    (dict(variant="S/16", depth=0), "depth=0 must be a positive integer"),
    (dict(variant="S/16", pool_type="map"), r"pool_type='map'; use one of \('tok', 'gap'\)"),
    (dict(variant="S/16", posemb="sincos"), r"posemb='sincos'; use one of \('learn', 'sincos2d'\)"),
    (dict(variant="mu/4", width=30, posemb="sincos2d"), r"sincos2d' needs a width that is a multiple of 4"),
])
def test_bad_config_is_explained(kwargs, match):
  with pytest.raises(ValueError, match=match):
    vit.make_config(**kwargs)


def closed_form_count(cfg) -> int:
  """Parameters of big_vision's ViT (tok, learn) from its equations: patch embedding, position
  embedding, class token, per block two LayerNorms, q/k/v/out with biases and the MLP, final norm, head."""
  w, m = cfg.width, cfg.mlp_dim
  block = 2 * 2 * w + 4 * (w * w + w) + 2 * w * m + m + w
  return (cfg.patch_size ** 2 * cfg.channels * w + w + cfg.num_patches * w + w + cfg.depth * block + 2 * w
          + w * cfg.num_classes + cfg.num_classes)


@pytest.mark.parametrize("variant,published", [
    ("B/16", 86.6e6), ("H/14", 632e6),
    ("g/14", 1011e6), ("G/14", 1843e6),  # "Scaling Vision Transformers", table 2
    ("e/14", 3.9e9),  # PaLI's ViT-e
    ("22B/14", 21.7e9),  # ViT-22B's shape (its parallel blocks, QK norm and missing biases differ slightly)
])
def test_giant_variants_have_the_published_shapes(variant, published):
  cfg = vit.make_config(variant)
  abstract = jax.eval_shape(vit.ViT(cfg).init, jax.random.key(0), vit.dummy_input(cfg))
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.unbox(abstract)["params"]))
  assert count == closed_form_count(cfg)
  assert abs(count - published) < 0.03 * published


def test_remat_policies_change_memory_not_values():
  """The same loss and gradients under every policy; the backward pass keeps fewer activations."""
  import dataclasses
  base = vit.make_config("mu/4", image_size=28, channels=1, num_classes=5, depth=3)
  images = jax.random.normal(jax.random.key(1), (128, 28, 28, 1))
  params = randomized(nn.unbox(jax.jit(vit.ViT(base).init)(jax.random.key(0), images[:1]))["params"], seed=3)

  def compiled(policy):
    cfg = dataclasses.replace(base, remat_policy=policy)
    loss = lambda p: jnp.sum(jnp.tanh(vit.ViT(cfg).apply({"params": p}, images)))
    return jax.jit(jax.value_and_grad(loss)).lower(params).compile()

  plain = compiled("none")
  want, plain_temp = plain(params), plain.memory_analysis().temp_size_in_bytes
  for policy in ("nothing_saveable", "dots_with_no_batch_dims_saveable"):  # dots_saveable: the docs' dry runs
    remat = compiled(policy)
    chex.assert_trees_all_close(remat(params), want, rtol=1e-5, atol=1e-6)
    assert remat.memory_analysis().temp_size_in_bytes < 0.8 * plain_temp, policy
  with pytest.raises(ValueError, match=r"remat_policy='everything'; use one of \('none', 'nothing_saveable'"):
    vit.make_config("mu/4", remat_policy="everything")
