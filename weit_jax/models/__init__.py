"""Model families: the one place that knows a family's fields.

A family (``config.model.family``: ``vit``, ``resnet``, ``dit``, ``policy``) is:

  config_cls      a frozen dataclass of everything that fixes the parameter shapes and the
                  computation (``short_name()`` names a size)
  make_config     ``(variant=None, **fields) -> config``, validated: every mistake is reported
                  before anything traces, with what to change
  variants        named sizes (``'S/16'``, ``'R50'``, ``'pico'``, ...)
  module          ``config -> nn.Module``: the plain Flax model, logical axes on every parameter,
                  nothing of templates
  dummy_inputs    ``(config, batch=1) -> tuple``: the positional inputs ``init`` traces with
                  (images; a DiT's images, times and labels)
  target_fields   the fields a target size takes from the source (auxiliary) model when the
                  target spec does not name them; ``aliases`` are short spec keys (``heads``)
  derive          ``(spec fields, base fields, source config) -> fields``: how a target size
                  derives what it does not name (e.g. the ViT's MLP ratio, a ResNet's stages)
  option_fields   fields that fix the computation beyond the sizes (a ViT's pooling and position
                  embedding): a target always has its templates' options
  data_fields     the fields set from the dataset (image size, channels, classes)
  train_flops     ``(config, batch) -> model FLOPs of one training step`` (for MFU), or None
  big_vision_npz  whether exports also write big_vision's ``params.npz`` (the parameter tree is
                  big_vision's own model's)
  from_big_vision ``flat '/'-joined arrays -> (flat arrays in this model's layout, size and option
                  fields read off their shapes)``: how a big_vision checkpoint of the family is read
                  (a template source, ``weit_jax/dense_checkpoint.py``), or None
  tasks           the tasks (``weit_jax.tasks``) its models serve: their inputs and outputs

The programs, initializers, dry run and benchmarks go through this registry (``get``, ``build``,
``dummy_inputs``, ``to_record`` / ``from_record`` for the ``model`` record of exports and runs)
and never name a family's fields. ``policy``: actor-critic MLPs for control (``weit_jax.models.policy``).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from weit_jax.models import dit, policy, resnet, vit


# Logical axes that are format, not width: never tiled by a family's default tiles, copied whole by
# weight selection. Every other named axis (``embed``, ``mlp``, ``stem``, ``res2``, ...) is a width axis.
FIXED_AXES = frozenset({"layers", "classes", "tokens", "patch_h", "patch_w", "conv_h", "conv_w", "channels",
                        "frequencies", "modulation", "patch_out",  # a DiT's
                        "value"})  # a policy's critic output

# Fields of every family's config that say how a model computes on a device, not which function it
# is: an export or a run matches a model whatever these are, and each program sets its own.
RUNTIME_FIELDS = ("dtype", "remat_policy")


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  config_cls: type
  make_config: Callable[..., Any]
  variants: Mapping[str, Any]
  parse_variant: Callable[[str], dict]
  module: Callable[[Any], nn.Module]
  dummy_inputs: Callable[..., tuple]
  target_fields: tuple[str, ...]
  aliases: Mapping[str, str]
  derive: Callable[[dict, dict, Any], dict]
  option_fields: tuple[str, ...] = ()
  data_fields: tuple[str, ...] = ("image_size", "channels", "num_classes")
  train_flops: Callable[[Any, int], float] | None = None
  big_vision_npz: bool = False
  from_big_vision: Callable[[Mapping[str, Any]], tuple[dict, dict]] | None = None
  tasks: tuple[str, ...] = ("classification",)
  # True: the ``classes``-axis parameters are an output head (a classifier's), which weight
  # selection re-initializes as its paper does; False: a class embedding the model reads (a
  # conditional generator's), selected like every other parameter.
  class_head: bool = True


def _keep_mlp_ratio(fields: dict, base: dict, source) -> dict:
  """A new width without an MLP size keeps the source's MLP ratio."""
  fields = dict(fields)
  if "width" in fields and "mlp_dim" not in fields and "variant" not in fields:
    fields["mlp_dim"] = int(fields["width"]) * source.mlp_dim // source.width
  return fields


def _resnet_derive(fields: dict, base: dict, source) -> dict:
  """One depth number applies to every stage of the base (variant or source)."""
  fields = dict(fields)
  if "depth" in fields:
    fields["depth"] = resnet.parse_depth(fields["depth"], len(base["depth"]))
  return fields


