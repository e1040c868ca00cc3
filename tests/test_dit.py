"""The plain DiT: its forward pass against a second implementation of the paper's equations,
adaLN-Zero's identity start, the published size, and its weights from templates."""
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from helpers import TINY_RECIPE, evenly, every_field_read, numpy_materialize, posemb_sincos_2d, randomized
from weit_jax import generator
from weit_jax.evaluators import sample_quality
from weit_jax.models import dit


def reference_forward(params, x, t, y, cfg):
  """DiT (Peebles & Xie, the reference models.py) in numpy float64, written from its equations,
  independently of the Flax module; one output per pixel (no learned variance)."""
  p = traverse_util.flatten_dict(jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params), sep="/")
  x = np.asarray(x, np.float64)
  n, size, _, ch = x.shape
  ps, w = cfg.patch_size, cfg.width
  h = size // ps
  patches = x.reshape(n, h, ps, h, ps, ch).transpose(0, 1, 3, 2, 4, 5).reshape(n, h * h, ps * ps * ch)
  tok = patches @ p["x_embedder/kernel"].reshape(-1, w) + p["x_embedder/bias"] + posemb_sincos_2d(h, h, w)
  silu = lambda v: v / (1 + np.exp(-v))
  freqs = np.exp(-np.log(10_000.0) * np.arange(128) / 128)
  args = np.asarray(t, np.float64)[:, None] * freqs[None]
  t_emb = np.concatenate([np.cos(args), np.sin(args)], axis=1)
  t_emb = silu(t_emb @ p["t_embedder_0/kernel"] + p["t_embedder_0/bias"]) @ p["t_embedder_1/kernel"] + p["t_embedder_1/bias"]
  c = t_emb + p["y_embedder"][np.asarray(y)]

  def modulation(kernel, bias, k):  # SiLU(c) @ W -> k vectors of width w
    out = silu(c) @ kernel.reshape(w, k * w) + bias.reshape(k * w)
    return [out[:, i * w:(i + 1) * w][:, None] for i in range(k)]

  def ln(v):  # no scale, no bias
    mu = v.mean(-1, keepdims=True)
    return (v - mu) / np.sqrt(((v - mu) ** 2).mean(-1, keepdims=True) + 1e-6)

  gelu = lambda v: 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))
  for l in range(cfg.depth):
    g = lambda name: p["blocks/" + name][l]
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = modulation(
        g("Modulation_0/adaLN_modulation/kernel"), g("Modulation_0/adaLN_modulation/bias"), 6)
    u = ln(tok) * (1 + scale_a) + shift_a
    att = "MultiHeadDotProductAttention_0/"
    q, k, v = (np.einsum("btd,dhk->bthk", u, g(att + f"{n_}/kernel")) + g(att + f"{n_}/bias")
               for n_ in ("query", "key", "value"))
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(w // cfg.num_heads)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bqhk,hkd->bqd", np.einsum("bhqs,bshk->bqhk", a, v), g(att + "out/kernel")) + g(att + "out/bias")
    tok = tok + gate_a * o
    u = ln(tok) * (1 + scale_m) + shift_m
    u = gelu(u @ g("Dense_0/kernel") + g("Dense_0/bias")) @ g("Dense_1/kernel") + g("Dense_1/bias")
    tok = tok + gate_m * u
  shift, scale = modulation(p["final_layer/adaLN_modulation/kernel"], p["final_layer/adaLN_modulation/bias"], 2)
  out = (ln(tok) * (1 + scale) + shift) @ p["final_linear/kernel"] + p["final_linear/bias"]
  return out.reshape(n, h, h, ps, ps, ch).transpose(0, 1, 3, 2, 4, 5).reshape(n, size, size, ch)


def inputs(cfg, n=3, seed=1):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k1, (n, cfg.image_size, cfg.image_size, cfg.channels))
  return x, jax.random.uniform(k2, (n,), maxval=1000.0), jax.random.randint(k3, (n,), 0, cfg.num_classes + 1)


