r"""Stage 1: constraint-based pre-training of weight templates.

Default: the paper-scale run (ImageNet-1k, ViT-B/16 auxiliary model, batch 4096, AdamW, cosine
schedule with warmup) for a TPU pod:

  python main.py --config=configs/vit_pretrain.py --workdir=gs://BUCKET/runs/pretrain

``runlocal``: Fashion-MNIST (built locally from Debian's dataset-fashion-mnist), a small auxiliary
ViT, a few minutes on a laptop CPU:

  python main.py --config=configs/vit_pretrain.py:runlocal --workdir=workdirs/pretrain

``from_checkpoint``: templates from a dense ViT one already has, no training (README, "Start from a
checkpoint you have"): the model's sizes and options are read from ``init_templates_from`` (a
big_vision ``.npz`` or an export folder; ``--config.model.*`` declares them instead), the templates
and its scalers are extracted in closed form and saved as step 0 (``--config.total_steps=N``
fine-tunes them for N steps under the constraint):

  python main.py --config=configs/vit_pretrain.py:runlocal,from_checkpoint \
      --config.init_templates_from=/path/to/params.npz --workdir=workdirs/from_checkpoint
"""
import ml_collections
from ml_collections import config_dict

from configs import common
from weit_jax import data_catalog


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, from_checkpoint=False)
  config = ml_collections.ConfigDict()
  config.program = "pretrain"

  # The auxiliary model whose weights are materialize(templates, scalers).
  config.model = common.model_config("B/16", dtype="bfloat16")
  # Width axes and their tiles; N templates per bank.
  config.weit = ml_collections.ConfigDict(dict(tiles=dict(embed=64, mlp=64, heads=1, kv=16), num_templates=4,
                                                      untemplated="", zero_init="ones", extra_sizes=""))
  # docs/design.md section 4: 'hard' (weights exist only as compositions) or 'soft' (a penalty).
  config.constraint = ml_collections.ConfigDict(dict(
      mode="hard", template_wd=1e-4, scaler_wd=1e-4, dense_wd=0.05, diversity=0.0, soft_lambda=1.0))
  config.distill = ml_collections.ConfigDict(dict(
      teacher=config_dict.placeholder(str), weight=0.0, temperature=1.0))
  config.init_templates_from = config_dict.placeholder(str)

  config.data = data_catalog.default_data_config("imagenet2012")
  config.label_smoothing = 0.1
  common.training_fields(config, total_steps=300 * 1251, batch_size=4096)  # 300 epochs
  config.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=10_000, schedule="cosine", min_lr_ratio=0.0, b1=0.9, b2=0.999,
      clip_norm=1.0, wd_paths=r"(kernel|embedding|pos_embedding|cls)$"))
  config.log_every = 100
  config.eval_every = 5000
  config.checkpoint_every = 2000

  if arg.runlocal:
    config.model = common.model_config("pico/4")
    config.weit.tiles = dict(embed=16, mlp=16, heads=1, kv=8)
    config.weit.num_templates = 4
    config.data = data_catalog.default_data_config("fashion_mnist_local")
    config.label_smoothing = 0.0
    config.total_steps = 1500
    config.batch_size = 128
    config.optim.lr = 2e-3
    config.optim.warmup_steps = 100
    config.log_every = 50
    config.eval_every = 500
    config.checkpoint_every = 250
  if arg.from_checkpoint:  # sizes from init_templates_from; the extracted templates saved as step 0
    common.from_checkpoint(config)
  return config
