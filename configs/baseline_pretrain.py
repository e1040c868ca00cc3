r"""Pre-training of a baseline initializer's auxiliary model (TLEG or FINE), for the comparisons.

  python main.py --config=configs/baseline_pretrain.py:family=vit,baseline=tleg,runlocal --workdir=workdirs/tleg
  python main.py --config=configs/baseline_pretrain.py:family=dit,baseline=fine,runlocal,variant=pico/4 \
      --workdir=workdirs/fine

The family's training config (``configs/<family>_train.py`` with the same ``runlocal`` and
``variant``: its data, step budget and optimizer) whose model is the auxiliary, trained in the
baseline's factorized form (``weit_jax/programs/baseline_pretrain.py``). The export in
``WORKDIR/export`` is the source ``weit_jax.inits`` reads (``TLEGSource``/``FINESource.from_export``).
"""
import importlib

import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, family="vit", baseline="tleg", runlocal=False, variant="")
  train = importlib.import_module(f"configs.{arg.family}_train")
  return from_train_config(
      train.get_config(",".join(["runlocal"] * arg.runlocal + [f"variant={arg.variant}"] * bool(arg.variant))),
      arg.baseline)


def from_train_config(train_config, baseline: str) -> ml_collections.ConfigDict:
  """A copy of a ``configs/<family>_train.py`` config that pre-trains ``baseline``'s auxiliary
  ('tleg' or 'fine'). Its ``init`` goes (the baseline starts from its own initialization; one that
  is set stays, for the program to refuse), and so does a DiT's ``sample_quality``: the train
  program measures it, this one never would."""
  config = ml_collections.ConfigDict(train_config.copy_and_resolve_references().to_dict())
  config.program, config.baseline = "baseline_pretrain", baseline
  if "init" in config and not config.init:
    del config["init"]
  if "sample_quality" in config:
    del config["sample_quality"]
  return config
