"""The plain actor-critic policy for continuous control, any depth and width: two MLP towers.

``Policy(config)(obs)`` -> ``(mean, log_std, value)``: normalized observations ``(N, obs_size)`` ->
the Gaussian policy's action mean ``(N, action_size)``, its log standard deviation (one learned
vector, state-independent, broadcast to the mean's shape) and the state value ``(N,)``. The actor
and the critic are separate towers of the same depth and width (PPO's usual layout for MuJoCo-like
tasks; sharing a torso couples the two losses' scales): ``depth`` tanh hidden layers each, the
first ``obs -> hidden``, the other ``depth - 1`` one ``nn.scan`` over a leading ``layers`` axis
(so a tower of any depth has one set of weight shapes, and one template bank per parameter),
then a linear head. Orthogonal initialization with PPO's gains: sqrt(2) for hidden layers, 0.01
for the action head (the first policy is nearly the mean-zero Gaussian), 1 for the value head.
Observation normalization is not part of the model: it is a running statistic of the rollouts
that the control task keeps beside the parameters (``weit_jax.tasks.control``).

Logical axes: ``hidden`` and ``hidden_in`` (a hidden layer's output and input: one activation, two
names, because a kernel cannot name one axis twice) are the width axes; ``obs`` and ``action`` are
width axes too, sized by the environment; ``value`` (the critic's one output) is format.

**Why observation and action sizes are width axes.** Templates must serve every morphology (hopper:
11 observations, 3 actions; walker2d: 17 and 6), and nothing in one morphology's observation
vector lines up with another's (joint angles of other joints, in another order). So the input
and output layers' templates are tiled along ``obs`` and ``action`` with a small tile (the configs
use 1): a template then holds only the hidden-side structure of a layer (a row of ``hidden``
weights), and the scalers, which are size-specific anyway, say how each observation or action
mixes the templates. One template bank serves any observation and action size; what transfers is
the structure of the hidden layers, which is where a deep policy's capacity is.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from weit_jax.models import fields, remat

VARIANTS = {
    "mu": dict(width=32, depth=2),
    "pico": dict(width=64, depth=3),
    "nano": dict(width=128, depth=4),
    "S": dict(width=256, depth=4),
    "B": dict(width=512, depth=6),
}
SIZE_FIELDS = ("width", "depth")
INIT_LOG_STD = -0.5  # the first policy's action noise: std 0.61 per action in [-1, 1]


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
  """Everything that fixes the policy's parameter shapes and its computation."""
  width: int
  depth: int  # hidden layers per tower
  obs_size: int = 11  # set from the environment (hopper's)
  action_size: int = 3
  dtype: str = "float32"
  remat_policy: str = "none"  # accepted for the programs' uniformity; an MLP this small never needs it

  def short_name(self) -> str:
    return f"d{self.depth}-w{self.width}-o{self.obs_size}-a{self.action_size}"


def parse_variant(variant: str) -> dict[str, int]:
  if variant not in VARIANTS:
    raise ValueError(f"unknown policy variant {variant!r}; use one of {sorted(VARIANTS)} or set "
                     "--config.model.width and --config.model.depth.")
  return dict(VARIANTS[variant])


def make_config(variant: str | None = None, **overrides: Any) -> PolicyConfig:
  """A validated ``PolicyConfig`` from a variant name and/or explicit sizes (explicit ones win)."""
  cfg = fields.sized_config(PolicyConfig, "policy", parse_variant(variant) if variant else {}, overrides,
                            SIZE_FIELDS, "pico")
  for name in ("width", "obs_size", "action_size"):
    if int(getattr(cfg, name)) < 1:
      raise ValueError(f"policy {name}={getattr(cfg, name)} must be a positive integer.")
  if int(cfg.depth) < 2:
    raise ValueError(f"policy depth={cfg.depth}: use at least 2 hidden layers (the first one, and at least one "
                     "of the scanned ones that every depth shares).")
  if cfg.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype={cfg.dtype!r}; use 'float32' or 'bfloat16'.")
  remat.check(cfg.remat_policy)
  return cfg


def _p(init, axes):
  return nn.with_logical_partitioning(init, axes)


class HiddenLayer(nn.Module):
  """``tanh(Dense(x))`` of the same width; scan's ``(carry, x) -> (carry, y)`` signature."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, _):
    x = nn.Dense(x.shape[-1], dtype=self.dtype, name="dense",
                 kernel_init=_p(nn.initializers.orthogonal(math.sqrt(2)), ("hidden_in", "hidden")),
                 bias_init=_p(nn.initializers.zeros, ("hidden",)))(x)
    return jnp.tanh(x), None


class Tower(nn.Module):
  """``obs -> depth tanh layers of width -> out`` (``out_axis``: the head's output axis name)."""
  config: PolicyConfig
  out: int
  out_axis: str
  head_gain: float

  @nn.compact
  def __call__(self, obs):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    x = nn.Dense(cfg.width, dtype=dtype, name="input",
                 kernel_init=_p(nn.initializers.orthogonal(math.sqrt(2)), ("obs", "hidden")),
                 bias_init=_p(nn.initializers.zeros, ("hidden",)))(obs.astype(dtype))
    x = jnp.tanh(x)
    layers = nn.scan(HiddenLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=cfg.depth - 1,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = layers(dtype=dtype, name="hidden")(x, None)
    return nn.Dense(self.out, dtype=dtype, name="head",
                    kernel_init=_p(nn.initializers.orthogonal(self.head_gain), ("hidden", self.out_axis)),
                    bias_init=_p(nn.initializers.zeros, (self.out_axis,)))(x).astype(jnp.float32)


class Policy(nn.Module):
  config: PolicyConfig

  @nn.compact
  def __call__(self, obs):
    cfg = self.config
    mean = Tower(cfg, cfg.action_size, "action", 0.01, name="actor")(obs)
    value = Tower(cfg, 1, "value", 1.0, name="critic")(obs)[:, 0]
    log_std = self.param("log_std", _p(nn.initializers.constant(INIT_LOG_STD), ("action",)), (cfg.action_size,))
    return mean, jnp.broadcast_to(log_std, mean.shape), value


def dummy_inputs(config: PolicyConfig, batch: int = 1) -> tuple:
  return (jnp.zeros((batch, config.obs_size), jnp.float32),)


def train_flops(cfg: PolicyConfig, batch_size: int) -> float:
  """Model FLOPs of one gradient step on ``batch_size`` observations (3x the forward of both towers)."""
  w = cfg.width
  towers = 2 * 2 * (cfg.obs_size * w + (cfg.depth - 1) * w * w) + 2 * w * (cfg.action_size + 1)
  return 3.0 * towers * batch_size
