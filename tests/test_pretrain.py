"""Pre-training pieces: a step lowers the loss on a fixed batch (both constraint modes), the train
state round-trips through a checkpoint onto other shardings, templates warm-started from a
dense export by closed-form extraction reproduce it, and multi-size pre-training's loss is the mean
of every size's (numpy-composed) loss."""
import chex
import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from configs import vit_pretrain
from helpers import numpy_materialize, randomized
from weit_jax import checkpoint, exports, models, sharding, train_loop
from weit_jax.programs import pretrain


def small_config(**overrides):
  c = ml_collections.ConfigDict(vit_pretrain.get_config("runlocal").to_dict())
  c.model.variant = "mu/4"
  c.weit.tiles = dict(embed=8, mlp=8, heads=1, kv=8)
  c.weit.num_templates = 3
  c.total_steps = 50
  c.optim.warmup_steps = 0
  c.optim.lr = 3e-3
  for k, v in overrides.items():
    c[k] = v
  return c


def fixed_batch(seed=0, n=16):
  rng = np.random.default_rng(seed)
  labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, n)]
  return {"image": rng.normal(size=(n, 28, 28, 1)).astype(np.float32), "labels": labels}


# The hard constraint with the diversity term and a dense teacher, and the soft one (the default,
# hard without either, trains in every program test).
@pytest.mark.parametrize("mode,diversity", [("hard", 0.1), ("soft", 0.0)])
def test_steps_lower_the_loss_on_a_fixed_batch(mode, diversity, tmp_path):
  c = small_config()
  c.constraint.mode = mode
  c.constraint.diversity = diversity
  if diversity:  # distillation from a dense ViT of another size: its weight 0.5 in the loss, it stays frozen
    teacher_cfg = models.from_config(dict(variant="mu/4", depth=1, width=24, num_heads=2),
                                     dict(image_size=28, channels=1, num_classes=10))
    teacher = jax.device_get(randomized(models.init_params(teacher_cfg, 0), 4))
    exports.write(str(tmp_path / "teacher"), teacher, dict(model=models.to_record(teacher_cfg)))
    c.distill.update(dict(teacher=str(tmp_path / "teacher"), weight=0.5))
  setup = pretrain.build(c)
  task = pretrain.make_task(c, setup, teacher=pretrain.load_teacher(c))
  mesh = sharding.make_mesh({"data": -1})
  _, shardings = train_loop.state_shardings(task, mesh)
  state = train_loop.make_init_state(task, shardings)(jax.random.key(0))
  step = train_loop.make_train_step(task, shardings, sharding.batch_sharding(mesh), mesh)
  batch = sharding.global_batch(fixed_batch(), mesh)
  losses = []
  for _ in range(8):
    state, out = step(state, batch, jax.random.key(1))
    losses.append(float(out["loss"]))
  assert losses[-1] < 0.9 * losses[0] and losses == sorted(losses, reverse=True), losses
  if mode == "soft":
    assert float(out["constraint"]) > 0
  if diversity:
    assert float(out["diversity"]) > 0 and float(out["distill"]) > 0
    np.testing.assert_allclose(float(out["loss"]), float(out["objective"]) + 0.5 * float(out["distill"])
                               + diversity * float(out["diversity"]), rtol=1e-5)
    chex.assert_trees_all_close(jax.device_get(state["params"].pop("teacher")), teacher)
  assert set(state["params"]) == ({"templates", "scalers", "dense"} if mode == "soft" else {"templates", "scalers"})


def test_train_state_round_trips_onto_other_shardings(tmp_path):
  c = small_config()
  setup = pretrain.build(c)
  task = pretrain.make_task(c, setup)
  mesh8 = sharding.make_mesh({"fsdp": 8})
  abstract, sh8 = train_loop.state_shardings(task, mesh8)
  state = train_loop.make_init_state(task, sh8)(jax.random.key(3))
  step = train_loop.make_train_step(task, sh8, sharding.batch_sharding(mesh8), mesh8)
  state, _ = step(state, sharding.global_batch(fixed_batch(n=16), mesh8), jax.random.key(1))
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1)
  ckpt.save(1, state, None, force=True)
  ckpt.wait()
  # Restore onto 4 devices with another mesh layout.
  mesh4 = sharding.make_mesh({"data": 2, "model": 2}, devices=jax.devices()[:4])
  _, sh4 = train_loop.state_shardings(task, mesh4)
  restored = ckpt.restore(1, checkpoint.abstract_with_shardings(abstract, sh4), None)
  ckpt.close()
  chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))
  leaf = restored["params"]["templates"]["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert len(leaf.sharding.device_set) == 4
  assert int(restored["step"]) == 1


def test_templates_extracted_from_a_dense_export(tmp_path):
  """A dense model that is an exact composition comes back exactly from init_templates_from."""
  c = small_config()
  setup = pretrain.build(c)
  rng = np.random.default_rng(5)
  draw = lambda tree: jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32), tree)
  t, s = draw(setup.gen.template_shapes()), draw(setup.gen.scaler_shapes())
  dense = jax.device_get(setup.gen.materialize(t, s))
  export = str(tmp_path / "dense")
  import dataclasses
  exports.write(export, dense, dict(model=dataclasses.asdict(setup.model_config)))
  c.init_templates_from = export
  task = pretrain.make_task(c, setup)
  params, record = pretrain.initial_params_from_dense(c, setup, task)
  assert max(record["reconstruction_error"].values()) < 1e-3 and record["form"] == "export"
  again = setup.gen.materialize(params["templates"], params["scalers"])
  chex.assert_trees_all_close(jax.device_get(again), dense, rtol=1e-3, atol=1e-3)