@pytest.mark.parametrize("overrides", [dict(variant="mu/4"), dict(variant="pico/7", depth=2, width=48, num_heads=3)])
def test_forward_matches_reference(overrides):
  cfg = dit.make_config(image_size=28, channels=2, num_classes=5, **overrides)
  model = dit.DiT(cfg)
  x, t, y = inputs(cfg)
  params = randomized(nn.unbox(jax.jit(model.init)(jax.random.key(0), x, t, y))["params"], seed=2)
  got = jax.jit(model.apply)({"params": params}, x, t, y)
  chex.assert_shape(got, x.shape)
  want = reference_forward(params, x, t, y, cfg)
  # float32 against float64: sin/cos of times up to 1000 and random weights make outputs of ~30.
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


def test_adaln_zero_blocks_start_as_the_identity():
  """The model's own init: every block maps its input to itself, the whole model outputs zero."""
  cfg = dit.make_config("mu/4", image_size=28, channels=1, num_classes=10)
  x, t, y = inputs(cfg, seed=3)
  params = nn.unbox(jax.jit(dit.DiT(cfg).init)(jax.random.key(0), x, t, y))["params"]
  np.testing.assert_array_equal(np.asarray(jax.jit(dit.DiT(cfg).apply)({"params": params}, x, t, y)), 0.0)
  block = dit.DiTBlock(cfg.mlp_dim, cfg.num_heads)
  tokens, c = jax.random.normal(jax.random.key(4), (2, 49, 32)), jax.random.normal(jax.random.key(5), (2, 32))
  block_params = jax.jit(block.init)(jax.random.key(6), (tokens, c), None)
  (out, _), _ = jax.jit(block.apply)(block_params, (tokens, c), None)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(tokens))


def test_published_size_and_names():
  """DiT-XL/2 on 32x32x4 latents, 1000 classes: the paper's 675M parameters (its learned variance
  doubles the final projection's outputs: 18,448 more)."""
  cfg = dit.make_config("XL/2")
  abstract = jax.eval_shape(dit.DiT(cfg).init, jax.random.key(0), *dit.dummy_inputs(cfg))
  flat = traverse_util.flatten_dict(nn.unbox(abstract)["params"], sep="/")
  assert flat["blocks/Modulation_0/adaLN_modulation/kernel"].shape == (28, 1152, 6, 1152)
  assert flat["y_embedder"].shape == (1001, 1152)  # the null class of classifier-free guidance
  count = sum(int(np.prod(v.shape)) for v in flat.values())
  assert count + 1152 * 16 + 16 == pytest.approx(675e6, rel=1e-3)
  specs = traverse_util.flatten_dict(nn.get_partition_spec(abstract)["params"], sep="/")
  assert tuple(specs["blocks/Modulation_0/adaLN_modulation/kernel"]) == ("layers", "cond", "modulation", "embed")


