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

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, family="vit", baseline="tleg", runlocal=False, variant="")
  train = importlib.import_module(f"configs.{arg.family}_train")
  config = train.get_config(",".join(["runlocal"] * arg.runlocal + [f"variant={arg.variant}"] * bool(arg.variant)))
  config.program = "baseline_pretrain"
  config.baseline = arg.baseline  # 'tleg' or 'fine'
  del config["init"]  # the baseline starts from its own initialization
  if "sample_quality" in config:
    config.sample_quality.per_class = 0  # measured by the train program only
  return config
