"""The three programs end to end on tiny learnable data: pre-train -> init -> train, resume,
exports, function preservation, and topology-independent restores."""
import json
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs import vit_init, vit_pretrain, vit_train
from helpers import every_field_read, numpy_materialize
from weit_jax import checkpoint, exports, generator, models, scaler_init, sharding
from weit_jax.models import vit
from weit_jax.programs import init as init_program
from weit_jax.programs import pretrain, train

TILES = dict(embed=8, mlp=8, heads=1, kv=8)


def unlocked(config):
  return ml_collections.ConfigDict(config.to_dict())


def pretrain_config(learnable_data, **overrides):
  c = unlocked(vit_pretrain.get_config("runlocal"))
  c.model.variant = "mu/4"
  # big_vision's "better plain ViT baselines" options: every program below honours them (the
  # default tok + learn runs through test_launch and test_reliability).
  c.model.pool_type, c.model.posemb = "gap", "sincos2d"
  c.weit.tiles = TILES
  c.weit.num_templates = 3
  c.weit.extra_sizes = "depth=4"  # multi-size pre-training: init starts TARGETS' d4 from these scalers
  c.batch_size = 32
  c.total_steps = 12
  c.optim.warmup_steps = 2
  c.log_every = 3
  c.eval_every = 6
  c.eval_at = "4,9"  # besides every 6
  c.checkpoint_every = 6
  c.update(overrides)
  return learnable_data(c)


@pytest.fixture(scope="module")
def pretrained(learnable_data, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pretrain"))
  config = pretrain_config(learnable_data)
  with every_field_read(config):
    summary = pretrain.run(config, workdir)
  return workdir, summary


def read_jsonl(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_pretrain_writes_metrics_plot_and_summary(pretrained):
  """(Resuming with a longer run: tests/test_multihost.py, in process; after SIGKILL and on another
  mesh: tests/test_reliability.py.)"""
  workdir, summary = pretrained
  records = read_jsonl(workdir)
  losses = [r["loss"] for r in records if "loss" in r]
  assert [r["step"] for r in records if "loss" in r][-1] == 12
  assert losses[-1] < losses[0]  # it learns
  assert [r["step"] for r in records if "eval_accuracy" in r] == [4, 6, 9, 12]  # eval_at, eval_every, the end
  assert os.path.getsize(os.path.join(workdir, "curves.png")) > 1000
  assert summary["final_step"] == 12 and summary["templates_params"] > 0
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "6"]


def test_workdir_of_another_config_is_refused(pretrained, learnable_data):
  workdir, _ = pretrained
  before = sorted(os.listdir(workdir))
  with pytest.raises(ValueError, match=r"holds a run of a different config \(fields \['seed'\] differ\)"):
    pretrain.run(pretrain_config(learnable_data, seed=5), workdir)
  assert sorted(os.listdir(workdir)) == before


def init_config(learnable_data, templates, targets, steps=4):
  c = unlocked(vit_init.get_config("runlocal"))
  c.templates = templates
  c.templates_step = 12
  c.targets = targets
  c.steps = steps
  c.num_examples = 128
  c.batch_size = 32
  c.optim.warmup_steps = 1
  c.log_every = 2
  c.checkpoint_every = 100
  return c


# shallower, deeper, and wider with a width that is not a multiple of the tile (8).
TARGETS = "depth=1;depth=4;width=36,heads=3"


@pytest.fixture(scope="module")
def initialized(pretrained, learnable_data, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("init"))
  config = init_config(learnable_data, pretrained[0], TARGETS)
  with every_field_read(config):
    results = init_program.run(config, workdir)
  return workdir, results


def test_init_exports_every_target(initialized):
  workdir, results = initialized
  assert sorted(results) == [f"{n}-gap-sincos2d" for n in ("d1-w32-h2-m64-p4", "d2-w36-h3-m72-p4", "d4-w32-h2-m64-p4")]
  for name, r in results.items():
    meta = exports.read_meta(os.path.join(workdir, name, "export"))
    assert meta["template_source"]["step"] == 12
    assert set(meta["scaler_training"]) >= {"accuracy_before", "accuracy_after", "heuristic", "steps"}
    assert models.from_record(meta["model"]).short_name() == name


def test_scaler_training_leaves_templates_bit_identical(pretrained, initialized):
  _, src, params, _ = pretrain.restore_templates(pretrained[0], 12)
  templates = jax.device_get(params["templates"])
  want = traverse_util.flatten_dict(templates)
  for name in initialized[1]:
    compact = _restore_compact(os.path.join(initialized[0], name, "compact"))
    got = traverse_util.flatten_dict(compact["templates"])
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=str(k))
    # ... while the scalers moved away from where the heuristic put them.
    cfg = models.from_record(meta_of(initialized[0], name)["model"])
    model = vit.ViT(cfg)
    gen = generator.WeightGenerator.from_model(model, vit.dummy_input(cfg), tiles=TILES, num_templates=3)
    sizes = src.sizes(params)
    source, source_scalers = sizes[scaler_init.nearest_size(gen, [s.gen for s, _ in sizes])]
    assert meta_of(initialized[0], name)["scaler_training"]["scalers_from"] == source.name
    start = scaler_init.init_scalers("interpolate", gen, templates, key=jax.random.key(0),
                                     target_stats=generator.param_stats(model, vit.dummy_input(cfg)),
                                     source=source.gen, source_scalers=jax.device_get(source_scalers),
                                     source_stats=generator.param_stats(source.model,
                                                                        vit.dummy_input(source.model_config)))
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
        jax.tree_util.tree_leaves(compact["scalers"]), jax.tree_util.tree_leaves(start))]
    assert max(moved) > 1e-4, moved


