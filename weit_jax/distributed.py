"""The one place that initializes multi-process JAX, and which rows of a batch each process feeds;
and the persistent compilation cache every program run uses.

On Cloud TPU VMs ``jax.distributed.initialize()`` reads everything from the environment. On CPU
(tests, a laptop) set ``WEIT_COORDINATOR=host:port``, ``WEIT_NUM_PROCESSES`` and
``WEIT_PROCESS_ID``: processes then talk over gloo collectives.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from weit_jax import sharding

_initialized = False
CACHE_ENV = "WEIT_COMPILATION_CACHE"  # a directory, or 'off'


def compilation_cache_dir() -> str | None:
  """Where compiled programs persist across runs: ``$WEIT_COMPILATION_CACHE`` ('off': nowhere), else
  ``$JAX_COMPILATION_CACHE_DIR``, else the user's cache (``$XDG_CACHE_HOME`` or ~/.cache)/weit_jax/xla.
  A user cache, not the workdir: reruns and other workdirs of the same programs hit it, and a
  workdir may be a bucket."""
  path = os.environ.get(CACHE_ENV) or os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if path == "off":
    return None
  return path or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "weit_jax", "xla")


def enable_compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache (programs that took over a second to compile); a
  repeated run skips compiling (a control run's rollout and evaluation: tens of seconds on a CPU)."""
  path = compilation_cache_dir()
  if path:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return path


def initialize(config=None) -> None:
  global _initialized
  if _initialized:
    return
  coordinator = os.environ.get("WEIT_COORDINATOR")
  if coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    host = coordinator.rpartition(":")[0].strip("[]")
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    if loopback:
      _gloo_on_loopback()
    jax.distributed.initialize(coordinator_address=coordinator,
                               coordinator_bind_address=coordinator if loopback else None,
                               num_processes=int(os.environ["WEIT_NUM_PROCESSES"]),
                               process_id=int(os.environ["WEIT_PROCESS_ID"]),
                               initialization_timeout=int(os.environ.get("WEIT_INIT_TIMEOUT_S", 300)))
  elif _on_tpu_pod():
    jax.distributed.initialize()
  _initialized = True


def _gloo_on_loopback() -> None:
  """jax creates gloo's TCP transport without an address, so gloo listens on whatever the host
  name resolves to; with a loopback coordinator (tests, one machine) keep it on 127.0.0.1 too."""
  try:
    from jax._src.lib import _jax
    make = _jax.make_gloo_tcp_collectives
    if getattr(make, "weit_loopback", False):
      return

    def on_loopback(distributed_client, hostname=None, interface=None):
      return make(distributed_client=distributed_client, hostname=hostname or "127.0.0.1", interface=interface)
    on_loopback.weit_loopback = True
    _jax.make_gloo_tcp_collectives = on_loopback
  except (ImportError, AttributeError, TypeError):  # another jax: its default applies
    pass


def _on_tpu_pod() -> bool:
  # Multi-host TPU VMs list their workers here; single-host runs need no coordination.
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def process_batch_rows(mesh, global_batch_size: int) -> np.ndarray:
  """The rows of a global batch (sorted) that this process's devices hold under the batch sharding
  of ``mesh``: what this process must feed ``jax.make_array_from_process_local_data``, in that
  order. Where the batch is replicated across processes, that is every row."""
  spec = sharding.batch_sharding(mesh)
  ways = sharding.batch_ways(mesh)
  if global_batch_size <= 0 or global_batch_size % ways:
    raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of the {ways} "
                     f"batch shards of the mesh {dict(mesh.shape)}.")
  shards = spec.addressable_devices_indices_map((int(global_batch_size),))
  rows = set()
  for index in shards.values():
    rows.update(range(*index[0].indices(int(global_batch_size))))
  if not rows:
    raise ValueError(f"this process holds no device of the mesh {dict(mesh.shape)}.")
  return np.asarray(sorted(rows), np.int64)
