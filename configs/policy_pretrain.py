r"""Stage 1 for control policies: constraint-based pre-training of actor-critic policy templates by PPO.

The task is control (``weit_jax/tasks/control.py``): a brax environment, PPO with GAE, the clipped
objective, a value loss, an entropy bonus and observation normalization; the auxiliary model is a
``policy`` (``weit_jax/models/policy.py``) whose weights are ``materialize(templates, scalers)``.
``total_steps`` counts PPO updates (each ``batch_size`` environments x ``unroll_length`` steps).

Default: hopper on the spring backend, 4096 environments, a B-sized policy (width 512, 6 hidden layers),
for an accelerator:

  python main.py --config=configs/policy_pretrain.py --workdir=gs://BUCKET/runs/policy_pretrain

``runlocal``: 256 environments, a pico policy (width 64, 3 hidden layers), minutes on a laptop CPU:

  python main.py --config=configs/policy_pretrain.py:runlocal --workdir=workdirs/policy_pretrain
"""
import ml_collections
from ml_collections import config_dict

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, from_checkpoint=False)
  config = ml_collections.ConfigDict()
  config.program = "pretrain"
  config.model = common.model_config("B", family="policy")
  # Width axes: the hidden layers (hidden, hidden_in), and the observation and action axes with tile
  # 1, so the templates hold hidden-side structure only and serve any morphology (models/policy.py).
  config.weit = ml_collections.ConfigDict(dict(tiles=dict(hidden=64, hidden_in=64, obs=1, action=1),
                                               num_templates=4, untemplated="", zero_init="ones", extra_sizes=""))
  config.constraint = ml_collections.ConfigDict(dict(
      mode="hard", template_wd=0.0, scaler_wd=0.0, dense_wd=0.0, diversity=0.0, soft_lambda=1.0))
  config.init_templates_from = config_dict.placeholder(str)
  common.training_fields(config, total_steps=2000, batch_size=4096)
  common.control_fields(config, runlocal=arg.runlocal)

  if arg.runlocal:
    config.model = common.model_config("pico", family="policy")
    config.weit.tiles = dict(hidden=16, hidden_in=16, obs=1, action=1)
    config.total_steps = 300
  if arg.from_checkpoint:  # sizes from init_templates_from (an export); its templates saved as step 0
    common.from_checkpoint(config)
  return config
