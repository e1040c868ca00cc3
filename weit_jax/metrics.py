"""What the user sees: progress lines, metrics as JSON lines and TensorBoard events, and plots.

Only process 0 writes or prints, so a pod run logs once.
"""
from __future__ import annotations

import io
import json
import math
import time
from typing import Mapping

import jax
from etils import epath


def is_main() -> bool:
  return jax.process_index() == 0


def log(msg: str) -> None:
  if is_main():
    print(msg, flush=True)


def _fmt_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricWriter:
  """Appends ``{"step": ..., **metrics}`` to ``workdir/metrics.jsonl`` and TensorBoard events."""

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0):
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self.total_steps = total_steps
    self._t0, self._s0, self._first = time.time(), start_step, True
    self._tb = None
    if is_main():
      from tensorboardX import SummaryWriter  # pure Python: no TensorFlow needed
      self._tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not is_main():
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    line = json.dumps(record) + "\n"
    try:
      with self.path.open("a") as f:
        f.write(line)
    except (ValueError, NotImplementedError, OSError):  # object stores (gs://) cannot append
      self.path.write_text((self.path.read_text() if self.path.exists() else "") + line)
    for k, v in metrics.items():
      self._tb.add_scalar(k, float(v), int(step))
    self._tb.flush()

  def progress(self, step: int, metrics: Mapping[str, float]) -> None:
    """One line: step, loss, learning rate, steps/s and ETA (timed from the first step on, so
    compilation does not distort the rate)."""
    if self._s0 is None or step <= self._s0 + 1 and self._first:
      self._t0, self._s0, self._first = time.time(), step, False
    elapsed = time.time() - self._t0
    rate = (step - self._s0) / elapsed if elapsed > 0 else float("nan")
    eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
    parts = [f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}"]
    parts += [f"{k} {metrics[k]:.4g}" for k in ("loss", "accuracy", "episode_return", "lr") if k in metrics]
    parts += [f"{rate:.2f} steps/s", f"ETA {_fmt_duration(eta)}"]
    log(" | ".join(parts))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# How a plot names a metric whose key alone would mislead (evaluators.sample_quality.FID_NAME; spelled out here
# so that metrics imports nothing of the tasks).
EVAL_LABELS = {"eval_fid_fmnist_classifier_features": "FID, Fashion-MNIST classifier features"}
# The training metric drawn beside an eval metric when its name is not the eval name without ``eval_``:
# a control run's training returns (stochastic policy) beside the deterministic policy's.
TRAIN_TWINS = {"eval_return": "episode_return"}


def plot_curves(workdir: str, title: str = "") -> str | None:
  """``workdir/curves.png``: training and eval loss against step, and beside them each of the
  task's other eval metrics (a classifier's accuracy; a generator's sample quality) if it has any (the last value logged for each step wins,
  so a resumed run draws one clean curve)."""
  if not is_main():
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  by_step: dict[str, dict[int, float]] = {}
  for rec in read_metrics(workdir):
    for k, v in rec.items():
      if k != "step":
        by_step.setdefault(k, {})[rec["step"]] = v
  if not by_step:
    return None
  others = sorted(k for k in by_step if k.startswith("eval_") and k != "eval_loss" and not k.endswith("_std"))
  # One panel per eval metric (their scales differ), with the training metric it is measured against.
  panels = [(("loss", "eval_loss"), "loss")] + [
      ((k, TRAIN_TWINS.get(k, k.removeprefix("eval_"))), EVAL_LABELS.get(k, k.removeprefix("eval_").replace("_", " ")))
      for k in others]
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
  for ax, (keys, label) in zip(axes[0], panels):
    for k in keys:
      if k in by_step:
        steps = sorted(by_step[k])
        ax.plot(steps, [by_step[k][s] for s in steps], label=k, marker="o" if len(steps) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  out = epath.Path(workdir) / "curves.png"
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  out.write_bytes(buf.getvalue())
  plt.close(fig)
  return str(out)