FAMILIES: dict[str, Family] = {
    "vit": Family("vit", vit.ViTConfig, vit.make_config, vit.VARIANTS, vit.parse_variant, vit.ViT,
                  vit.dummy_inputs, vit.SIZE_FIELDS, {"heads": "num_heads", "mlp": "mlp_dim", "patch": "patch_size"},
                  _keep_mlp_ratio, option_fields=vit.OPTION_FIELDS, train_flops=vit.train_flops,
                  big_vision_npz=True, from_big_vision=vit.from_big_vision),
    "resnet": Family("resnet", resnet.ResNetConfig, resnet.make_config, resnet.VARIANTS, resnet.parse_variant,
                     resnet.ResNet, resnet.dummy_inputs, resnet.SIZE_FIELDS + ("stem",), resnet.ALIASES,
                     _resnet_derive, train_flops=resnet.train_flops),
    "dit": Family("dit", dit.DiTConfig, dit.make_config, dit.VARIANTS, dit.parse_variant, dit.DiT, dit.dummy_inputs,
                  dit.SIZE_FIELDS, {"heads": "num_heads", "mlp": "mlp_dim", "patch": "patch_size"}, _keep_mlp_ratio,
                  train_flops=dit.train_flops, tasks=("diffusion",), class_head=False),
    "policy": Family("policy", policy.PolicyConfig, policy.make_config, policy.VARIANTS, policy.parse_variant,
                     policy.Policy, policy.dummy_inputs, policy.SIZE_FIELDS, {}, lambda fields, base, source: fields,
                     data_fields=("obs_size", "action_size"), train_flops=policy.train_flops, tasks=("control",),
                     class_head=False),
}


def get(name: str) -> Family:
  if name not in FAMILIES:
    raise ValueError(f"unknown model family {name!r}; use one of {sorted(FAMILIES)} (config.model.family).")
  return FAMILIES[name]


def family_of(config) -> Family:
  for family in FAMILIES.values():
    if isinstance(config, family.config_cls):
      return family
  raise ValueError(f"{type(config).__name__} is not the config of a model family ({sorted(FAMILIES)}).")


def build(config) -> nn.Module:
  """The plain model of ``config`` (any family)."""
  return family_of(config).module(config)


def dummy_inputs(config, batch: int = 1) -> tuple:
  """The model's positional inputs for ``init`` (zeros of the right shapes)."""
  return family_of(config).dummy_inputs(config, batch)


def init_params(config, seed: int) -> dict:
  """The model's own initializers for ``seed``, as a nested dict of float32 numpy arrays."""
  model = build(config)
  params = jax.jit(model.init)(jax.random.key(int(seed)), *dummy_inputs(config))
  return jax.tree_util.tree_map(lambda x: np.array(x, np.float32), jax.device_get(nn.unbox(params)["params"]))


def classifier_paths(config) -> list[tuple[str, ...]]:
  """Paths of the parameters with a ``classes`` axis (the head): what a new task re-initializes."""
  boxed = jax.eval_shape(build(config).init, jax.random.key(0), *dummy_inputs(config))
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  specs = jax.tree_util.tree_map(tuple, nn.get_partition_spec(boxed)["params"], is_leaf=is_spec)
  return sorted(p for p, axes in traverse_util.flatten_dict(specs).items() if "classes" in axes)


def with_fresh_classifier(params, config, seed: int) -> dict:
  """``params`` with the head (every ``classes``-axis parameter) from the model's own init: for an
  export of the same model trained on another number of classes."""
  flat = traverse_util.flatten_dict(dict(params))
  fresh = traverse_util.flatten_dict(init_params(config, seed))
  for path in classifier_paths(config):
    flat[path] = fresh[path]
  return traverse_util.unflatten_dict(flat)


def other_classes(exported, target) -> bool:
  """Whether two configs of a family with classes differ in their number (a new head is needed)."""
  return getattr(exported, "num_classes", None) != getattr(target, "num_classes", None)


def same_up_to_head(exported, target) -> bool:
  """Whether ``exported`` is ``target``'s model but for the number of classes and the runtime fields:
  an export that initializes ``target`` (with a fresh head if the classes differ)."""
  if type(exported) is not type(target):
    return False
  classes = {"num_classes": target.num_classes} if hasattr(target, "num_classes") else {}
  return dataclasses.replace(exported, **classes, **runtime_of(target)) == target


def to_record(config) -> dict:
  """The JSON record of a model config (exports, runs): its fields and its family."""
  return dict(dataclasses.asdict(config), family=family_of(config).name)


DEFAULT_FAMILY = "vit"  # of a model section or record that names none (written before there were families)


def family_named_in(fields: Mapping[str, Any]) -> Family:
  """The family a model section or record names (``family``; ``DEFAULT_FAMILY`` if it names none)."""
  return get(fields.get("family") or DEFAULT_FAMILY)


