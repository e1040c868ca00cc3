"""Optax chains from config: clipping, Adam(W), schedules, decoupled weight decay by masks, and
freezing through ``optax.partition``."""
from __future__ import annotations

import re
from typing import Mapping

import jax
import optax
from flax import traverse_util


def with_total_steps(optim_config, total_steps: int):
  """An unlocked copy of ``config.optim`` that also knows the run length (for the schedule)."""
  import ml_collections
  out = ml_collections.ConfigDict(optim_config.to_dict())
  out.total_steps = int(total_steps)
  return out


def schedule(config) -> optax.Schedule:
  """Learning-rate schedule: linear warmup, then ``cosine``, ``linear`` or ``constant``."""
  lr, total, warmup = float(config.lr), int(config.total_steps), int(config.warmup_steps)
  if warmup >= total and total > 0:
    raise ValueError(f"optim.warmup_steps={warmup} must be smaller than total_steps={total}.")
  decay_steps = max(total - warmup, 1)
  if config.schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(config.get("min_lr_ratio", 0.0)))
  elif config.schedule == "linear":
    decay = optax.linear_schedule(lr, lr * float(config.get("min_lr_ratio", 0.0)), decay_steps)
  elif config.schedule == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f"optim.schedule={config.schedule!r}; use 'cosine', 'linear' or 'constant'.")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def path_mask(params, pattern: str | None):
  """True for every leaf whose '/'-joined path matches ``pattern`` (re.search)."""
  rx = re.compile(pattern) if pattern else None
  flat = traverse_util.flatten_dict(params, sep="/")
  return traverse_util.unflatten_dict({k: bool(rx and rx.search(k)) for k in flat}, sep="/")


def make_optimizer(config, params, weight_decay: Mapping[str, float] | float | None = None,
                   frozen: str | None = None) -> optax.GradientTransformation:
  """The chain: clip -> Adam -> decoupled weight decay per group -> -lr * schedule.

  Args:
    config: ``config.optim`` with lr, total_steps, warmup_steps, schedule, b1, b2, clip_norm,
      wd_paths (regex of the parameter paths that are decayed, e.g. kernels only).
    params: the trainable tree (or its abstract shapes); its top-level keys are the groups
      (e.g. ``templates``, ``scalers``, ``dense``).
    weight_decay: group -> decoupled decay coefficient (multiplied by the learning rate, as AdamW);
      a single number applies to the whole tree.
    frozen: a regex of paths that receive no update at all (``optax.set_to_zero``).
  """
  lr = schedule(config)
  parts = []
  if config.get("clip_norm"):
    parts.append(optax.clip_by_global_norm(float(config.clip_norm)))
  parts.append(optax.scale_by_adam(b1=float(config.b1), b2=float(config.b2)))
  decayed = path_mask(params, config.get("wd_paths"))
  if isinstance(weight_decay, (int, float)):
    if weight_decay:
      parts.append(optax.add_decayed_weights(float(weight_decay), mask=decayed))
    weight_decay = None
  for group, wd in (weight_decay or {}).items():
    if wd:
      mask = jax.tree_util.tree_map(lambda m: False, decayed)
      mask[group] = decayed[group]
      parts.append(optax.add_decayed_weights(float(wd), mask=mask))
  parts.append(optax.scale_by_learning_rate(lr))
  tx = optax.chain(*parts)
  if frozen:
    labels = jax.tree_util.tree_map(lambda f: "frozen" if f else "trained", path_mask(params, frozen))
    tx = optax.partition({"trained": tx, "frozen": optax.set_to_zero()}, labels)
  return tx
