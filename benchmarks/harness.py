"""What every benchmark of initializers does the same way: budgets and flags, stage caches, curves
over seeds, the speed-up over random init, curve plots and the report's header.

A benchmark (init_quality.py, generation_quality.py, control_quality.py, ablations.py) keeps only its own stages,
its metric and its prose; nothing here holds state between calls.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
sys.path.insert(0, ROOT)  # configs/ and this checkout's weit_jax, for every benchmark

# Every initializer any benchmark compares, in the order of tables and legends.
LABELS = {"random": "random", "weit": "WeiT", "weit_extracted": "WeiT (extracted)",
          "weight_selection": "weight selection", "tleg": "TLEG", "mimetic": "mimetic", "fine": "FINE",
          "pretrained": "pre-trained target (reference)"}
COLORS = {"random": "tab:gray", "weit": "tab:red", "weit_extracted": "tab:brown", "weight_selection": "tab:blue",
          "tleg": "tab:green", "mimetic": "tab:purple", "fine": "tab:orange",
          "pretrained": "black"}


def log(msg: str) -> None:
  print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------
# Flags and budgets
# ---------------------------------------------------------------------------------------------------

def parser(doc: str, budgets: dict | None = None, methods: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
  """--workdir, --out, --quick; with ``budgets`` one override flag per budget key, with ``methods``
  --methods. Add the benchmark's own flags, then call ``resolve``."""
  p = argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default=None, help="cache of every stage (default: the benchmark's folder in "
                 "workdirs/, another one with --quick)")
  p.add_argument("--out", default=None, help="where the report goes (default docs/results; "
                 "WORKDIR/results with --quick, so a smoke test never overwrites the real report)")
  p.add_argument("--quick", action="store_true", help="tiny budgets and 1 seed: a smoke test")
  for key, value in (budgets or {}).get("full", {}).items():
    p.add_argument("--" + key.replace("_", "-"), type=type(value), default=None,
                   help=f"override the budget (full: {value}, quick: {budgets['quick'][key]})")
  if methods:
    p.add_argument("--methods", default=",".join(methods), help="comma-separated subset of " + ",".join(methods))
  return p


def resolve(p: argparse.ArgumentParser, args, budgets: dict, workdirs: tuple[str, str],
            methods: tuple[str, ...] | None = None, family_budget: dict | None = None):
  """Sets ``args.budget`` (quick or full, ``family_budget`` over the full one, then the flags),
  ``args.default_budget`` (the same without the flags), ``args.workdir`` (default workdirs/<full or
  quick name of ``workdirs``), ``args.out`` and, with ``methods``, ``args.methods``; exits with the
  checks every benchmark makes."""
  budget = dict(budgets["quick" if args.quick else "full"])
  if not args.quick:
    budget.update(family_budget or {})
  args.default_budget = dict(budget)  # before the flags: what a report's name is keyed against
  for key in budget:
    if getattr(args, key, None) is not None:
      budget[key] = getattr(args, key)
  args.budget = budget
  args.workdir = os.path.abspath(args.workdir or os.path.join(ROOT, "workdirs", workdirs[bool(args.quick)]))
  args.out = os.path.abspath(args.out or (os.path.join(args.workdir, "results") if args.quick else
                                          os.path.join(ROOT, "docs", "results")))
  if methods:
    args.methods = [m for m in args.methods.split(",") if m]
    for m in args.methods:
      if m not in methods:
        p.error(f"unknown method {m!r}; valid: {methods}")
    if "random" not in args.methods:
      p.error("the speed-up is measured against random init: keep 'random' in --methods")
  if "train_steps" in budget and budget["train_steps"] % budget["eval_every"]:
    p.error(f"--train-steps={budget['train_steps']} must be a multiple of --eval-every={budget['eval_every']}")
  return args


# ---------------------------------------------------------------------------------------------------
# Stage caches and timing
# ---------------------------------------------------------------------------------------------------

def enable_compilation_cache(workdir: str) -> None:
  """Every run of one target compiles the same step: keep the executables on disk across runs."""
  import jax
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def start(args) -> tuple[float, tuple]:
  """A benchmark's first step: its workdir, the compilation cache, quiet absl logs; returns the
  start time and load average for ``run_info``."""
  t_start, load_start = time.time(), os.getloadavg()
  os.makedirs(args.workdir, exist_ok=True)
  enable_compilation_cache(args.workdir)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  log(f"budget: {args.budget}; workdir {args.workdir}; report to {args.out}")
  return t_start, load_start


