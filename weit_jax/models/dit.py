"""The plain diffusion transformer (DiT, Peebles & Xie 2023), any depth and width: adaLN-Zero blocks.

``DiT(config)(x, t, y)``: noisy images ``x`` (N, H, W, C), diffusion times ``t`` (N,) and class labels
``y`` (N,) -> a prediction of the same shape as ``x`` (the diffusion task says of what: noise or
velocity; one output per pixel, no learned variance). As the reference DiT:

- patchify (a p x p / p convolution), plus a fixed 2-D sin-cos position table (no parameter; MoCo
  v3's table, as the ViT's ``sincos2d``);
- the condition ``c = t_embedder(t) + y_embedder(y)``: a sinusoidal embedding of ``t`` (256
  frequencies) through a two-layer SiLU MLP, plus a class embedding table with one extra row,
  class ``num_classes``, the null class of classifier-free guidance;
- ``depth`` blocks, scanned on ``layers``: ``x += gate_msa * attn(modulate(LN(x), shift_msa,
  scale_msa))``, ``x += gate_mlp * mlp(modulate(LN(x), ...))`` with the six modulation vectors from
  ``Dense(SiLU(c))`` and LayerNorms without parameters; ``modulate(x, shift, scale) = x * (1 +
  scale) + shift``;
- a final layer: ``Dense(modulate(LN(x), shift, scale))`` to ``p * p * C`` per patch, unpatchified.

adaLN-Zero: the modulation projections and the final projection start at zero, so every block
starts as the identity and the model's first output is zero.

Logical axes (read by sharding and by the weight generator, which knows nothing of DiTs): ``embed``
(the residual stream), ``mlp``, ``heads``, ``kv`` as the ViT's; ``cond`` (the condition vector ``c``,
as wide as the model) and ``cond_mlp`` (the timestep MLP's hidden layer) are width axes of their
own because a kernel cannot name one axis twice (``c -> 6 x embed`` is ``(cond, modulation,
embed)``); ``frequencies``, ``modulation``, ``patch_out`` (p * p * C), ``classes`` and the patch
kernel's axes are format, not width. Every parameter, the modulation projections included, gets
templates.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from weit_jax.models import fields, remat
from weit_jax.models.vit import posemb_sincos_2d

FREQUENCIES = 256  # the timestep embedding's sinusoid size (the reference DiT's)
# Named sizes: the paper's (patch 2, 4 or 8 on 32x32x4 latents), plus small ones for a laptop CPU.
VARIANTS = {
    "mu": dict(width=32, depth=2, num_heads=2),
    "pico": dict(width=64, depth=3, num_heads=2),
    "nano": dict(width=96, depth=4, num_heads=3),
    "S": dict(width=384, depth=12, num_heads=6),
    "B": dict(width=768, depth=12, num_heads=12),
    "L": dict(width=1024, depth=24, num_heads=16),
    "XL": dict(width=1152, depth=28, num_heads=16),
}
SIZE_FIELDS = ("width", "depth", "mlp_dim", "num_heads", "patch_size")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Everything that fixes the DiT's parameter shapes and its computation."""
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  image_size: int = 32
  channels: int = 4
  num_classes: int = 1000  # plus the null class (classifier-free guidance)
  dtype: str = "float32"
  remat_policy: str = "none"  # how, not what: see weit_jax.models.remat

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  def short_name(self) -> str:
    return f"d{self.depth}-w{self.width}-h{self.num_heads}-m{self.mlp_dim}-p{self.patch_size}"


def parse_variant(variant: str) -> dict[str, int]:
  """``'XL/2'`` -> sizes of DiT-XL with patch 2 (MLP 4x the width). Raises ValueError naming the variants."""
  m = re.fullmatch(r"(\w+)/(\d+)", variant or "")
  if not m or m.group(1) not in VARIANTS:
    raise ValueError(f"unknown DiT variant {variant!r}; use NAME/PATCH with NAME one of {sorted(VARIANTS)} "
                     "(e.g. 'XL/2', 'pico/4').")
  sizes = dict(VARIANTS[m.group(1)], patch_size=int(m.group(2)))
  return dict(sizes, mlp_dim=4 * sizes["width"])


