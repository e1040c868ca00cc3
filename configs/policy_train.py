r"""Stage 3 for control policies: train a plain policy by PPO, from an export or from scratch.

  python main.py --config=configs/policy_train.py:runlocal --config.init=workdirs/policy_init/<size>/export \
      --workdir=workdirs/policy_train
  python main.py --config=configs/policy_train.py:runlocal --config.env=walker2d \
      --config.init=workdirs/policy_init_walker2d/<size>/export --workdir=workdirs/policy_train_walker2d

With ``--config.init`` the policy's size comes from the export (its observation and action sizes must
be the environment's), and its observation statistics too when it has them; without it the model is
``config.model`` from its own initializers. ``total_steps`` counts PPO updates.
"""
import ml_collections
from ml_collections import config_dict

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, variant="S")
  config = ml_collections.ConfigDict()
  config.program = "train"
  config.init = config_dict.placeholder(str)  # an export folder (init program or a baseline)
  config.model = common.model_config(arg.variant, family="policy")
  config.weight_decay = 0.0
  common.training_fields(config, total_steps=2000, batch_size=4096)
  common.control_fields(config, runlocal=arg.runlocal)
  if arg.runlocal:
    config.model = common.model_config(arg.variant if arg.variant != "S" else "pico", family="policy")
    config.total_steps = 300
  return config