def test_weights_from_templates_equal_the_kron_oracle_and_the_model_runs_on_them():
  """Every DiT parameter, the modulation projections included, composes from templates as the
  numpy.kron oracle does (a width not a tile multiple), and the plain model runs on the result."""
  cfg = dit.make_config("mu/4", image_size=28, channels=1, num_classes=10, width=40, mlp_dim=100, num_heads=2)
  model = dit.DiT(cfg)
  tiles = dict(embed=16, cond=16, cond_mlp=16, mlp=16, heads=1, kv=8)
  gen = generator.WeightGenerator.from_model(model, *dit.dummy_inputs(cfg), tiles=tiles, num_templates=3)
  assert gen.banks[("blocks", "Modulation_0", "adaLN_modulation", "kernel")].tile == (16, 6, 16)
  rng = np.random.default_rng(7)
  draw = lambda tree: jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), tree)
  t, s = draw(gen.template_shapes()), draw(gen.scaler_shapes())
  params = jax.jit(gen.materialize)(t, s)
  flat, ft, fs = (traverse_util.flatten_dict(jax.device_get(x)) for x in (params, t, s))
  for path, bank in gen.banks.items():
    np.testing.assert_allclose(flat[path], numpy_materialize(bank, np.asarray(ft[path], np.float64),
                                                             np.asarray(fs[path], np.float64)),
                               rtol=1e-5, atol=1e-5, err_msg="/".join(path))
  x, tt, y = inputs(cfg)
  assert np.isfinite(np.asarray(jax.jit(model.apply)({"params": params}, x / 10, tt, y))).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(variant="XXL/2"), "unknown DiT variant 'XXL/2'"),
    (dict(variant="S/2", num_heads=5), "num_heads=5 does not divide width=384"),
    (dict(variant="S/5"), "patch_size=5 does not divide image_size=32"),
    (dict(variant="mu/4", width=30, num_heads=2), "multiple of 4"),
    (dict(variant="S/2", remat_policy="all"), "remat_policy='all'"),
])
def test_bad_config_is_explained(kwargs, match):
  with pytest.raises(ValueError, match=match):
    dit.make_config(**kwargs)


# --- the programs ---------------------------------------------------------------------------------

def _config(module, learnable_data, **overrides):
  import ml_collections
  c = ml_collections.ConfigDict(module.get_config("runlocal").to_dict())
  if "model" in c:
    c.model.variant = "mu/4"
  c.update(dict(batch_size=32, log_every=2, eval_every=4, checkpoint_every=4))
  c.optim.warmup_steps = 1
  c.update(overrides)
  return learnable_data(c) if "data" in c else c  # init reads its templates' data


