r"""Stage 3: train a plain ViT from an export (or from scratch), like any other model.

  python main.py --config=configs/vit_train.py:runlocal --config.init=workdirs/init/<size>/export --workdir=DIR
  python main.py --config=configs/vit_train.py:runlocal,variant=mu/4 --workdir=DIR   # random init

The model size comes from the export when ``init`` is set (``model`` must then match it, except
the number of classes, which comes from the dataset: a different one gets a new head).
"""
import ml_collections
from ml_collections import config_dict

from configs import common
from weit_jax import data_catalog


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, variant="S/16")
  config = ml_collections.ConfigDict()
  config.program = "train"
  config.init = config_dict.placeholder(str)  # an export folder (init program or a baseline)
  config.model = common.model_config(arg.variant, dtype="bfloat16")
  config.data = data_catalog.default_data_config("imagenet2012")
  config.label_smoothing = 0.1
  config.weight_decay = 0.05
  common.training_fields(config, total_steps=10 * 1251, batch_size=1024)  # 10 epochs
  config.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=1000, schedule="cosine", min_lr_ratio=0.0, b1=0.9, b2=0.999, clip_norm=1.0,
      wd_paths=r"(kernel|embedding|pos_embedding|cls)$"))
  if arg.runlocal:
    config.model = common.model_config(arg.variant if arg.variant != "S/16" else "mu/4")
    config.data = data_catalog.default_data_config("fashion_mnist_local")
    config.label_smoothing = 0.0
    config.total_steps = 500
    config.batch_size = 128
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 50
    config.log_every = 50
    config.eval_every = 250
    config.checkpoint_every = 250
  return config
