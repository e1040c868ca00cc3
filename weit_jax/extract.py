"""Closed-form template extraction from a dense checkpoint (Van Loan–Pitsianis).

``rearrange`` maps ``kron(S, T)`` (numpy convention, docs/design.md section 1) to the rank-1 matrix
``outer(vec S, vec T)``. Stacking the rearranged layers of one bank gives ``R`` of shape
``(layers * prod(grid), prod(tile))``, and ``sum_t kron(S_lt, T_t)`` for every layer ``l`` is exactly a
rank-N factorization of ``R``. The truncated SVD is therefore the best shared N-template bank in the
Frobenius norm of the (zero-padded) weights.

Split of the singular values: templates have unit RMS, ``T_t = sqrt(prod(tile)) v_t``, and scalers
carry the scale, ``S_lt = s_t u_lt / sqrt(prod(tile))``. That is the scale of ``WeightGenerator.init``
(``T ~ N(0, 1)``), independent of the source model's depth and width (templates are shared by every
size), and a constant parameter extracts to ``T_0 = 1, S_0 = value`` as in ``init``. Signs are fixed
so that each template's largest-magnitude entry is positive (deterministic output).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from weit_jax.generator import WeightGenerator


def rearrange(w: np.ndarray, grid: Sequence[int], tile: Sequence[int]) -> np.ndarray:
  """``(*lead, g_1 w_1, ..., g_k w_k) -> (prod(lead) * prod(grid), prod(tile))``.

  Entry ``i * w + j`` of an axis goes to grid index ``i`` (row) and tile index ``j`` (column), so
  ``rearrange(kron(S, T)) == outer(S.ravel(), T.ravel())``. Leading axes (layers) stack row blocks.
  """
  k, n = len(grid), w.ndim - len(grid)
  x = w.reshape(*w.shape[:n], *(d for g, t in zip(grid, tile) for d in (g, t)))
  x = x.transpose(*range(n), *(n + 2 * a for a in range(k)), *(n + 2 * a + 1 for a in range(k)))
  return x.reshape(-1, math.prod(tile))


def extract_templates(gen: WeightGenerator, params: Mapping[str, Any], *, key: jax.Array | None = None,
                      refine_steps: int = 0) -> tuple[dict, dict, dict[str, float]]:
  """Templates and scalers for ``gen`` that best reproduce the dense ``params``.

  Args:
    gen: the generator of the model that ``params`` belong to.
    params: plain parameter tree with ``gen.param_shapes()`` shapes (numpy or jax arrays).
    key: seeds the templates beyond the rank bound ``min(layers * prod(grid), prod(tile))`` of a
      bank; they get unit-RMS noise and zero scalers, so the composition is unchanged and their
      scalers still receive gradient when training resumes.
    refine_steps: widths that are not tile multiples are zero-padded, which makes the SVD optimal
      for the padded weights, not the cropped ones. Each step refills the padding with the current
      reconstruction and redoes the SVD (hard impute): the cropped error never increases.

  Returns:
    ``(templates, scalers, errors)``: float32 jax arrays with ``gen.template_shapes()`` and
    ``gen.scaler_shapes()`` shapes, and ``'path/of/param' -> ||W - W_hat||_F / ||W||_F`` on the
    cropped weights (0 for an all-zero weight).
  """
  flat = traverse_util.flatten_dict(params)
  if set(flat) != set(gen.banks):
    raise ValueError(f"params do not match the generator's parameters; they differ at "
                     f"{['/'.join(p) for p in sorted(set(flat) ^ set(gen.banks))][:4]}.")
  key = jax.random.key(0) if key is None else key
  templates, scalers, errors = {}, {}, {}
  for i, (path, b) in enumerate(sorted(gen.banks.items())):
    name = "/".join(path)
    w = np.asarray(flat[path], np.float64)
    if w.shape != b.shape:
      raise ValueError(f"parameter {name} has shape {w.shape}, but the generator expects {b.shape}.")
    pad = [(0, 0)] * (w.ndim - len(b.grid)) + [(0, g * t - n) for g, t, n in zip(b.grid, b.tile, b.crop)]
    r0 = rearrange(np.pad(w, pad), b.grid, b.tile)
    keep = rearrange(np.pad(np.ones(w.shape, bool), pad), b.grid, b.tile)  # False on the padding
    n_tiles, k = math.prod(b.tile), min(b.num_templates, *r0.shape)
    r = r0
    for _ in range(1 + (refine_steps if not keep.all() else 0)):
      u, s, vt = np.linalg.svd(r, full_matrices=False)
      approx = (u[:, :k] * s[:k]) @ vt[:k]
      r = np.where(keep, r0, approx)
    norm = np.linalg.norm(r0)
    errors[name] = float(np.linalg.norm(np.where(keep, r0 - approx, 0.0)) / norm) if norm > 0 else 0.0

    sign = np.sign(vt[np.arange(k), np.abs(vt[:k]).argmax(1)])
    t = vt[:k] * (sign * math.sqrt(n_tiles))[:, None]
    sc = u[:, :k] * (sign * s[:k] / math.sqrt(n_tiles))  # (layers * G, k)
    sc = sc.reshape(-1, math.prod(b.grid), k).transpose(0, 2, 1)  # (layers, k, G)
    if k < b.num_templates:
      logging.info("extract: %s has rank bound %d < %d templates; the other %d are noise with zero scalers.",
                   name, k, b.num_templates, b.num_templates - k)
      extra = jax.random.normal(jax.random.fold_in(key, i), (b.num_templates - k, n_tiles), jnp.float32)
      t = np.concatenate([t, np.asarray(extra, np.float64)])
      sc = np.concatenate([sc, np.zeros((sc.shape[0], b.num_templates - k, sc.shape[2]))], axis=1)
    templates[path] = jnp.asarray(t.reshape(b.template_shape), jnp.float32)
    scalers[path] = jnp.asarray(sc.reshape(b.scaler_shape), jnp.float32)
  return traverse_util.unflatten_dict(templates), traverse_util.unflatten_dict(scalers), errors
