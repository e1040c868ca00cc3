"""Samples of an image-generation model (a DiT export): a PNG grid, one row per class.

  python main.py --config=configs/dit_sample.py --config.init=EXPORT --workdir=S
  python main.py --config=configs/dit_sample.py --config.init=TRAINING_WORKDIR --workdir=S   # its export

Writes ``S/samples.png`` (rows: classes, columns: samples; the leftmost column of each row says
the class) and ``S/samples.npz`` (the images in [-1, 1], their labels, and what made them). The
sampler is ``tasks.diffusion.sample``: Euler steps of the rectified-flow ODE from noise drawn with
``config.seed``, classifier-free guidance ``config.guidance``: the same command gives the same
images.
"""
from __future__ import annotations

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from weit_jax import checkpoint, config_checks, metrics, models, tasks
from weit_jax.tasks import diffusion


def validate(config, workdir: str):
  """Every check before anything is computed or written; returns (model config, the classes)."""
  del workdir
  config_checks.check_ranges(config)
  if not config.init:
    raise ValueError("set --config.init to an export folder of a DiT (the init program's "
                     "WORKDIR/<size>/export, a baseline's) or a finished training workdir.")
  cfg = models.from_record(checkpoint.read_export_meta(export_of(config.init))["model"])
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
  if not (epath.Path(path) / checkpoint.EXPORT_META).exists() and (inner / checkpoint.EXPORT_META).exists():
    return str(inner)
  return path


def generate(model, params, cfg, classes, *, per_class: int, steps: int, guidance: float, seed: int):
  """``(images [len(classes) * per_class, H, W, C] in [-1, 1] (clipped), labels)``."""
  labels = jnp.repeat(jnp.asarray(classes, jnp.int32), per_class)
  noise = jax.random.normal(jax.random.key(seed), (labels.shape[0], cfg.image_size, cfg.image_size, cfg.channels))
  run = jax.jit(lambda p, n, y: diffusion.sample(lambda x, t, yy: model.apply({"params": p}, x, t, yy), n, y,
                                                 steps=steps, scale=guidance, null_class=cfg.num_classes))
  images = run(params, noise, labels)
  return np.clip(np.asarray(images), -1.0, 1.0), np.asarray(labels)


def grid_png(images: np.ndarray, labels: np.ndarray, per_class: int, title: str) -> bytes:
  """One row per class; images in [-1, 1]."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = len(images) // per_class
  h, w, c = images.shape[1:]
  tiles = ((images + 1) / 2).reshape(rows, per_class, h, w, c)
  canvas = np.ones((rows * (h + 2), per_class * (w + 2), c), np.float32)
  for r in range(rows):
    for k in range(per_class):
      canvas[r * (h + 2) + 1:r * (h + 2) + 1 + h, k * (w + 2) + 1:k * (w + 2) + 1 + w] = tiles[r, k]
  fig, ax = plt.subplots(figsize=(max(3.0, per_class * 0.6), max(2.0, rows * 0.6) + 0.5))
  ax.imshow(canvas[..., 0] if c == 1 else canvas, cmap="gray" if c == 1 else None, vmin=0, vmax=1,
            interpolation="nearest")
  ax.set_yticks([r * (h + 2) + h / 2 for r in range(rows)], [f"class {labels[r * per_class]}" for r in range(rows)])
  ax.set_xticks([])
  ax.set_title(title, fontsize=8)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  return buf.getvalue()


def run(config, workdir: str) -> dict:
  cfg, classes = validate(config, workdir)
  source = export_of(config.init)
  params = checkpoint.load_params(source)
  model = models.build(cfg)
  metrics.log(f"Sampling {config.per_class} images of each of {len(classes)} classes from {config.init} "
              f"({cfg.short_name()}; {config.steps} Euler steps, guidance {config.guidance}, seed {config.seed}).")
  images, labels = generate(model, params, cfg, classes, per_class=int(config.per_class), steps=int(config.steps),
                            guidance=float(config.guidance), seed=int(config.seed))
  made = dict(init=checkpoint.absolute(source), model=models.to_record(cfg), steps=int(config.steps),
              guidance=float(config.guidance), seed=int(config.seed), classes=classes, per_class=int(config.per_class))
  out = epath.Path(workdir)
  out.mkdir(parents=True, exist_ok=True)
  title = f"{cfg.short_name()}\n{config.steps} Euler steps, guidance {config.guidance}, seed {config.seed}"
  for name, data in (("samples.png", grid_png(images, labels, int(config.per_class), title)),
                     ("samples.npz", _npz(images=images, labels=labels, made=np.asarray(json.dumps(made))))):
    tmp = out / (name + ".tmp")
    tmp.write_bytes(data)  # whole files only: a crash leaves no half-written grid
    tmp.replace(out / name)
  metrics.log(f"Wrote {out / 'samples.png'} and {out / 'samples.npz'}.")
  return dict(made, png=str(out / "samples.png"))


def _npz(**arrays) -> bytes:
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  return buf.getvalue()
