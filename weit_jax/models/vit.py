"""The plain Vision Transformer, any size: big_vision's ``vit.Model`` (``scan=True``), parameter for
parameter and operation for operation, for ``pool_type`` in {``tok``, ``gap``} and ``posemb`` in
{``learn``, ``sincos2d``}.

As big_vision's: the position embedding is added to the patch tokens *before* the class token is
prepended (the class token has none); ``sincos2d`` has no parameter, ``gap`` no class token; pre-norm
blocks, ``encoder_norm``, then the head on token 0 (``tok``) or on the mean of all tokens (``gap``).
An export loads into big_vision's ViT with the same sizes and options (its ``params.npz``).

Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``, ``kv``, ...). The same
names drive sharding (``weit_jax.sharding``) and the Kronecker composition (``weit_jax.generator``):
the model itself knows nothing of templates.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from weit_jax.models import fields, remat

# Named sizes: big_vision's (up to g, G, e), ViT-22B's shape (arXiv:2302.05442; only the shape: its
# parallel blocks, QK normalization and bias-free layers are not this model), plus small ones that
# train in minutes on a laptop CPU.
VARIANTS = {
    "mu": dict(width=32, depth=2, mlp_dim=64, num_heads=2),
    "pico": dict(width=64, depth=3, mlp_dim=128, num_heads=2),
    "nano": dict(width=96, depth=4, mlp_dim=192, num_heads=3),
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "M": dict(width=512, depth=12, mlp_dim=2048, num_heads=8),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
    "g": dict(width=1408, depth=40, mlp_dim=6144, num_heads=16),
    "G": dict(width=1664, depth=48, mlp_dim=8192, num_heads=16),
    "e": dict(width=1792, depth=56, mlp_dim=15360, num_heads=16),
    "22B": dict(width=6144, depth=48, mlp_dim=24576, num_heads=48),
}
SIZE_FIELDS = ("width", "depth", "mlp_dim", "num_heads", "patch_size")
POOL_TYPES = ("tok", "gap")  # head on the class token | on the mean of the patch tokens
POSEMBS = ("learn", "sincos2d")  # a learned parameter | MoCo v3's fixed 2-D sin-cos table
# The fields that fix a ViT's computation beyond its sizes: templates serve only targets that share them.
OPTION_FIELDS = ("pool_type", "posemb")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Everything that fixes the ViT's parameter shapes and its computation."""
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  image_size: int = 224
  channels: int = 3
  num_classes: int = 1000
  dtype: str = "float32"
  pool_type: str = "tok"
  posemb: str = "learn"
  remat_policy: str = "none"  # how, not what: see weit_jax.models.remat

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_tokens(self) -> int:
    return self.num_patches + (self.pool_type == "tok")  # patches (+ class token)

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  def short_name(self) -> str:
    options = "" if (self.pool_type, self.posemb) == ("tok", "learn") else f"-{self.pool_type}-{self.posemb}"
    return f"d{self.depth}-w{self.width}-h{self.num_heads}-m{self.mlp_dim}-p{self.patch_size}{options}"


def parse_variant(variant: str) -> dict[str, int]:
  """``'S/16'`` -> sizes of ViT-S with patch 16. Raises ValueError naming the valid variants."""
  m = re.fullmatch(r"(\w+)/(\d+)", variant or "")
  if not m or m.group(1) not in VARIANTS:
    raise ValueError(
        f"unknown ViT variant {variant!r}; use NAME/PATCH with NAME one of {sorted(VARIANTS)} "
        f"(e.g. 'S/16', 'pico/4', '22B/14').")
  return dict(VARIANTS[m.group(1)], patch_size=int(m.group(2)))


