r"""Stage 3 for ResNets: train a plain ResNet from an export (or from scratch), like any other model.

  python main.py --config=configs/resnet_train.py:runlocal --config.init=workdirs/resnet_init/<size>/export --workdir=DIR
  python main.py --config=configs/resnet_train.py:runlocal,variant=mu --workdir=DIR   # random init

The model size comes from the export when ``init`` is set (``model`` must then match it, except
the number of classes, which comes from the dataset: a different one gets a new head).
"""
import ml_collections
from ml_collections import config_dict

from configs import common
from weit_jax import data_catalog


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, variant="R50")
  config = ml_collections.ConfigDict()
  config.program = "train"
  config.init = config_dict.placeholder(str)  # an export folder (init program or a baseline)
  config.model = common.model_config(arg.variant, family="resnet", dtype="bfloat16")
  config.data = data_catalog.default_data_config("imagenet2012")
  config.label_smoothing = 0.1
  config.weight_decay = 0.05
  common.training_fields(config, total_steps=10 * 1251, batch_size=1024)  # 10 epochs
  config.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=1000, schedule="cosine", min_lr_ratio=0.0, b1=0.9, b2=0.999, clip_norm=1.0,
      wd_paths=r"kernel$"))
  if arg.runlocal:
    config.model = common.model_config(arg.variant if arg.variant != "R50" else "mu", family="resnet")
    config.data = data_catalog.default_data_config("fashion_mnist_local")
    config.label_smoothing = 0.0
    config.total_steps = 200
    config.batch_size = 64
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 20
    config.log_every = 25
    config.eval_every = 100
    config.checkpoint_every = 100
  return config
