"""The plain ResNet (v1, bottleneck units), any depth and width, with big_vision's ``bit.py`` names.

GroupNorm and weight-standardized convolutions (``StdConv``) instead of BatchNorm, as big_vision's
BiT ResNets: no batch statistics, so a model is its parameters alone. Stage ``s`` (1-based) has
bottleneck width ``width * 2**(s-1)`` and output ``4 *`` that; its first unit (stride 2 from stage 2
on, with a projection shortcut) is ``block{s}/unit1``, and the other units are one ``nn.scan`` over
a leading ``layers`` axis (``block{s}/units``), so a stage of any depth shares one set of weights'
shapes (and, under WeiT, one template bank per parameter).

Logical axes, read by sharding and by the weight generator (which knows nothing of ResNets): the
width axes are ``stem`` (the root conv's output channels), ``res{s}`` (stage s's output channels,
the residual stream), and ``mid{s}a`` / ``mid{s}b`` (the bottleneck channels after conv1 and after
conv2: two activations of the same size, so the 3x3 kernel's axes have different names);
``conv_h``/``conv_w`` (the spatial kernel), ``channels`` (image channels) and ``classes`` are not.
Every stage has names of its own because its channel counts differ; the names are what lets weight
selection keep the same channels in every parameter that shares them. The model itself knows
nothing of templates.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from weit_jax.models import remat

# The root conv: 3x3/1 (full resolution) | 3x3/2 (28-32 px images: stages at 1/2, 1/4, 1/8 of the input,
# about a quarter of the compute of 'small') | 7x7/2 + 3x3/2 max pool (ImageNet).
STEMS = ("small", "strided", "imagenet")
VARIANTS = {
    "femto": dict(width=8, depth=(2,), stem="strided", num_groups=4),  # one stage: smoke tests
    "mu": dict(width=8, depth=(2, 2, 2), stem="strided", num_groups=4),
    "pico": dict(width=16, depth=(2, 2, 2), stem="strided", num_groups=4),
    "nano": dict(width=24, depth=(3, 3, 3), stem="strided", num_groups=4),
    "R26": dict(width=64, depth=(2, 2, 2, 2), stem="imagenet", num_groups=32),
    "R50": dict(width=64, depth=(3, 4, 6, 3), stem="imagenet", num_groups=32),
    "R101": dict(width=64, depth=(3, 4, 23, 3), stem="imagenet", num_groups=32),
    "R152": dict(width=64, depth=(3, 8, 36, 3), stem="imagenet", num_groups=32),
}
SIZE_FIELDS = ("width", "depth", "num_groups")
ALIASES = {"groups": "num_groups"}


def parse_depth(value: Any, stages: int | None = None) -> tuple[int, ...]:
  """Blocks per stage: ``(3, 4, 6, 3)``, ``'3-4-6-3'``, or one number for every one of ``stages``."""
  if isinstance(value, (list, tuple)):
    depth = tuple(int(d) for d in value)
  elif isinstance(value, int) or (isinstance(value, str) and re.fullmatch(r"\d+", value.strip())):
    if stages is None:
      raise ValueError(f"ResNet depth={value!r}: one number needs a variant (or source) for the number of "
                       "stages; give blocks per stage like '3-4-6-3'.")
    depth = (int(value),) * stages
  elif isinstance(value, str) and re.fullmatch(r"\d+(-\d+)*", value.strip()):
    depth = tuple(int(d) for d in value.strip().split("-"))
  else:
    raise ValueError(f"ResNet depth={value!r}; give blocks per stage, e.g. 2 (every stage) or '3-4-6-3'.")
  return depth


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """Everything that fixes the ResNet's parameter shapes and its computation."""
  width: int
  depth: tuple[int, ...]  # units per stage; every stage has at least 2 (its first unit + a scanned group)
  num_groups: int = 32  # GroupNorm groups (must divide every channel count)
  stem: str = "imagenet"
  image_size: int = 224
  channels: int = 3
  num_classes: int = 1000
  dtype: str = "float32"
  remat_policy: str = "none"  # how, not what: see weit_jax.models.remat

  def __post_init__(self):
    object.__setattr__(self, "depth", tuple(int(d) for d in self.depth))

  @property
  def stages(self) -> int:
    return len(self.depth)

  def mid(self, stage: int) -> int:
    return self.width * 2 ** (stage - 1)

  def short_name(self) -> str:
    return f"r{'-'.join(map(str, self.depth))}-w{self.width}-g{self.num_groups}"


def parse_variant(variant: str) -> dict[str, Any]:
  if variant not in VARIANTS:
    raise ValueError(f"unknown ResNet variant {variant!r}; use one of {sorted(VARIANTS)}.")
  return dict(VARIANTS[variant])