def from_record(record: Mapping[str, Any]):
  """A model config from ``to_record``'s output."""
  fields = dict(record)
  family = family_named_in(fields)
  fields.pop("family", None)
  valid = {f.name for f in dataclasses.fields(family.config_cls)}
  unknown = set(fields) - valid
  if unknown:
    raise ValueError(f"a {family.name} model record with unknown fields {sorted(unknown)}; it was written by "
                     "another version of weit_jax.")
  return family.config_cls(**fields)


def from_config(model_fields: Mapping[str, Any], data_fields: Mapping[str, Any]):
  """A validated model config from ``config.model`` (``family``, ``variant`` and size overrides)
  and the dataset's fields (image size, channels, classes)."""
  fields = {k: v for k, v in dict(model_fields).items() if v is not None}
  family = family_named_in(fields)
  fields.pop("family", None)
  variant = fields.pop("variant", None)
  return family.make_config(variant, **fields, **dict(data_fields))


def parse_targets(spec: str, family: Family) -> list[dict]:
  """``'S/16;depth=7,width=320,heads=5'`` -> one dict of spec fields per target (a variant name,
  and fields with their aliases resolved). Values are ints, or strings where a family takes them
  (a ResNet's ``depth=3-4-6-3``)."""
  targets = []
  keys = sorted(set(family.target_fields) | set(family.aliases))
  for item in filter(None, (s.strip() for s in spec.split(";"))):
    fields: dict = {}
    for part in filter(None, (p.strip() for p in item.split(","))):
      key, eq, value = part.partition("=")
      if not eq:
        fields["variant"] = key
        continue
      key = family.aliases.get(key, key)
      if key not in family.target_fields:
        raise ValueError(f"target {item!r}: unknown {family.name} field {key!r}; use a variant (one of "
                         f"{sorted(family.variants)}) and/or {keys}.")
      fields[key] = int(value) if re.fullmatch(r"-?\d+", value.strip()) else value.strip()
    targets.append(fields)
  if not targets:
    raise ValueError("no target size given; set --config.targets (e.g. 'depth=4;width=48').")
  return targets


def option_conflict(requested: Mapping[str, Any], source) -> tuple[str, Any, Any] | None:
  """The first option (``option_fields``) that ``requested`` sets to another value than ``source``
  has, as (name, requested, source's); a model made from ``source`` (templates, an export) has its
  options. Unset (None) options conflict with nothing."""
  for name in family_of(source).option_fields:
    if requested.get(name) is not None and requested.get(name) != getattr(source, name):
      return name, requested.get(name), getattr(source, name)
  return None


def target_config(fields: Mapping[str, Any], source, data: Mapping[str, Any] | None = None):
  """The config of one target (``parse_targets`` output) initialized from templates of ``source``:
  fields the target does not name come from its variant, else from the source; the options
  (``option_fields``) and the runtime fields always from the source; the dataset's fields from
  ``data`` (the init task's: a policy for another morphology), else from the source."""
  family = family_of(source)
  fields = dict(fields)
  if (conflict := option_conflict(fields, source)):
    name, want, have = conflict
    raise ValueError(
        f"a target with {name}={want!r} cannot be composed from templates pre-trained with {name}={have!r}: "
        f"a target has its templates' {' and '.join(family.option_fields)}; pre-train templates with "
        f"--config.model.{name}={want!r}.")
  fields = {k: v for k, v in fields.items() if k not in family.option_fields}
  variant = fields.pop("variant", None)
  base = family.parse_variant(variant) if variant else {k: getattr(source, k) for k in family.target_fields}
  base.update(family.derive(dict(fields, **({"variant": variant} if variant else {})), base, source))
  base.pop("variant", None)
  data = {k: (data or {}).get(k, getattr(source, k)) for k in family.data_fields}
  data.update({k: getattr(source, k) for k in family.option_fields})
  return family.make_config(**base, **data, **runtime_of(source))


def runtime_of(config) -> dict[str, Any]:
  """``config``'s ``RUNTIME_FIELDS``."""
  return {k: getattr(config, k) for k in RUNTIME_FIELDS}


__all__ = ["FAMILIES", "FIXED_AXES", "Family", "build", "classifier_paths", "dummy_inputs", "family_of",
           "from_config", "from_record", "get", "init_params", "option_conflict", "other_classes", "same_up_to_head", "parse_targets", "resnet",
           "RUNTIME_FIELDS", "runtime_of", "target_config", "to_record", "vit", "with_fresh_classifier"]
