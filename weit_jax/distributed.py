"""The one place that initializes multi-process JAX.

On Cloud TPU VMs ``jax.distributed.initialize()`` reads everything from the environment. On CPU
(tests, a laptop) set ``WEIT_COORDINATOR=host:port``, ``WEIT_NUM_PROCESSES`` and
``WEIT_PROCESS_ID``: processes then talk over gloo collectives.
"""
from __future__ import annotations

import os

import jax

_initialized = False


def initialize(config=None) -> None:
  global _initialized
  if _initialized:
    return
  coordinator = os.environ.get("WEIT_COORDINATOR")
  if coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=int(os.environ["WEIT_NUM_PROCESSES"]),
                               process_id=int(os.environ["WEIT_PROCESS_ID"]))
  elif _on_tpu_pod():
    jax.distributed.initialize()
  _initialized = True


def _on_tpu_pod() -> bool:
  # Multi-host TPU VMs set these; single-host runs need no coordination.
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID")
  return bool(hosts) and "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
