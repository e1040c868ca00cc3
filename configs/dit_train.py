r"""Stage 3 for diffusion transformers: train a plain DiT from an export (or from scratch).

  python main.py --config=configs/dit_train.py:runlocal --config.init=workdirs/dit_init/<size>/export --workdir=DIR
  python main.py --config=configs/dit_train.py:runlocal,variant=mu/4 --workdir=DIR   # random init

The model size comes from the export when ``init`` is set; the objective is the pre-training one
(rectified flow, ``weit_jax/rectified_flow.py``). Default: ImageNet-1k at 32x32 pixels, as
configs/dit_pretrain.py. ``runlocal`` (Fashion-MNIST) also measures sample quality at eval steps
and at the end ("FID, Fashion-MNIST classifier features" and class fidelity of 500 samples, a grid
in DIR/samples/; ``sample_quality`` below).
"""
import ml_collections
from ml_collections import config_dict

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, variant="S/2")
  config = ml_collections.ConfigDict()
  config.program = "train"
  config.init = config_dict.placeholder(str)  # an export folder (init program or a baseline)
  config.model = common.model_config(arg.variant, family="dit", dtype="bfloat16")
  config.data = common.generation_data("imagenet2012")
  config.data.image_size = 32
  config.weight_decay = 0.0  # the DiT paper's AdamW has none
  common.training_fields(config, total_steps=100_000, batch_size=256)
  config.task = "diffusion"
  config.diffusion = ml_collections.ConfigDict(dict(label_dropout=0.1))
  # At eval steps and at the end: per_class samples of every class (the same noise each time), their
  # "FID, Fashion-MNIST classifier features" and class fidelity (weit_jax/evaluators/sample_quality.py), and a
  # grid in WORKDIR/samples/. Measured on Fashion-MNIST only (the classifier's data): 0 turns it off.
  config.sample_quality = ml_collections.ConfigDict(dict(per_class=0, steps=20, guidance=1.0, seed=0))
  config.optim = ml_collections.ConfigDict(dict(
      lr=1e-4, warmup_steps=1000, schedule="cosine", min_lr_ratio=0.0, b1=0.9, b2=0.999, clip_norm=1.0,
      wd_paths=r"kernel$"))
  if arg.runlocal:
    config.model = common.model_config(arg.variant if arg.variant != "S/2" else "mu/4", family="dit")
    config.data = common.generation_data("fashion_mnist_local")
    config.total_steps = 500
    config.batch_size = 128
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 50
    config.log_every = 50
    config.eval_every = 250
    config.checkpoint_every = 250
    config.sample_quality.per_class = 50
  return config
