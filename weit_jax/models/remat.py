"""Activation rematerialization of a family's scanned blocks: ``remat_policy`` (big_vision's names).

``none`` keeps every activation for the backward pass (the fastest step, the most memory). The
others recompute a block's forward during the backward pass, saving only what the JAX checkpoint
policy of the same name keeps: ``nothing_saveable`` (only the block's input), ``dots_saveable``
(matmul outputs), ``dots_with_no_batch_dims_saveable`` (matmul outputs without batch dimensions:
not attention's scores and values). Unlike here, big_vision's scanned ViT always rematerializes
and defaults to ``nothing_saveable``; its ``none`` means JAX's default policy, which also saves
nothing. The parameters and the values computed are the same under every policy: a run or an
export never depends on it.
"""
from __future__ import annotations

import flax.linen as nn
import jax

POLICIES = ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")


def check(policy: str) -> None:
  if policy not in POLICIES:
    raise ValueError(f"remat_policy={policy!r}; use one of {POLICIES} (--config.model.remat_policy).")


def wrap(block: type[nn.Module], policy: str) -> type[nn.Module]:
  """``block`` (a module class about to be scanned) with ``policy``'s rematerialization."""
  check(policy)
  if policy == "none":
    return block
  # prevent_cse=False: inside a scan the loop already keeps XLA from merging the recomputation away.
  return nn.remat(block, prevent_cse=False, policy=getattr(jax.checkpoint_policies, policy))
