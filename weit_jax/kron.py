"""The composition math: W = crop(sum_t kron(S_t, T_t)), pure jnp, no Flax.

Convention (docs/design.md section 1): along every axis, entry ``i * w + j`` of the result takes scaler
index ``i`` and template index ``j``, exactly like ``numpy.kron``. Blocks are templates.
"""
from __future__ import annotations

import string
from typing import Sequence

import jax.numpy as jnp


def compose(scalers: jnp.ndarray, templates: jnp.ndarray,
            shape: Sequence[int] | None = None, rowwise: Sequence[int] = ()) -> jnp.ndarray:
  """Returns ``sum_t kron(scalers[t], templates[t])``, cropped to ``shape`` if given.

  Args:
    scalers: ``(N, g_1, ..., g_k)``, one grid of block weights per template.
    templates: ``(N, w_1, ..., w_k)``.
    shape: optional ``(n_1, ..., n_k)`` with ``n_a <= g_a * w_a``: keep the first ``n_a`` entries
      of every axis (widths need not be tile multiples).

  One einsum: the sum over ``t`` and the interleaving of grid and tile axes happen in the same
  contraction, then a free reshape merges each (grid, tile) pair. Axes with ``g_a == 1`` are just
  the template's axis. Works under ``jit``, ``grad`` and ``vmap`` (e.g. over a layers axis).

  ``rowwise``: axes (0-based, among the k) computed entry by entry instead: entry ``r`` takes scaler
  row ``r // w`` and template row ``r % w`` (two gathers), and ``r`` is an ordinary batch index of
  the contraction. The values are the same; what changes is that such an axis can be split across
  devices at any boundary (a parameter sharded along it, whatever its tile): each device then
  computes only its own entries, with no temporary larger than its shard.
  """
  if scalers.ndim != templates.ndim or scalers.shape[0] != templates.shape[0]:
    raise ValueError(
        f"compose needs scalers (N, g_1..g_k) and templates (N, w_1..w_k) with the same N and k; "
        f"got scalers {scalers.shape} and templates {templates.shape}.")
  k = scalers.ndim - 1
  if 2 * k + 1 > len(string.ascii_letters):
    raise ValueError(f"compose supports at most {(len(string.ascii_letters) - 1) // 2} axes, got {k}.")
  full_shape = tuple(g * w for g, w in zip(scalers.shape[1:], templates.shape[1:]))
  shape = full_shape if shape is None else tuple(shape)
  if len(shape) != k or any(n > f or n < 1 for n, f in zip(shape, full_shape)):
    raise ValueError(f"crop shape {shape} must have {k} axes, each between 1 and the composed size {full_shape}.")
  rowwise = sorted(set(int(a) for a in rowwise))
  if any(not 0 <= a < k for a in rowwise):
    raise ValueError(f"rowwise axes {rowwise} must be between 0 and {k - 1}.")
  dtype = jnp.result_type(scalers.dtype, templates.dtype)
  scalers, templates = scalers.astype(dtype), templates.astype(dtype)
  for a in rowwise:
    rows = jnp.arange(shape[a])
    scalers = jnp.take(scalers, rows // templates.shape[1 + a], axis=1 + a, mode="clip")
    templates = jnp.take(templates, rows % templates.shape[1 + a], axis=1 + a, mode="clip")
  letters = iter(string.ascii_letters)
  t = next(letters)
  grid, tile, out = "", "", ""
  for a in range(k):
    g = next(letters)
    w = g if a in rowwise else next(letters)  # a rowwise axis: one shared (batch) index
    grid, tile, out = grid + g, tile + w, out + (g if a in rowwise else g + w)
  full = jnp.einsum(f"{t}{grid},{t}{tile}->{out}", scalers, templates)
  merged = tuple(shape[a] if a in rowwise else full_shape[a] for a in range(k))
  full = full.reshape(merged)
  if shape == merged:
    return full
  return full[tuple(slice(0, n) for n in shape)]
