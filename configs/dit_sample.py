r"""Samples of a DiT export: a PNG grid, one row per class (weit_jax/programs/sample.py).

  python main.py --config=configs/dit_sample.py --config.init=workdirs/dit_init/<size>/export --workdir=S
"""
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.program = "sample"
  config.init = config_dict.placeholder(str)  # an export folder of a DiT
  config.per_class = 8  # columns of the grid
  config.classes = ""  # e.g. '0,3,7'; default: every class
  config.steps = 50  # Euler steps from noise to image
  config.guidance = 2.0  # classifier-free guidance scale (1: the conditional model, 0: unconditional)
  config.seed = 0
  return config
