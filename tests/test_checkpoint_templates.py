"""Templates from a checkpoint one already has (``init_templates_from``, weit_jax/dense_checkpoint.py):
a big_vision ``.npz`` written with numpy alone, under the names big_vision's ViT gives its parameters
(``helpers.big_vision_tree``), scanned or one block per layer. Oracles: ``numpy.kron`` loops
(``helpers.numpy_materialize``) and templates that are known by construction."""
import json
import os

import numpy as np
import pytest
from flax import traverse_util

import helpers
from configs import vit_pretrain
from weit_jax import exports, models
from weit_jax.programs import init as init_program
from weit_jax.programs import pretrain

SMALL = ["--config.weit.tiles.embed=8", "--config.weit.tiles.mlp=8", "--config.weit.tiles.kv=8",
         "--config.weit.num_templates=3", "--config.batch_size=32", "--config.optim.warmup_steps=0",
         "--config.eval_every=0", "--config.log_every=1"]
MU = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4)  # mu/4, what the checkpoints below are


@pytest.fixture(scope="module")
def data_flags(learnable_data):
  import ml_collections
  c = learnable_data(ml_collections.ConfigDict(vit_pretrain.get_config("runlocal").to_dict()))
  return [f"--config.data.idx_dir={c.data.idx_dir}", f"--config.data.data_dir={c.data.data_dir}",
          "--config.data.read_threads=2", "--config.data.prefetch_buffer_size=16"]


def parse(npz, data_flags, workdir, *extra, arg="runlocal,from_checkpoint"):
  return helpers.parse_main([f"--config=configs/vit_pretrain.py:{arg}", f"--config.init_templates_from={npz}",
                             *SMALL, *data_flags, *extra], workdir)[0]


def write_npz(path, arrays, per_layer=False):
  """A big_vision checkpoint made with numpy: ``np.savez`` of ``'/'``-joined names; ``per_layer``:
  big_vision's ``scan=False`` layout (``Transformer/encoderblock_{i}/...``)."""
  flat = {}
  for name, a in arrays.items():
    if per_layer and name.startswith("Transformer/encoderblock/"):
      flat.update({name.replace("encoderblock/", f"encoderblock_{i}/"): a[i] for i in range(a.shape[0])})
    else:
      flat[name] = np.asarray(a, np.float32)
  np.savez(path, **flat)
  return str(path)


def banks_by_name(gen):
  return {"/".join(p): b for p, b in gen.banks.items()}


def mu_setup(**fields):
  """The generator of a mu/4 ViT with the tests' tiles (no data needed)."""
  c = vit_pretrain.get_config("runlocal")
  c.model.variant = "mu/4"
  for k, v in dict(embed=8, mlp=8, heads=1, kv=8).items():
    c.weit.tiles[k] = v
  c.weit.num_templates = 3
  c.model.update(fields)
  return pretrain.build(c)


def composed(gen, templates, scalers):
  """Oracle: every parameter as a numpy.kron loop over the templates and scalers, by name."""
  t, s = traverse_util.flatten_dict(templates), traverse_util.flatten_dict(scalers)
  return {"/".join(p): numpy_kron(b, t[p], s[p]) for p, b in gen.banks.items()}


def numpy_kron(bank, t, s):
  return helpers.numpy_materialize(bank, np.asarray(t, np.float64), np.asarray(s, np.float64))


def known_bank(bank, rng, sigmas=(3.0, 2.0, 1.0)):
  """Templates and scalers whose rearranged composition is an SVD by construction (orthonormal
  template vectors, orthogonal scaler vectors with distinct norms ``sigmas``), so the best N-template
  bank is exactly these templates, up to sign; random ones where the bank's rank bound is below N."""
  n_t, lead = bank.num_templates, bank.scaler_shape[:-len(bank.grid)][:-1]  # (layers,) or ()
  n_tile, n_rows = int(np.prod(bank.tile)), int(np.prod(lead)) * int(np.prod(bank.grid))
  if min(n_tile, n_rows) < n_t:
    return rng.normal(size=bank.template_shape), rng.normal(size=bank.scaler_shape), False
  v = np.linalg.qr(rng.normal(size=(n_tile, n_t)))[0].T * np.sqrt(n_tile)  # (N, tile), unit RMS
  u = np.linalg.qr(rng.normal(size=(n_rows, n_t)))[0] * np.asarray(sigmas[:n_t])  # (rows, N)
  s = np.moveaxis(u.reshape(*lead, *bank.grid, n_t), -1, len(lead))
  return v.reshape(bank.template_shape), s, True