def make_config(variant: str | None = None, **overrides: Any) -> ViTConfig:
  """A validated ``ViTConfig`` from a variant name and/or explicit sizes (explicit ones win).

  Every mistake is reported here, before anything is traced or compiled.
  """
  cfg = fields.sized_config(ViTConfig, "ViT", parse_variant(variant) if variant else {}, overrides, SIZE_FIELDS,
                            "S/16")
  for name in ("width", "depth", "mlp_dim", "num_heads", "patch_size", "image_size", "channels", "num_classes"):
    if int(getattr(cfg, name)) < 1:
      raise ValueError(f"ViT {name}={getattr(cfg, name)} must be a positive integer.")
  if cfg.width % cfg.num_heads:
    divisors = [h for h in range(1, cfg.width + 1) if cfg.width % h == 0 and h <= 64]
    raise ValueError(f"num_heads={cfg.num_heads} does not divide width={cfg.width}; "
                     f"valid head counts for this width: {divisors}.")
  if cfg.image_size % cfg.patch_size:
    raise ValueError(f"patch_size={cfg.patch_size} does not divide image_size={cfg.image_size}.")
  if cfg.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype={cfg.dtype!r}; use 'float32' or 'bfloat16'.")
  remat.check(cfg.remat_policy)
  if cfg.pool_type not in POOL_TYPES:
    raise ValueError(f"ViT pool_type={cfg.pool_type!r}; use one of {POOL_TYPES} (big_vision's names).")
  if cfg.posemb not in POSEMBS:
    raise ValueError(f"ViT posemb={cfg.posemb!r}; use one of {POSEMBS} (big_vision's names).")
  if cfg.posemb == "sincos2d" and (cfg.width % 4 or cfg.width < 8):
    raise ValueError(f"posemb='sincos2d' needs a width that is a multiple of 4 and at least 8 (sin and cos "
                     f"of rows and columns, at least two frequencies); width={cfg.width}.")
  return cfg


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0):
  """MoCo v3's fixed 2-D position embedding, ``(1, h * w, width)``, as big_vision computes it."""
  y, x = jnp.mgrid[:h, :w]
  omega = 1.0 / temperature ** (jnp.arange(width // 4) / (width // 4 - 1))
  y = jnp.einsum("m,d->md", y.flatten(), omega)
  x = jnp.einsum("m,d->md", x.flatten(), omega)
  return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)[None]


def _p(init, axes):
  return nn.with_logical_partitioning(init, axes)


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype,
                 kernel_init=_p(nn.initializers.xavier_uniform(), ("embed", "mlp")),
                 bias_init=_p(nn.initializers.normal(stddev=1e-6), ("mlp",)))(x)
    x = nn.gelu(x)
    return nn.Dense(width, dtype=self.dtype,
                    kernel_init=_p(nn.initializers.xavier_uniform(), ("mlp", "embed")),
                    bias_init=_p(nn.initializers.normal(stddev=1e-6), ("embed",)))(x)


def _layer_norm(dtype, name=None):
  return nn.LayerNorm(dtype=dtype, name=name,
                      scale_init=_p(nn.initializers.ones, ("embed",)),
                      bias_init=_p(nn.initializers.zeros, ("embed",)))


class Encoder1DBlock(nn.Module):
  """Pre-norm block; ``__call__`` has scan's ``(carry, x) -> (carry, y)`` signature."""
  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, _):
    y = _layer_norm(self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        kernel_init=_p(nn.initializers.xavier_uniform(), ("embed", "heads", "kv")),
        bias_init=_p(nn.initializers.zeros, ("heads", "kv")),
        out_kernel_init=_p(nn.initializers.xavier_uniform(), ("heads", "kv", "embed")),
        out_bias_init=_p(nn.initializers.zeros, ("embed",)),
        deterministic=True)(y, y)
    x = x + y
    y = _layer_norm(self.dtype)(x)
    y = MlpBlock(self.mlp_dim, dtype=self.dtype)(y)
    return x + y, None


