r"""Stage 2 for ResNets: initialize target sizes from pre-trained templates, train only their
scalers, export.

  python main.py --config=configs/resnet_init.py --config.templates=PRETRAIN_WORKDIR --workdir=DIR
  python main.py --config=configs/resnet_init.py:runlocal --config.templates=workdirs/resnet_pretrain \
      --config.targets='depth=3;width=12' --workdir=workdirs/resnet_init

A target's ``depth`` is units per stage (one number for every stage, or '3-4-6-3'), ``width`` the
stem width (stage s has bottleneck width ``width * 2**(s-1)``), ``groups`` the GroupNorm groups.
Each target goes to DIR/<size name>/ with its export and the compact form.
"""
import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, target="R26")
  config = ml_collections.ConfigDict()
  config.program = "init"
  config.templates = ml_collections.config_dict.placeholder(str)  # the pre-training workdir
  config.templates_step = ml_collections.config_dict.placeholder(int)  # default: its latest checkpoint
  config.target = common.model_config(arg.target, family="resnet")  # --config.target.depth=3 etc.
  config.targets = ""  # several sizes at once: 'depth=3;width=12;R26'
  config.scaler_init = "interpolate"  # or 'random'
  config.num_examples = common.scaler_examples()  # the pool the scalers see: 10,676 images, 0.83% of ImageNet-1k
  config.label_smoothing = 0.0
  config.scaler_wd = 0.0
  common.training_fields(config, total_steps=1000, batch_size=1024, mesh=common.FSDP_ALL)
  del config["total_steps"]  # the scaler-training length is `steps`
  config.steps = common.scaler_steps(config.batch_size)  # 0: heuristic only; 1068: 0.85 of an ImageNet epoch
  del config["task"]  # the templates' pre-training task
  config.optim = ml_collections.ConfigDict(dict(
      lr=3e-3, warmup_steps=50, schedule="cosine", min_lr_ratio=0.0, b1=0.9, b2=0.999, clip_norm=1.0,
      wd_paths=".*"))
  config.log_every = 50
  config.eval_every = 0
  config.checkpoint_every = 500

  if arg.runlocal:
    config.target = common.model_config(arg.target if arg.target != "R26" else "mu", family="resnet")
    config.batch_size = 128
    # The measured budget (common.SCALER_EPOCHS, SCALER_POOL): 400 steps from 500 Fashion-MNIST images.
    config.steps = common.scaler_steps(config.batch_size, "fashion_mnist_local")
    config.num_examples = common.scaler_examples("fashion_mnist_local")
    config.optim.warmup_steps = 10
    config.log_every = 10
    config.checkpoint_every = 50
  return config
