"""Exports: a plain parameter tree in a folder, with a JSON record of what it is.

An export is what the init program, the baselines (``weit_jax.inits``) and a training run's end
write, and what a training run or a user starts from: ``DIR/params`` (an orbax tree of plain
parameters), ``DIR/export.json`` (the model record and provenance; written last, so a folder with it
is a complete export) and, for models whose tree is big_vision's own, ``DIR/params.npz`` in
big_vision's checkpoint format.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import zipfile
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from weit_jax import models, sharding
from weit_jax.checkpoint import CheckpointError, absolute, abstract_with_shardings

META = "export.json"
BIG_VISION_NPZ = "params.npz"


def write(directory: str, params, meta: Mapping[str, Any]) -> None:
  """Writes ``params`` (a plain nested dict) and a JSON record beside it; for a model whose tree is
  big_vision's own (``meta['model']`` of a family with ``big_vision_npz``, plain parameters: no
  ``form``), also ``params.npz`` in big_vision's checkpoint format.

  The JSON is written last (atomically), so a folder with ``export.json`` is a complete export.
  """
  path = epath.Path(absolute(directory))
  if (path / META).exists():
    raise CheckpointError(f"{path} already holds an export; choose another folder.")
  path.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path / "params", params, force=True)
    ckptr.wait_until_finished()
  record = meta.get("model")
  if record is not None and "form" not in meta and models.family_named_in(record).big_vision_npz:
    write_big_vision_npz(path / BIG_VISION_NPZ, params)
  if jax.process_index() == 0:
    tmp = path / (META + ".tmp")
    tmp.write_text(json.dumps(dict(meta), indent=2, sort_keys=True, default=str))
    tmp.rename(path / META)


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


def read_big_vision_npz(path) -> dict[str, np.ndarray]:
  """A big_vision ``.npz`` checkpoint (``write_big_vision_npz``'s layout, and big_vision's: one array
  per ``/``-joined parameter name) as ``name -> array``, read whole. A file that is not such an
  archive (not a zip, truncated, a damaged member, a single ``.npy``) raises ValueError in one line."""
  path = epath.Path(path)
  try:
    with path.open("rb") as f, contextlib.closing(np.load(f, allow_pickle=False)) as z:
      if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"it holds one array {np.shape(z)}, not a tree of named parameters")
      arrays = {name: np.asarray(z[name]) for name in z.files}
  except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
    detail = (str(e).splitlines() or [""])[0][:160]
    raise ValueError(f"{path} is not a readable .npz checkpoint ({type(e).__name__}: {detail}); give a big_vision "
                     "checkpoint (one array per '/'-joined parameter name) or an export folder.") from None
  if not arrays:
    raise ValueError(f"{path} is an empty .npz: it holds no parameters.")
  return arrays


def read_meta(directory: str) -> dict:
  meta = epath.Path(directory) / META
  if not meta.exists():
    raise CheckpointError(f"{directory} is not an export (no {META}); give the folder an init "
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

  record = read_meta(directory)["model"]
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
