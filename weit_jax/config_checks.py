"""Checks on a whole config that every program runs before it writes anything.

``check_ranges``: numeric fields where a wrong sign or a zero is never meant (learning rates, batch
sizes, step counts, cadences, weight decays, ...) are refused with one message that names the field
and its valid range. Fields a config does not have are skipped, so one table serves every program
and family.

``eval_steps``: the steps ``eval_at`` names, evaluated besides every ``eval_every`` (checked by
``check_ranges`` too).

``run_defining``: the part of a config that defines a run (model, data, objective, optimizer,
seed), as opposed to how and where it runs (mesh, data-loading threads, logging and checkpoint
cadence, run length). A workdir may be resumed with another mesh, device count or cadence, never
with another run-defining field.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Any, Mapping

import ml_collections

# Dotted field pattern -> (low, low inclusive, high, high inclusive); None = unbounded.
RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "total_steps": (0, True, None, False),  # 0: the initial state saved as step 0, evaluated, not trained
    "steps": (0, True, None, False),  # init: 0 = heuristic scalers only
    "batch_size": (1, True, None, False),
    "num_examples": (1, True, None, False),
    "log_every": (1, True, None, False),
    "eval_every": (0, True, None, False),  # 0: no periodic eval
    "checkpoint_every": (1, True, None, False),
    "keep_checkpoints": (1, True, None, False),
    "resume_step": (0, True, None, False),
    "templates_step": (0, True, None, False),
    "label_smoothing": (0, True, 1, False),
    "weight_decay": (0, True, None, False),
    "scaler_wd": (0, True, None, False),
    "optim.lr": (0, False, None, False),
    "optim.warmup_steps": (0, True, None, False),
    "optim.min_lr_ratio": (0, True, 1, True),
    "optim.b1": (0, True, 1, False),
    "optim.b2": (0, True, 1, False),
    "optim.clip_norm": (0, True, None, False),  # 0 (or unset): no clipping
    "constraint.template_wd": (0, True, None, False),
    "constraint.scaler_wd": (0, True, None, False),
    "constraint.dense_wd": (0, True, None, False),
    "constraint.diversity": (0, True, None, False),
    "constraint.soft_lambda": (0, True, None, False),
    "distill.weight": (0, True, None, False),
    "distill.temperature": (0, False, None, False),
    "weit.num_templates": (1, True, None, False),
    "weit.tiles.*": (1, True, None, False),
    "data.image_size": (1, True, None, False),
    "data.crop_padding": (0, True, None, False),
    "data.center_crop_fraction": (0, False, 1, True),
    "data.mixup_alpha": (0, True, None, False),
    "data.worker_count": (0, True, None, False),
    "data.worker_buffer_size": (1, True, None, False),
    "data.read_threads": (1, True, None, False),
    "data.prefetch_buffer_size": (1, True, None, False),
    "dry_run.hbm_gib": (0, False, None, False),
    "sample_quality.per_class": (0, True, None, False),  # 0: not measured
    "sample_quality.steps": (1, True, None, False),
    "sample_quality.guidance": (0, True, None, False),
    "episode_length": (1, True, None, False),  # control (weit_jax/tasks/control.py)
    "eval_episodes": (1, True, None, False),
    "ppo.unroll_length": (1, True, None, False),
    "ppo.num_minibatches": (1, True, None, False),
    "ppo.epochs": (1, True, None, False),
    "ppo.discounting": (0, False, 1, True),
    "ppo.gae_lambda": (0, True, 1, True),
    "ppo.clip_eps": (0, False, None, False),
    "ppo.value_coef": (0, True, None, False),
    "ppo.entropy_coef": (0, True, None, False),
    "ppo.reward_scaling": (0, False, None, False),
}

# How and where a run happens: may change when a workdir is resumed (patterns on dotted fields).
PLACEMENT_FIELDS = (
    "mesh", "mesh.*",  # another slice, topology or device count
    "data.data_dir", "data.idx_dir",  # where the same data lives on this machine
    # threads and buffers (not data.worker_count: the saved data-iterator state depends on it)
    "data.worker_buffer_size", "data.read_threads", "data.prefetch_buffer_size",
    "log_every", "eval_every", "eval_at", "checkpoint_every", "keep_checkpoints",
    "total_steps", "steps",  # a run may be extended
    "overwrite", "resume_step", "dry_run", "dry_run.*",
    "model.remat_policy", "target.remat_policy",  # recomputation: the same values, less memory
    "sample_quality", "sample_quality.*",  # what is measured at eval steps, not what is trained
    "eval_episodes",
)


# Fields added after runs were recorded: a recorded config without one had this value.
ADDED_FIELDS = {"model.family": "vit", "target.family": "vit", "task": "classification"}


def flatten(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
  """Dotted field name -> value, for every leaf of ``config`` (a ConfigDict or its JSON dict)."""
  tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  out: dict[str, Any] = {}

  def walk(prefix, node):
    if isinstance(node, Mapping) and node:
      for k, v in node.items():
        walk(f"{prefix}.{k}" if prefix else str(k), v)
    else:
      out[prefix] = list(node) if isinstance(node, tuple) else node
  walk("", tree)
  return out


def _range_text(low, low_inclusive, high, high_inclusive) -> str:
  if high is None:
    return f"{'>=' if low_inclusive else '>'} {low:g}"
  return f"in {'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"


def check_ranges(config) -> None:
  """Raises ValueError for the first numeric field outside its valid range (see ``RANGES``)."""
  for field, value in flatten(config).items():
    rule = next((r for pattern, r in RANGES.items() if fnmatch.fnmatchcase(field, pattern)), None)
    if rule is None or value is None or isinstance(value, bool):
      continue
    low, low_inclusive, high, high_inclusive = rule
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value >= low if low_inclusive else value > low)
    if ok and high is not None:
      ok = value <= high if high_inclusive else value < high
    if not ok:
      raise ValueError(f"--config.{field}={value!r} is out of range: it must be "
                       f"{_range_text(*rule)}.")
  eval_steps(config)


def eval_steps(config) -> frozenset[int]:
  """The steps of ``config.eval_at`` ('5,10,15': extra evaluations besides every ``eval_every``,
  e.g. dense early in a run, where a curve changes fastest); empty when unset. Raises ValueError
  for a step that is not a positive integer or lies past ``total_steps``."""
  text = str(config.get("eval_at") or "").strip()
  if not text:
    return frozenset()
  total = config.get("total_steps")
  steps = set()
  for part in text.split(","):
    part = part.strip()
    if not part.isdigit() or int(part) < 1 or (total is not None and int(part) > int(total)):
      raise ValueError(f"--config.eval_at={text!r}: {part!r} is not a step in 1..{total} (total_steps); "
                       "give comma-separated steps, e.g. --config.eval_at=5,10,15")
    steps.add(int(part))
  return frozenset(steps)


def run_defining(config) -> dict[str, Any]:
  """The fields of ``config`` (ConfigDict or its recorded JSON dict) that define the run."""
  fields = flatten(config)
  for field, value in ADDED_FIELDS.items():
    parent = field.rpartition(".")[0]
    if field not in fields and (not parent or any(k.startswith(parent + ".") for k in fields)):
      fields[field] = value
  return {k: v for k, v in fields.items() if not any(fnmatch.fnmatchcase(k, p) for p in PLACEMENT_FIELDS)}
