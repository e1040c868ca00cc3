"""Orbax checkpoints of a run: train state + data iterator in the workdir (exports: ``exports.py``).

Train checkpoints live in ``WORKDIR/checkpoints/<step>``: the train state (any pytree of global
arrays, restored onto the shardings the caller asks for) and each process's grain iterator state,
so a resumed run sees exactly the batches an uninterrupted one would. Orbax writes a step to a
temporary folder and renames it when complete, so a crash mid-save never leaves a step that looks
finished.
"""
from __future__ import annotations

import asyncio
import contextlib
import os

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath

# Orbax splits an array replicated over N devices into N slices, one written by each replica. For a
# small array that costs more than it saves (a compiled slice per shape, N tiny writes): arrays whose
# slice would be under 1 MiB are written whole by one replica.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 1 << 20


def _write_small_arrays_from_one_replica() -> None:
  default = ocp.type_handlers.get_type_handler(jax.Array)
  handler = ocp.type_handlers.ArrayHandler(
      array_metadata_store=getattr(default, "_array_metadata_store", None),
      min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL)
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax warns on every override, an intended one too
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    absl_logging.set_verbosity(verbosity)


_write_small_arrays_from_one_replica()


def absolute(path: str) -> str:
  """Local paths made absolute; object-store URLs (``gs://...``) as they are."""
  return path if "://" in path else os.path.abspath(os.path.expanduser(path))


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used, with what to do about it in the message."""


class Checkpointer:
  """Periodic, asynchronous saves and resume of (state, data iterator) in ``workdir/checkpoints``."""

  def __init__(self, workdir: str, *, every: int, keep: int = 3, async_save: bool = True):
    self.directory = epath.Path(absolute(workdir)) / "checkpoints"
    self.every = int(every)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(self.every, 1), create=True,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True),
        item_names=("state", "data"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
    """Saves when ``step`` is on the interval (or ``force``); returns whether a save started."""
    args = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, step: int, abstract_state, data_iterator):
    """Restores ``step`` onto the shardings of ``abstract_state`` (ShapeDtypeStructs with
    ``.sharding``: any mesh, any number of devices or processes); the data iterator is advanced in
    place to where it was, unless another number of processes saved it (``data_process_count``)."""
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None and self.data_process_count(step) in (None, jax.process_count()):
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      with _settled_event_loops():
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # orbax raises many types; the user needs the folder and a way out
      earlier = [s for s in self.all_steps() if s < step]
      hint = (f"rerun with --config.resume_step={earlier[-1]} to resume from the previous checkpoint "
              "(the later ones are discarded)" if earlier
              else "remove the folder (or use a new --workdir) to start over")
      raise CheckpointError(
          f"checkpoint {self.directory / str(step)} cannot be restored: damaged, incomplete, or written "
          f"by another version ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
          f"{hint}.") from e
    return restored["state"]

  def data_process_count(self, step: int) -> int | None:
    """How many processes saved ``step``'s data-iterator state (grain writes one
    ``data/process_<i>-of-<n>.json`` per process); None if there is none. When it differs from
    ``jax.process_count()``, ``restore`` restores the train state alone and the caller positions
    the data."""
    counts = {int(p.name.rpartition("-of-")[2].removesuffix(".json"))
              for p in (self.directory / str(step) / "data").glob("process_*-of-*.json")}
    return max(counts) if counts else None

  def discard_after(self, step: int) -> list[int]:
    """Deletes the checkpoints after ``step`` (a run rewound to ``step`` saves those steps anew);
    returns their steps."""
    later = [s for s in self.all_steps() if s > step]
    for s in later:
      self.manager.delete(s)
    return later

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


class _SettlingEventLoop(asyncio.SelectorEventLoop):
  """An event loop that, before it closes, lets the tasks still pending on it finish.

  Orbax runs a restore on a fresh event loop and closes it as soon as the restore returns or
  raises. When one read of a damaged checkpoint fails, the others are still in flight in
  tensorstore's threads; each would later post its result to the closed loop and print a
  "RuntimeError: Event loop is closed" traceback, possibly after the run's own error message.
  Finishing them first leaves nothing running once the restore has failed."""

  def close(self):
    if not self.is_running() and not self.is_closed():
      pending = [t for t in asyncio.all_tasks(self) if not t.done()]
      if pending:
        self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    super().close()


class _SettlingEventLoopPolicy(asyncio.DefaultEventLoopPolicy):
  _loop_factory = _SettlingEventLoop


@contextlib.contextmanager
def _settled_event_loops():
  """New event loops made inside (orbax's, for one restore) settle their tasks before closing."""
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_SettlingEventLoopPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)


def abstract_with_shardings(abstract_tree, sharding_tree):
  return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_tree, sharding_tree)
