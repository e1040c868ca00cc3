"""Helpers shared by the config files: big_vision-style arguments."""
from __future__ import annotations

import ml_collections

from weit_jax import data_catalog, sharding


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """``'runlocal,target=S/16'`` -> ConfigDict(runlocal=True, target='S/16') over ``defaults``.

  Values keep the type of their default (bool flags may be given bare).
  """
  out = dict(defaults)
  for part in (arg or "").split(","):
    if not part:
      continue
    key, eq, value = part.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; valid: {sorted(defaults)}.")
    if not eq:
      out[key] = True
    elif isinstance(defaults[key], bool):
      out[key] = value.lower() in ("1", "true", "yes")
    elif defaults[key] is None:
      out[key] = value
    else:
      out[key] = type(defaults[key])(value)
  return ml_collections.ConfigDict(out)


# Per model family (weit_jax.models), the fields a config may override (sizes and options), with
# their command-line types; unset (None) means the variant's value, else the model's default. A
# ResNet's depth is blocks per stage: 2 (every stage) or '3-4-6-3'. A ViT's pool_type ('tok', 'gap')
# and posemb ('learn', 'sincos2d') are big_vision's options (default tok + learn). remat_policy (every
# family): 'none' (default) or a JAX checkpoint policy for the scanned blocks (weit_jax/models/remat.py).
SIZE_FIELDS = {
    "vit": dict(width=int, depth=int, mlp_dim=int, num_heads=int, patch_size=int, pool_type=str, posemb=str,
                remat_policy=str),
    "resnet": dict(width=int, depth=str, num_groups=int, stem=str, remat_policy=str),
    "dit": dict(width=int, depth=int, mlp_dim=int, num_heads=int, patch_size=int, remat_policy=str),
    "policy": dict(width=int, depth=int, remat_policy=str),
}


def model_config(variant: str | None = "B/16", family: str = "vit", **sizes) -> ml_collections.ConfigDict:
  """A model: its family, a variant name, and explicit size overrides (None = from the variant)."""
  c = ml_collections.ConfigDict(dict(family=family, variant=variant, dtype=sizes.pop("dtype", "float32")))
  for name, kind in SIZE_FIELDS[family].items():
    value = sizes.pop(name, None)
    c[name] = ml_collections.config_dict.placeholder(kind) if value is None else value
  if sizes:
    raise ValueError(f"unknown {family} size fields {sorted(sizes)}; valid: {sorted(SIZE_FIELDS[family])}.")
  return c


def from_checkpoint(config: ml_collections.ConfigDict) -> None:
  """A pre-training config's ``from_checkpoint`` argument: templates from a dense checkpoint one has
  (``init_templates_from``: a big_vision ``.npz`` or an export folder), the model's sizes read from it
  (no variant; ``--config.model.*`` declares them instead), saved as step 0 without training
  (``--config.total_steps=N`` fine-tunes them under the constraint)."""
  config.model.variant = ml_collections.config_dict.placeholder(str)
  config.total_steps = 0


# Meshes over ('data', 'fsdp', 'model'): weit_jax.sharding's defaults.
DATA_PARALLEL, FSDP_ALL = sharding.DATA_PARALLEL, sharding.FSDP_ALL


def generation_data(name: str) -> ml_collections.ConfigDict:
  """A dataset as image generation reads it: the whole image (shorter side resized, center crop; no
  pad-and-crop, which would teach black borders), flips as the dataset allows, pixels in [-1, 1]."""
  data = data_catalog.default_data_config(name)
  channels = len(data.mean)
  data.update(dict(random_crop="none", crop_padding=0, center_crop_fraction=1.0, mean=(0.5,) * channels,
                   std=(0.5,) * channels))
  return data


# The scaler budget: the examples drawn (steps x batch) as a fraction of an epoch of the templates'
# data, and the pool they are drawn from as a fraction of its training split. From the ViT rows of
# docs/results/ablations.md (CPU scale; MNIST-5k transfer of a depth and a width target): the best
# budget, and the smallest within its spread, at both scaler lrs measured, is 400 steps x batch 128
# drawn from 500 of Fashion-MNIST's 60,000 training images (at the ViT's lr 3e-3: 77.4% / 72.0%;
# the old 100 steps from 2,000 at 1e-2: 71.8% / 58.6%). Past it the deeper target loses (1,000
# steps at 1e-2: 72.8% / 67.1%); below it the width target does (10 steps, 2.1% of an epoch, at 3e-3:
# 72.8% / 55.5%); at 100, 400 and 1,000 steps a smaller pool transfers better. The ResNet's rows
# agree (400 x 500 at lr 3e-3: 41.4% / 34.4% against 100 x 2,000 at 1e-2: 39.1% / 26.7%): its
# runlocal init is the ViT's. The DiT init keeps the ViT's fractions at paper scale (not measured
# for it; its runlocal budget is unchanged).
SCALER_EPOCHS = 400 * 128 / 60_000  # 0.85 of an epoch drawn ...
SCALER_POOL = 500 / 60_000  # ... from 0.83% of the training split


