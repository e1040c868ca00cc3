"""The plain ViT: shapes and names, and its forward pass against a second implementation."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from weit_jax.models import vit


def reference_forward(params, images, cfg):
  """A straightforward numpy ViT (einsum attention), written independently of the Flax module."""
  p = traverse_util.flatten_dict(jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params), sep="/")
  x = np.asarray(images, np.float64)
  n, hh, ww, c = x.shape
  ps = cfg.patch_size
  patches = x.reshape(n, hh // ps, ps, ww // ps, ps, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, -1, ps * ps * c)
  tok = patches @ p["embedding/kernel"].reshape(-1, cfg.width) + p["embedding/bias"]
  tok = np.concatenate([np.broadcast_to(p["cls"], (n, 1, cfg.width)), tok], 1) + p["pos_embedding"]

  def ln(v, scale, bias):
    mu = v.mean(-1, keepdims=True)
    var = ((v - mu) ** 2).mean(-1, keepdims=True)
    return (v - mu) / np.sqrt(var + 1e-6) * scale + bias

  def gelu(v):  # tanh approximation, as flax's nn.gelu default
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
  return tok[:, 0] @ p["head/kernel"] + p["head/bias"]


def randomized(params, seed):
  """Every parameter random (the model's own init has zero heads and unit norms)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      treedef, [jnp.asarray(rng.normal(scale=0.3, size=x.shape), jnp.float32) for x in leaves])


@pytest.mark.parametrize("overrides", [dict(variant="mu/4"), dict(variant="pico/7", depth=2, width=48, num_heads=3)])
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
  assert flat["pos_embedding"] == (1, 197, 768)
  assert flat["cls"] == (1, 1, 768)
  assert flat["Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"] == (12, 768, 12, 64)
  assert flat["Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"] == (12, 768, 3072)
  assert flat["Transformer/encoder_norm/scale"] == (768,)
  assert flat["head/kernel"] == (768, 1000)
  total = sum(int(np.prod(v)) for v in flat.values())
  assert total == 86_567_656  # ViT-B/16 with a 1000-class head, as published


@pytest.mark.parametrize("kwargs,match", [
    (dict(variant="Q/16"), "unknown ViT variant 'Q/16'"),
    (dict(variant="S/16", num_heads=7), "num_heads=7 does not divide width=384"),
    (dict(variant="S/16", patch_size=15), "patch_size=15 does not divide image_size=224"),
    (dict(width=64, depth=2), r"ViT sizes \['mlp_dim', 'num_heads', 'patch_size'\] are not set"),
    (dict(variant="S/16", depth=0), "depth=0 must be a positive integer"),
])
def test_bad_config_is_explained(kwargs, match):
  with pytest.raises(ValueError, match=match):
    vit.make_config(**kwargs)