def test_known_templates_come_back_from_a_big_vision_npz(tmp_path, data_flags):
  """A ViT that is an exact composition of known templates, written as big_vision's .npz (numpy,
  big_vision's names): its extracted templates are those templates up to sign, their numpy.kron
  composition is the checkpoint, every bank's recorded error is ~0, and the sizes were read off the
  shapes."""
  setup = mu_setup()
  rng = np.random.default_rng(0)
  banks = banks_by_name(setup.gen)
  assert {n: b.shape for n, b in banks.items()} == helpers.big_vision_tree(setup.model_config)  # big_vision's names
  known, t_true, s_true = {}, {}, {}
  for name, b in banks.items():
    t_true[name], s_true[name], known[name] = known_bank(b, rng)
  assert sum(known.values()) >= 10, known
  weights = {n: numpy_kron(banks[n], t_true[n], s_true[n]) for n in banks}
  npz = write_npz(tmp_path / "vit.npz", weights)

  checked = pretrain.validate(parse(npz, data_flags, str(tmp_path / "wd")), str(tmp_path / "wd"))
  assert {k: checked.config.model[k] for k in MU} == MU  # read from the checkpoint's shapes
  assert set(checked.handling.values()) == {"copied"}
  task = pretrain.make_task(checked.config, checked.setup)
  params, record = pretrain.initial_params_from_dense(checked.config, checked.setup, task, checked.source)
  t_flat = traverse_util.flatten_dict(params["templates"], sep="/")
  again = composed(checked.setup.gen, params["templates"], params["scalers"])
  for name in banks:
    np.testing.assert_allclose(again[name], weights[name], rtol=1e-4, atol=1e-4 * np.abs(weights[name]).max(),
                               err_msg=name)
    assert record["reconstruction_error"][name] < 1e-5, name
    if known[name]:  # the same templates, in order of their scale, each up to its sign
      t, want = t_flat[name].reshape(3, -1), t_true[name].reshape(3, -1)
      signs = np.sign(np.sum(t * want, axis=1))
      np.testing.assert_allclose(t, signs[:, None] * want, atol=1e-4, err_msg=name)
  assert record["form"] == "big_vision npz" and record["num_templates"] == 3


def test_per_layer_npz_of_random_weights_records_the_true_reconstruction_error(tmp_path, data_flags):
  """Random weights (not a composition) in big_vision's per-layer layout (``encoderblock_{i}``), the
  model declared (``--config.model.variant``): each bank's recorded error is the relative error of
  the numpy.kron composition of the extracted templates and scalers against the checkpoint."""
  setup = mu_setup()
  rng = np.random.default_rng(1)
  weights = {n: rng.normal(size=b.shape) for n, b in banks_by_name(setup.gen).items()}
  npz = write_npz(tmp_path / "vit.npz", weights, per_layer=True)
  assert "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel" in np.load(npz).files
  config = parse(npz, data_flags, str(tmp_path / "wd"), "--config.model.variant=mu/4", arg="runlocal")
  checked = pretrain.validate(config, str(tmp_path / "wd"))
  task = pretrain.make_task(checked.config, checked.setup)
  params, record = pretrain.initial_params_from_dense(checked.config, checked.setup, task, checked.source)
  again = composed(checked.setup.gen, params["templates"], params["scalers"])
  for name, w in weights.items():
    want = np.linalg.norm(w - again[name]) / np.linalg.norm(w)
    assert record["reconstruction_error"][name] == pytest.approx(want, rel=1e-3, abs=1e-6), name
  assert 0.05 < max(record["reconstruction_error"].values()) < 1  # random weights are not 3 templates


def _valid_npz(path, **fields):
  setup = mu_setup(**fields)
  rng = np.random.default_rng(2)
  return write_npz(path, {n: rng.normal(size=b.shape) for n, b in banks_by_name(setup.gen).items()})


