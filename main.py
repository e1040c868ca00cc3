r"""weit_jax entry point: parses flags and runs the program the config names.

  python main.py --config=configs/vit_pretrain.py:runlocal --workdir=workdirs/pretrain
  python main.py --config=configs/vit_init.py:runlocal --config.templates=workdirs/pretrain --workdir=workdirs/init
  python main.py --config=configs/vit_train.py:runlocal --config.init=workdirs/init/pico/export --workdir=workdirs/train
  python main.py --config=configs/dit_sample.py --config.init=workdirs/dit_init/<size>/export --workdir=workdirs/samples

``--check``: validate the config, data and workdir as the run would, print what was checked, and
write nothing.
"""
import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags



def define_flags(flag_values=flags.FLAGS, sys_argv=None):
  """``--config``, ``--workdir``, ``--check`` on ``flag_values``; ``sys_argv`` (default sys.argv) is
  where ml_collections finds the ``--config.FIELD`` overrides."""
  config_flags.DEFINE_config_file("config", None, "Config file; e.g. configs/vit_pretrain.py:runlocal.",
                                  lock_config=True, flag_values=flag_values, sys_argv=sys_argv)
  flags.DEFINE_string("workdir", None, "Where this run writes everything (checkpoints, metrics, plots).",
                      flag_values=flag_values)
  flags.DEFINE_bool("check", False, "Only validate the config, data and workdir; write nothing.",
                    flag_values=flag_values)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


define_flags()

PROGRAMS = ("pretrain", "init", "train", "sample", "baseline_pretrain")


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
  distributed.enable_compilation_cache()
  program = importlib.import_module(f"weit_jax.programs.{config.program}")
  workdir = checkpoint.absolute(flags.FLAGS.workdir)
  if flags.FLAGS.check:
    program.validate(config, workdir)
    print(f"The {config.program} config is valid for {workdir}; nothing was written.")
    return
  program.run(config, workdir)


def parse_flags(argv, flag_values=flags.FLAGS):
  """absl's flag parsing, with every mistake on the command line raised as a ValueError (one
  ``error:`` line, exit 2) instead of absl's usage dump or ml_collections' traceback."""
  try:
    return flag_values(argv)
  except (AttributeError, KeyError) as e:  # an override of a field the config does not have
    raise ValueError(_unknown_override(argv) or str(e)) from e
  except flags.Error as e:  # a value of the wrong type, a missing --workdir, an unknown flag
    raise ValueError(str(e)) from e


def _unknown_override(argv) -> str | None:
  """Names the first ``--config.a.b=...`` override whose field the config file does not define,
  with the fields that level does have."""
  import runpy
  import ml_collections
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return None
  path, colon, arg = spec.partition(":")
  config = runpy.run_path(path)["get_config"](*([arg] if colon else []))
  for a in argv:
    if not a.startswith("--config."):
      continue
    field = a[len("--config."):].split("=", 1)[0]
    node, walked = config, ["config"]
    for name in field.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or name not in node:
        fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        return (f"unknown config field --config.{field}: {'.'.join(walked)} has no field {name!r}; "
                f"its fields are {fields}.")
      node = node[name]
      walked.append(name)
  return None


def _run():
  """Usage errors (bad flags or config, missing data, damaged checkpoint, divergence) end as one
  readable line, the last one on stderr, with exit code 2 (WEIT_DEBUG=1 shows the traceback)."""
  from weit_jax.checkpoint import CheckpointError
  from weit_jax.train_loop import DivergenceError
  try:
    app.run(main, flags_parser=parse_flags)
  except (ValueError, FileNotFoundError, CheckpointError, DivergenceError) as e:
    if os.environ.get("WEIT_DEBUG"):
      raise
    sys.stdout.flush()
    print("error: " + " ".join(str(e).split()), file=sys.stderr, flush=True)
    # The programs stop their own background work (checkpoint writes and reads, metric writers)
    # before they raise; os._exit skips the interpreter's teardown of library threads (grain's
    # readers, tensorstore), which has nothing left to say.
    os._exit(2)


if __name__ == "__main__":
  _run()
