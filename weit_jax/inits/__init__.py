"""Baseline initializers behind one interface: ``(source, target model config) -> plain params``.

Every initializer returns a nested dict of float32 numpy arrays with exactly the tree of the
target model's ``init`` (any family of ``weit_jax.models``), and can write it as an export that
``configs/<family>_train.py`` trains (``--config.init=EXPORT``)::

  from weit_jax import inits
  params = inits.get("mimetic")(None, target_cfg, seed=0)
  inits.get("weight_selection").export("exports/ws", "workdirs/dense/export", target_cfg)

Names (``INITIALIZERS``) and their sources:

  random            None            the model's own initializers (the control)
  weight_selection  DenseSource     a larger pre-trained plain model, or its export folder (Xu et al. 2024)
  tleg              TLEGSource      a trained TLEG auxiliary model, or its export folder (Xia et al. 2024);
                                    depth only
  fine              FINESource      a trained FINE model (shared U, V; per-layer sigma), or its export folder;
                                    depth only (sigma interpolated over relative depth)
  mimetic           None            data-free attention structure (Trockman & Kolter 2023); ViTs only
  weit              export folder   the init program's export (WeiT), passed through
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from weit_jax import checkpoint, exports, models
from weit_jax.inits import common, fine, mimetic, tleg, weight_selection
from weit_jax.inits.fine import FINESource
from weit_jax.inits.tleg import TLEGSource
from weit_jax.inits.weight_selection import DenseSource


@dataclasses.dataclass(frozen=True)
class Initializer:
  """``init(source, target, seed=...) -> params``; ``init.export(directory, source, target)``."""
  name: str
  fn: Callable[..., dict]
  needs_source: bool
  summary: str

  def __call__(self, source: Any, target, *, seed: int = 0) -> dict:
    models.family_of(target)  # raises for anything that is not a model config
    if self.needs_source and source is None:
      raise ValueError(f"initializer {self.name!r} needs a source: {self.summary}.")
    params = self.fn(source, target, seed=int(seed))
    common.check_tree(params, target, self.name)
    return params

  def export(self, directory: str, source: Any, target, *, seed: int = 0,
             meta: Mapping[str, Any] | None = None) -> str:
    """Writes ``self(source, target, seed=seed)`` as an export (``exports.write``) with
    ``model`` (the target), ``init`` (this name), ``seed`` and ``source`` recorded. Returns the folder."""
    params = self(source, target, seed=seed)
    record = dict(meta or {}, model=models.to_record(target), init=self.name, seed=int(seed),
                  source=describe_source(source))
    exports.write(directory, params, record)
    return directory


def describe_source(source: Any) -> str | None:
  if source is None:
    return None
  if isinstance(source, str):
    return checkpoint.absolute(source)
  return source.describe() if hasattr(source, "describe") else type(source).__name__


def _random(source, target, *, seed: int = 0) -> dict:
  del source
  return common.own_init(target, seed)


def _weit(source, target, *, seed: int = 0) -> dict:
  """The export of ``programs/init.py`` (a folder), checked against the target; a different number
  of classes gets a new head (the target's own init), like ``programs/train.py`` does."""
  if not isinstance(source, str):
    raise ValueError("weit needs the init program's export folder (WORKDIR/<size>/export); "
                     f"got {type(source).__name__}.")
  exported = models.from_record(exports.read_meta(source)["model"])
  if not models.same_up_to_head(exported, target):
    exports.load_params(source, expected_model=target)  # raises, naming the differing fields
    raise ValueError(f"export {source} is a {exported.short_name()}, not the target {target.short_name()}.")
  params = common.to_numpy(exports.load_params(source))
  if models.other_classes(exported, target):
    params = models.with_fresh_classifier(params, target, seed)
  return params


INITIALIZERS: dict[str, Initializer] = {
    "random": Initializer("random", _random, False, "no source; the model's own initializers"),
    "weight_selection": Initializer(
        "weight_selection", weight_selection.select, True,
        "a larger pre-trained plain model (weight_selection.DenseSource or a plain-model export folder)"),
    "tleg": Initializer("tleg", tleg.expand, True,
                        "a trained TLEG auxiliary model (tleg.TLEGSource or its export folder)"),
    "fine": Initializer("fine", fine.expand, True, "a trained FINE model (fine.FINESource or its export folder)"),
    "mimetic": Initializer("mimetic", mimetic.init, False, "no source; data-free"),
    "weit": Initializer("weit", _weit, True, "the init program's export folder (WORKDIR/<size>/export)"),
}


def get(name: str) -> Initializer:
  if name not in INITIALIZERS:
    raise ValueError(f"unknown initializer {name!r}; valid: {sorted(INITIALIZERS)}.")
  return INITIALIZERS[name]


__all__ = ["INITIALIZERS", "Initializer", "get", "DenseSource", "FINESource", "TLEGSource", "common", "fine",
           "mimetic", "tleg", "weight_selection"]
