"""Loss and regularizer terms against values computed by hand (numpy)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import ml_collections

from weit_jax import losses, optim


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_cross_entropy_with_label_smoothing():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 5)).astype(np.float32)
  labels = np.eye(5, dtype=np.float32)[[0, 3, 1, 4]]
  eps = 0.1
  smooth = labels * (1 - eps) + eps / 5
  want = -(smooth * np_log_softmax(logits.astype(np.float64))).sum(-1).mean()
  np.testing.assert_allclose(float(losses.softmax_cross_entropy(logits, labels, eps)), want, rtol=1e-5)


def test_distillation_is_scaled_kl():
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
  tau = 2.0
  pt = np.exp(np_log_softmax(t / tau))
  kl = (pt * (np_log_softmax(t / tau) - np_log_softmax(s / tau))).sum(-1).mean()
  got = losses.distillation(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), tau)
  np.testing.assert_allclose(float(got), tau ** 2 * kl, rtol=1e-5)
  assert float(losses.distillation(jnp.asarray(t, jnp.float32), jnp.asarray(t, jnp.float32), tau)) == pytest.approx(0, abs=1e-6)


def test_template_diversity_by_hand():
  rng = np.random.default_rng(2)
  a = rng.normal(size=(3, 2, 4))
  b = rng.normal(size=(1, 5))  # a bank with one template has no overlap
  flat = a.reshape(3, -1)
  flat = flat / np.linalg.norm(flat, axis=1, keepdims=True)
  g = flat @ flat.T
  want = sum(g[i, j] ** 2 for i in range(3) for j in range(3) if i != j)
  got = losses.template_diversity({"x": jnp.asarray(a, jnp.float32), "y": {"z": jnp.asarray(b, jnp.float32)}})
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  q, _ = np.linalg.qr(rng.normal(size=(8, 3)))  # orthonormal templates: no overlap
  assert float(losses.template_diversity({"x": jnp.asarray(q.T, jnp.float32)})) == pytest.approx(0, abs=1e-10)


def test_soft_constraint_by_hand():
  rng = np.random.default_rng(3)
  w = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(5,))}
  c = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(5,))}
  want = ((w["a"] - c["a"]) ** 2).sum() / 12 + ((w["b"] - c["b"]) ** 2).sum() / 5
  got = losses.soft_constraint(jax.tree_util.tree_map(jnp.asarray, w), jax.tree_util.tree_map(jnp.asarray, c))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def _optim_config(**kw):
  base = dict(lr=0.1, total_steps=10, warmup_steps=0, schedule="constant", b1=0.9, b2=0.999,
              clip_norm=0.0, wd_paths=r"kernel$")
  return ml_collections.ConfigDict({**base, **kw})


def test_weight_decay_groups_and_masks():
  """One AdamW step with zero gradients: only decay acts, p <- p - lr * wd * p, per group and mask."""
  params = {"templates": {"k": {"kernel": jnp.full((2,), 2.0), "bias": jnp.full((2,), 2.0)}},
            "scalers": {"k": {"kernel": jnp.full((3,), 4.0), "bias": jnp.full((3,), 4.0)}}}
  tx = optim.make_optimizer(_optim_config(), params, weight_decay={"templates": 0.5, "scalers": 0.25})
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["templates"]["k"]["kernel"], 2.0 - 0.1 * 0.5 * 2.0)
  np.testing.assert_allclose(new["scalers"]["k"]["kernel"], 4.0 - 0.1 * 0.25 * 4.0)
  np.testing.assert_allclose(new["templates"]["k"]["bias"], 2.0)  # not matched by wd_paths
  np.testing.assert_allclose(new["scalers"]["k"]["bias"], 4.0)


def test_frozen_paths_get_no_update():
  rng = np.random.default_rng(4)
  params = {"templates": {"w": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
            "scalers": {"w": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}}
  tx = optim.make_optimizer(_optim_config(), params, weight_decay={"templates": 0.1}, frozen="^templates/")
  grads = jax.tree_util.tree_map(lambda x: jnp.ones_like(x), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert np.all(np.asarray(updates["templates"]["w"]) == 0)
  assert np.all(np.asarray(updates["scalers"]["w"]) != 0)


def test_schedule_warmup_then_cosine():
  sched = optim.schedule(_optim_config(schedule="cosine", warmup_steps=4, total_steps=12, lr=1.0))
  np.testing.assert_allclose([float(sched(s)) for s in (0, 2, 4, 8, 12)],
                             [0.0, 0.5, 1.0, 0.5 * (1 + np.cos(np.pi * 4 / 8)), 0.0], atol=1e-6)
  with pytest.raises(ValueError, match="warmup_steps=20 must be smaller than total_steps=10"):
    optim.schedule(_optim_config(warmup_steps=20))
