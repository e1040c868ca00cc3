r"""Stage 1 for diffusion transformers: constraint-based pre-training of DiT templates.

The task is class-conditional image generation by rectified flow (``weit_jax/tasks/diffusion.py``
over ``weit_jax/rectified_flow.py``: velocity prediction, label dropout for classifier-free
guidance); the auxiliary model is a DiT
(``weit_jax/models/dit.py``) whose weights, the adaLN modulation projections included, are
``materialize(templates, scalers)``.

Default: class-conditional ImageNet-1k in pixel space at 32x32 (no latent autoencoder can be
downloaded here, so not the paper's 256x256 latents), DiT-B/2 auxiliary model (256 tokens), batch
256, AdamW at 1e-4 as the DiT paper (no EMA of the weights here), for a TPU pod:

  python main.py --config=configs/dit_pretrain.py --workdir=gs://BUCKET/runs/dit_pretrain

``runlocal``: Fashion-MNIST (built locally from Debian's dataset-fashion-mnist), a small auxiliary
DiT, minutes on a laptop CPU:

  python main.py --config=configs/dit_pretrain.py:runlocal --workdir=workdirs/dit_pretrain
"""
import ml_collections
from ml_collections import config_dict

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, from_checkpoint=False)
  config = ml_collections.ConfigDict()
  config.program = "pretrain"

  config.model = common.model_config("B/2", family="dit", dtype="bfloat16")
  # Width axes: the residual stream (embed), the condition vector (cond) and the timestep MLP's
  # hidden layer (cond_mlp) are all as wide as the model; mlp, heads, kv as the ViT's. N=64: a
  # denoiser needs far more template capacity than a classifier (docs/results/generation.md, on the
  # runlocal DiT: the auxiliary's eval loss against an unconstrained DiT's is N=4 +48%, N=16 +16%,
  # N=32 +1%, N=64 -11%; N=64 is the smallest count whose deeper and wider students end ahead of
  # weight selection's). Chosen on that CPU-sized DiT; at paper scale the same count, not re-measured.
  config.weit = ml_collections.ConfigDict(dict(
      tiles=dict(embed=64, cond=64, cond_mlp=64, mlp=64, heads=1, kv=16), num_templates=64,
      untemplated="", zero_init="ones", extra_sizes=""))
  config.constraint = ml_collections.ConfigDict(dict(
      mode="hard", template_wd=1e-4, scaler_wd=1e-4, dense_wd=0.0, diversity=0.0, soft_lambda=1.0))
  config.init_templates_from = config_dict.placeholder(str)

  config.data = common.generation_data("imagenet2012")
  config.data.image_size = 32
  common.training_fields(config, total_steps=400_000, batch_size=256)
  config.task = "diffusion"
  config.diffusion = ml_collections.ConfigDict(dict(label_dropout=0.1))
  config.optim = ml_collections.ConfigDict(dict(
      lr=1e-4, warmup_steps=5_000, schedule="cosine", min_lr_ratio=0.0, b1=0.9, b2=0.999,
      clip_norm=1.0, wd_paths=r"kernel$"))
  config.log_every = 100
  config.eval_every = 5000
  config.checkpoint_every = 2000

  if arg.runlocal:
    config.model = common.model_config("pico/4", family="dit")
    # Tiles of 8 on the width axes, not 16 (docs/results/generation.md, ablation "tiles16"): the
    # auxiliary's eval loss 0.357 -> 0.313 with 0.42x the template parameters, and the narrower
    # target (width 40 = 5 x 8; with 16 its composition is 48 wide, cropped) ends at FID 143 not 178.
    config.weit.tiles = dict(embed=8, cond=8, cond_mlp=8, mlp=8, heads=1, kv=8)
    config.data = common.generation_data("fashion_mnist_local")
    config.total_steps = 1500
    config.batch_size = 128
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 100
    config.log_every = 50
    config.eval_every = 500
    config.checkpoint_every = 250
  if arg.from_checkpoint:  # sizes from init_templates_from (an export); its templates saved as step 0
    common.from_checkpoint(config)
  return config
