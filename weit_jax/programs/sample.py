"""Samples of an image-generation model (a DiT export): a PNG grid, one row per class.

  python main.py --config=configs/dit_sample.py --config.init=EXPORT --workdir=S
  python main.py --config=configs/dit_sample.py --config.init=TRAINING_WORKDIR --workdir=S   # its export

Writes ``S/samples.png`` (rows: classes, columns: samples; the leftmost column of each row says
the class) and ``S/samples.npz`` (the images in [-1, 1], their labels, and what made them). The
sampler is ``rectified_flow.sample``: Euler steps of the rectified-flow ODE from noise drawn with
``config.seed``, classifier-free guidance ``config.guidance``: the same command gives the same
images.
"""
from __future__ import annotations

import io
import json

import numpy as np
from etils import epath

from weit_jax import checkpoint, config_checks, exports, metrics, models, tasks, workdir_lock
from weit_jax.evaluators import sample_quality


def validate(config, workdir: str):
  """Every check before anything is computed or written; returns (model config, the classes)."""
  del workdir
  config_checks.check_ranges(config)
  if not config.init:
    raise ValueError("set --config.init to an export folder of a DiT (the init program's "
                     "WORKDIR/<size>/export, a baseline's) or a finished training workdir.")
  cfg = models.from_record(exports.read_meta(export_of(config.init))["model"])
  tasks.check_family("diffusion", models.family_of(cfg))
  for name, low in (("per_class", 1), ("steps", 1)):
    if int(config[name]) < low:
      raise ValueError(f"--config.{name}={config[name]} must be at least {low}.")
  if float(config.guidance) < 0:
    raise ValueError(f"--config.guidance={config.guidance} must be at least 0 (1: the conditional model).")
  classes = [int(c) for c in str(config.classes).split(",") if c.strip()] if config.classes else \
      list(range(cfg.num_classes))
  bad = [c for c in classes if not 0 <= c < cfg.num_classes]
  if bad:
    raise ValueError(f"--config.classes: {bad} are not classes of this model (0 .. {cfg.num_classes - 1}).")
  return cfg, classes


def export_of(path: str) -> str:
  """``path`` itself, or the export a finished training run wrote into it (``WORKDIR/export``)."""
  inner = epath.Path(path) / "export"
  if not (epath.Path(path) / exports.META).exists() and (inner / exports.META).exists():
    return str(inner)
  return path


def run(config, workdir: str) -> dict:
  cfg, classes = validate(config, workdir)
  with workdir_lock.hold(workdir, "sample"):  # the first write: refused if another run holds it
    source = export_of(config.init)
    params = exports.load_params(source)
    model = models.build(cfg)
    metrics.log(f"Sampling {config.per_class} images of each of {len(classes)} classes from {config.init} "
                f"({cfg.short_name()}; {config.steps} Euler steps, guidance {config.guidance}, seed {config.seed}).")
    images, labels = sample_quality.generate(model, params, cfg, classes, per_class=int(config.per_class), steps=int(config.steps),
                              guidance=float(config.guidance), seed=int(config.seed))
    made = dict(init=checkpoint.absolute(source), model=models.to_record(cfg), steps=int(config.steps),
                guidance=float(config.guidance), seed=int(config.seed), classes=classes, per_class=int(config.per_class))
    out = epath.Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{cfg.short_name()}\n{config.steps} Euler steps, guidance {config.guidance}, seed {config.seed}"
    sample_quality.write_whole(out / "samples.png", sample_quality.grid_png(images, labels, int(config.per_class), title))
    sample_quality.write_whole(out / "samples.npz", _npz(images=images, labels=labels, made=np.asarray(json.dumps(made))))
    metrics.log(f"Wrote {out / 'samples.png'} and {out / 'samples.npz'}.")
    return dict(made, png=str(out / "samples.png"))


def _npz(**arrays) -> bytes:
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  return buf.getvalue()