# --- multi-size pre-training (weit.extra_sizes) ------------------------------------------------------

def _numpy_weights(gen, templates, scalers):
  """Oracle: every parameter composed by a numpy.kron loop (tests/helpers.numpy_materialize)."""
  flat_t, flat_s = traverse_util.flatten_dict(templates), traverse_util.flatten_dict(scalers)
  return traverse_util.unflatten_dict({p: numpy_materialize(b, np.asarray(flat_t[p], np.float64),
                                                            np.asarray(flat_s[p], np.float64))
                                       for p, b in gen.banks.items()})


def test_extra_sizes_loss_is_the_mean_of_each_sizes_loss():
  """The loss of multi-size pre-training = the mean over the auxiliary and the extra sizes of each
  size's cross-entropy, with every size's weights composed by numpy.kron from the shared templates
  and its own scalers; every size's scalers get gradient."""
  c = small_config()
  c.label_smoothing = 0.1
  c.weit.extra_sizes = "depth=1;width=24,heads=3"
  setup = pretrain.build(c)
  assert [s.name for s in setup.extra] == ["d1-w32-h2-m64-p4", "d2-w24-h3-m48-p4"]
  task = pretrain.make_task(c, setup)
  params = randomized(task.init_params(jax.random.key(0)), seed=4)
  assert set(params) == {"templates", "scalers", "extra_scalers"}
  batch = fixed_batch(seed=2)
  # One compile for the loss, its parts and the gradient.
  (loss, aux), grads = jax.jit(jax.value_and_grad(task.loss_fn, has_aux=True))(params, batch, jax.random.key(1))
  want = []
  for size, scalers in setup.sizes(params):
    weights = jax.tree_util.tree_map(lambda w: w.astype(np.float32),
                                     _numpy_weights(size.gen, params["templates"], scalers))
    logits = np.asarray(jax.jit(size.model.apply)({"params": weights}, batch["image"]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    smoothed = batch["labels"] * 0.9 + 0.1 / 10
    want.append(float(np.mean(-np.sum(smoothed * logp, -1))))
  np.testing.assert_allclose([float(aux["objective"]), float(aux["objective_d1-w32-h2-m64-p4"]),
                              float(aux["objective_d2-w24-h3-m48-p4"])], want, rtol=2e-4)
  np.testing.assert_allclose(float(loss), np.mean(want), rtol=2e-4)
  assert len(set(np.round(want, 4))) == 3  # three different models, not one loss counted three times

  # Every size's own scalers get gradient (the loss reaches each extra size), on the auxiliary's too.
  for group in [grads["scalers"]] + [grads["extra_scalers"][s.name] for s in setup.extra]:
    assert max(float(np.abs(np.asarray(g)).max()) for g in jax.tree_util.tree_leaves(group)) > 0


@pytest.mark.parametrize("change,pattern", [
    (dict(extra_sizes="depth=2"), r"repeats the size d2-w32-h2-m64-p4 \(the auxiliary is d2-w32-h2-m64-p4\)"),
    (dict(extra_sizes="depth=1;depth=1"), "repeats the size d1-w32"),
    (dict(extra_sizes="depht=3"), "unknown vit field 'depht'"),
    (dict(extra_sizes="depth=1", mode="soft"), "needs constraint.mode='hard'"),
])
def test_extra_sizes_refusals(change, pattern):
  c = small_config()
  c.weit.extra_sizes = change["extra_sizes"]
  c.constraint.mode = change.get("mode", "hard")
  with pytest.raises(ValueError, match=pattern):
    pretrain.build(c)
