r"""Mimetic initialization (Trockman & Kolter, "Mimetic Initialization of Self-Attention Layers",
ICML 2023): no data, any size. Attention weights are set so that each layer starts with the
structure the paper observed in pre-trained ViTs (query-key products close to a positive multiple
of the identity plus noise, value-out products close to a negative one):

    per head h:   W_q^h W_k^h^T  ~  alpha1 * Z1^h + beta1 * I      (a d x d target, rank head_dim)
    all heads:    W_v W_o        =  alpha2 * Z2   - beta2 * I      (d x d, exact)

with ``Z`` i.i.d. Gaussian entries of variance ``1/d`` (``N(0, 1) / sqrt(d)``), ``d`` the width,
and the paper's ViT defaults ``alpha1 = beta1 = 0.7``, ``alpha2 = beta2 = 0.4``.

Recipe (as in the paper and the authors' reference code, in this model's row-vector convention
``q = x @ W_q``):

- **query/key**: for each head an independent ``Z1^h``; ``M = alpha1 Z1^h + beta1 I = U S V^T``
  (SVD); ``W_q^h = U[:, :k] sqrt(S[:k])`` and ``W_k^h = V[:, :k] sqrt(S[:k])`` with ``k =
  head_dim``. So ``W_q^h W_k^h^T`` is the best rank-k approximation of ``M`` (Eckart-Young): the
  "approximately" above is exactly this truncation.
- **value/out**: one ``Z2`` for the layer; ``M = alpha2 Z2 - beta2 I = U S V^T``; the value kernel
  (all heads, ``d x heads*k``) is ``U sqrt(S)`` and the out kernel (``heads*k x d``) ``sqrt(S)
  V^T``, so ``sum_h W_v^h W_o^h = M`` exactly (``heads * k = d``).
- attention biases zero; the ``1/sqrt(head_dim)`` logit scale stays in the attention op (as in
  the paper, whose targets are on the weights). Every other parameter (embeddings, MLPs,
  norms, head) comes from the model's own initializers.

Every layer draws its own ``Z``s. Randomness: numpy's ``default_rng(seed)``.
"""
from __future__ import annotations

import numpy as np

from weit_jax.inits import common
from weit_jax import models
from weit_jax.models import vit

ALPHA1, BETA1 = 0.7, 0.7  # query-key
ALPHA2, BETA2 = 0.4, 0.4  # value-out
ATTENTION = ("Transformer", "encoderblock", "MultiHeadDotProductAttention_0")


def attention_layer(rng: np.random.Generator, width: int, num_heads: int, *, alpha1=ALPHA1, beta1=BETA1,
                    alpha2=ALPHA2, beta2=BETA2) -> dict:
  """One layer's kernels (Flax shapes) and the targets they factor.

  Returns dict with ``query``, ``key``, ``value``: (d, heads, k); ``out``: (heads, k, d);
  ``qk_targets``: (heads, d, d) the matrices ``alpha1 Z1^h + beta1 I``; ``vo_target``: (d, d).
  """
  d, h = int(width), int(num_heads)
  k = d // h
  eye = np.eye(d)
  query, key = np.empty((d, h, k)), np.empty((d, h, k))
  qk_targets = np.empty((h, d, d))
  for head in range(h):
    m = alpha1 * rng.standard_normal((d, d)) / np.sqrt(d) + beta1 * eye
    u, s, vt = np.linalg.svd(m)
    root = np.sqrt(s[:k])
    query[:, head, :] = u[:, :k] * root
    key[:, head, :] = vt[:k].T * root
    qk_targets[head] = m
  m = alpha2 * rng.standard_normal((d, d)) / np.sqrt(d) - beta2 * eye
  u, s, vt = np.linalg.svd(m)
  root = np.sqrt(s[:h * k])
  value = (u[:, :h * k] * root).reshape(d, h, k)
  out = (root[:, None] * vt[:h * k]).reshape(h, k, d)
  return dict(query=query, key=key, value=value, out=out, qk_targets=qk_targets, vo_target=m)


def check_target(target) -> None:
  """Only models with self-attention (ViTs): a ResNet has none, so the method does not apply."""
  if not isinstance(target, vit.ViTConfig):
    raise ValueError(f"mimetic initialization sets self-attention weights; a {models.family_of(target).name} "
                     "model has none (N/A).")


def init(source, target: vit.ViTConfig, *, seed: int = 0, **coefficients) -> dict:
  """The target's own init with every attention layer's q, k, v, out kernels set mimetically."""
  del source  # data-free
  check_target(target)
  params = common.own_init(target, seed)
  rng = np.random.default_rng([int(seed), 0x313])  # independent of the own-init stream
  att = params
  for name in ATTENTION:
    att = att[name]
  for layer in range(target.depth):
    w = attention_layer(rng, target.width, target.num_heads, **coefficients)
    for name in ("query", "key", "value", "out"):
      att[name]["kernel"][layer] = w[name].astype(np.float32)
      att[name]["bias"][layer] = 0.0
  return params
