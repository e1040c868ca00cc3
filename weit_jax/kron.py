"""The composition math: W = crop(sum_t kron(S_t, T_t)), pure jnp, no Flax.

Convention (DESIGN.md section 1): along every axis, entry ``i * w + j`` of the result takes scaler
index ``i`` and template index ``j``, exactly like ``numpy.kron``. Blocks are templates.
"""
from __future__ import annotations

import string
from typing import Sequence

import jax.numpy as jnp


def compose(scalers: jnp.ndarray, templates: jnp.ndarray,
            shape: Sequence[int] | None = None) -> jnp.ndarray:
  """Returns ``sum_t kron(scalers[t], templates[t])``, cropped to ``shape`` if given.

  Args:
    scalers: ``(N, g_1, ..., g_k)``, one grid of block weights per template.
    templates: ``(N, w_1, ..., w_k)``.
    shape: optional ``(n_1, ..., n_k)`` with ``n_a <= g_a * w_a``: keep the first ``n_a`` entries
      of every axis (widths need not be tile multiples).

  One einsum: the sum over ``t`` and the interleaving of grid and tile axes happen in the same
  contraction, then a free reshape merges each (grid, tile) pair. Axes with ``g_a == 1`` are just
  the template's axis. Works under ``jit``, ``grad`` and ``vmap`` (e.g. over a layers axis).
  """
  if scalers.ndim != templates.ndim or scalers.shape[0] != templates.shape[0]:
    raise ValueError(
        f"compose needs scalers (N, g_1..g_k) and templates (N, w_1..w_k) with the same N and k; "
        f"got scalers {scalers.shape} and templates {templates.shape}.")
  k = scalers.ndim - 1
  if 2 * k + 1 > len(string.ascii_letters):
    raise ValueError(f"compose supports at most {(len(string.ascii_letters) - 1) // 2} axes, got {k}.")
  letters = string.ascii_letters
  t = letters[0]
  grid = letters[1:k + 1]
  tile = letters[k + 1:2 * k + 1]
  out = "".join(g + w for g, w in zip(grid, tile))
  dtype = jnp.result_type(scalers.dtype, templates.dtype)
  full = jnp.einsum(f"{t}{grid},{t}{tile}->{out}", scalers.astype(dtype), templates.astype(dtype))
  full_shape = tuple(g * w for g, w in zip(scalers.shape[1:], templates.shape[1:]))
  full = full.reshape(full_shape)
  if shape is None:
    return full
  shape = tuple(shape)
  if len(shape) != k or any(n > f or n < 1 for n, f in zip(shape, full_shape)):
    raise ValueError(f"crop shape {shape} must have {k} axes, each between 1 and the composed size {full_shape}.")
  if shape == full_shape:
    return full
  return full[tuple(slice(0, n) for n in shape)]
