"""A dense checkpoint one already has, as the source of templates (``init_templates_from``).

The pre-training program extracts templates and the source's scalers from it in closed form
(``extract.py``) instead of drawing them; with ``total_steps=0`` that is the whole run, and its
workdir serves the init program like any pre-training workdir. This module reads the checkpoint and
fits it to the run's model:

- ``read``: an export folder of any family (its ``export.json`` names the model) or a big_vision
  ``.npz`` (``exports.read_big_vision_npz``: ``/``-joined names, one array each). A family that reads
  big_vision's layout (``Family.from_big_vision``: the ViT) also takes its per-layer blocks and reads
  the model's sizes and options off the shapes.
- ``model_fields``: ``config.model`` with the fields it leaves unset read from the checkpoint.
- ``plan`` / ``adapt``: the checkpoint's parameters in the shapes of the run's model, parameter by
  parameter; the first that fits neither way below is refused, naming the expected and found shapes.
  Parameters the checkpoint holds for its own data are handled as weight selection handles them
  (``inits/weight_selection.py``): a head for other classes (a ``classes`` axis of a family whose
  classes are an output, ``Family.class_head``) starts from the model's own initializer; a learned position embedding of another square grid (``tokens``) is
  resampled bilinearly to the model's grid, as big_vision does when it loads one.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np
from etils import epath
from flax import traverse_util

from weit_jax import exports, generator, models
from weit_jax.checkpoint import absolute

# How a parameter comes from the checkpoint: the first words of its entry in the record (``plan``),
# which ``adapt`` acts on.
COPIED, OWN_INIT, RESAMPLED = "copied", "own init", "resampled"


@dataclasses.dataclass(frozen=True)
class Source:
  """A dense checkpoint: its parameters (``'/'``-joined name -> numpy array, the family's layout) and
  the size and option fields it says of its model (``{}`` when it cannot say)."""
  path: str
  form: str  # 'export' or 'big_vision npz'
  params: Mapping[str, np.ndarray]
  fields: Mapping[str, Any]

  def describe(self) -> dict:
    return dict(path=absolute(self.path), form=self.form, model_fields=dict(self.fields))


def read(path: str, family: models.Family) -> Source:
  """The checkpoint at ``path`` for a model of ``family``; raises a one-line error (ValueError, or
  the CheckpointError of an incomplete export) for anything else."""
  p = epath.Path(path)
  if p.is_dir():
    record = exports.read_meta(path)["model"]  # refuses a folder that is not a complete export
    source = models.from_record(record)
    if models.family_of(source) is not family:
      raise ValueError(f"init_templates_from={path} is an export of a {models.family_of(source).name} model, not of "
                       f"the {family.name} family this config trains.")
    params = traverse_util.flatten_dict(exports.load_params(path), sep="/")
    return Source(path, "export", {k: np.asarray(v, np.float32) for k, v in params.items()},
                  {k: getattr(source, k) for k in (*family.target_fields, *family.option_fields)})
  if not p.exists():
    raise ValueError(f"init_templates_from={path}: no such file or folder; give a big_vision .npz checkpoint or an "
                     "export folder.")
  params = exports.read_big_vision_npz(path)
  fields = {}
  if family.from_big_vision is not None:
    try:
      params, fields = family.from_big_vision(params)
    except ValueError as e:
      raise ValueError(f"init_templates_from={path}: {e}") from None
  return Source(path, "big_vision npz", params, fields)


def model_fields(model: Mapping[str, Any], source: Source) -> dict[str, Any]:
  """``config.model`` (its fields as a dict) with the fields it leaves unset (None) read from the
  checkpoint: every size when it names no variant, the options (a ViT's pool and position
  embedding) always. A variant or a field it sets is declared: the checkpoint must then be that model
  (``plan`` refuses it otherwise)."""
  fields = dict(model)
  family = models.family_named_in(fields)
  sizes_declared = bool(fields.get("variant"))
  for name, value in source.fields.items():
    if fields.get(name) is None and (name in family.option_fields or not sizes_declared):
      fields[name] = value
  return fields


def plan(source: Source, gen: generator.WeightGenerator, cfg) -> dict[str, str]:
  """How each parameter of the model ``cfg`` (its generator ``gen``: shapes and logical axes) comes
  from the checkpoint: ``'copied'`` or what was done instead. Raises ValueError at the first
  parameter (in name order) that is missing, extra or of a shape neither rule fits."""
  what = f"a {models.family_of(cfg).name} {cfg.short_name()}"
  want = {"/".join(path): bank for path, bank in gen.banks.items()}
  out = {}
  for name in sorted(set(want) | set(source.params)):
    if name not in want:
      raise _mismatch(source, what, f"it has a parameter {name} {np.shape(source.params[name])} that {what} does not have")
    shape, axes = tuple(want[name].shape), tuple(want[name].axes)
    if name not in source.params:
      raise _mismatch(source, what, f"parameter {name}: expected shape {shape}, not in the checkpoint")
    found = tuple(np.shape(source.params[name]))
    differ = [i for i, (a, b) in enumerate(zip(shape, found)) if a != b] if len(shape) == len(found) else None
    if differ == []:
      out[name] = COPIED
    elif differ and all(axes[i] == "classes" for i in differ) and models.family_of(cfg).class_head:
      out[name] = (f"{OWN_INIT}: the checkpoint's head is for {found[differ[0]]} classes, the data has "
                   f"{shape[differ[0]]} (as weight selection does)")
    elif differ and all(axes[i] == "tokens" for i in differ) and _grid(found[differ[0]]) and _grid(shape[differ[0]]):
      g_from, g_to = _grid(found[differ[0]]), _grid(shape[differ[0]])
      out[name] = f"{RESAMPLED} bilinearly from a {g_from}x{g_from} to a {g_to}x{g_to} grid of tokens"
    else:
      raise _mismatch(source, what, f"parameter {name}: expected shape {shape}, found {found}")
  return out


def adapt(source: Source, gen: generator.WeightGenerator, cfg, *, seed: int) -> tuple[dict, dict[str, str]]:
  """The checkpoint's parameters as the model ``cfg``'s tree (float32 numpy), and ``plan``'s record."""
  how = plan(source, gen, cfg)
  own = None
  flat = {}
  for name, what in how.items():
    w = np.asarray(source.params[name], np.float32)
    if what.startswith(OWN_INIT):
      own = own if own is not None else traverse_util.flatten_dict(models.init_params(cfg, seed), sep="/")
      w = own[name]
    elif what.startswith(RESAMPLED):
      axis = list(gen.banks[tuple(name.split("/"))].axes).index("tokens")
      w = resample_grid(w, axis, gen.banks[tuple(name.split("/"))].shape[axis])
    flat[name] = w
  return traverse_util.unflatten_dict(flat, sep="/"), how


def resample_grid(w: np.ndarray, axis: int, n: int) -> np.ndarray:
  """``w`` with its ``axis`` (a square grid of ``g * g`` tokens, row-major) resampled bilinearly to
  ``n`` tokens (``scipy.ndimage.zoom(order=1)``, big_vision's ``resample_posemb``)."""
  g, h = _grid(w.shape[axis]), _grid(n)
  x = np.moveaxis(w, axis, 0)
  grid = x.reshape(g, g, -1)
  import scipy.ndimage  # here, not at the top: 0.3 s at every program's start, for a rare case
  out = scipy.ndimage.zoom(grid, (h / g, h / g, 1), order=1)
  return np.moveaxis(out.reshape(h * h, *x.shape[1:]), 0, axis).astype(np.float32)


def _grid(tokens: int) -> int | None:
  g = math.isqrt(int(tokens))
  return g if g * g == tokens else None


def _mismatch(source: Source, what: str, detail: str) -> ValueError:
  return ValueError(f"init_templates_from={source.path} is not {what} (the model this config declares or reads from "
                    f"the checkpoint): {detail}. Give a checkpoint of that model, or set --config.model.* to its "
                    "sizes (or leave them unset to read them from it: configs/<family>_pretrain.py:from_checkpoint).")