def test_pretrain_init_sample_train_a_dit(learnable_data, tmp_path, monkeypatch):
  """The programs for image generation on tiny learnable data: DiT templates pre-trained on the
  diffusion objective, a deeper and wider DiT initialized from them (scalers trained on the same
  objective), exported, sampled, and trained with sample quality measured. (Training from an export
  and its own export, resuming: the family-blind train program, tests/test_programs.py.)"""
  from configs import dit_init, dit_pretrain
  from weit_jax import exports, models
  from weit_jax.programs import init as init_program
  from weit_jax.programs import pretrain
  tiles = dict(embed=8, cond=8, cond_mlp=8, mlp=8, heads=1, kv=8)
  pre = _config(dit_pretrain, learnable_data, total_steps=8, eval_every=8, checkpoint_every=8,
                weit=dict(tiles=tiles, num_templates=3))
  with every_field_read(pre):  # and every field of the other programs' configs below
    summary = pretrain.run(pre, str(tmp_path / "pre"))
  import json
  first = next(json.loads(l) for l in open(tmp_path / "pre" / "metrics.jsonl") if '"loss"' in l)
  assert summary["final_step"] == 8 and summary["eval_loss"] < 0.95 * first["loss"]  # it learns
  ini = _config(dit_init, learnable_data, steps=4, num_examples=64, templates=str(tmp_path / "pre"),
                targets="depth=3,width=40,heads=2")
  ini.optim.warmup_steps = 1
  with every_field_read(ini):
    [result] = init_program.run(ini, str(tmp_path / "init")).values()
  assert result["loss_after"] < result["loss_before"]
  export = str(tmp_path / "init" / "d3-w40-h2-m160-p4" / "export")
  cfg = models.from_record(exports.read_meta(export)["model"])
  assert models.family_of(cfg).name == "dit" and (cfg.depth, cfg.width) == (3, 40)

  # Samples of the export: a grid with one row per class, the same images for the same seed.
  from configs import dit_sample
  from weit_jax.programs import sample
  sc = dit_sample.get_config()
  sc.update(dict(init=export, per_class=3, classes="0,7", steps=2))
  with every_field_read(sc):
    made = sample.run(sc, str(tmp_path / "samples"))
  assert os.path.getsize(made["png"]) > 1000
  saved = np.load(tmp_path / "samples" / "samples.npz")
  assert saved["images"].shape == (6, 28, 28, 1) and list(saved["labels"]) == [0, 0, 0, 7, 7, 7]
  again, _ = sample_quality.generate(models.build(cfg), exports.load_params(export), cfg, [0, 7], per_class=3,
                                     steps=2, guidance=2.0, seed=0)
  np.testing.assert_array_equal(again, saved["images"])
  sc.classes = "3,10"
  with pytest.raises(ValueError, match=r"\[10\] are not classes of this model"):
    sample.validate(sc, str(tmp_path / "s2"))

  # Training from the export measures sample quality at eval steps and at the end, with a grid
  # each time (the classifier: the recipe at a tiny size, on the same learnable data).
  from configs import dit_train
  from weit_jax import metrics
  from weit_jax.evaluators import feature_classifier
  from weit_jax.programs import train
  monkeypatch.setattr(feature_classifier, "RECIPE", TINY_RECIPE)
  tc = _config(dit_train, learnable_data, total_steps=2, eval_every=1, checkpoint_every=2, init=export,
               sample_quality=dict(per_class=3, steps=2, guidance=1.0, seed=0))
  with every_field_read(tc, {"model.*": "config.init unset (an export names its model)"}):
    summary = train.run(tc, str(tmp_path / "train"))
  fid = "eval_" + sample_quality.FID_KEY
  logged = {r["step"]: r for r in metrics.read_metrics(str(tmp_path / "train")) if fid in r}
  assert sorted(logged) == [1, 2] and summary[fid] == logged[2][fid] > 0
  assert 0 <= summary["eval_" + sample_quality.FIDELITY_KEY] <= 1
  assert sorted(os.listdir(tmp_path / "train" / "samples")) == ["step_0000001.png", "step_0000002.png"]
  assert exports.read_meta(str(tmp_path / "train" / "export"))["training"][sample_quality.FID_KEY] == \
      summary[fid]
  # Measured on the classifier's data only: other data is refused before anything is written.
  tc.data.image_size = 32
  with pytest.raises(ValueError, match="per_class=0 to train without it"):
    train.validate(tc, str(tmp_path / "train32"))
  assert not (tmp_path / "train32").exists()
  tc.data.image_size, tc.sample_quality.steps = 28, 0
  with pytest.raises(ValueError, match=r"sample_quality.steps=0 is out of range"):
    train.validate(tc, str(tmp_path / "train32"))