def make_config(variant: str | None = None, **overrides: Any) -> DiTConfig:
  """A validated ``DiTConfig`` from a variant name and/or explicit sizes (explicit ones win)."""
  cfg = fields.sized_config(DiTConfig, "DiT", parse_variant(variant) if variant else {}, overrides, SIZE_FIELDS,
                            "S/2")
  for name in ("width", "depth", "mlp_dim", "num_heads", "patch_size", "image_size", "channels", "num_classes"):
    if int(getattr(cfg, name)) < 1:
      raise ValueError(f"DiT {name}={getattr(cfg, name)} must be a positive integer.")
  if cfg.width % cfg.num_heads:
    raise ValueError(f"num_heads={cfg.num_heads} does not divide width={cfg.width}; valid head counts for this "
                     f"width: {[h for h in range(1, min(cfg.width, 64) + 1) if cfg.width % h == 0]}.")
  if cfg.image_size % cfg.patch_size:
    raise ValueError(f"patch_size={cfg.patch_size} does not divide image_size={cfg.image_size}.")
  if cfg.width % 4 or cfg.width < 8:
    raise ValueError(f"DiT width={cfg.width}: the 2-D sin-cos position table needs a multiple of 4, at least 8.")
  if cfg.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype={cfg.dtype!r}; use 'float32' or 'bfloat16'.")
  remat.check(cfg.remat_policy)
  return cfg


