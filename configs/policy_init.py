r"""Stage 2 for control policies: initialize policies of other depths and widths (and morphologies)
from pre-trained templates, train only their scalers by PPO with the templates frozen, export.

  python main.py --config=configs/policy_init.py:runlocal --config.templates=workdirs/policy_pretrain \
      --config.targets='depth=2;depth=6;width=40' --workdir=workdirs/policy_init
  python main.py --config=configs/policy_init.py:runlocal --config.templates=workdirs/policy_pretrain \
      --config.env=walker2d --config.targets='depth=3;width=96' --workdir=workdirs/policy_init_walker2d

A target's observation and action sizes are its environment's (``--config.env``; default the
templates' hopper). Each target goes to DIR/<size name>/ with its export (plain parameters +
export.json, with the observation statistics) and the compact form (templates + scalers).
"""
import ml_collections
from ml_collections import config_dict

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, target="S")
  config = ml_collections.ConfigDict()
  config.program = "init"
  config.templates = config_dict.placeholder(str)  # the pre-training workdir
  config.templates_step = config_dict.placeholder(int)  # default: its latest checkpoint
  config.target = common.model_config(arg.target, family="policy")
  config.targets = ""  # several sizes at once: 'depth=2;depth=6;width=40'
  config.scaler_init = "interpolate"  # or 'random'
  config.steps = 100  # PPO updates of the scalers (0: heuristic only)
  # How the scalers learn: 'ppo' (the target's own PPO, templates frozen) or 'distill' (match the
  # auxiliary policy's outputs on its own rollouts; the templates' environment only).
  config.adapt = "ppo"
  config.scaler_wd = 0.0
  common.training_fields(config, total_steps=100, batch_size=4096)
  del config["total_steps"]  # the scaler-training length is `steps`
  common.control_fields(config, runlocal=arg.runlocal)
  del config["task"]  # the templates' pre-training task (control); env and PPO settings are this config's
  config.optim.lr = 1e-3
  config.eval_every = 0
  config.checkpoint_every = 50
  if arg.runlocal:
    config.target = common.model_config(arg.target if arg.target != "S" else "mu", family="policy")
    config.steps = 30
  return config