class Encoder(nn.Module):
  depth: int
  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, x):
    # One block traced once, its parameters stacked on a leading `layers` axis: compile time does
    # not grow with depth, and the generator sees one template bank per parameter kind.
    blocks = nn.scan(remat.wrap(Encoder1DBlock, self.remat_policy), variable_axes={"params": 0}, split_rngs={"params": True},
                     length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = blocks(self.mlp_dim, self.num_heads, dtype=self.dtype, name="encoderblock")(x, None)
    return _layer_norm(self.dtype, name="encoder_norm")(x)


class ViT(nn.Module):
  """big_vision names: embedding, pos_embedding (``learn``), cls (``tok``), Transformer/encoderblock/...,
  Transformer/encoder_norm, head."""
  config: ViTConfig

  @nn.compact
  def __call__(self, images):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    p = c.patch_size
    x = nn.Conv(c.width, (p, p), strides=(p, p), padding="VALID", dtype=dtype, name="embedding",
                kernel_init=_p(nn.initializers.lecun_normal(), ("patch_h", "patch_w", "channels", "embed")),
                bias_init=_p(nn.initializers.zeros, ("embed",)))(images.astype(dtype))
    n, h, w, d = x.shape
    x = x.reshape(n, h * w, d)
    if c.posemb == "learn":
      pos = self.param("pos_embedding", _p(nn.initializers.normal(stddev=d ** -0.5), (None, "tokens", "embed")),
                       (1, h * w, d))
    else:
      pos = posemb_sincos_2d(h, w, d)
    x = x + pos.astype(dtype)  # before the class token, which has no position embedding
    if c.pool_type == "tok":
      cls = self.param("cls", _p(nn.initializers.zeros, (None, None, "embed")), (1, 1, d))
      x = jnp.concatenate([jnp.tile(cls.astype(dtype), (n, 1, 1)), x], axis=1)
    x = Encoder(c.depth, c.mlp_dim, c.num_heads, dtype=dtype, remat_policy=c.remat_policy, name="Transformer")(x)
    x = x[:, 0] if c.pool_type == "tok" else jnp.mean(x, axis=1)
    logits = nn.Dense(c.num_classes, dtype=dtype, name="head",
                      kernel_init=_p(nn.initializers.zeros, ("embed", "classes")),
                      bias_init=_p(nn.initializers.zeros, ("classes",)))(x)
    return logits.astype(jnp.float32)


def train_flops(cfg: ViTConfig, batch_size: int) -> float:
  """Model FLOPs of one training step of the plain ViT: matmuls and attention (multiply-add = 2),
  3x the forward (forward, input and weight gradients), except the patch embedding, whose input
  (the images) needs no gradient: 2x. The numerator of MFU."""
  t, w, m, d = cfg.num_tokens, cfg.width, cfg.mlp_dim, cfg.depth
  per_layer = 2 * t * (4 * w * w + 2 * w * m) + 2 * 2 * t * t * w  # qkv+out, mlp; scores and values
  embed = 2 * cfg.num_patches * cfg.patch_size ** 2 * cfg.channels * w
  return (3.0 * (d * per_layer + 2 * w * cfg.num_classes) + 2.0 * embed) * batch_size


def dummy_input(config: ViTConfig, batch: int = 1):
  return jnp.zeros((batch, config.image_size, config.image_size, config.channels), jnp.float32)


def dummy_inputs(config: ViTConfig, batch: int = 1) -> tuple:
  return (dummy_input(config, batch),)


BLOCKS = "Transformer/encoderblock"  # the scanned blocks; big_vision's unscanned form: encoderblock_{i}


def from_big_vision(flat: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """A big_vision ViT checkpoint (``'/'``-joined name -> array) in this model's layout, and the size
  and option fields read off its shapes.

  big_vision writes its blocks scanned (``Transformer/encoderblock/...``, a leading depth axis) or,
  with ``scan=False`` (its default, and its public checkpoints), one ``Transformer/encoderblock_{i}``
  per layer; the latter are stacked into the former, as big_vision's ``vit.load`` does. The sizes:
  width and patch from ``embedding/kernel`` ``(p, p, channels, width)``, depth from the blocks, MLP
  size from ``Dense_0``, heads from the query kernel ``(width, heads, head_dim)``; the options from
  which parameters exist (``cls``: pool ``tok``, ``pos_embedding``: posemb ``learn``). The fields the
  data fixes (image size, channels, classes) are not read: a run takes them from its data.
  """
  out, layers = {}, {}
  for name, value in flat.items():
    m = re.fullmatch(re.escape(BLOCKS) + r"_(\d+)/(.+)", name)
    if m:
      layers.setdefault(m.group(2), {})[int(m.group(1))] = value
    else:
      out[name] = value
  depths = {tuple(sorted(by_layer)) for by_layer in layers.values()}
  if layers:
    if len(depths) != 1 or next(iter(depths)) != tuple(range(len(next(iter(depths))))):
      raise ValueError(f"the checkpoint's blocks {BLOCKS}_<i> are not numbered 0..depth-1 with the same parameters "
                       "in each; it is not a big_vision ViT.")
    if any(k.startswith(BLOCKS + "/") for k in out):
      raise ValueError(f"the checkpoint has both scanned ({BLOCKS}/...) and per-layer ({BLOCKS}_<i>/...) blocks.")
    for rest, by_layer in layers.items():
      out[f"{BLOCKS}/{rest}"] = np.stack([np.asarray(by_layer[i]) for i in sorted(by_layer)])

  def shape(name, ndim):
    if name not in out:
      raise ValueError(f"it has no parameter {name!r}, so it is not a big_vision ViT (its parameters: "
                       f"{sorted(out)[:6]}...).")
    if np.ndim(out[name]) != ndim:
      raise ValueError(f"its parameter {name} has shape {np.shape(out[name])}, not the {ndim} axes of a big_vision "
                       "ViT's.")
    return np.shape(out[name])
  patch = shape("embedding/kernel", 4)
  if patch[0] != patch[1]:
    raise ValueError(f"its patch embedding embedding/kernel {patch} is not square; this ViT has square patches.")
  fields = dict(width=patch[3], patch_size=patch[0],
                depth=shape(f"{BLOCKS}/LayerNorm_0/scale", 2)[0],
                mlp_dim=shape(f"{BLOCKS}/MlpBlock_0/Dense_0/kernel", 3)[2],
                num_heads=shape(f"{BLOCKS}/MultiHeadDotProductAttention_0/query/kernel", 4)[2],
                pool_type="tok" if "cls" in out else "gap",
                posemb="learn" if "pos_embedding" in out else "sincos2d")
  return out, {k: int(v) if not isinstance(v, str) else v for k, v in fields.items()}
