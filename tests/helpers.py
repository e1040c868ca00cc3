"""Helpers more than one test file uses (import them from here; never from another test file)."""
import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import main
from weit_jax import checkpoint
from weit_jax.evaluators import feature_classifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What main.py turns into one ``error:`` line and exit code 2.
USER_ERRORS = (ValueError, FileNotFoundError, checkpoint.CheckpointError)


def snapshot(path):
  """Every file and folder under ``path``, a file with a hash of its bytes; None if ``path`` does not
  exist (so a new workdir that was created, even empty, shows)."""
  if not os.path.exists(path):
    return None
  out = {}
  for dp, dirs, fs in os.walk(path):
    for d in dirs:
      out[os.path.relpath(os.path.join(dp, d), path) + "/"] = None
    for f in fs:
      with open(os.path.join(dp, f), "rb") as fh:
        out[os.path.relpath(os.path.join(dp, f), path)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def parse_main(argv, workdir):
  """``main.py ARGV --workdir=WORKDIR``'s config and workdir, parsed exactly as main.py parses them
  (its errors are the ValueErrors main.py prints as one line)."""
  argv = ["main.py", *argv, f"--workdir={workdir}"]
  fv = flags.FlagValues()
  main.define_flags(fv, sys_argv=argv)
  main.parse_flags(argv, fv)
  return fv.config, fv.workdir


# --- oracles -------------------------------------------------------------------------------------------

def numpy_materialize(bank, t, s):
  """Oracle: a numpy.kron loop per layer, cropped."""
  def one(sl):
    full = sum(np.kron(sl[i], t[i]) for i in range(t.shape[0]))
    return full[tuple(slice(0, n) for n in bank.crop)]
  return np.stack([one(sl) for sl in s]) if bank.layers else one(s)


def posemb_sincos_2d(h, w, width, temperature=10_000.0):
  """MoCo v3's table as big_vision writes it: [sin(x w), cos(x w), sin(y w), cos(y w)], w = T^-i/(d/4-1)."""
  rows, cols = np.divmod(np.arange(h * w), w)  # token m = row * w + col
  omega = temperature ** -(np.arange(width // 4) / (width // 4 - 1))
  x, y = np.outer(cols, omega), np.outer(rows, omega)
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None]


def randomized(params, seed):
  """Every parameter random (the model's own init has zero heads and unit norms)."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      treedef, [jnp.asarray(rng.normal(scale=0.3, size=x.shape), jnp.float32) for x in leaves])


def big_vision_tree(cfg):
  """Parameter names and shapes of big_vision's ``vit.Model(num_classes, width, depth, mlp_dim,
  num_heads, patch_size, pool_type, posemb, scan=True)``, read off its module definitions."""
  w, m, h, L, p = cfg.width, cfg.mlp_dim, cfg.num_heads, cfg.depth, cfg.patch_size
  tree = {"embedding/kernel": (p, p, cfg.channels, w), "embedding/bias": (w,),
          "Transformer/encoder_norm/scale": (w,), "Transformer/encoder_norm/bias": (w,),
          "head/kernel": (w, cfg.num_classes), "head/bias": (cfg.num_classes,)}
  if cfg.posemb == "learn":  # big_vision's get_posemb: a parameter only when learned
    tree["pos_embedding"] = (1, (cfg.image_size // p) ** 2, w)
  if cfg.pool_type == "tok":
    tree["cls"] = (1, 1, w)
  block = "Transformer/encoderblock/"
  for ln in ("LayerNorm_0", "LayerNorm_1"):
    tree.update({f"{block}{ln}/scale": (L, w), f"{block}{ln}/bias": (L, w)})
  for proj in ("query", "key", "value"):
    tree.update({f"{block}MultiHeadDotProductAttention_0/{proj}/kernel": (L, w, h, w // h),
                 f"{block}MultiHeadDotProductAttention_0/{proj}/bias": (L, h, w // h)})
  tree.update({f"{block}MultiHeadDotProductAttention_0/out/kernel": (L, h, w // h, w),
               f"{block}MultiHeadDotProductAttention_0/out/bias": (L, w),
               f"{block}MlpBlock_0/Dense_0/kernel": (L, w, m), f"{block}MlpBlock_0/Dense_0/bias": (L, m),
               f"{block}MlpBlock_0/Dense_1/kernel": (L, m, w), f"{block}MlpBlock_0/Dense_1/bias": (L, w)})
  return tree


def evenly(n_source, n_target):
  """Independent oracle: floor(i * (n_source - 1) / (n_target - 1) + 1/2) (no ties in the cases below)."""
  if n_source % n_target == 0:
    return [i * (n_source // n_target) for i in range(n_target)]
  return [int(np.floor(i * (n_source - 1) / (n_target - 1) + 0.5)) for i in range(n_target)]

# The feature classifier's recipe at a tiny size (trains in seconds on the learnable data).
TINY_RECIPE = dict(feature_classifier.RECIPE, channels=(4, 8), features=16, steps=60, batch_size=32, lr=5e-3,
                   crop_padding=0,  # a shift of 2 rows would move a bar to the next class
                   reference_split="train[:240]", test_split="test")

# --- python main.py in a subprocess ------------------------------------------------------------------

TIMEOUT = 300  # seconds, per subprocess (a cold compile on a loaded 2-core machine takes ~1 minute)


@dataclasses.dataclass
class Result:
  returncode: int
  stdout: str
  stderr: str
  signalled_at: int | None = None  # the step whose progress line triggered the signal

  def resumed_from(self):
    m = re.search(r"Resuming from step (\d+)", self.stdout)
    return int(m.group(1)) if m else None


def run_main(args, workdir, env, *, signal_after_step=None, sig=signal.SIGKILL, extra_env=None,
             wrapper=None, timeout=TIMEOUT) -> Result:
  """``python main.py ARGS --workdir=WORKDIR``; with ``signal_after_step``, sends ``sig`` as soon as the
  progress line of that step (or a later one) is printed. Always bounded by ``timeout``."""
  cmd = [sys.executable] + (["-c", wrapper] if wrapper else ["main.py"]) + list(args) + [f"--workdir={workdir}"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(env, **(extra_env or {})), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  out, err, sent = [], [], []

  def read_stdout():
    for line in proc.stdout:
      out.append(line)
      m = re.match(r"step\s+(\d+)/", line)
      if signal_after_step is not None and not sent and m and int(m.group(1)) >= signal_after_step:
        sent.append(int(m.group(1)))
        proc.send_signal(sig)

  readers = [threading.Thread(target=read_stdout, daemon=True),
             threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)]
  try:
    for t in readers:
      t.start()
    proc.wait(timeout=timeout)
    for t in readers:
      t.join(timeout=10)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  return Result(proc.returncode, "".join(out), "".join(err), sent[0] if sent else None)


def committed_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def ok(result):
  assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
  return result


def refused_in_process(argv, workdir, caplog) -> tuple[str, set[str]]:
  """``main.py ARGV --workdir=WORKDIR`` in this process, for input it must refuse: parsed as main.py
  parses it, its program run; returns the message main.py would print as its one ``error:`` line
  and the names of the functions compiled meanwhile (JAX's compile log)."""
  import importlib
  config, workdir = parse_main(argv, workdir)
  program = importlib.import_module(f"weit_jax.programs.{config.program}")
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="jax._src.dispatch"), jax.log_compiles(True):
    try:
      program.run(config, workdir)
    except USER_ERRORS as e:
      refused = e
    else:
      raise AssertionError(f"{argv} was accepted")
  compiled = set(re.findall(r"Finished XLA compilation of jit\((\w+)\)", caplog.text))
  return str(refused), compiled


def assert_refused(result, pattern: str, case: str) -> None:
  """Exit 2 with one ``error:`` line, the last on stderr, matching ``pattern``; no traceback."""
  assert result.returncode == 2, f"{case}: exit {result.returncode}\n{result.stderr[-3000:]}"
  lines = result.stderr.splitlines()
  error = [line for line in lines if line.startswith("error: ")]
  assert len(error) == 1 and lines[-1] == error[0], lines[-10:]
  assert re.search(pattern, error[0]), error[0]
  assert "Traceback" not in result.stderr


# --- every config field is read --------------------------------------------------------------------

# ConfigDict methods that visit every field without a program choosing to read it: their reads do not count.
_WHOLE_CONFIG_WALKS = ("items", "values", "iteritems", "itervalues", "to_dict", "to_json", "to_json_best_effort",
                       "copy_and_resolve_references", "__eq__", "__repr__", "__str__", "__init__")


@contextlib.contextmanager
def config_reads():
  """The set of ConfigDict field names read (attribute, item, ``get``) while the context is open, by
  any ConfigDict (programs copy their config). Whole-config walks (``_WHOLE_CONFIG_WALKS`` of a
  config with a ``program``: the workdir guard's JSON, range checks, copies) are not reads; such a
  walk of a section (``config.data.to_dict()`` for the input pipeline) reads all its fields."""
  from ml_collections.config_dict import config_dict as cd
  read, walking = set(), [0]
  getitem = cd.ConfigDict.__getitem__

  def recording_getitem(self, key):
    if not walking[0] and isinstance(key, str) and "." not in key:  # a dotted key recurses per part
      read.add(key)
    return getitem(self, key)

  def leaf_names(section):
    for key, value in section._fields.items():
      yield from leaf_names(value) if isinstance(value, cd.ConfigDict) else (key,)

  def not_a_read(method):
    def walk(self, *args, **kwargs):
      fields = vars(self).get("_fields")  # None while __init__ builds it
      if not walking[0] and fields is not None and "program" not in fields:  # a section handed on whole
        read.update(leaf_names(self))
      walking[0] += 1
      try:
        return method(self, *args, **kwargs)
      finally:
        walking[0] -= 1
    return walk

  originals = {name: getattr(cd.ConfigDict, name) for name in _WHOLE_CONFIG_WALKS}
  cd.ConfigDict.__getitem__ = recording_getitem
  for name, method in originals.items():
    setattr(cd.ConfigDict, name, not_a_read(method))
  try:
    yield read
  finally:
    cd.ConfigDict.__getitem__ = getitem
    for name, method in originals.items():
      setattr(cd.ConfigDict, name, method)


# Read by main.py, not by a program's run: which program runs, and the dry run's settings (--dry_run).
READ_BY_MAIN = ("program", "dry_run.*")
# Read only in some runs of a program: field pattern -> when.
READ_WHEN = {
    "overwrite": "the workdir holds a run of another config",
    "constraint.dense_wd": "constraint.mode='soft' (the dense weights' weight decay)",
    "constraint.soft_lambda": "constraint.mode='soft'",
    "distill.temperature": "distill.teacher set (distillation from a dense teacher)",
}


def unread_fields(config, read: set[str], read_when: dict[str, str] | None = None) -> list[str]:
  """The dotted fields of ``config`` whose name no code read (``config_reads``), beside those
  main.py reads and those read only in some runs (``READ_WHEN``, and ``read_when`` for this run)."""
  import fnmatch
  from weit_jax import config_checks
  excused = READ_BY_MAIN + tuple(READ_WHEN) + tuple(read_when or {})
  return sorted(f for f in config_checks.flatten(config) if f.rpartition(".")[2] not in read
                and not any(fnmatch.fnmatchcase(f, p) for p in excused))


@contextlib.contextmanager
def every_field_read(config, read_when: dict[str, str] | None = None):
  """Fails if the code run in the context leaves a field of ``config`` unread: a dead field (remove
  it) or one read only in some runs (say when, in ``READ_WHEN`` or ``read_when``)."""
  with config_reads() as read:
    yield
  unread = unread_fields(config, read, read_when)
  assert not unread, f"config fields no code read in this run: {unread}"
