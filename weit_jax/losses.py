"""Cross-entropy, distillation, and the constraint regularizer (docs/design.md section 4)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def softmax_cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray, label_smoothing: float = 0.0) -> jnp.ndarray:
  """Mean cross-entropy against (soft) one-hot labels, with optional label smoothing."""
  if label_smoothing:
    labels = labels * (1.0 - label_smoothing) + label_smoothing / labels.shape[-1]
  return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1))


def distillation(student_logits: jnp.ndarray, teacher_logits: jnp.ndarray, temperature: float = 1.0) -> jnp.ndarray:
  """``tau^2 * KL(softmax(teacher / tau) || softmax(student / tau))``, averaged over the batch.

  The ``tau^2`` factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).
  """
  t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits) / temperature)
  s = jax.nn.log_softmax(student_logits / temperature)
  return temperature ** 2 * jnp.mean(jnp.sum(jnp.exp(t) * (t - s), axis=-1))


def accuracy(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
  """Per-example 0/1 correctness against the arg-max of (soft) labels."""
  return (jnp.argmax(logits, -1) == jnp.argmax(labels, -1)).astype(jnp.float32)


def template_diversity(templates) -> jnp.ndarray:
  """Overlap between the templates of each bank: ``sum_banks ||G - diag(G)||^2``.

  ``G`` is the Gram matrix of the bank's flattened, L2-normalized templates, so the term is the
  sum of squared cosine similarities between distinct templates: zero iff they are orthogonal.
  """
  total = jnp.zeros((), jnp.float32)
  for t in jax.tree_util.tree_leaves(templates):
    if t.shape[0] < 2:
      continue
    flat = t.reshape(t.shape[0], -1).astype(jnp.float32)
    flat = flat / (jnp.linalg.norm(flat, axis=1, keepdims=True) + 1e-12)
    gram = flat @ flat.T
    total = total + jnp.sum((gram - jnp.diag(jnp.diag(gram))) ** 2)
  return total


def soft_constraint(dense, composed) -> jnp.ndarray:
  """``sum_params ||W - materialize(T, S)||^2 / numel(W)``: the soft-mode penalty."""
  sq = jax.tree_util.tree_map(lambda w, c: jnp.mean((w.astype(jnp.float32) - c.astype(jnp.float32)) ** 2),
                              dense, composed)
  return sum(jax.tree_util.tree_leaves(sq))