def test_a_family_is_refused_for_a_task_it_does_not_serve(tmp_path):
  """Refused before anything is written or compiled (main.py: exit 2, one line)."""
  import ml_collections
  from configs import dit_pretrain, vit_pretrain
  from weit_jax.programs import pretrain

  def refused(config, match):
    with pytest.raises(ValueError, match=match):
      pretrain.validate(config, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()

  c = ml_collections.ConfigDict(vit_pretrain.get_config("runlocal").to_dict())
  c.task = "diffusion"
  refused(c, r"config.task='diffusion' trains models of another kind than the vit family, which serves "
             r"\['classification'\]")
  c = ml_collections.ConfigDict(dit_pretrain.get_config("runlocal").to_dict())
  c.task = "classification"
  refused(c, r"the dit family, which serves \['diffusion'\]")
  c = ml_collections.ConfigDict(dit_pretrain.get_config("runlocal").to_dict())
  c.data.mixup_alpha = 0.2
  refused(c, "data.mixup_alpha must be 0 for image generation")
  c = ml_collections.ConfigDict(dit_pretrain.get_config("runlocal").to_dict())
  c.diffusion.label_dropout = 1.0
  refused(c, r"diffusion.label_dropout=1.0: use a probability in \[0, 1\)")
  c = ml_collections.ConfigDict(dit_pretrain.get_config("runlocal").to_dict())
  c.distill = ml_collections.ConfigDict(dict(teacher=str(tmp_path), weight=1.0, temperature=1.0))
  refused(c, r"distillation from a teacher \(distill.teacher\) is for tasks .*; Diffusion has none")


def test_weight_selection_and_tleg_serve_dits(tmp_path):
  """The baseline initializers on DiTs, against oracles built from the logical axes alone: weight
  selection keeps the first layers and evenly spaced indices along every width axis (the class
  table too: it is an input of a generator, not a head), TLEG gives layer l of L' the value
  A + (l / L') B; every init's tree runs in the target DiT."""
  from weit_jax import inits, models
  from weit_jax.inits import common, tleg
  fmt = dict(image_size=28, channels=1, num_classes=10)
  source = dit.make_config("pico/4", depth=6, width=96, num_heads=3, mlp_dim=384, **fmt)
  target = dit.make_config("pico/4", depth=3, width=40, num_heads=2, mlp_dim=160, **fmt)
  shapes = common.shapes(source)
  src = {k: np.arange(np.prod(s), dtype=np.float32).reshape(s) for k, s in shapes.items()}
  params = inits.get("weight_selection")(inits.DenseSource(source, traverse_util.unflatten_dict(src)), target)
  sizes_s, sizes_t = common.axis_sizes(source), common.axis_sizes(target)
  assert {"embed", "cond", "cond_mlp", "mlp", "heads", "kv"} <= set(sizes_t)
  checked = set()
  for path, w in traverse_util.flatten_dict(params).items():
    came_from = np.unravel_index(w.astype(np.int64), shapes[path])
    for axis, name in enumerate(common.axes(target)[path]):
      grid = np.indices(w.shape)[axis]
      if name in sizes_t:
        want = np.asarray(evenly(sizes_s[name], sizes_t[name]))[grid]
      else:
        want = grid  # layers: the first N; fixed axes (classes, modulation, patches): whole
      np.testing.assert_array_equal(came_from[axis], want, err_msg=f"{path} axis {axis} ({name})")
      checked.add(name)
  assert {"layers", "classes", "modulation", "embed", "cond", "kv"} <= checked

  rng = np.random.default_rng(0)
  aux = dit.make_config("pico/4", **fmt)  # depth 4
  layers, dense = tleg.split(traverse_util.unflatten_dict(
      {k: rng.standard_normal(s).astype(np.float32) for k, s in common.shapes(aux).items()}), aux)
  A = jax.tree_util.tree_map(lambda x: x[0], layers)
  B = jax.tree_util.tree_map(lambda a: rng.standard_normal(a.shape).astype(np.float32), A)
  deeper = dit.make_config("pico/4", depth=6, **fmt)
  got = traverse_util.flatten_dict(inits.get("tleg")(inits.TLEGSource(aux, {"A": A, "B": B, "dense": dense}), deeper))
  for path, a in traverse_util.flatten_dict(A).items():
    b = traverse_util.flatten_dict(B)[path]
    for l in range(6):
      np.testing.assert_allclose(got[path][l], a + (l + 1) / 6 * b, rtol=1e-6, atol=1e-6)
  for path, d in traverse_util.flatten_dict(dense).items():
    np.testing.assert_array_equal(got[path], d)

  x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
  t, y = jnp.array([10.0, 500.0]), jnp.array([3, 10])
  random_source = {k: rng.standard_normal(s).astype(np.float32) * 0.1 for k, s in shapes.items()}
  selected = inits.get("weight_selection")(inits.DenseSource(source, traverse_util.unflatten_dict(random_source)),
                                           target)
  for cfg, tree in ((target, selected), (deeper, traverse_util.unflatten_dict(got))):
    out = models.build(cfg).apply({"params": tree}, x, t, y)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