def make_config(variant: str | None = None, **overrides: Any) -> ResNetConfig:
  """A validated ``ResNetConfig`` from a variant name and/or explicit sizes (explicit ones win)."""
  sizes: dict[str, Any] = parse_variant(variant) if variant else {}
  valid = [f.name for f in dataclasses.fields(ResNetConfig)]
  unknown = set(overrides) - set(valid)
  if unknown:
    raise ValueError(f"unknown ResNet field(s) {sorted(unknown)}; valid: {valid}.")
  overrides = {k: v for k, v in overrides.items() if v is not None}
  if "depth" in overrides:
    stages = len(sizes["depth"]) if "depth" in sizes else None
    overrides["depth"] = parse_depth(overrides["depth"], stages)
  sizes.update(overrides)
  missing = [f for f in ("width", "depth") if f not in sizes]
  if missing:
    raise ValueError(f"ResNet sizes {missing} are not set: give a variant (e.g. 'R50', 'pico') or set them.")
  cfg = ResNetConfig(**sizes)
  for name in ("width", "num_groups", "image_size", "channels", "num_classes"):
    if int(getattr(cfg, name)) < 1:
      raise ValueError(f"ResNet {name}={getattr(cfg, name)} must be a positive integer.")
  if not cfg.depth or min(cfg.depth) < 2:
    raise ValueError(f"ResNet depth={cfg.depth}: every stage needs at least 2 units (its first unit, "
                     "then the scanned ones that share templates over depth).")
  if cfg.stem not in STEMS:
    raise ValueError(f"ResNet stem={cfg.stem!r}; use one of {STEMS}.")
  for stage in range(1, cfg.stages + 1):
    for channels in (cfg.mid(stage), 4 * cfg.mid(stage)):
      if channels % cfg.num_groups:
        divisors = [g for g in range(1, cfg.width + 1) if cfg.width % g == 0]
        raise ValueError(f"GroupNorm num_groups={cfg.num_groups} does not divide the {channels} channels of "
                         f"stage {stage} (width={cfg.width}); use a group count that divides the width: "
                         f"{divisors}.")
  if cfg.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype={cfg.dtype!r}; use 'float32' or 'bfloat16'.")
  remat.check(cfg.remat_policy)
  return cfg


def _p(init, axes):
  return nn.with_logical_partitioning(init, axes)


def weight_standardize(w, eps=1e-5):
  """Per output channel: zero mean, unit standard deviation over (kh, kw, in)."""
  w = w - jnp.mean(w, axis=(0, 1, 2), keepdims=True)
  return w / (jnp.std(w, axis=(0, 1, 2), keepdims=True) + eps)