def _truncated(path):
  good = _valid_npz(path.with_name("good.npz"))
  with open(good, "rb") as f:
    data = f.read()
  path.write_bytes(data[:len(data) // 2])
  return str(path)


def _extra_param(path):
  setup = mu_setup()
  arrays = {n: np.ones(b.shape) for n, b in banks_by_name(setup.gen).items()}
  arrays["pre_logits/kernel"] = np.ones((32, 32))
  return write_npz(path, arrays)


def _no_embedding(path):
  setup = mu_setup()
  return write_npz(path, {n: np.ones(b.shape) for n, b in banks_by_name(setup.gen).items() if n != "embedding/kernel"})


def _not_a_zip(path):
  path.write_bytes(np.random.default_rng(3).bytes(4096))
  return str(path)


REFUSED = [
    ("not a zip", _not_a_zip, [], r"vit\.npz is not a readable \.npz checkpoint \("),
    ("truncated", _truncated, [], r"vit\.npz is not a readable \.npz checkpoint \(BadZipFile"),
    ("another width than declared", lambda p: _valid_npz(p, width=24), ["--config.model.variant=mu/4"],
     r"is not a vit d2-w32-h2-m64-p4 .*: parameter Transformer/encoder_norm/bias: expected shape \(32,\), "
     r"found \(24,\)"),
    ("a parameter the ViT does not have", _extra_param, [],
     r"it has a parameter pre_logits/kernel \(32, 32\) that a vit d2-w32-h2-m64-p4 does not have"),
    ("not a ViT", _no_embedding, [], r"it has no parameter 'embedding/kernel', so it is not a big_vision ViT"),
]


@pytest.mark.parametrize("make, extra, message", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_a_corrupt_or_mismatched_npz_is_refused_with_nothing_written(make, extra, message, tmp_path, data_flags):
  npz = make(tmp_path / "vit.npz")
  workdir = str(tmp_path / "wd")
  with pytest.raises(helpers.USER_ERRORS, match=message) as refused:
    pretrain.run(parse(npz, data_flags, workdir, *extra), workdir)
  assert "\n" not in str(refused.value)  # main.py prints it as one error: line
  assert helpers.snapshot(workdir) is None


def test_step_zero_workdir_initializes_three_sizes(tmp_path, data_flags):
  """A checkpoint of another dataset (7 classes, 32x32 images: an 8x8 grid) -> a step-0 templates
  workdir (head from the model's own init, position embedding resampled to the data's 7x7 grid, both
  recorded) -> the init program makes a deeper, a narrower (20: not a tile multiple) and a wider
  student from it."""
  setup = mu_setup()
  other = models.target_config({}, setup.model_config, dict(image_size=32, num_classes=7))
  rng = np.random.default_rng(4)
  npz = write_npz(tmp_path / "vit.npz", {n: rng.normal(scale=0.2, size=s)
                                         for n, s in helpers.big_vision_tree(other).items()})
  workdir = str(tmp_path / "templates")
  config = parse(npz, data_flags, workdir)
  with helpers.every_field_read(config, {"constraint.diversity": "total_steps > 0 (a loss is computed)"}):
    summary = pretrain.run(config, workdir)
  assert summary["final_step"] == 0 and 0 <= summary["eval_accuracy"] <= 1
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["0"]
  with open(os.path.join(workdir, "summary.json")) as f:
    source = json.load(f)["template_source"]
  assert source["path"] == npz and source["model_fields"] == dict(MU, pool_type="tok", posemb="learn")
  how = source["parameters"]
  assert how["head/kernel"].startswith("own init: the checkpoint's head is for 7 classes, the data has 10")
  assert how["pos_embedding"] == "resampled bilinearly from a 8x8 to a 7x7 grid of tokens"
  assert sum(v == "copied" for v in how.values()) == len(how) - 3
  assert set(source["reconstruction_error"]) == set(how)

  init = helpers.parse_main(["--config=configs/vit_init.py:runlocal", f"--config.templates={workdir}",
                             "--config.targets=depth=3;width=20;width=48", "--config.steps=0",
                             "--config.num_examples=64", "--config.batch_size=32"], str(tmp_path / "init"))[0]
  results = init_program.run(init, str(tmp_path / "init"))
  assert sorted(results) == ["d2-w20-h2-m40-p4", "d2-w48-h2-m96-p4", "d3-w32-h2-m64-p4"]
  for name in results:
    export = os.path.join(tmp_path, "init", name, "export")
    assert exports.read_meta(export)["template_source"]["step"] == 0
    params = exports.load_params(export)
    shapes = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(params).items()}
    cfg = models.from_record(exports.read_meta(export)["model"])
    assert shapes == helpers.big_vision_tree(cfg)
    assert all(np.isfinite(np.asarray(v)).all() for v in traverse_util.flatten_dict(params).values())