def timestep_embedding(t, dim: int = FREQUENCIES, max_period: float = 10_000.0):
  """The reference DiT's sinusoidal embedding of (continuous) times: ``[cos(t f), sin(t f)]``."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _p(init, axes):
  return nn.with_logical_partitioning(init, axes)


def modulate(x, shift, scale):
  return x * (1 + scale[:, None]) + shift[:, None]


def _norm(dtype):
  return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=dtype)


class Modulation(nn.Module):
  """``SiLU(c) -> k`` vectors of the residual width, zero-initialized (adaLN-Zero)."""
  k: int
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, c):
    out = nn.DenseGeneral((self.k, self.width), dtype=self.dtype, name="adaLN_modulation",
                          kernel_init=_p(nn.initializers.zeros, ("cond", "modulation", "embed")),
                          bias_init=_p(nn.initializers.zeros, ("modulation", "embed")))(nn.silu(c))
    return [out[:, i] for i in range(self.k)]


class DiTBlock(nn.Module):
  """adaLN-Zero block; ``__call__`` has scan's ``(carry, x) -> (carry, y)`` signature, the carry
  being ``(x, c)``."""
  mlp_dim: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry, _):
    x, c = carry
    width = x.shape[-1]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = Modulation(6, width, self.dtype)(c)
    y = modulate(_norm(self.dtype)(x), shift_msa, scale_msa)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        kernel_init=_p(nn.initializers.xavier_uniform(), ("embed", "heads", "kv")),
        bias_init=_p(nn.initializers.zeros, ("heads", "kv")),
        out_kernel_init=_p(nn.initializers.xavier_uniform(), ("heads", "kv", "embed")),
        out_bias_init=_p(nn.initializers.zeros, ("embed",)), deterministic=True)(y, y)
    # Probes for diagnostics (a no-op unless apply is asked for the 'intermediates' collection):
    # the adaLN gates and each branch's residual update.
    self.sow("intermediates", "gate_msa", gate_msa)
    self.sow("intermediates", "gate_mlp", gate_mlp)
    self.sow("intermediates", "update_msa", gate_msa[:, None] * y)
    x = x + gate_msa[:, None] * y
    y = modulate(_norm(self.dtype)(x), shift_mlp, scale_mlp)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_p(nn.initializers.xavier_uniform(), ("embed", "mlp")),
                 bias_init=_p(nn.initializers.zeros, ("mlp",)))(y)
    y = nn.gelu(y, approximate=True)
    y = nn.Dense(width, dtype=self.dtype, kernel_init=_p(nn.initializers.xavier_uniform(), ("mlp", "embed")),
                 bias_init=_p(nn.initializers.zeros, ("embed",)))(y)
    self.sow("intermediates", "update_mlp", gate_mlp[:, None] * y)
    return (x + gate_mlp[:, None] * y, c), None


class DiT(nn.Module):
  """Reference DiT names where they exist: x_embedder, t_embedder, y_embedder, blocks, final_layer."""
  config: DiTConfig

  @nn.compact
  def __call__(self, x, t, y):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    p, w = cfg.patch_size, cfg.width
    n = x.shape[0]
    h = x.shape[1] // p
    tokens = nn.Conv(w, (p, p), strides=(p, p), padding="VALID", dtype=dtype, name="x_embedder",
                     kernel_init=_p(nn.initializers.xavier_uniform(), ("patch_h", "patch_w", "channels", "embed")),
                     bias_init=_p(nn.initializers.zeros, ("embed",)))(x.astype(dtype))
    tokens = tokens.reshape(n, h * h, w) + posemb_sincos_2d(h, h, w).astype(dtype)

    t_emb = nn.Dense(w, dtype=dtype, name="t_embedder_0",
                     kernel_init=_p(nn.initializers.normal(0.02), ("frequencies", "cond_mlp")),
                     bias_init=_p(nn.initializers.zeros, ("cond_mlp",)))(timestep_embedding(t).astype(dtype))
    t_emb = nn.Dense(w, dtype=dtype, name="t_embedder_1",
                     kernel_init=_p(nn.initializers.normal(0.02), ("cond_mlp", "cond")),
                     bias_init=_p(nn.initializers.zeros, ("cond",)))(nn.silu(t_emb))
    table = self.param("y_embedder", _p(nn.initializers.normal(0.02), ("classes", "cond")), (cfg.num_classes + 1, w))
    c = t_emb + jnp.take(table, y, axis=0).astype(dtype)

    # One block traced once, its parameters stacked on `layers`: one template bank per kind.
    blocks = nn.scan(remat.wrap(DiTBlock, cfg.remat_policy), variable_axes={"params": 0, "intermediates": 0},
                     split_rngs={"params": True}, length=cfg.depth,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    (tokens, _), _ = blocks(cfg.mlp_dim, cfg.num_heads, dtype=dtype, name="blocks")((tokens, c), None)

    shift, scale = Modulation(2, w, dtype, name="final_layer")(c)
    out = nn.Dense(p * p * cfg.channels, dtype=dtype, name="final_linear",
                   kernel_init=_p(nn.initializers.zeros, ("embed", "patch_out")),
                   bias_init=_p(nn.initializers.zeros, ("patch_out",)))(modulate(_norm(dtype)(tokens), shift, scale))
    out = out.reshape(n, h, h, p, p, cfg.channels).transpose(0, 1, 3, 2, 4, 5)  # unpatchify
    return out.reshape(n, h * p, h * p, cfg.channels).astype(jnp.float32)


def dummy_inputs(config: DiTConfig, batch: int = 1) -> tuple:
  return (jnp.zeros((batch, config.image_size, config.image_size, config.channels), jnp.float32),
          jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.int32))


def train_flops(cfg: DiTConfig, batch_size: int) -> float:
  """Model FLOPs of one training step (multiply-add = 2; 3x the forward, 2x for the patch embedding,
  whose input needs no gradient): per block attention, MLP and the modulation projection."""
  t, w, m = cfg.num_patches, cfg.width, cfg.mlp_dim
  per_block = 2 * t * (4 * w * w + 2 * w * m) + 2 * 2 * t * t * w + 2 * w * 6 * w
  final = 2 * t * w * cfg.patch_size ** 2 * cfg.channels + 2 * w * 2 * w
  cond = 2 * (FREQUENCIES * w + w * w)
  embed = 2 * t * cfg.patch_size ** 2 * cfg.channels * w
  return (3.0 * (cfg.depth * per_block + final + cond) + 2.0 * embed) * batch_size
