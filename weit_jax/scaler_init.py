"""Scalers for a new model size from pre-trained templates: the ``interpolate`` and ``random``
heuristics of the init program (docs/design.md section 1, stage 2)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from weit_jax.generator import Bank, WeightGenerator

HEURISTICS = ("interpolate", "random")


def _resample(x: np.ndarray, axis: int, size: int) -> np.ndarray:
  """Linear interpolation of ``x`` along ``axis`` onto ``size`` evenly spaced positions
  (the first and last entries map onto each other)."""
  n = x.shape[axis]
  if n == size:
    return x
  pos = np.linspace(0.0, n - 1.0, size) if size > 1 else np.zeros(1)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, n - 1)
  frac = (pos - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
  return np.take(x, lo, axis) * (1 - frac) + np.take(x, hi, axis) * frac


def interpolate_scalers(source: np.ndarray, source_bank: Bank, target_bank: Bank, scale: float) -> np.ndarray:
  """Source scalers -> target scalers: depth by interpolating between the source layers at the
  same relative position, width by resampling each grid axis, then ``scale`` (the ratio of the
  target's to the source's initial weight scale, so activations keep their scale)."""
  s = np.asarray(source, np.float64)
  lead = 0
  if target_bank.layers:
    s = _resample(s, 0, target_bank.layers) if source_bank.layers else np.repeat(s[None], target_bank.layers, 0)
    lead = 1
  for a, g in enumerate(target_bank.grid):
    s = _resample(s, lead + 1 + a, g)
  return (s * scale).astype(np.float32)


def size_distance(target: WeightGenerator, source: WeightGenerator) -> float:
  """How far apart two sizes composed from the same templates are: over every parameter and every
  axis (depth included), the sum of ``|log(target's length / source's length)|`` (0: the same size).
  Axis by axis, so a deeper, narrower size is not taken for a shallower, wider one of as many
  entries."""
  return sum(abs(math.log(n / m)) for p, b in target.banks.items() for n, m in zip(b.shape, source.banks[p].shape))


def nearest_size(target: WeightGenerator, sources: list[WeightGenerator]) -> int:
  """The index of the trained size whose scalers ``interpolate`` starts ``target`` from (multi-size
  pre-training): the nearest by ``size_distance``, the first (the auxiliary) on a tie."""
  distances = [size_distance(target, s) for s in sources]
  return distances.index(min(distances))


def fit_constant(templates: np.ndarray, bank: Bank, value: float) -> np.ndarray:
  """Scalers whose composition is closest (least squares) to the constant ``value``."""
  flat = np.asarray(templates, np.float64).reshape(templates.shape[0], -1)
  coef, *_ = np.linalg.lstsq(flat.T, np.full(flat.shape[1], value), rcond=None)
  s = np.broadcast_to(coef.reshape((-1,) + (1,) * len(bank.grid)), bank.scaler_shape[(1 if bank.layers else 0):])
  if bank.layers:
    s = np.broadcast_to(s, bank.scaler_shape)
  return np.array(s, np.float32)


def init_scalers(heuristic: str, target: WeightGenerator, templates, *, key: jax.Array,
                 target_stats, source: WeightGenerator | None = None, source_scalers=None,
                 source_stats=None) -> dict:
  """Scalers for ``target`` given (frozen) ``templates``.

  ``interpolate`` needs the source (auxiliary) generator, its scalers and both models' init
  statistics; ``random`` draws scalers so each composed weight has the target's initial scale
  given the actual template norms. Parameters the model initializes to a constant (norm scales,
  biases, a zero head) get the least-squares scalers for that constant under both heuristics of
  ``random``, and interpolated ones under ``interpolate``.
  """
  if heuristic not in HEURISTICS:
    raise ValueError(f"scaler_init={heuristic!r}; use one of {HEURISTICS}.")
  flat_t = traverse_util.flatten_dict(templates)
  t_stats = traverse_util.flatten_dict(target_stats)
  out = {}
  keys = dict(zip(sorted(target.banks), jax.random.split(key, len(target.banks))))
  for path, bank in target.banks.items():
    t = np.asarray(flat_t[path], np.float64)
    mean, std = (float(v) for v in t_stats[path])
    if heuristic == "interpolate":
      s_bank = source.banks[path]
      s_std = float(traverse_util.flatten_dict(source_stats)[path][1])
      scale = std / s_std if s_std > 0 and std > 0 else 1.0
      out[path] = interpolate_scalers(traverse_util.flatten_dict(source_scalers)[path], s_bank, bank, scale)
    elif std == 0.0:
      out[path] = fit_constant(t, bank, mean)
    else:
      # Var(sum_t S_t T_t) = sum_t Var(S) E[T_t^2]: pick Var(S) for the target's init variance.
      power = float(np.sum(np.mean(t.reshape(t.shape[0], -1) ** 2, axis=1)))
      out[path] = np.asarray(std / math.sqrt(max(power, 1e-12)) *
                             jax.random.normal(keys[path], bank.scaler_shape, jnp.float32))
  return traverse_util.unflatten_dict(out)
