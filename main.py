r"""weit_jax entry point: parses flags and runs the program the config names.

  python main.py --config=configs/vit_pretrain.py:runlocal --workdir=workdirs/pretrain
  python main.py --config=configs/vit_init.py:runlocal --config.templates=workdirs/pretrain --workdir=workdirs/init
  python main.py --config=configs/vit_train.py:runlocal --config.init=workdirs/init/pico/export --workdir=workdirs/train
"""
import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file; e.g. configs/vit_pretrain.py:runlocal.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where this run writes everything (checkpoints, metrics, plots).")
flags.mark_flags_as_required(["config", "workdir"])

PROGRAMS = ("pretrain", "init", "train")


def main(argv):
  del argv
  import jax
  from weit_jax import checkpoint, distributed
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # library INFO chatter hides the progress lines
  config = flags.FLAGS.config
  if config.program not in PROGRAMS:
    raise ValueError(f"config.program={config.program!r}; use one of {PROGRAMS}.")
  if config.get("dry_run") and config.dry_run.get("topology"):
    # Compile-only, in this one process: the host's own devices stay CPU (libtpu is only asked
    # for the slice's description), unless JAX_PLATFORMS says otherwise.
    if not os.environ.get("JAX_PLATFORMS"):
      jax.config.update("jax_platforms", "cpu")
    from weit_jax import dry_run
    dry_run.run(config, checkpoint.absolute(flags.FLAGS.workdir))
    return
  distributed.initialize(config)
  program = importlib.import_module(f"weit_jax.programs.{config.program}")
  program.run(config, checkpoint.absolute(flags.FLAGS.workdir))


def _run():
  """Usage errors (bad config, missing data, damaged checkpoint) end as one readable line, exit 2."""
  from weit_jax.checkpoint import CheckpointError
  from weit_jax.train_loop import DivergenceError
  try:
    app.run(main)
  except (ValueError, FileNotFoundError, CheckpointError, DivergenceError) as e:
    if os.environ.get("WEIT_DEBUG"):
      raise
    print(f"error: {e}", file=sys.stderr)
    print("(set WEIT_DEBUG=1 for the traceback)", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: reads still in flight in orbax/tensorstore threads (a damaged checkpoint) would
    # otherwise print tracebacks during interpreter shutdown, burying the one-line error.
    os._exit(2)


if __name__ == "__main__":
  _run()
