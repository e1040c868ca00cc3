"""Why WeiT's DiT initializations were weak: the measurements behind generation.md's cause section.

Used by ``benchmarks/generation_quality.py`` (its stages give the inputs):

- ``constraint_fits``: the best N-template Kronecker fit (``weit_jax/extract.py``, closed form) of a
  trained *unconstrained* DiT of the auxiliary's size, per template bank and N, grouped by what the
  bank is (attention, MLP, adaLN modulation, embedders, final layer): how much the constraint costs
  each kind of weight at the tiles in use.
- ``probe_export``: of a plain DiT export, on one fixed batch of noisy Fashion-MNIST images: the RMS
  of each block's adaLN gates and of its two residual updates (``gate * branch``, the model's
  ``intermediates`` probes), and the norm of the training loss's gradient (the step-1 gradient norm).
- ``scaler_convergence``: the scaler-only loss curve of WeiT's init program: is it still falling?
"""
from __future__ import annotations

import math
import re

import numpy as np

# What a DiT parameter path is, for the per-kind summaries (first match wins).
GROUPS = (("attention", r"MultiHeadDotProductAttention"),
          ("MLP", r"blocks/Dense_"),
          ("adaLN modulation", r"adaLN_modulation"),
          ("embedders", r"_embedder"),
          ("final layer", r"final_linear"))


def group_of(path: str) -> str:
  for name, pattern in GROUPS:
    if re.search(pattern, path):
      return name
  raise ValueError(f"no group for DiT parameter {path!r}; add it to GROUPS")


def constraint_fits(params, cfg, tiles: dict, counts=(1, 2, 4, 8, 16)) -> dict:
  """``{'banks': {path: {N: rel. error}}, 'groups': {group: {N: error}}, 'norms': ...}``.

  A group's error is the norm-weighted one, ``sqrt(sum_b err_b^2 |W_b|^2 / sum_b |W_b|^2)``: the
  relative Frobenius error of the group's weights taken together. Biases and other vectors are
  fitted too (their banks are in the model's generator like any weight).
  """
  import jax
  from flax import traverse_util
  from weit_jax import extract, generator, models
  model = models.build(cfg)
  flat = {"/".join(k): np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(params).items()}
  banks: dict = {}
  for n in counts:
    gen = generator.WeightGenerator.from_model(model, *models.dummy_inputs(cfg), tiles=tiles, num_templates=n)
    _, _, errors = extract.extract_templates(gen, jax.device_get(params), key=jax.random.key(0), refine_steps=3)
    for path, err in errors.items():
      banks.setdefault(path, {})[n] = float(err)
  groups: dict = {}
  for n in counts:
    num, den = {}, {}
    for path, errs in banks.items():
      g, w2 = group_of(path), float(np.sum(flat[path] ** 2))
      num[g] = num.get(g, 0.0) + errs[n] ** 2 * w2
      den[g] = den.get(g, 0.0) + w2
    for g in num:
      groups.setdefault(g, {})[n] = math.sqrt(num[g] / den[g]) if den[g] else 0.0
  norms = {g: math.sqrt(sum(float(np.sum(flat[p] ** 2)) for p in banks if group_of(p) == g))
           for g in groups}
  return dict(banks=banks, groups=groups, norms=norms, counts=list(counts), tiles=dict(tiles))


def probe_batch(data_config, batch_size: int = 64, seed: int = 0):
  """One fixed batch of the eval split, its diffusion inputs (times and noise from ``seed``)."""
  import jax
  from weit_jax import input_pipeline
  from weit_jax.tasks import diffusion
  batch = next(iter(input_pipeline.make_eval_iterator(data_config, global_batch_size=batch_size)))
  batch = {k: np.asarray(v) for k, v in batch.items()}
  task = diffusion.Diffusion(data_config)
  inputs, target = task._draw(batch, jax.random.key(seed), 0.0)
  return batch, inputs, target


def probe_export(params, cfg, inputs, target) -> dict:
  """adaLN gate and residual-update RMS per block, and the loss's gradient norm, of ``params``."""
  import jax
  import optax
  from flax import traverse_util
  from weit_jax import models, rectified_flow
  model = models.build(cfg)
  _, state = model.apply({"params": params}, *inputs, mutable=["intermediates"])
  probes = {k[-1]: np.asarray(v[0] if isinstance(v, tuple) else v) for k, v in
            traverse_util.flatten_dict(state["intermediates"]).items()}
  rms = lambda x, axes: np.sqrt(np.mean(np.square(x), axis=axes)).tolist()  # per layer (axis 0)
  out = {name: rms(probes[name], tuple(range(1, probes[name].ndim))) for name in
         ("gate_msa", "gate_mlp", "update_msa", "update_mlp")}

  # The weights' scale per kind (Adam moves every weight by about the learning rate per step, so a
  # larger scale is a smaller relative step).
  flat = {"/".join(k): np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(params).items()}
  def kernels(g):  # a kind's weight matrices (the class table included), not its biases
    return [w.ravel() for p, w in flat.items() if group_of(p) == g and ("kernel" in p or p.endswith("y_embedder"))]
  out["weight_rms"] = {g: float(np.sqrt(np.mean(np.concatenate(kernels(g) or [np.zeros(1)]) ** 2))) for g, _ in GROUPS}

  def loss(p):
    return rectified_flow.loss(model.apply({"params": p}, *inputs), target)
  value, grads = jax.value_and_grad(loss)(params)
  out.update(loss=float(value), grad_norm=float(optax.tree.norm(grads)))
  return out


def scaler_convergence(init_workdir: str, target_name: str) -> dict:
  """The scaler-training loss of one target: first/last logged values, and the relative fall over
  the last quarter of the run (near 0: converged at this learning rate and schedule)."""
  import os
  from weit_jax import metrics
  recs = [r for r in metrics.read_metrics(os.path.join(init_workdir, target_name)) if "loss" in r]
  steps = [int(r["step"]) for r in recs]
  losses = [float(r["loss"]) for r in recs]
  if len(steps) < 2:
    return dict(steps=steps, losses=losses)
  quarter = [l for s, l in zip(steps, losses) if s >= 0.75 * steps[-1]]
  half = max(1, len(quarter) // 2)
  early, late = float(np.mean(quarter[:half])), float(np.mean(quarter[half:] or quarter))
  return dict(steps=steps, losses=losses, last_quarter_fall=(early - late) / early if early else 0.0)
