"""Orbax checkpoints: train state + data iterator in the workdir, and exports of plain parameters.

Train checkpoints live in ``WORKDIR/checkpoints/<step>``: the train state (any pytree of global
arrays, restored onto the shardings the caller asks for) and each process's grain iterator state,
so a resumed run sees exactly the batches an uninterrupted one would. Orbax writes a step to a
temporary folder and renames it when complete, so a crash mid-save never leaves a step that looks
finished.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import zipfile
from typing import Any, Mapping

import flax.linen as nn
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from weit_jax import models, sharding


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


# --- exports: plain parameter trees --------------------------------------------------------------

EXPORT_META = "export.json"
BIG_VISION_NPZ = "params.npz"


def export_params(directory: str, params, meta: Mapping[str, Any]) -> None:
  """Writes ``params`` (a plain nested dict) and a JSON record beside it; for a model whose tree is
  big_vision's own (``meta['model']`` of a family with ``big_vision_npz``, plain parameters: no
  ``form``), also ``params.npz`` in big_vision's checkpoint format.

  The JSON is written last (atomically), so a folder with ``export.json`` is a complete export.
  """
  path = epath.Path(absolute(directory))
  if (path / EXPORT_META).exists():
    raise CheckpointError(f"{path} already holds an export; choose another folder.")
  path.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path / "params", params, force=True)
    ckptr.wait_until_finished()
  record = meta.get("model")
  if record is not None and "form" not in meta and models.get(record.get("family") or "vit").big_vision_npz:
    write_big_vision_npz(path / BIG_VISION_NPZ, params)
  if jax.process_index() == 0:
    tmp = path / (EXPORT_META + ".tmp")
    tmp.write_text(json.dumps(dict(meta), indent=2, sort_keys=True, default=str))
    tmp.rename(path / EXPORT_META)


def write_big_vision_npz(path, params) -> None:
  """``params`` as big_vision's ``.npz`` checkpoint: one float32 array per parameter, keyed by its
  ``/``-joined path (``Transformer/encoderblock/MlpBlock_0/Dense_0/kernel``), what big_vision's
  ``utils.load_params`` reads. Arrays are gathered and written one at a time (a sharded model is
  never whole in one host's memory twice); process 0 writes, to a temporary name renamed at the end."""
  from flax import traverse_util
  from jax.experimental import multihost_utils
  path = epath.Path(path)
  tmp = path.parent / (path.name + ".tmp")
  main = jax.process_index() == 0
  with contextlib.ExitStack() as stack:
    zf = stack.enter_context(zipfile.ZipFile(stack.enter_context(tmp.open("wb")), "w", allowZip64=True)) if main else None
    for names, leaf in sorted(traverse_util.flatten_dict(dict(params)).items()):
      if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        leaf = multihost_utils.process_allgather(leaf, tiled=True)  # a collective: every process calls it
      if main:
        with zf.open("/".join(names) + ".npy", "w", force_zip64=True) as f:
          np.lib.format.write_array(f, np.asarray(jax.device_get(leaf), np.float32), allow_pickle=False)
  if main:
    tmp.rename(path)


def read_export_meta(directory: str) -> dict:
  meta = epath.Path(directory) / EXPORT_META
  if not meta.exists():
    raise CheckpointError(f"{directory} is not an export (no {EXPORT_META}); give the folder an init "
                          "program wrote (WORKDIR/<target>/export), or re-run that export.")
  return json.loads(meta.read_text())


def restore_tree(directory: str, abstract_tree):
  """Restores a StandardCheckpointer tree onto the shapes and shardings of ``abstract_tree``,
  refusing clearly when the stored shapes differ."""
  path = epath.Path(absolute(str(directory)))
  with ocp.StandardCheckpointer() as ckptr:
    stored = ckptr.metadata(path)
    stored = getattr(stored, "item_metadata", stored)
    stored = getattr(stored, "tree", stored)
    want = _flat_shapes(abstract_tree)
    have = _flat_shapes(stored)
    if want != have:
      diff = sorted(set(want.items()) ^ set(have.items()))[:4]
      raise CheckpointError(
          f"{directory} holds parameters of another shape than requested; first differences "
          f"(path, shape): {diff}. Load it with the model config it was exported with.")
    return ckptr.restore(path, abstract_tree)


def _flat_shapes(tree) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {jax.tree_util.keystr(k): tuple(np.shape(v) if not hasattr(v, "shape") else v.shape) for k, v in leaves}


def load_params(directory: str, mesh=None, expected_model=None):
  """Restores an export (plain parameters of any model family) onto one device, or sharded onto
  ``mesh`` by the logical rules. ``expected_model``: a model config the export must match (checked
  first; the runtime fields, e.g. the dtype, may differ)."""

  record = read_export_meta(directory)["model"]
  recorded = models.from_record(record)
  if expected_model is not None:
    have, want = models.to_record(recorded), models.to_record(expected_model)
    diff = {k: (have.get(k), want.get(k)) for k in sorted(set(have) | set(want))
            if k not in models.RUNTIME_FIELDS and have.get(k) != want.get(k)}
    if diff:
      raise CheckpointError(f"export {directory} is a {have['family']} {recorded.short_name()} but the model asked "
                            f"for is a {want['family']} {expected_model.short_name()}; differing fields (export, "
                            f"requested): {diff}.")
    recorded = dataclasses.replace(recorded, **models.runtime_of(expected_model))
  boxed = jax.eval_shape(models.build(recorded).init, jax.random.key(0), *models.dummy_inputs(recorded))
  abstract = nn.unbox(boxed)["params"]
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(lambda _: device, abstract)
  else:
    target = sharding.shardings(abstract, nn.get_partition_spec(boxed)["params"], mesh)
  return restore_tree(epath.Path(directory) / "params", abstract_with_shardings(abstract, target))