def meta_of(workdir, name):
  return exports.read_meta(os.path.join(workdir, name, "export"))


def _restore_compact(path):
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(path, "params"))


def test_export_preserves_the_template_models_function(initialized):
  workdir, results = initialized
  name = "d2-w36-h3-m72-p4-gap-sincos2d"
  meta = exports.read_meta(os.path.join(workdir, name, "export"))
  cfg = models.from_record(meta["model"])
  model = vit.ViT(cfg)
  gen = generator.WeightGenerator.from_model(model, vit.dummy_input(cfg), tiles=TILES, num_templates=3)
  compact = _restore_compact(os.path.join(workdir, name, "compact"))
  images = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  template_logits = model.apply({"params": gen.materialize(compact["templates"], compact["scalers"])}, images)
  plain = exports.load_params(os.path.join(workdir, name, "export"))
  export_logits = model.apply({"params": plain}, images)
  np.testing.assert_allclose(np.asarray(export_logits), np.asarray(template_logits), rtol=1e-5, atol=1e-5)
  assert float(jnp.std(export_logits)) > 0


def test_export_restores_on_one_and_eight_devices(initialized):
  export = os.path.join(initialized[0], "d4-w32-h2-m64-p4-gap-sincos2d", "export")
  one = exports.load_params(export)
  kernel = one["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert len(kernel.sharding.device_set) == 1
  for shape, spec in (({"fsdp": 8}, jax.sharding.PartitionSpec(None, "fsdp", None)),
                      ({"fsdp": 4, "model": 2}, jax.sharding.PartitionSpec(None, "fsdp", "model"))):
    mesh = sharding.make_mesh(shape)
    eight = exports.load_params(export, mesh=mesh)
    k8 = eight["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
    assert k8.sharding.spec == spec and len(k8.sharding.device_set) == 8
    chex.assert_trees_all_close(jax.device_get(eight), jax.device_get(one), rtol=0, atol=0)


def test_mismatched_export_is_refused(initialized):
  export = os.path.join(initialized[0], "d4-w32-h2-m64-p4-gap-sincos2d", "export")
  other = vit.make_config("mu/4", depth=3, image_size=28, channels=1, num_classes=10)
  with pytest.raises(checkpoint.CheckpointError, match=r"is a vit d4-w32-h2-m64-p4-gap-sincos2d but the model asked "
                                                       r"for is a vit d3-w32.*'pool_type': \('gap', 'tok'\)"):
    exports.load_params(export, expected_model=other)
  with pytest.raises(checkpoint.CheckpointError, match="is not an export"):
    exports.load_params(initialized[0])


def test_train_from_export_and_from_scratch(initialized, learnable_data, tmp_path):
  export = os.path.join(initialized[0], "d1-w32-h2-m64-p4-gap-sincos2d", "export")
  results = {}
  for label, init in (("weit", export), ("random", None)):
    c = unlocked(vit_train.get_config("runlocal,variant=mu/4"))
    c.init = init
    c.total_steps, c.batch_size, c.log_every, c.eval_every, c.checkpoint_every = 6, 32, 3, 0, 6
    c.optim.warmup_steps = 1
    learnable_data(c)
    with every_field_read(c, {"model.*": "config.init unset (an export names its model)"} if init else None):
      results[label] = train.run(c, str(tmp_path / label))
  assert results["weit"]["init"] == export and results["random"]["init"] == "random"
  # The export's depth (1) and options (gap: no class token) are used, not the config's variant (mu: depth 2).
  assert results["weit"]["params"]["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"].shape[0] == 1
  assert "cls" not in results["weit"]["params"] and "cls" in results["random"]["params"]
  assert results["random"]["params"]["Transformer"]["encoderblock"]["LayerNorm_0"]["scale"].shape[0] == 2
  # A finished run leaves its trained model as an export; invoked again, it keeps it.
  trained = str(tmp_path / "weit" / "export")
  assert exports.read_meta(trained)["training"]["steps"] == 6
  chex.assert_trees_all_equal(jax.device_get(exports.load_params(trained)), jax.device_get(results["weit"]["params"]))
  train.run(c, str(tmp_path / "random"))
  assert exports.read_meta(str(tmp_path / "random" / "export"))["training"]["init"] == "random"


def test_new_head_for_another_number_of_classes(initialized):
  export = os.path.join(initialized[0], "d1-w32-h2-m64-p4-gap-sincos2d", "export")
  cfg = models.from_record(dict(exports.read_meta(export)["model"], num_classes=5))
  c = ml_collections.ConfigDict(dict(init=export, seed=0))
  params = train.initial_params(c, cfg)
  assert params["head"]["kernel"].shape == (32, 5)
  exported = jax.device_get(exports.load_params(export))
  np.testing.assert_array_equal(params["embedding"]["kernel"], exported["embedding"]["kernel"])


def test_init_heuristic_only_and_overwrite(pretrained, learnable_data, tmp_path):
  """steps=0 exports the heuristic's scalers; overwrite starts the targets over. (A target of the
  init fixture's: its programs come from the session's compilation cache.)"""
  workdir = str(tmp_path / "init0")
  c = init_config(learnable_data, pretrained[0], "depth=4", steps=0)
  r = init_program.run(c, workdir)["d4-w32-h2-m64-p4-gap-sincos2d"]
  assert r["steps"] == 0 and r["accuracy_before"] == r["accuracy_after"]
  # d4 is a size pre-training trained (weit.extra_sizes): the export is that size, composed by numpy.kron
  # from the templates and its own pre-trained scalers.
  assert r["scalers_from"] == "d4-w32-h2-m64-p4-gap-sincos2d"
  _, src, params, _ = pretrain.restore_templates(pretrained[0], 12)
  (d4, scalers), = [(s, sc) for s, sc in src.sizes(jax.device_get(params)) if s.name == r["scalers_from"]]
  flat_t, flat_s = (traverse_util.flatten_dict(x) for x in (params["templates"], scalers))
  plain = traverse_util.flatten_dict(jax.device_get(exports.load_params(
      os.path.join(workdir, "d4-w32-h2-m64-p4-gap-sincos2d", "export"))))
  for path, bank in d4.gen.banks.items():
    want = numpy_materialize(bank, np.asarray(flat_t[path], np.float64), np.asarray(flat_s[path], np.float64))
    np.testing.assert_allclose(np.asarray(plain[path]), want, rtol=1e-4, atol=1e-5, err_msg=str(path))
  assert not os.path.exists(os.path.join(workdir, "d4-w32-h2-m64-p4-gap-sincos2d", "checkpoints"))
  c2 = init_config(learnable_data, pretrained[0], "depth=4", steps=2)
  c2.num_examples = 96  # another config (the run length alone may change between resumes)
  with pytest.raises(ValueError, match="holds a run of a different config"):
    init_program.run(c2, workdir)
  c2.overwrite = True
  r2 = init_program.run(c2, workdir)["d4-w32-h2-m64-p4-gap-sincos2d"]
  assert r2["steps"] == 2 and r2["num_examples"] == 96  # trained anew, not "already exported; skipping"
