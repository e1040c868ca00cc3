r"""Stage 2: initialize target sizes from pre-trained templates, train only their scalers, export.

  python main.py --config=configs/vit_init.py:target=S/16 --config.templates=PRETRAIN_WORKDIR --workdir=DIR
  python main.py --config=configs/vit_init.py:runlocal --config.templates=workdirs/pretrain \
      --config.targets='mu/4;depth=6;width=72,heads=3' --workdir=workdirs/init

Each target goes to DIR/<size name>/ with its export (plain parameters + export.json) and the
compact form (templates + scalers).
"""
import ml_collections
from ml_collections import config_dict

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, target="S/16")
  config = ml_collections.ConfigDict()
  config.program = "init"
  config.templates = config_dict.placeholder(str)  # the pre-training workdir
  config.templates_step = config_dict.placeholder(int)  # default: its latest checkpoint
  config.target = common.model_config(arg.target)  # --config.target.depth=7 etc. override the variant
  config.targets = ""  # several sizes at once: 'S/16;Ti/16;depth=7,width=320,heads=5'
  config.scaler_init = "interpolate"  # or 'random'
  config.num_examples = common.scaler_examples()  # the pool the scalers see: 10,676 images, 0.83% of ImageNet-1k
  config.label_smoothing = 0.0
  config.scaler_wd = 0.0
  common.training_fields(config, total_steps=1000, batch_size=1024, mesh=common.FSDP_ALL)
  del config["total_steps"]  # the scaler-training length is `steps`
  config.steps = common.scaler_steps(config.batch_size)  # 0: heuristic only; 1068: 0.85 of an ImageNet epoch
  del config["task"]  # the templates' pre-training task
  # lr 3e-3 (was 1e-2): docs/results/ablations.md, at 400 scaler steps from 500 images 77.4% / 72.0% on
  # MNIST-5k against 76.7% / 67.0% (3e-2 at 100 steps: 54.6% / 49.5%).
  config.optim = ml_collections.ConfigDict(dict(
      lr=3e-3, warmup_steps=50, schedule="cosine", min_lr_ratio=0.0, b1=0.9, b2=0.999, clip_norm=1.0,
      wd_paths=".*"))
  config.log_every = 50
  config.eval_every = 0
  config.checkpoint_every = 500

  if arg.runlocal:
    config.target = common.model_config(arg.target if arg.target != "S/16" else "mu/4")
    config.batch_size = 128
    # The measured budget (common.SCALER_EPOCHS, SCALER_POOL): 400 steps from 500 Fashion-MNIST images.
    config.steps = common.scaler_steps(config.batch_size, "fashion_mnist_local")
    config.num_examples = common.scaler_examples("fashion_mnist_local")
    config.optim.warmup_steps = 10
    config.log_every = 20
    config.checkpoint_every = 100
  return config
