r"""What the Kronecker parameterization costs, measured side by side in one run (issue 7).

  python benchmarks/performance.py              # everything, ~15 minutes on a 2-core CPU
  python benchmarks/performance.py --quick      # a smoke test

Writes docs/performance.md (tables + the command, machine and date) and docs/performance.json.
Runs itself on 8 fake CPU devices (XLA_FLAGS is set below, before jax is imported), so the
sharded materialization is measured in the same process as the single-device one.

1. Training-step overhead: a pre-training step of the template model vs a step of the plain ViT
   of the same size, same batch, same optimizer (interleaved repetitions; median and spread).
2. Materialization of ViT-B/16, L/16, H/14 from templates, on 1 and on 8 devices (sharded out):
   time vs the floor (a fill of the same bytes with the same shardings, measured here), and
   per-device memory from the compiled program (output + temporaries) vs one shard.
3. Scaler training cost: a scaler-training step vs a full training step of the target, the init
   program's step budget vs one epoch, trainable scalers vs the target's parameters.
4. Compile time of the pre-training step at depth 12 vs 48.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import datetime
import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import vit_init, vit_pretrain, vit_train  # noqa: E402
from weit_jax import generator, sharding, train_loop  # noqa: E402
from weit_jax.models import vit  # noqa: E402
from weit_jax.programs import pretrain, train  # noqa: E402


def _config(module, arg, **model):
  c = ml_collections.ConfigDict(module.get_config(arg).to_dict())
  for k, v in model.items():
    c.model[k] = v
  return c


def _step_fns(size, image_size, batch, mesh):
  """(template-model step, plain-model step), each with its state and a fixed batch."""
  pc = _config(vit_pretrain, "runlocal", **size)
  pc.data.image_size = image_size
  tc = _config(vit_train, "runlocal", **size)
  tc.data.image_size = image_size
  tc.weight_decay = 0.0
  pc.constraint.template_wd = pc.constraint.scaler_wd = 0.0
  setup = pretrain.build(pc)
  tasks = {"templates": pretrain.make_task(pc, setup),
           "plain": train.make_task(tc, setup.model, setup.model_config)}
  rng = np.random.default_rng(0)
  local = {"image": rng.normal(size=(batch, image_size, image_size, 1)).astype(np.float32),
           "labels": np.eye(10, dtype=np.float32)[rng.integers(0, 10, batch)]}
  b = sharding.global_batch(local, mesh)
  out = {}
  for name, task in tasks.items():
    _, sh = train_loop.state_shardings(task, mesh)
    state = train_loop.make_init_state(task, sh)(jax.random.key(0))
    step = train_loop.make_train_step(task, sh, sharding.batch_sharding(mesh), mesh)
    out[name] = [step, state]
  return out, b, setup


def bench_step_overhead(sizes, reps, steps_per_rep, mesh):
  rows = []
  for label, size, image_size, batch in sizes:
    fns, b, setup = _step_fns(size, image_size, batch, mesh)
    key = jax.random.key(1)
    for name in fns:  # compile + warm up
      for _ in range(2):
        fns[name][1], o = fns[name][0](fns[name][1], b, key)
      jax.block_until_ready(o)
    times = {n: [] for n in fns}
    for _ in range(reps):  # interleaved, so drifts in machine load hit both alike
      for name in fns:
        t0 = time.perf_counter()
        for _ in range(steps_per_rep):
          fns[name][1], o = fns[name][0](fns[name][1], b, key)
        jax.block_until_ready(o)
        times[name].append(batch * steps_per_rep / (time.perf_counter() - t0))
    med = {n: statistics.median(v) for n, v in times.items()}
    rows.append(dict(size=label, model=setup.model_config.short_name(), batch=batch, image=image_size,
                     plain_img_s=med["plain"], templates_img_s=med["templates"],
                     plain_spread=(min(times["plain"]), max(times["plain"])),
                     templates_spread=(min(times["templates"]), max(times["templates"])),
                     ratio=med["templates"] / med["plain"],
                     ratios=[t / p for t, p in zip(times["templates"], times["plain"])]))
    print(f"[step] {label}: plain {med['plain']:.0f} img/s, templates {med['templates']:.0f} img/s, "
          f"ratio {rows[-1]['ratio']:.3f}", flush=True)
  return rows


def _timed(fn, *args, reps):
  fn(*args)  # compile
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts), min(ts), max(ts)


def bench_materialize(variants, reps):
  rows = []
  tiles = dict(embed=64, mlp=64, heads=1, kv=16)
  for variant in variants:
    cfg = vit.make_config(variant)
    gen = generator.WeightGenerator.from_model(vit.ViT(cfg), vit.dummy_input(cfg), tiles=tiles, num_templates=4)
    t, s = gen.init(jax.random.key(0))
    nbytes = 4 * gen.counts()["materialized"]
    for ndev in (1, 8):
      mesh = sharding.make_mesh({"fsdp": ndev}, devices=jax.devices()[:ndev])
      out_sh = sharding.shardings(gen.param_shapes(), gen.param_axes(), mesh)
      tt = jax.device_put(t, sharding.shardings(gen.template_shapes(), gen.template_axes(), mesh))
      ss = jax.device_put(s, sharding.replicated(mesh))
      mat = jax.jit(gen.materialize, out_shardings=out_sh)
      fill = jax.jit(lambda: jax.tree_util.tree_map(lambda a: jnp.full(a.shape, 0.5, jnp.float32),
                                                    gen.param_shapes()), out_shardings=out_sh)
      mem = mat.lower(tt, ss).compile().memory_analysis()
      t_mat = _timed(mat, tt, ss, reps=reps)
      t_fill = _timed(fill, reps=reps)
      per_device_shard = sum(
          int(np.prod(sh.shard_shape(b.shape))) * 4
          for b, sh in zip(jax.tree_util.tree_leaves(gen.param_shapes()), jax.tree_util.tree_leaves(out_sh)))
      rows.append(dict(variant=variant, devices=ndev, gbytes=nbytes / 1e9, materialize_s=t_mat[0],
                       materialize_spread=t_mat[1:], floor_s=t_fill[0], ratio=t_mat[0] / t_fill[0],
                       bandwidth_gb_s=nbytes / t_fill[0] / 1e9,
                       out_mb_per_device=mem.output_size_in_bytes / 1e6,
                       temp_mb_per_device=mem.temp_size_in_bytes / 1e6,
                       shard_mb=per_device_shard / 1e6, replica_mb=nbytes / 1e6))
      print(f"[materialize] {variant} on {ndev}: {t_mat[0]:.3f}s vs floor {t_fill[0]:.3f}s "
            f"(x{t_mat[0] / t_fill[0]:.2f}); out {mem.output_size_in_bytes / 1e6:.0f} MB + temp "
            f"{mem.temp_size_in_bytes / 1e6:.0f} MB per device; shard {per_device_shard / 1e6:.0f} MB", flush=True)
  return rows


def bench_scaler_training(mesh, steps):
  """Scaler-only step vs full step for the runlocal targets; init budget vs one epoch."""
  from weit_jax import losses, optim
  rows = []
  pc = _config(vit_pretrain, "runlocal")
  setup = pretrain.build(pc)
  for fields in (dict(variant="mu/4"), dict(variant="pico/4", depth=6), dict(variant="pico/4", width=72, num_heads=3, mlp_dim=144)):
    cfg = vit.make_config(**fields, image_size=28, channels=1, num_classes=10)
    model = vit.ViT(cfg)
    gen = generator.WeightGenerator.from_model(model, vit.dummy_input(cfg), tiles=dict(pc.weit.tiles),
                                               num_templates=pc.weit.num_templates)
    t, s = gen.init(jax.random.key(0))
    ic = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=0, schedule="constant", b1=0.9, b2=0.999,
                                        clip_norm=1.0, wd_paths=".*", total_steps=10))

    def fwd(p, x):
      return model.apply({"params": gen.materialize(p["templates"], p["scalers"])}, x)

    def loss_fn(p, b, k):
      return losses.softmax_cross_entropy(fwd(p, b["image"]), b["labels"]), {}

    init = {"templates": t, "scalers": s}
    scaler_task = train_loop.Task(lambda k: init, {"templates": gen.template_axes(), "scalers": gen.scaler_axes()},
                                  loss_fn, fwd, optim.make_optimizer(ic, init, frozen="^templates/"), optim.schedule(ic))
    tc = _config(vit_train, "runlocal")
    full_task = train.make_task(tc, model, cfg)
    rng = np.random.default_rng(0)
    batch = 128
    b = sharding.global_batch({"image": rng.normal(size=(batch, 28, 28, 1)).astype(np.float32),
                               "labels": np.eye(10, dtype=np.float32)[rng.integers(0, 10, batch)]}, mesh)
    rates = {}
    for name, task in (("scalers", scaler_task), ("full", full_task)):
      _, sh = train_loop.state_shardings(task, mesh)
      state = train_loop.make_init_state(task, sh)(jax.random.key(0))
      step = train_loop.make_train_step(task, sh, sharding.batch_sharding(mesh), mesh)
      for _ in range(2):
        state, o = step(state, b, jax.random.key(1))
      jax.block_until_ready(o)
      t0 = time.perf_counter()
      for _ in range(steps):
        state, o = step(state, b, jax.random.key(1))
      jax.block_until_ready(o)
      rates[name] = (time.perf_counter() - t0) / steps
    counts = gen.counts()
    rows.append(dict(target=cfg.short_name(), scaler_step_s=rates["scalers"], full_step_s=rates["full"],
                     trainable=counts["scalers"], params=counts["materialized"]))
    print(f"[scalers] {cfg.short_name()}: scaler step {rates['scalers'] * 1e3:.1f} ms, full step "
          f"{rates['full'] * 1e3:.1f} ms; {counts['scalers']:,} of {counts['materialized']:,} trainable", flush=True)
  return rows


def bench_compile(depths, width_variant="Ti/16", image_size=32, patch=4):
  rows = []
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  for depth in depths:
    pc = _config(vit_pretrain, "runlocal", variant=width_variant, depth=depth, patch_size=patch)
    pc.data.image_size = image_size
    pc.weit.tiles = dict(embed=64, mlp=64, heads=1, kv=16)
    setup = pretrain.build(pc)
    task = pretrain.make_task(pc, setup)
    abstract, sh = train_loop.state_shardings(task, mesh)
    step = train_loop.make_train_step(task, sh, sharding.batch_sharding(mesh), mesh)
    batch = {"image": jax.ShapeDtypeStruct((8, image_size, image_size, 1), jnp.float32),
             "labels": jax.ShapeDtypeStruct((8, 10), jnp.float32)}
    t0 = time.perf_counter()
    lowered = step.lower(abstract, batch, jax.random.key(0))
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    rows.append(dict(depth=depth, model=setup.model_config.short_name(), trace_lower_s=t1 - t0, compile_s=t2 - t1))
    print(f"[compile] depth {depth}: trace+lower {t1 - t0:.2f}s, compile {t2 - t1:.2f}s", flush=True)
  return rows


def write_doc(results, path, command, wall):
  lines = ["# Performance", "",
           f"Produced by `{command}` on {results['machine']} ({results['date']}), wall time {wall:.0f} s.",
           "Every figure below is what that run printed; rerun the command to reproduce.", "",
           "## 1. Training-step overhead of the template model", "",
           "A pre-training step (weights = materialize(templates, scalers) inside the step, gradients to both) "
           "vs a step of the plain ViT of the same size, same batch and optimizer (Adam), on one CPU "
           "device (this machine's 2 cores). Throughput in images/s: median over interleaved repetitions "
           "(min-max in brackets). Target: ratio >= 0.97.", "",
           "| size | model | batch | plain img/s | template img/s | ratio (median) | ratio range |",
           "|---|---|---:|---:|---:|---:|---:|"]
  for r in results["step_overhead"]:
    lines.append(f"| {r['size']} | {r['model']} | {r['batch']} | {r['plain_img_s']:.0f} [{r['plain_spread'][0]:.0f}-"
                 f"{r['plain_spread'][1]:.0f}] | {r['templates_img_s']:.0f} [{r['templates_spread'][0]:.0f}-"
                 f"{r['templates_spread'][1]:.0f}] | {r['ratio']:.3f} | {min(r['ratios']):.3f}-{max(r['ratios']):.3f} |")
  lines += ["", "## 2. Materialization", "",
            "Templates (tiles embed=64, mlp=64, heads=1, kv=16; N=4) -> the full float32 parameter tree, inside "
            "`jit` with the target shardings (fsdp over the devices). Floor: a `jnp.full` of the same tree with the "
            "same shardings (the cost of writing those bytes here), measured in the same run. Memory: the compiled "
            "program's output and temporaries per device, vs one shard and a full replica.", "",
            "| model | devices | GB | materialize s | floor s | ratio | write GB/s | out MB/device | temp MB/device | shard MB | replica MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in results["materialize"]:
    lines.append(f"| ViT-{r['variant']} | {r['devices']} | {r['gbytes']:.2f} | {r['materialize_s']:.3f} | {r['floor_s']:.3f} | "
                 f"{r['ratio']:.2f} | {r['bandwidth_gb_s']:.1f} | {r['out_mb_per_device']:.0f} | {r['temp_mb_per_device']:.0f} | "
                 f"{r['shard_mb']:.0f} | {r['replica_mb']:.0f} |")
  # The budgets are today's configs' (a changed budget re-renders with --render; the step times are measured).
  init_steps, epoch_steps = vit_init.get_config("runlocal").steps, 60000 // 128
  lines += ["", "## 3. Scaler training cost", "",
            "Per-step time of scaler-only training (templates frozen) vs full training of the same target "
            f"(batch 128, 28x28 Fashion-MNIST shapes), and the init program's runlocal budget ({init_steps} steps) "
            f"vs one epoch of Fashion-MNIST ({epoch_steps} steps at batch 128): step time x steps.", "",
            f"| target | scaler step ms | full step ms | init ({init_steps} steps) s | one epoch s | init / epoch | "
            "trainable scalers | target params | fraction |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in results["scaler_training"]:
    init_s, epoch_s = init_steps * r["scaler_step_s"], epoch_steps * r["full_step_s"]
    lines.append(f"| {r['target']} | {r['scaler_step_s'] * 1e3:.1f} | {r['full_step_s'] * 1e3:.1f} | {init_s:.1f} | "
                 f"{epoch_s:.1f} | {init_s / epoch_s:.2f} | {r['trainable']:,} | {r['params']:,} | "
                 f"{r['trainable'] / r['params']:.2%} |")
  lines += ["", "## 4. Compile time vs depth", "",
            "The pre-training step of a width-192 template model (Ti/16 widths, 32x32 images, patch 4), "
            "depth 12 vs 48: the blocks are one `nn.scan`, so compile time should stay nearly flat.", "",
            "| depth | model | trace + lower s | compile s |", "|---:|---|---:|---:|"]
  for r in results["compile"]:
    lines.append(f"| {r['depth']} | {r['model']} | {r['trace_lower_s']:.2f} | {r['compile_s']:.2f} |")
  scale = os.path.join(os.path.dirname(path), "scale_runs.json")
  if os.path.exists(scale):  # per-chip FLOPs and the MFU bound from the TPU dry runs (docs/scale.md)
    with open(scale) as f:
      runs = json.load(f)["runs"]
    lines += ["", "## 5. ViT-B/16 pre-training on TPU slices: FLOPs and MFU bound", "",
              "From the compile-only dry runs of `benchmarks/scale_table.py` (`docs/scale_runs.json`, see "
              "[scale.md](scale.md)): FLOPs per chip of the compiled step (template model), the plain ViT's "
              "model FLOPs, and their ratio, the MFU the step reaches at most (materializing the weights "
              "from templates is the difference). Not measured on a TPU.", "",
              "| slice | flags | chips | batch per chip | compiled FLOPs per chip | model FLOPs per chip | step time at peak "
              "| MFU bound |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
      step = (run.get("result") or {}).get("steps", {}).get("pretrain_step", {})
      if run["row"][:2] == ["pretrain", "B/16"] and step.get("fits") and step.get("mfu_bound"):
        flags = " ".join(f"`{f.removeprefix('--config.')}`" for f in run["row"][3]) or "defaults"
        lines.append(f"| {run['row'][2]} | {flags} | {run['result']['chips']} | {step['per_chip_batch']:.0f} | "
                     f"{step['flops_per_chip']:.3g} | {step['model_flops_per_chip']:.3g} | "
                     f"{step['step_time_at_peak_s'] * 1e3:.1f} ms | {step['mfu_bound']:.2%} |")
  lines.append("")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--out", default="docs/performance.md")
  p.add_argument("--render", action="store_true", help="rewrite the markdown from the saved JSON only")
  a = p.parse_args()
  if a.render:
    with open(os.path.splitext(a.out)[0] + ".json") as f:
      saved = json.load(f)
    write_doc(saved, a.out, saved["command"], saved["wall_s"])
    print(f"wrote {a.out} from its JSON")
    return
  t0 = time.time()
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  small = ("small", dict(variant="pico/4"), 28, 128)
  medium = ("medium", dict(variant="Ti/4", depth=6), 32, 64)
  results = dict(machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, jax {jax.__version__}",
                 date=datetime.date.today().isoformat())
  if a.quick:
    results["step_overhead"] = bench_step_overhead([small], reps=2, steps_per_rep=3, mesh=mesh)
    results["materialize"] = bench_materialize(["B/16"], reps=1)
    results["scaler_training"] = bench_scaler_training(mesh, steps=3)[:1]
    results["compile"] = bench_compile([2, 4])
  else:
    results["step_overhead"] = bench_step_overhead([small, medium], reps=7, steps_per_rep=10, mesh=mesh)
    results["materialize"] = bench_materialize(["B/16", "L/16", "H/14"], reps=3)
    results["scaler_training"] = bench_scaler_training(mesh, steps=20)
    results["compile"] = bench_compile([12, 48])
  wall = time.time() - t0
  command = "python benchmarks/performance.py" + (" --quick" if a.quick else "")
  os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
  with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
    json.dump(dict(results, wall_s=wall, command=command), f, indent=2)
  write_doc(results, a.out, command, wall)
  print(f"wrote {a.out} ({wall:.0f}s)")


if __name__ == "__main__":
  main()
