"""Bad input writes nothing, and a refused run never blocks its corrected rerun.

Every program validates the whole config (ranges, model, mesh, data, templates or export, the
workdir's recorded run) before its first write. These tests call each program's ``validate`` and
``run`` in-process on tiny learnable data, and parse command lines the way ``main.py`` does, so no
test here compiles a training step except the one pre-training fixture that the init cases need.
"""
import fnmatch
import json
import os
import shutil

import ml_collections
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import helpers
from configs import dit_pretrain, resnet_init, resnet_pretrain, resnet_train, vit_init, vit_pretrain, vit_train
from weit_jax import config_checks, train_loop
from weit_jax.programs import init as init_program
from weit_jax.programs import pretrain, train

PROGRAMS = {"pretrain": pretrain, "init": init_program, "train": train}
USER_ERRORS = helpers.USER_ERRORS
snapshot = helpers.snapshot


def unlocked(config):
  return ml_collections.ConfigDict(config.to_dict())


@pytest.fixture(scope="module")
def data_flags(learnable_data):
  c = learnable_data(unlocked(vit_pretrain.get_config("runlocal")))
  return [f"--config.data.idx_dir={c.data.idx_dir}", f"--config.data.data_dir={c.data.data_dir}",
          "--config.data.read_threads=2", "--config.data.prefetch_buffer_size=16"]