def read_json(path: str) -> dict | None:
  """A stage's cached record; None if the stage has not finished."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, record: dict) -> dict:
  """Written whole or not at all: an interrupted write never looks like a finished stage."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=2)
  os.replace(path + ".tmp", path)
  return record


def json_safe(x, relative_paths: bool = False):
  """Strict JSON: infinite speed-ups become the string 'inf', tuples lists. ``relative_paths`` (a
  report, never a stage record that is read back): absolute paths relative to the git checkout
  holding them, so a report names no machine path."""
  if isinstance(x, dict):
    return {str(k): json_safe(v, relative_paths) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_safe(v, relative_paths) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  if relative_paths and isinstance(x, str) and os.path.isabs(x):
    return in_checkout(x)
  return x


def wall_clock(fn, *args, **kwargs):
  t0 = time.time()
  out = fn(*args, **kwargs)
  return out, time.time() - t0


# ---------------------------------------------------------------------------------------------------
# Curves over seeds and the speed-up
# ---------------------------------------------------------------------------------------------------

def group(results: list[dict], *keys: str) -> dict:
  """Nested dicts by ``keys`` (in order), lists of runs at the leaves."""
  out: dict = {}
  for r in results:
    node = out
    for key in keys[:-1]:
      node = node.setdefault(r[key], {})
    node.setdefault(r[keys[-1]], []).append(r)
  return out


def seed_curves(curves: list[dict], steps: list[int]) -> np.ndarray:
  """seeds x steps: every seed's curve (step as text -> value) at ``steps``."""
  return np.array([[curve[str(s)] for s in steps] for curve in curves])


def curve_stats(values: np.ndarray) -> dict:
  """Mean and std over seeds of a seeds x steps array: the curves, their last and first points."""
  return dict(mean=values.mean(0).tolist(), std=values.std(0).tolist(),
              final_mean=float(values[:, -1].mean()), final_std=float(values[:, -1].std()),
              step0_mean=float(values[:, 0].mean()), step0_std=float(values[:, 0].std()))


def steps_to_reach(steps: list[int], values: list[float], threshold: float) -> float | None:
  """The first step at which the (linearly interpolated) curve reaches ``threshold``; None if never."""
  for i, (s, a) in enumerate(zip(steps, values)):
    if a >= threshold:
      if i == 0:
        return float(s)
      s0, a0 = steps[i - 1], values[i - 1]
      return s0 + (s - s0) * (threshold - a0) / (a - a0)
  return None


def steps_to_fall_to(steps: list[int], values: list[float], threshold: float) -> float | None:
  """The first step at which the interpolated curve is at or below ``threshold`` (lower is better)."""
  return steps_to_reach(steps, [-v for v in values], -threshold)


def speedup(needed: float | None, reference: float) -> float | None:
  """``reference`` steps over the ``needed`` ones; None if never reached, inf if reached at step 0."""
  return None if needed is None else (math.inf if needed == 0 else reference / needed)


def fmt_speedup(e: dict, T: int, method: str, final: str) -> str:
  """The speed-up cell of a ``T``-step budget; ``final``: the run's final value as the report writes it."""
  if method == "random":
    return f"1× (reference: {final} at step {T})"
  if e.get("speedup") is None:
    return f"not reached (final {final})"
  if math.isinf(e["speedup"]):
    return "∞ (at step 0)"
  return f"{e['speedup']:.1f}× ({e['steps_to_random_final']:.0f} steps)"


def applicable(targets: dict, methods: list[str], why_not) -> tuple[list[tuple[str, str]], dict]:
  """(role, method) pairs to run, and {(method, role): why} of those ``why_not(method, cfg)`` rules
  out (the tables' N/A cells)."""
  pairs, na = [], {}
  for role, cfg in targets.items():
    for method in methods:
      why = why_not(method, cfg)
      if why:
        na[(method, role)] = why
      else:
        pairs.append((role, method))
  return pairs, na


# ---------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------

def plot_curves(path: str, panels: list[list[dict]], *, ylabels: list[str], suptitle: str,
                xlabel: str = "training step", log_y: bool = False, title_size: int = 10,
                xlabels: list[str] | None = None) -> None:
  """Mean ± std curves of every method, one panel per target. ``panels``: rows of
  {title, curves: {method: (x, mean, std)}, lines: [(y, color, linestyle)]}; ``ylabels`` per row;
  ``xlabels`` per row where the rows' x axes differ (else ``xlabel``, under the last row)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  columns = max(len(row) for row in panels)
  fig, axes = plt.subplots(len(panels), columns, figsize=(4.2 * columns, 0.4 + 3.5 * len(panels)), squeeze=False)
  handles = {}
  for r, row in enumerate(panels):
    for ax, panel in zip(axes[r], row):
      for method in LABELS:
        if method not in panel["curves"]:
          continue
        x, m, sd = (np.asarray(v, dtype=float) for v in panel["curves"][method])
        (handles[method],) = ax.plot(x, m, label=LABELS[method], color=COLORS[method], marker="o", ms=3)
        ax.fill_between(x, m - sd, m + sd, color=COLORS[method], alpha=0.18, linewidth=0)
      for y, color, style in panel.get("lines", ()):
        ax.axhline(y, color=color, ls=style, lw=0.8)
      if log_y:
        ax.set_yscale("log")
      if panel.get("title"):
        ax.set_title(panel["title"], fontsize=10)
      if xlabels:
        ax.set_xlabel(xlabels[r])
      elif r == len(panels) - 1:
        ax.set_xlabel(xlabel)
      ax.grid(alpha=0.3, which="both")
    axes[r][0].set_ylabel(ylabels[r])
  order = [m for m in LABELS if m in handles]
  fig.legend([handles[m] for m in order], [LABELS[m] for m in order], loc="lower center", ncol=len(order),
             fontsize=9, frameon=False)
  fig.suptitle(suptitle, fontsize=title_size)
  fig.tight_layout(rect=(0, 0.07 / len(panels), 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def seeds_text(n: int) -> str:
  """'mean over n seeds (shaded: ± std)', as plot titles say it."""
  return f"mean over {n} seed{'s' * (n > 1)}{' (shaded: ± std)' if n > 1 else ''}"


# ---------------------------------------------------------------------------------------------------
# The report's header
# ---------------------------------------------------------------------------------------------------

def machine() -> dict:
  import jax
  cpu = platform.processor() or ""
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return dict(cpu=cpu, cores=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
              jax=jax.__version__, backend=jax.default_backend(), load_average=os.getloadavg())


def in_checkout(arg: str) -> str:
  """``--flag=/abs/path`` or ``/abs/path`` -> the path relative to the git checkout holding it, so a
  report names no machine path (a run from another worktree writing into this one included)."""
  flag, eq, value = arg.rpartition("=") if arg.startswith("--") else ("", "", arg)
  if not os.path.isabs(value):
    return arg
  top = value
  while top != os.path.dirname(top) and not os.path.exists(os.path.join(top, ".git")):
    top = os.path.dirname(top)
  rel = os.path.relpath(value, top) if top != os.path.dirname(top) else value
  return f"{flag}{eq}{rel}"


def run_info(script: str, argv: list[str] | None, t_start: float, load_start: tuple, **extra) -> dict:
  """This invocation as the report records it: command (paths relative to their checkout), date,
  machine (load average at the end), wall time, load average at the start; ``extra`` fields (e.g.
  the recorded work) after them."""
  args = [in_checkout(a) for a in (sys.argv[1:] if argv is None else argv)]
  return dict(command=" ".join(["python", script, *args]),
              date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), machine=machine(),
              wall_s=time.time() - t_start, load_start=load_start, **extra)


def header(info: dict, seeds: int, seeds_why: str, recorded_s: float | None = None) -> list[str]:
  """The lines under a report's title: command, date and wall time, machine and load, seeds."""
  m = info["machine"]
  recorded = ("" if recorded_s is None else
              f" (all stages, cached or not: {recorded_s / 60:.1f} min of recorded work)")
  return ["```\n" + info["command"] + "\n```\n",
          f"- Date: {info['date']}; this invocation's wall time: {info['wall_s'] / 60:.1f} min{recorded}.",
          f"- Machine: {m['cpu']}, {m['cores']} cores, {m['platform']}; JAX {m['jax']} ({m['backend']}); "
          f"load average at start / end: {info['load_start'][0]:.1f} / {m['load_average'][0]:.1f} "
          "(above the core count means the machine was shared and the times are pessimistic).",
          f"- Seeds: {', '.join(str(s) for s in range(seeds))} ({seeds_why}). Spread: mean ± std over seeds.\n"]