def _train_examples(dataset: str) -> int:
  info = data_catalog.dataset_info(dataset)
  return info.splits[info.train_split]


def scaler_steps(batch_size: int, dataset: str = "imagenet2012", epochs: float = SCALER_EPOCHS) -> int:
  """Scaler-training steps that draw ``epochs`` epochs of ``dataset``'s training split (by default
  the paper-scale budget: SCALER_EPOCHS of ImageNet-1k)."""
  return max(1, round(epochs * _train_examples(dataset) / batch_size))


def scaler_examples(dataset: str = "imagenet2012", fraction: float = SCALER_POOL) -> int:
  """The scaler-training pool: ``fraction`` of ``dataset``'s training split (by default the
  paper-scale pool: SCALER_POOL of ImageNet-1k)."""
  return max(1, round(fraction * _train_examples(dataset)))


def training_fields(config: ml_collections.ConfigDict, *, total_steps: int, batch_size: int,
                    mesh: dict = DATA_PARALLEL) -> None:
  """Run length, cadence, checkpoints, mesh: the fields every program shares."""
  config.seed = 0
  config.task = "classification"  # weit_jax.tasks
  config.total_steps = total_steps
  config.batch_size = batch_size
  config.log_every = 50
  config.eval_every = 500
  config.eval_at = ""  # extra eval steps, comma-separated (e.g. '5,10,15': dense early in a run)
  config.checkpoint_every = 500
  config.keep_checkpoints = 3
  config.resume_step = ml_collections.config_dict.placeholder(int)
  config.overwrite = False
  config.mesh = ml_collections.ConfigDict(dict(mesh))
  # Compile-only dry run for a TPU slice (weit_jax/dry_run.py): topology e.g. 'v5e:16x16'; materialize
  # e.g. 'H/14' also compiles the init program's materialize step for that target, on
  # materialize_mesh (the init program's default mesh); pretrain_step=False compiles only that;
  # hbm_gib overrides the chip's memory.
  config.dry_run = ml_collections.ConfigDict(dict(
      topology=ml_collections.config_dict.placeholder(str),
      pretrain_step=True,
      materialize=ml_collections.config_dict.placeholder(str),
      materialize_mesh=ml_collections.ConfigDict(dict(FSDP_ALL)),
      hbm_gib=ml_collections.config_dict.placeholder(float)))


def control_fields(config: ml_collections.ConfigDict, *, runlocal: bool) -> None:
  """The control task (weit_jax/tasks/control.py): a brax environment and PPO. ``batch_size`` is the
  number of environments stepped in parallel; one train step is one PPO update (a rollout of
  ``unroll_length`` steps of every environment, then ``epochs`` x ``num_minibatches`` optimizer
  updates). ``--config.env=walker2d`` initializes or trains for another morphology."""
  config.task = "control"
  config.env = "hopper"
  config.backend = "spring"  # brax's fastest backend on CPU and TPU; 'generalized', 'positional', 'mjx'
  config.episode_length = 1000
  config.eval_episodes = 32  # the deterministic policy's mean return over these (fixed initial states)
  config.batch_size = 256 if runlocal else 4096
  config.ppo = ml_collections.ConfigDict(dict(
      unroll_length=32, num_minibatches=4, epochs=4, discounting=0.99, gae_lambda=0.95, clip_eps=0.2,
      value_coef=0.5, entropy_coef=1e-3, reward_scaling=1.0, normalize_advantage=True))
  if not runlocal:
    config.ppo.num_minibatches = 32
  # Adam at 3e-4, constant (PPO's usual), gradient norm clipped at 0.5 (PPO implementations' default).
  config.optim = ml_collections.ConfigDict(dict(
      lr=3e-4, warmup_steps=0, schedule="constant", min_lr_ratio=0.0, b1=0.9, b2=0.999, clip_norm=0.5,
      wd_paths=r"kernel$"))
  config.log_every = 10
  config.eval_every = 50 if runlocal else 100
  config.checkpoint_every = 50 if runlocal else 100
