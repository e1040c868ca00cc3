r"""Stage 1 for ResNets: constraint-based pre-training of conv-kernel templates.

Default: a paper-scale run (ImageNet-1k, ResNet-50 auxiliary model with GroupNorm and weight
standardization, batch 1024, AdamW, cosine schedule with warmup) for a TPU pod:

  python main.py --config=configs/resnet_pretrain.py --workdir=gs://BUCKET/runs/resnet_pretrain

``runlocal``: Fashion-MNIST, a small auxiliary ResNet (3 stages of 2 units, width 16), minutes on a
laptop CPU (a step of batch 64 takes about a second on a 2-core CPU: convolutions at 28x28 are
far slower there than the ViT's matmuls):

  python main.py --config=configs/resnet_pretrain.py:runlocal --workdir=workdirs/resnet_pretrain

Tiles: both channel axes of every conv kernel are width axes (``stem``, ``mid{s}a``, ``mid{s}b``,
``res{s}``); the spatial kernel lives whole in the template. ``res`` tiles are 4x the ``mid`` tiles,
as the bottleneck's channels are, so every kernel of a stage has the same grid.
"""
import ml_collections
from ml_collections import config_dict

from configs import common
from weit_jax import data_catalog


def tiles(stages: int, tile: int) -> dict[str, int]:
  """Tile ``tile`` on the stem and bottleneck channels, ``4 * tile`` on each stage's output channels."""
  out = dict(stem=tile)
  for s in range(1, stages + 1):
    out.update({f"mid{s}a": tile, f"mid{s}b": tile, f"res{s}": 4 * tile})
  return out


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, from_checkpoint=False)
  config = ml_collections.ConfigDict()
  config.program = "pretrain"
  config.model = common.model_config("R50", family="resnet", dtype="bfloat16")
  config.weit = ml_collections.ConfigDict(dict(tiles=tiles(4, 32), num_templates=4, untemplated="", zero_init="ones",
                                               extra_sizes=""))
  config.constraint = ml_collections.ConfigDict(dict(
      mode="hard", template_wd=1e-4, scaler_wd=1e-4, dense_wd=0.05, diversity=0.0, soft_lambda=1.0))
  config.distill = ml_collections.ConfigDict(dict(
      teacher=config_dict.placeholder(str), weight=0.0, temperature=1.0))
  config.init_templates_from = config_dict.placeholder(str)

  config.data = data_catalog.default_data_config("imagenet2012")
  config.label_smoothing = 0.1
  common.training_fields(config, total_steps=90 * 1251, batch_size=1024)  # 90 epochs
  config.optim = ml_collections.ConfigDict(dict(
      lr=1e-3, warmup_steps=5_000, schedule="cosine", min_lr_ratio=0.0, b1=0.9, b2=0.999,
      clip_norm=1.0, wd_paths=r"kernel$"))
  config.log_every = 100
  config.eval_every = 5000
  config.checkpoint_every = 2000

  if arg.runlocal:
    config.model = common.model_config("pico", family="resnet")
    config.weit.tiles = tiles(3, 8)
    # The stem and head kept out of templates: they transfer faster (docs/results/ablations.md, resnet).
    config.weit.untemplated = "^(conv_root|head)/"
    config.data = data_catalog.default_data_config("fashion_mnist_local")
    config.label_smoothing = 0.0
    config.total_steps = 300
    config.batch_size = 64
    config.optim.lr = 2e-3
    config.optim.warmup_steps = 30
    config.log_every = 25
    config.eval_every = 100
    config.checkpoint_every = 100
  if arg.from_checkpoint:  # sizes from init_templates_from (an export); its templates saved as step 0
    common.from_checkpoint(config)
  return config