class StdConv(nn.Module):
  """A bias-free convolution whose kernel is weight-standardized at every call."""
  features: int
  kernel: tuple[int, int]
  axes: tuple[str, str]  # logical names of (input, output) channels
  strides: tuple[int, int] = (1, 1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel
    w = self.param("kernel", _p(nn.initializers.lecun_normal(), ("conv_h", "conv_w", *self.axes)),
                   (kh, kw, x.shape[-1], self.features))
    w = weight_standardize(w.astype(jnp.float32)).astype(self.dtype)
    return jax.lax.conv_general_dilated(x.astype(self.dtype), w, self.strides, "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _group_norm(groups, axis, dtype, name, zero_scale=False):
  return nn.GroupNorm(num_groups=groups, dtype=dtype, name=name,
                      scale_init=_p(nn.initializers.zeros if zero_scale else nn.initializers.ones, (axis,)),
                      bias_init=_p(nn.initializers.zeros, (axis,)))


class ResidualUnit(nn.Module):
  """Bottleneck unit: 1x1 -> 3x3 (stride) -> 1x1, GroupNorm after each (the last one's scale starts
  at zero, so every unit starts as the identity on its shortcut), projection shortcut when the
  shape changes. ``__call__`` has scan's ``(carry, x) -> (carry, y)`` signature."""
  mid: int
  axes: tuple[str, str, str, str]  # logical names of (input, after conv1, after conv2, output) channels
  groups: int
  strides: tuple[int, int] = (1, 1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, _=None):
    ax_in, ax_a, ax_b, ax_out = self.axes
    out = 4 * self.mid
    residual = x
    if x.shape[-1] != out or self.strides != (1, 1):
      residual = StdConv(out, (1, 1), (ax_in, ax_out), self.strides, self.dtype, name="conv_proj")(x)
      residual = _group_norm(self.groups, ax_out, self.dtype, "gn_proj")(residual)
    y = StdConv(self.mid, (1, 1), (ax_in, ax_a), dtype=self.dtype, name="conv1")(x)
    y = nn.relu(_group_norm(self.groups, ax_a, self.dtype, "gn1")(y))
    y = StdConv(self.mid, (3, 3), (ax_a, ax_b), self.strides, self.dtype, name="conv2")(y)
    y = nn.relu(_group_norm(self.groups, ax_b, self.dtype, "gn2")(y))
    y = StdConv(out, (1, 1), (ax_b, ax_out), dtype=self.dtype, name="conv3")(y)
    y = _group_norm(self.groups, ax_out, self.dtype, "gn3", zero_scale=True)(y)
    return nn.relu(residual + y), None


class ResNetStage(nn.Module):
  """``unit1`` (stride, projection), then ``depth - 1`` identical units scanned on ``layers``."""
  depth: int
  mid: int
  axes: tuple[str, str, str, str]
  groups: int
  strides: tuple[int, int]
  dtype: Any = jnp.float32
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, x):
    _, ax_a, ax_b, ax_out = self.axes
    x, _ = ResidualUnit(self.mid, self.axes, self.groups, self.strides, self.dtype, name="unit1")(x)
    units = nn.scan(remat.wrap(ResidualUnit, self.remat_policy), variable_axes={"params": 0}, split_rngs={"params": True},
                    length=self.depth - 1, metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = units(self.mid, (ax_out, ax_a, ax_b, ax_out), self.groups, dtype=self.dtype, name="units")(x, None)
    return x


class ResNet(nn.Module):
  """big_vision names: conv_root, gn_root, block{s}/unit1, block{s}/units (scanned), head."""
  config: ResNetConfig

  @nn.compact
  def __call__(self, images):
    c = self.config
    dtype = jnp.dtype(c.dtype)
    x = images.astype(dtype)
    if c.stem == "imagenet":
      x = StdConv(c.width, (7, 7), ("channels", "stem"), (2, 2), dtype, name="conv_root")(x)
    else:
      strides = (2, 2) if c.stem == "strided" else (1, 1)
      x = StdConv(c.width, (3, 3), ("channels", "stem"), strides, dtype, name="conv_root")(x)
    x = nn.relu(_group_norm(c.num_groups, "stem", dtype, "gn_root")(x))
    if c.stem == "imagenet":
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    ax_in = "stem"
    for s, depth in enumerate(c.depth, 1):
      axes = (ax_in, f"mid{s}a", f"mid{s}b", f"res{s}")
      x = ResNetStage(depth, c.mid(s), axes, c.num_groups, (1, 1) if s == 1 else (2, 2), dtype,
                      c.remat_policy, name=f"block{s}")(x)
      ax_in = f"res{s}"
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(dtype)
    logits = nn.Dense(c.num_classes, dtype=dtype, name="head",
                      kernel_init=_p(nn.initializers.zeros, (ax_in, "classes")),
                      bias_init=_p(nn.initializers.zeros, ("classes",)))(x)
    return logits.astype(jnp.float32)


def dummy_input(config: ResNetConfig, batch: int = 1):
  return jnp.zeros((batch, config.image_size, config.image_size, config.channels), jnp.float32)


def dummy_inputs(config: ResNetConfig, batch: int = 1) -> tuple:
  return (dummy_input(config, batch),)


def width_axes(config: ResNetConfig) -> tuple[str, ...]:
  """The logical names of the width axes of a ResNet of ``config``'s number of stages."""
  names = ["stem"]
  for s in range(1, config.stages + 1):
    names += [f"mid{s}a", f"mid{s}b", f"res{s}"]
  return tuple(names)


def train_flops(config: ResNetConfig, batch_size: int) -> float:
  """Model FLOPs of one training step (multiply-add = 2): every convolution and the head, 3x the
  forward (forward, input and weight gradients), except the root conv, whose input (the images)
  needs no gradient: 2x. The numerator of MFU."""
  conv = lambda size, k, c_in, c_out: 2.0 * size * size * k * k * c_in * c_out
  size = config.image_size
  if config.stem == "imagenet":
    size = -(-size // 2)
    root = conv(size, 7, config.channels, config.width)
    size = -(-size // 2)  # max pool
  else:
    if config.stem == "strided":
      size = -(-size // 2)
    root = conv(size, 3, config.channels, config.width)
  body, c_in = 0.0, config.width
  for stage, depth in enumerate(config.depth, 1):
    mid = config.mid(stage)
    for unit in range(depth):
      out_size = -(-size // 2) if stage > 1 and unit == 0 else size
      body += conv(size, 1, c_in, mid) + conv(out_size, 3, mid, mid) + conv(out_size, 1, mid, 4 * mid)
      if c_in != 4 * mid or out_size != size:
        body += conv(out_size, 1, c_in, 4 * mid)
      size, c_in = out_size, 4 * mid
  return (3.0 * (body + 2.0 * c_in * config.num_classes) + 2.0 * root) * batch_size
