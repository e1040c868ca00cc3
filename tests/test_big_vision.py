"""Exports in big_vision's format, exports restored with orbax alone, and the earlier layout.

The ViT itself against big_vision's equations (every option) is in test_vit.py. Here: exports write
big_vision's ``params.npz`` (``/``-joined keys, as its ``utils.load_params`` reads), restore with
nothing but ``orbax.checkpoint.StandardCheckpointer``, and exports of the earlier layout (the class
token had a position embedding) load converted, computing the same function; workdirs and templates
of that layout are refused with what to do.
"""
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from helpers import big_vision_tree, randomized
from weit_jax import exports, models
from weit_jax.models import vit

IMAGE, CHANNELS, CLASSES = 12, 3, 5


def small_vit(pool_type="tok", posemb="learn"):
  return vit.make_config(width=16, depth=2, mlp_dim=24, num_heads=2, patch_size=4, image_size=IMAGE,
                         channels=CHANNELS, num_classes=CLASSES, pool_type=pool_type, posemb=posemb)


def random_params(cfg, seed):
  return jax.tree.map(np.asarray, randomized(models.init_params(cfg, 0), seed))


def flat_shapes(params):
  return {"/".join(k): tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params).items()}


def test_templates_of_one_option_refuse_a_target_of_another():
  source = small_vit("gap", "sincos2d")
  target = models.target_config(dict(depth=3), source)
  assert (target.pool_type, target.posemb, target.depth) == ("gap", "sincos2d", 3)  # options come along
  with pytest.raises(ValueError, match=r"pool_type='tok' cannot be composed from templates pre-trained with "
                                       r"pool_type='gap'.*--config.model.pool_type='tok'"):
    models.target_config(dict(pool_type="tok"), source)


# --- exports --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def export(tmp_path_factory):
  cfg = small_vit()
  params = random_params(cfg, seed=3)
  directory = str(tmp_path_factory.mktemp("export") / "export")
  exports.write(directory, params, dict(model=models.to_record(cfg), init="test"))
  return directory, cfg, params


def test_export_writes_big_visions_npz(export):
  directory, cfg, params = export
  with np.load(os.path.join(directory, "params.npz"), allow_pickle=False) as npz:
    stored = dict(npz)
  assert {k: v.shape for k, v in stored.items()} == big_vision_tree(cfg)
  for key, value in traverse_util.flatten_dict(params, sep="/").items():
    np.testing.assert_array_equal(stored[key], value)
  assert all(v.dtype == np.float32 for v in stored.values())
  assert not [f for f in os.listdir(directory) if f.endswith(".tmp")]


def test_export_restores_with_orbax_alone(export):
  """README's 'Use an export elsewhere': nothing of weit_jax, no target tree."""
  directory, _, params = export
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(os.path.abspath(os.path.join(directory, "params")))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), params)


def test_resnet_exports_write_no_npz(tmp_path):
  """big_vision's bit.py has one module per unit, not a scanned stack: no npz that would not load."""
  cfg = models.resnet.make_config("femto", image_size=8, channels=1, num_classes=3)
  exports.write(str(tmp_path / "e"), models.init_params(cfg, 0), dict(model=models.to_record(cfg)))
  assert sorted(os.listdir(tmp_path / "e")) == ["export.json", "params"]


def test_records_round_trip_with_the_options():
  cfg = small_vit("gap", "sincos2d")
  record = models.to_record(cfg)
  assert (record["pool_type"], record["posemb"]) == ("gap", "sincos2d") and models.from_record(record) == cfg


def test_training_refuses_an_option_other_than_its_exports(tmp_path):
  from configs import vit_train
  from weit_jax.programs import train
  cfg = small_vit("gap", "learn")
  exports.write(str(tmp_path / "e"), models.init_params(cfg, 0), dict(model=models.to_record(cfg)))
  c = ml_collections.ConfigDict(vit_train.get_config("runlocal").to_dict())
  c.init, c.model.pool_type = str(tmp_path / "e"), "tok"
  with pytest.raises(ValueError, match=r"export of a model with pool_type='gap', but --config.model.pool_type='tok'; "
                                       r"leave it unset"):
    train.validate(c, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()