SMALL = ["--config.model.variant=mu/4", "--config.weit.tiles.embed=8", "--config.weit.tiles.mlp=8",
         "--config.weit.tiles.kv=8", "--config.batch_size=32", "--config.optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def templates_workdir(tmp_path_factory, data_flags):
  """A real (two-step) pre-training run: what the init program's templates come from."""
  workdir = str(tmp_path_factory.mktemp("templates") / "wd")
  config = parse(["--config=configs/vit_pretrain.py:runlocal", *SMALL, *data_flags, "--config.total_steps=2",
                  "--config.checkpoint_every=2", "--config.eval_every=0", "--config.log_every=1"], workdir)[0]
  pretrain.run(config, workdir)
  return workdir


parse = helpers.parse_main


def base_argv(program, data_flags, templates_workdir=None):
  if program == "pretrain":
    return ["--config=configs/vit_pretrain.py:runlocal", *SMALL, *data_flags]
  if program == "init":
    return ["--config=configs/vit_init.py:runlocal", f"--config.templates={templates_workdir}",
            "--config.batch_size=32", "--config.num_examples=64", "--config.steps=2",
            "--config.optim.warmup_steps=1"]
  return ["--config=configs/vit_train.py:runlocal", "--config.batch_size=32", *data_flags]


# --- ranges ------------------------------------------------------------------------------------------

# (config, field, a value that is refused, a value at the edge that is accepted)
RANGE_CASES = [
    (vit_pretrain, "optim.lr", -1.0, 1e-9),
    (vit_pretrain, "optim.lr", 0.0, 1e-9),
    (vit_pretrain, "optim.warmup_steps", -1, 0),
    (vit_pretrain, "optim.b2", 1.0, 0.0),
    (vit_pretrain, "optim.clip_norm", -0.5, 0.0),
    (vit_pretrain, "optim.min_lr_ratio", 1.5, 1.0),
    (vit_pretrain, "batch_size", 0, 1),
    (vit_pretrain, "total_steps", -1, 0),  # 0: the initial state saved as step 0
    (vit_pretrain, "log_every", 0, 1),
    (vit_pretrain, "eval_every", -1, 0),
    (vit_pretrain, "checkpoint_every", 0, 1),
    (vit_pretrain, "keep_checkpoints", 0, 1),
    (vit_pretrain, "label_smoothing", 1.0, 0.999),
    (vit_pretrain, "label_smoothing", -0.1, 0.0),
    (vit_pretrain, "constraint.template_wd", -1e-4, 0.0),
    (vit_pretrain, "constraint.soft_lambda", -1.0, 0.0),
    (vit_pretrain, "distill.temperature", 0.0, 1e-3),
    (vit_pretrain, "weit.num_templates", 0, 1),
    (vit_pretrain, "weit.tiles.embed", 0, 1),
    (vit_pretrain, "data.center_crop_fraction", 0.0, 1.0),
    (vit_pretrain, "data.mixup_alpha", -0.2, 0.0),
    (vit_init, "steps", -1, 0),
    (vit_init, "num_examples", 0, 1),
    (vit_init, "scaler_wd", -1.0, 0.0),
    (vit_train, "weight_decay", -0.05, 0.0),
]


@pytest.mark.parametrize("bad", ["0", "5,x", "-3", "13", "2.5"])
def test_eval_at_names_steps_of_the_run(bad):
  config = unlocked(vit_pretrain.get_config("runlocal"))
  config.total_steps = 12
  config.eval_at = " 3, 12,3"
  assert config_checks.eval_steps(config) == {3, 12}
  config_checks.check_ranges(config)
  config.eval_at = bad
  with pytest.raises(ValueError, match=r"^--config\.eval_at=.*is not a step in 1\.\.12 \(total_steps\)"):
    config_checks.check_ranges(config)


@pytest.mark.parametrize("module, field, bad, good", RANGE_CASES,
                         ids=[f"{m.__name__.split('.')[-1]}:{f}={b}" for m, f, b, _ in RANGE_CASES])
def test_numeric_fields_are_range_checked(module, field, bad, good):
  config = unlocked(module.get_config("runlocal"))
  *parents, leaf = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = good
  config_checks.check_ranges(config)  # the edge of the range is valid
  node[leaf] = bad
  with pytest.raises(ValueError, match=rf"^--config\.{field.replace('.', '[.]')}={bad!r} is out of range: "
                                       r"it must be (>=? -?\d|in [\[(])"):
    config_checks.check_ranges(config)


def test_every_default_config_is_in_range():
  for module in (vit_pretrain, vit_init, vit_train, resnet_pretrain, resnet_init, resnet_train):
    for arg in (None, "runlocal"):
      config = module.get_config(arg)
      config_checks.check_ranges(config)  # raises for a default out of range
      covered = [f for f in config_checks.flatten(config) if any(fnmatch.fnmatchcase(f, p) for p in config_checks.RANGES)]
      assert len(covered) >= 10, (module.__name__, arg, covered)  # the table reaches this config's fields


def test_paper_scale_scaler_budget_is_its_fraction_of_an_imagenet_epoch():
  """The init configs state the scaler budget as common.SCALER_EPOCHS of an epoch: steps x batch
  over ImageNet-1k's 1,281,167 training images (the published split size) is that fraction, to
  within one step, drawn from a pool of common.SCALER_POOL of them."""
  from configs import common, dit_init
  for module in (vit_init, resnet_init, dit_init):
    c = module.get_config()
    assert abs(c.steps * c.batch_size / 1_281_167 - common.SCALER_EPOCHS) <= c.batch_size / 1_281_167, module
    assert abs(c.num_examples / 1_281_167 - common.SCALER_POOL) <= 1 / 1_281_167, module
  assert common.scaler_steps(1024, "imagenet2012", 0.02) == 25  # 25,623 images: 2% of an epoch
  assert common.scaler_steps(128, "fashion_mnist_local", 0.25) == 117  # 15,000 of 60,000
  # The CPU-scale inits use the measured row itself: 400 steps x 128 from 500 of 60,000 images.
  for module in (vit_init, resnet_init):
    c = module.get_config("runlocal")
    assert (c.steps, c.batch_size, c.num_examples, c.optim.lr) == (400, 128, 500, 3e-3), module


# --- bad input writes nothing ----------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("--config.mesh.model=3", r"mesh .* needs|do not divide the 8 devices"),
    ("--config.batch_size=0", r"--config\.batch_size=0 is out of range"),
    ("--config.optim.lr=-1", r"--config\.optim\.lr=-1\.0 is out of range: it must be > 0"),
    ("--config.batch_size=36", r"global batch size 36 must be a positive multiple of the 8 batch shards"),
    ("--config.model.pool_type=map", r"ViT pool_type='map'; use one of \('tok', 'gap'\)"),
    ("--config.model.posemb=sincos", r"ViT posemb='sincos'; use one of \('learn', 'sincos2d'\)"),
])
@pytest.mark.parametrize("state", ["absent", "previous run"])
def test_refused_run_leaves_workdir_as_it_was_and_the_corrected_rerun_proceeds(
    override, message, state, data_flags, tmp_path):
  argv = base_argv("pretrain", data_flags)
  workdir = str(tmp_path / "wd")
  if state == "previous run":  # the same run, recorded as a first launch records it
    config, _ = parse(argv, workdir)
    train_loop.guard_workdir(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      f.write(json.dumps({"step": 1, "loss": 2.3}) + "\n")
  before = snapshot(workdir)
  bad, _ = parse(argv + [override], workdir)
  with pytest.raises(ValueError, match=message):
    pretrain.run(bad, workdir)
  assert snapshot(workdir) == before
  corrected, _ = parse(argv, workdir)
  pretrain.validate(corrected, workdir)  # not refused: the bad run left no trace
  assert snapshot(workdir) == before


def test_workdir_guard_allows_another_mesh_and_cadence_but_not_another_run(data_flags, tmp_path):
  workdir = str(tmp_path / "wd")
  argv = base_argv("pretrain", data_flags)
  config, _ = parse(argv, workdir)
  train_loop.guard_workdir(config, workdir)
  for placement in (["--config.mesh.data=2", "--config.mesh.fsdp=4"], ["--config.mesh.fsdp=8", "--config.mesh.data=1"],
                    ["--config.log_every=7", "--config.checkpoint_every=3", "--config.total_steps=3000"],
                    ["--config.data.read_threads=1", "--config.data.prefetch_buffer_size=4"]):
    assert train_loop.check_workdir(parse(argv + placement, workdir)[0], workdir) is False, placement
  for defining, field in ((["--config.seed=3"], "seed"), (["--config.optim.lr=0.01"], "optim.lr"),
                          (["--config.model.depth=3"], "model.depth"), (["--config.data.flip=False"], "data.flip"),
                          (["--config.weit.tiles.embed=16"], "weit.tiles.embed")):
    with pytest.raises(ValueError, match=rf"fields \['{field}'\] differ"):
      train_loop.check_workdir(parse(argv + defining, workdir)[0], workdir)


# --- the contract, drawn ------------------------------------------------------------------------------

# Fields that point at data or other runs: drawn only as paths that do not exist (building a real
# dataset per example would take minutes).
PATH_FIELDS = {"data.data_dir", "data.idx_dir", "templates", "init", "distill.teacher", "init_templates_from"}
SKIPPED = {"program", "data.name", "data.train_split", "data.eval_split", "dry_run.topology",
           "dry_run.materialize", "overwrite"}


def _value_text(value):
  return "None" if value is None else str(value)


@st.composite
def overrides(draw, program):
  """Up to three ``--config.FIELD=VALUE`` flags: valid, out of range, of the wrong type, or unknown."""
  config = {"pretrain": vit_pretrain, "init": vit_init, "train": vit_train}[program].get_config("runlocal")
  fields = sorted(f for f in config_checks.flatten(config) if f not in SKIPPED)
  out = []
  for _ in range(draw(st.integers(1, 3))):
    kind = draw(st.sampled_from(["valid", "edge", "wrong type", "unknown"]))
    if kind == "unknown":
      out.append(f"--config.{draw(st.sampled_from(['nope', 'model.heads', 'optim.learning_rate']))}=1")
      continue
    field = draw(st.sampled_from(fields))
    if field in PATH_FIELDS:
      out.append(f"--config.{field}=/nonexistent/{draw(st.sampled_from(['a', 'b']))}")
      continue
    default = config_checks.flatten(config)[field]
    if kind == "wrong type":
      value = draw(st.sampled_from(["abc", "[1,", "1.5.2"]))
    elif isinstance(default, bool):
      value = draw(st.sampled_from(["True", "False"]))
    elif isinstance(default, (int, float)) or default is None:
      value = _value_text(draw(st.sampled_from([-1, 0, 1, 2, 8, 3, 1e-3, -0.5, 0.5, 1.0])))
    elif isinstance(default, str):
      value = draw(st.sampled_from([default, "zz", ""]))
    else:
      value = _value_text(default)
    out.append(f"--config.{field}={value}")
  return out


CONTRACT = settings(max_examples=25, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _check_contract(program, argv, workdir) -> str:
  """Accepted, or refused with a user error (one line: what main.py prints) and nothing written.
  Returns which."""
  before = snapshot(workdir)
  outcome = "accepted"
  try:
    config, _ = parse(argv, workdir)
    PROGRAMS[program].validate(config, workdir)
  except USER_ERRORS as e:
    assert str(e).strip(), argv
    outcome = "refused"
  assert snapshot(workdir) == before, argv
  return outcome


@pytest.mark.parametrize("program", ["pretrain", "train"])
def test_contract_for_drawn_overrides(program, data_flags, tmp_path):
  workdir = str(tmp_path / "wd")
  base = base_argv(program, data_flags)
  config, _ = parse(base, workdir)
  train_loop.guard_workdir(config, workdir)  # a previous run of the base config is there

  outcomes = set()

  @CONTRACT
  @given(overrides(program))
  def check(extra):
    outcomes.add(_check_contract(program, base + extra, workdir))
    outcomes.add(_check_contract(program, base + extra, str(tmp_path / "absent")))
  check()
  assert outcomes == {"accepted", "refused"}  # the draws reach both sides of the contract


def test_contract_for_drawn_init_overrides(data_flags, templates_workdir, tmp_path):
  base = base_argv("init", data_flags, templates_workdir)
  watched = templates_workdir

  outcomes = set()

  @settings(CONTRACT, max_examples=12)
  @given(overrides("init"))
  def check(extra):
    before = snapshot(watched)
    outcomes.add(_check_contract("init", base + extra, str(tmp_path / "absent")))
    assert snapshot(watched) == before  # the templates' run is read, never written
  check()
  assert "refused" in outcomes


def test_init_validates_before_writing(templates_workdir, data_flags, tmp_path):
  workdir = str(tmp_path / "wd")
  base = base_argv("init", data_flags, templates_workdir)
  for bad, message in ((["--config.targets=depth=2,heads=5"], r"num_heads=5 does not divide width=32"),
                       (["--config.mesh.fsdp=3"], r"mesh .*"), (["--config.steps=-1"], r"--config\.steps=-1")):
    with pytest.raises(ValueError, match=message):
      init_program.run(parse(base + bad, workdir)[0], workdir)
    assert not os.path.exists(workdir)
  init_program.validate(parse(base, workdir)[0], workdir)
  assert not os.path.exists(workdir)
  shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("module", [vit_pretrain, dit_pretrain])
def test_scaler_distillation_is_refused_for_tasks_trained_on_a_dataset(module):
  """``adapt='distill'`` (the init program) needs a task whose data the model makes (control)."""
  from weit_jax import tasks
  config = module.get_config("runlocal")
  with pytest.raises(ValueError, match=r"adapt='distill' is for tasks whose data the model makes .* "
                                       r"Use --config\.adapt=ppo\."):
    tasks.from_config(config).check_distillation(config)


def test_the_field_read_check_sees_reads_and_misses():
  """The check behind ``helpers.every_field_read`` (used by every program's pipeline test) on a
  config whose reads are known: attribute, item, ``get`` and a section handed on whole count; the
  range check's and the workdir guard's whole-config walks and copies do not."""
  c = ml_collections.ConfigDict(dict(program="x", a=1, b=2, c=3, d=4, sec=dict(e=5, f=6), other=dict(g=7)))
  with helpers.config_reads() as read:
    assert (c.a, c["b"], c.get("c"), c.sec.to_dict()) == (1, 2, 3, dict(e=5, f=6))
    config_checks.check_ranges(c), c.to_json(), ml_collections.ConfigDict(c.to_dict()), c.copy_and_resolve_references()
  assert helpers.unread_fields(c, read) == ["d", "other.g"]
  assert helpers.unread_fields(c, read, {"other.*": "read only in some runs"}) == ["d"]
  with pytest.raises(AssertionError, match=r"config fields no code read in this run: \['d', 'other.g'\]"):
    with helpers.every_field_read(c):
      c.a, c.b, c.c, c.sec.e, c.sec.f
