r"""Runs compile-only dry runs (weit_jax/dry_run.py) for TPU slices and writes docs/scale.md.

Needs libtpu, i.e. a Python environment with the 'tpu' extra (keep it apart from the test one):

  python3 -m venv .venv-tpu && .venv-tpu/bin/pip install -e '.[tpu]'
  .venv-tpu/bin/python benchmarks/scale_table.py            # all rows, writes docs/scale.md
  .venv-tpu/bin/python benchmarks/scale_table.py --only B/16 --out /tmp/scale.md
  python benchmarks/scale_table.py --render docs/scale_runs.json   # rewrite the text only

Every row is one `main.py` command (printed in the document), run in its own process with
JAX_PLATFORMS=cpu; nothing needs a TPU, a dataset or the network.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2 ** 30

# (label, model variant, topology, extra flags, materialize target)
PRETRAIN_SLICES = ("v5e:4x4", "v5e:8x8", "v5e:16x16", "v4:2x2x4", "v4:4x4x4", "v5p:2x2x4", "v6e:8x8")
ROWS = (
    [("pretrain", "B/16", t, [], "H/14" if t == "v5e:16x16" else None) for t in PRETRAIN_SLICES]
    + [("pretrain", "B/16", "v5e:4x4", ["--config.batch_size=1024"], None)]  # a batch a 16-chip slice holds
    + [("pretrain", "L/16", t, [], None) for t in PRETRAIN_SLICES]
    # Activation rematerialization: the paper's batch on the smallest slice, and FLOPs at a batch that
    # fits without it (the overhead).
    + [("pretrain", "B/16", "v5e:4x4", [f"--config.model.remat_policy={p}", *b], None)
       for b in ([], ["--config.batch_size=1024"])
       for p in ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")]
    # ... and the smallest slices with the policy that keeps least.
    + [("pretrain", "B/16", t, ["--config.model.remat_policy=nothing_saveable"], None) for t in ("v5e:2x4", "v5e:2x2")]
    # The control task's PPO step (configs/policy_pretrain.py: hopper, 4096 environments, policy B).
    + [("control", "B", t, [], None) for t in ("v5e:2x2", "v5e:4x4", "v5e:16x16")]
)
CONFIGS = {"pretrain": "configs/vit_pretrain.py", "control": "configs/policy_pretrain.py"}

# Materializing a target on the init program's default mesh (fsdp over all chips), per slice:
# `--materialize-sweep` (one process per slice, each target compiled by weit_jax.dry_run's own
# functions). `--code=DIR` runs another checkout's weit_jax (the 'before' column).
SWEEP_TARGETS = (("B/16", "B/16"), ("H/14", "H/14"), ("G/14", "depth=48,width=1664,heads=16,mlp=8192,patch=14"),
                 ("22B/14", "depth=48,width=6144,heads=48,mlp=24576,patch=14"))
SWEEP_INTRO = """
`generator.materialize` under `jit` for a target, templates and scalers in (the default pre-training
config's tiles: embed/mlp 64, kv 16, heads 1, N = 4), the plain float32 weights out into their
shardings, on the init program's default mesh: fsdp over every chip (`--config.mesh`,
`--config.dry_run.materialize_mesh`). *Before*: each chip composed whole rows of the Kronecker product and
XLA moved them into place; *after*: each chip composes only its own shard (`generator._local_plan`:
a split axis whose per-chip slice is not whole tiles is composed row by row), the scanned blocks'
weights one layer at a time (`lax.map`: composed for all layers at once, the compiler kept
whole-weight intermediates padded to the TPU's tiles, 1.4-2.4 shards on the smallest slices), and a
mesh axis that does not divide a weight's sharded dimension moves to another dimension it divides
(`sharding._fallback`). *Temps in shards*: temporaries / the chip's output (its shard). The goal:
temporaries at most one shard. ViT-G/14 on v5e:16x16: its width 1664 does not split 256 ways, so its
MLP weights are split along their 8192 instead; its attention kernels (48 x 1664 x 16 heads x 104)
have no dimension that 256 divides and stay whole on every chip of that mesh (*weights not split*:
float32 bytes per chip of the weights split fewer ways than there are chips, counting those with at
least 2^22 elements per chip, `sharding.unsplit_weights`). The init program's log and the dry run say
so and name the mesh of the same chips that splits every weight (`sharding.split_advice`: the most
fsdp ways, the rest on model); the row under such a slice is compiled on that mesh
(`--config.mesh.fsdp/.model`, the dry run's `--config.dry_run.materialize_mesh`).
"""
SWEEP_SLICES = ("v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:8x8", "v5e:16x16", "v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4")


def command(python: str, kind: str, variant: str, topology: str, extra: list[str], materialize: str | None,
            workdir: str) -> list[str]:
  cmd = [python, "main.py", f"--config={CONFIGS[kind]}", f"--config.model.variant={variant}",
         f"--config.dry_run.topology={topology}", *extra]
  if materialize:
    cmd.append(f"--config.dry_run.materialize={materialize}")
  return cmd + [f"--workdir={workdir}"]


INTRO = """\
# Scale: compile-only dry runs for TPU slices

Every row below compiles the real jitted step for the chips of a TPU slice, on a CPU machine with
no TPU: `jax.experimental.topologies.get_topology_desc` (libtpu) describes the slice, the mesh is
built from those devices, and the TPU compiler compiles the step lowered with abstract arguments
(`weit_jax/dry_run.py`; no data is read, nothing is allocated). The same run for one slice:

    JAX_PLATFORMS=cpu .venv-tpu/bin/python main.py --config=configs/vit_pretrain.py \\
        --config.dry_run.topology=v5e:16x16 --config.dry_run.materialize=H/14 --workdir=/tmp/dry

- **Pre-training step**: `train_loop.make_train_step` of `programs/pretrain.make_task` (materialize
  the auxiliary ViT's weights from templates and scalers, forward, backward, AdamW), the train state
  sharded by `train_loop.state_shardings`, a batch of `batch_size` sharded over `data` x `fsdp`.
- **Materialize step** (the init program's export): `generator.materialize` under `jit`, templates
  and scalers in, the target's plain weights out, straight into their shardings.

Columns:

- *args / temps / total per chip*: XLA's buffer assignment (`compiled.memory_analysis()`).
  Arguments are the state and the batch shard; the state's outputs are donated (aliased) to it;
  total = arguments + outputs - aliased + temporaries + code. *HBM* per chip as published (v5e 16
  GiB, v4 32, v5p 95, v6e 32). The TPU compiler itself refuses a program over the HBM it knows
  ("compiler: ..." rows); `main.py` then exits with status 2 and one line.
- *FLOPs per chip (HLO)*: the dots and convolutions of the compiled per-chip program, each loop
  body counted as many times as the loop runs (`dry_run.hlo_matmul_flops`). *XLA cost analysis* is
  `compiled.cost_analysis()["flops"]`: it counts the body of the scanned encoder once, so it is
  about depth times too small; it is shown only to say why it is not used.
- *step time at peak* = FLOPs per chip / the chip's peak dense bf16 FLOP/s (v5e 197 T, v4 275 T,
  v5p 459 T, v6e 918 T): a lower bound on the step time.
- *model FLOPs per chip*: the plain ViT's matmuls and attention, forward and backward
  (`models.vit.train_flops`). *MFU bound* = model FLOPs / compiled FLOPs: the MFU the step would
  reach running at peak; what is missing is materializing the weights from the templates (once per
  step on every chip, so it weighs more at small per-chip batches).

What cannot be verified without a TPU:

- Real step times and achieved MFU. The compute lower bound leaves out the gradient all-reduce over
  the data axis, HBM-bandwidth-bound work (LayerNorm, softmax, elementwise; not in the FLOPs) and
  host input (decoding and augmenting 4096 images per step).
- That the runtime's memory matches the compile-time buffer assignment (runtime reservations,
  fragmentation), and the host memory of the input pipeline and of checkpointing.
- Multi-host start-up (`jax.distributed.initialize()` on a pod), data loading per host and `gs://`
  throughput; these run here only as 2 processes x 4 CPU devices (tests/test_multihost.py).
- That the TPU VM's libtpu compiles the same program: numbers come from the libtpu version below.
  Topology names and chip configurations (v4/v5p as "megacore": one device per chip; 2x2x1 chips
  per host) follow public tooling; libtpu accepted them here.
- ViT-H/14 rows use templates shaped for patch 14: the default pre-training config (B/16) makes
  templates for patch 16, which cannot feed a patch-14 target (the patch embedding and position
  embedding templates depend on the patch size); `--config.model.variant=B/14` pre-training would.
"""

def run_row(python, row, timeout):
  kind, variant, topology, extra, materialize = row
  workdir = tempfile.mkdtemp(prefix="scale_")
  cmd = command(python, kind, variant, topology, extra, materialize, workdir)
  t0 = time.time()
  proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=timeout)
  wall = time.time() - t0
  path = os.path.join(workdir, "dry_run.json")
  result = json.load(open(path)) if os.path.exists(path) else None
  shown = ["python", *cmd[1:-1], "--workdir=/tmp/dry"]
  if result and result.get("steps"):
    status = ", ".join(f"{name} {'fits' if step.get('fits') else 'does not fit'}"
                       for name, step in result["steps"].items())
  else:
    status = f"failed (exit {proc.returncode})"
  if result is None and proc.returncode != 0:
    print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
  return dict(row=row, command=shlex.join(shown), status=status, wall_s=round(wall, 1), result=result,
              stderr_tail=[l for l in proc.stderr.splitlines() if l.startswith("error:")][-1:])


def _remat(extra) -> str:
  for flag in extra:
    if flag.startswith("--config.model.remat_policy="):
      return flag.split("=", 1)[1]
  return "none"


def _batch(extra) -> int:
  for flag in extra:
    if flag.startswith("--config.batch_size="):
      return int(flag.split("=", 1)[1])
  return 4096


def sweep_slice(topology: str) -> list[dict]:
  """Compiles the materialize step of every SWEEP_TARGETS on ``topology`` (this process: the
  weit_jax on sys.path). Templates: the default pre-training config's tiles, shaped for the target."""
  from configs import vit_pretrain
  from weit_jax import dry_run, sharding
  from weit_jax.programs import pretrain
  config = vit_pretrain.get_config()
  config.model.variant = "B/16"
  setup = pretrain.build(config)
  topo = dry_run.parse_topology(topology)
  devices = dry_run.topology_devices(topo)
  # Spelled out, not sharding.FSDP_ALL: the 'before' column runs a checkout that predates it.
  default = dict(data=1, fsdp=-1, model=1)
  splits = hasattr(sharding, "unsplit_weights")  # the 'before' checkout predates it too
  out = []

  def compile_on(name, spec, mesh_shape, **extra):
    t0 = time.time()
    mesh = sharding.make_mesh(mesh_shape, devices=devices)
    try:
      compiled, cfg, gen, _, _ = dry_run.compile_materialize(config, setup, spec, mesh)
      r = dry_run.analyze(compiled, topo.chip, topo.chip.hbm_gib)
      r = {k: v for k, v in r.items() if k != "flops_notes"}
      r.update(model=cfg.short_name(), materialized_params=gen.counts()["materialized"])
      if splits:  # float32 bytes per chip of the weights the rules leave (partly) whole
        whole = sharding.unsplit_weights(gen.param_shapes(), gen.param_axes(), mesh.shape)
        r.update(unsplit_bytes=sharding.unsplit_bytes(whole),
                 splitting_mesh=sharding.mesh_splitting_every_weight(gen.param_shapes(), gen.param_axes(),
                                                                     topo.num_chips) if whole else None)
    except Exception as e:  # noqa: BLE001: the TPU compiler refuses what exceeds HBM
      if "RESOURCE_EXHAUSTED" not in str(e) and "ran out of memory" not in str(e).lower():
        raise
      r = dict(fits=False, error=next((l for l in str(e).splitlines() if l.strip()), "")[:300])
    out.append(dict(target=name, topology=topology, chips=topo.num_chips, hbm_gib=topo.chip.hbm_gib,
                    mesh=dict(mesh.shape), compile_s=round(time.time() - t0, 1), **extra, **r))
    print(f"  {name} on {topology}, mesh {dict(mesh.shape)}: {'fits' if r['fits'] else 'does not fit'} "
          f"({out[-1]['compile_s']:.0f} s)", file=sys.stderr, flush=True)
    return r

  for name, spec in SWEEP_TARGETS:
    r = compile_on(name, spec, default)
    if r.get("splitting_mesh"):  # the same slice on the mesh that splits every weight
      compile_on(name, spec, r["splitting_mesh"], alternative=True)
  return out


def run_sweep(python: str, code: str, timeout: int) -> list[dict]:
  rows = []
  for topology in SWEEP_SLICES:
    proc = subprocess.run([python, os.path.abspath(__file__), f"--sweep-slice={topology}", f"--code={code}"],
                          cwd=code, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode:
      print(proc.stderr[-3000:], file=sys.stderr)
      raise SystemExit(f"the sweep of {topology} failed (exit {proc.returncode})")
    rows += json.loads(proc.stdout.strip().splitlines()[-1])
    print(proc.stderr.strip(), flush=True)
  return rows


def _peak(r) -> str:
  if "output_bytes" not in r:
    return "compiler: " + _refusal(r.get("error", ""))
  return (f"{_g(r['output_bytes'])} / {_g(r['temp_bytes'])} / {_g(r['total_bytes'])}"
          f"{'' if r['fits'] else ' **no**'}")


def sweep_table(sweeps: dict) -> list[str]:
  """Per target and slice: outputs / temporaries / total per chip, before and after; then the
  smallest slice of each generation that initializes the target."""
  after, before = sweeps.get("after", {}).get("rows", []), sweeps.get("before", {}).get("rows", [])
  find = lambda rows, t, s, alt=False: next((r for r in rows if r["target"] == t and r["topology"] == s
                                              and r.get("alternative", False) == alt), None)
  out = ["| target (weights) | slice | chips | HBM GiB | before: outputs / temps / total per chip, GiB "
         "| after: outputs / temps / total, GiB | temps after, in shards | weights not split, GiB per chip |",
         "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for name, _ in SWEEP_TARGETS:
    for topology in SWEEP_SLICES:
      a, b = find(after, name, topology), find(before, name, topology)
      if a is None:
        continue
      for row, first in ((a, b), (find(after, name, topology, True), None)):
        if row is None:
          continue
        weights = f" ({row['materialized_params'] / 1e9:.2f}B)" if "materialized_params" in row else ""
        shards = f"{row['temp_bytes'] / row['output_bytes']:.2f}" if "output_bytes" in row else ""
        mesh = (f", mesh fsdp={row['mesh']['fsdp']} x model={row['mesh']['model']}"
                if row.get("alternative") else "")
        unsplit = _g(row["unsplit_bytes"]) if "unsplit_bytes" in row else ""
        out.append(f"| ViT-{name}{weights}{mesh} | {topology} | {row['chips']} | {row['hbm_gib']:g} | "
                   f"{(_peak(first) if first else 'not run') if row is a else ''} | {_peak(row)} | {shards} | "
                   f"{unsplit} |")
  out += ["", "Smallest slice that initializes each target (of those above):", "",
          "| target | v5e before | v5e after | v5p before | v5p after |", "| --- | --- | --- | --- | --- |"]
  for name, _ in SWEEP_TARGETS:
    cells = []
    for gen in ("v5e", "v5p"):
      for rows in (before, after):
        fit = [r for r in rows if r["target"] == name and r["topology"].startswith(gen + ":") and r["fits"]
               and not r.get("alternative")]
        cells.append(min(fit, key=lambda r: r["chips"])["topology"] if fit else ("not run" if not rows else "none"))
    out.append(f"| ViT-{name} | " + " | ".join(cells) + " |")
  return out


def _refusal(error: str) -> str:
  import re
  m = re.search(r"temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", error)
  if m:
    return f"needs {m.group(1)} GiB of temporaries, {m.group(2)} GiB available"
  return error.split(":", 1)[-1].strip()[:100]


def _g(b):
  return f"{b / GIB:.2f}"


def _steps(runs, kind):
  """(run, its result, its pre-training step or None) of every row of ``kind``."""
  for r in runs:
    if r["row"][0] == kind:
      res = r["result"] or {}
      yield r, res, res.get("steps", {}).get("pretrain_step")


def pretrain_table(runs) -> list[str]:
  out = ["| model | remat | slice | chips | global batch (per chip) | args / temps / total per chip, GiB | HBM GiB | fits "
         "| FLOPs per chip (HLO) | XLA cost analysis | step time at peak | model FLOPs per chip | MFU bound |",
         "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
  for r, res, s in _steps(runs, "pretrain"):
    _, variant, topology, _, _ = r["row"]
    if s is None:
      out.append(f"| ViT-{variant} | {_remat(r['row'][3])} | {topology} | | | | | {r['status']} | | | | | |")
      continue
    if "argument_bytes" not in s:  # the compiler refused it
      b = _batch(r["row"][3])
      out.append(f"| ViT-{variant} | {_remat(r['row'][3])} | {topology} | {res['chips']} | {b} ({b // res['chips']}) | "
                 f"compiler: {_refusal(s.get('error', ''))} | {res['hbm_gib']:g} | **no** | | | | | |")
      continue
    out.append(
        f"| ViT-{variant} | {_remat(r['row'][3])} | {topology} | {res['chips']} | {s['batch_size']} ({s['per_chip_batch']:g}) | "
        f"{_g(s['argument_bytes'])} / {_g(s['temp_bytes'])} / {_g(s['total_bytes'])} | {res['hbm_gib']:g} | "
        f"{'yes' if s['fits'] else '**no**'} | {s['flops_per_chip']:.3g} | {s['xla_cost_flops']:.3g} | "
        f"{1e3 * s['step_time_at_peak_s']:.1f} ms | {s['model_flops_per_chip']:.3g} | {100 * s['mfu_bound']:.1f}% |")
  return out


def control_table(runs) -> list[str]:
  out = ["| policy | slice | chips | environments (per chip) | args / temps / total per chip, GiB | HBM GiB | fits "
         "| FLOPs per chip (HLO) | step time at peak | environment steps per chip per step | "
         "environment steps/s per chip at peak (bound) |",
         "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
  for r, res, s in _steps(runs, "control"):
    _, variant, topology, _, _ = r["row"]
    if s is None or "argument_bytes" not in s:
      out.append(f"| {variant} | {topology} | {res.get('chips', '')} | | {r['status']} | | **no** | | | | |")
      continue
    out.append(
        f"| {variant} | {topology} | {res['chips']} | {s['batch_size']} ({s['environments_per_chip']:g}) | "
        f"{_g(s['argument_bytes'])} / {_g(s['temp_bytes'])} / {_g(s['total_bytes'])} | {res['hbm_gib']:g} | "
        f"{'yes' if s['fits'] else '**no**'} | {s['flops_per_chip']:.3g} | {1e3 * s['step_time_at_peak_s']:.2f} ms | "
        f"{s['env_steps_per_step_per_chip']:g} | {s['env_steps_per_s_at_peak']:.3g} |")
  return out


def remat_findings(pre) -> list[str]:
  """Which remat policy fits ViT-B/16 at batch 4096 on v5e:4x4, and what it costs in FLOPs (against
  no remat at a batch that fits without it)."""
  out = []
  pick = lambda policy, batch: next((s for r, s in pre if r["row"][1] == "B/16" and r["row"][2] == "v5e:4x4"
                                     and _remat(r["row"][3]) == policy and _batch(r["row"][3]) == batch), None)
  base = pick("none", 1024)
  for policy in ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable"):
    big, small = pick(policy, 4096), pick(policy, 1024)
    if big is None:
      continue
    fits = big.get("fits") and "argument_bytes" in big
    text = (f"- remat `{policy}`: ViT-B/16 at global batch 4096 on v5e:4x4 "
            + (f"fits ({big['total_bytes'] / GIB:.1f} GiB per chip, {big['temp_bytes'] / GIB:.1f} GiB of temporaries)"
               if fits else f"does not fit ({_refusal(big.get('error', '')) if 'error' in big else _g(big['total_bytes']) + ' GiB'})"))
    if small and base and "flops_per_chip" in small and "flops_per_chip" in base:
      text += (f"; its compiled FLOPs at batch 1024 are {small['flops_per_chip'] / base['flops_per_chip']:.2f}x "
               f"those without remat (MFU bound {100 * small['mfu_bound']:.1f}% vs {100 * base['mfu_bound']:.1f}%).")
    else:
      text += "."
    out.append(text)
  runs = [(r, s) for r, s in pre if r["row"][1] == "B/16" and _remat(r["row"][3]) == "nothing_saveable"
          and _batch(r["row"][3]) == 4096]
  fit = sorted(((r, s) for r, s in runs if s.get("fits") and "argument_bytes" in s),
               key=lambda rs: rs[0]["result"]["chips"])
  if fit:
    r, s = fit[0]
    no = [x["row"][2] for x, y in runs if not y.get("fits")]
    out.append(f"- The smallest slice that pre-trains ViT-B/16 at global batch 4096 (remat `nothing_saveable`): "
               f"{r['row'][2]}, {r['result']['chips']} chips at {s['per_chip_batch']:g} images each, "
               f"{s['total_bytes'] / GIB:.1f} GiB per chip" + (f"; not {', '.join(no)}." if no else "."))
  return out


def findings(runs) -> list[str]:
  """A few sentences computed from the rows (so they stay true when the table is regenerated)."""
  out = ["## Reading the numbers", ""]
  pre = [(r, r["result"]["steps"]["pretrain_step"]) for r in runs
         if r["row"][0] == "pretrain" and r["result"] and "pretrain_step" in r["result"]["steps"]]
  for variant in sorted({r["row"][1] for r, _ in pre}):
    rows = [(r, s) for r, s in pre if r["row"][1] == variant and _batch(r["row"][3]) == 4096
            and _remat(r["row"][3]) == "none"]
    fit = [(r, s) for r, s in rows if s.get("fits") and "argument_bytes" in s]
    no = [r["row"][2] for r, s in rows if not s.get("fits")]
    if not fit:
      out.append(f"- ViT-{variant} at global batch 4096 fits on none of {', '.join(no)}.")
      continue
    state = max(s["argument_bytes"] for _, s in fit) / GIB
    tight = max(fit, key=lambda rs: rs[1]["per_chip_batch"])
    out.append(
        f"- ViT-{variant} at global batch 4096 fits on {', '.join(r['row'][2] for r, _ in fit)}"
        + (f"; not on {', '.join(no)}" if no else "") + f". The arguments are small (at most {state:.2f} GiB "
        f"per chip: the templates, scalers and their Adam moments, replicated over `data`, and the batch "
        f"shard); temporaries for the per-chip batch are the rest (activations kept for the backward "
        f"pass, without rematerialization): {tight[1]['temp_bytes'] / GIB:.1f} GiB at "
        f"{tight[1]['per_chip_batch']:g} images per chip on {tight[0]['row'][2]}.")
    for r, s in fit:
      if r["row"][2] == "v5e:16x16":
        out.append(f"  On v5e:16x16: {s['flops_per_chip']:.3g} FLOPs per chip per step, at least "
                   f"{1e3 * s['step_time_at_peak_s']:.1f} ms per step at peak, i.e. at most "
                   f"{4096 / s['step_time_at_peak_s'] / 1e3:.0f}k images/s for the slice.")
  out += remat_findings(pre)
  mfu = [s["mfu_bound"] for r, s in pre if s.get("mfu_bound") and _remat(r["row"][3]) == "none"]
  if mfu:
    out.append(f"- The compiled FLOPs are the plain ViT's model FLOPs to within {100 * abs(1 - min(mfu)):.1f}%: "
               f"materializing the weights from the templates every step costs little next to the "
               f"forward and backward at these per-chip batches, so the MFU bound is "
               f"{100 * min(mfu):.1f}-{100 * max(mfu):.1f}%; what the real MFU is depends on what the FLOPs "
               "leave out (communication, memory-bound work, input), which needs a TPU to measure.")
  out.append("- XLA's own cost analysis reports about 1/depth of the compiled FLOPs: it counts the "
             "scanned encoder's body once.")
  return out + [""]


def machine() -> str:
  import jax
  try:
    from importlib.metadata import version
    libtpu = version("libtpu")
  except Exception:  # noqa: BLE001 (reporting only)
    libtpu = "not installed"
  cpu = platform.processor() or platform.machine()
  return (f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} CPU cores, no TPU; "
          f"Python {platform.python_version()}, jax {jax.__version__}, libtpu {libtpu}")


def write(runs, sweeps, out_path, *, made: str, date: str):
  lines = INTRO.rstrip().splitlines()
  lines += ["", f"Generated {date} by `benchmarks/scale_table.py` on: {made}.", ""]
  lines += ["## Pre-training (the default config: auxiliary ViT, global batch 4096, bf16 compute, "
            "tiles embed/mlp 64, kv 16, N = 4, AdamW; mesh data = all chips)", ""]
  lines += pretrain_table(runs)
  if any(r["row"][0] == "control" for r in runs):
    lines += ["", "## Control: the PPO step (configs/policy_pretrain.py: hopper on brax's spring backend, 4096 "
              "environments, policy B, unroll 32; mesh data = all chips)", "",
              "One step: a rollout of every environment for `unroll_length` steps, then `epochs` passes of "
              "`num_minibatches` updates. The environments are split over the batch axes like a batch (each chip "
              "holds and steps its own, `train_loop.carry_shardings`); the minibatches too. The bound on "
              "environment steps per second divides a chip's environment steps per update by the step time at "
              "peak, which counts only the dots (the policy's matmuls, and materializing its weights): brax's "
              "physics is elementwise work the bound leaves out, so real rates are lower.", ""]
    lines += control_table(runs)
  lines += ["", "## Materializing a target (the init program's export step)", "", SWEEP_INTRO.strip(), ""]
  for label in ("before", "after"):
    if label in sweeps:
      lines.append(f"- *{label}*: weit_jax at commit {sweeps[label]['commit']}, {sweeps[label]['date']}: "
                   f"`{sweeps[label]['command']}`")
  lines += [""] + sweep_table(sweeps)
  lines += [""] + findings(runs)
  lines += ["", "## Commands", "", "Each row, as run (with `JAX_PLATFORMS=cpu`, in the environment that has "
            "libtpu):", ""]
  lines += [f"    {r['command']}    # {r['status']}, {r['wall_s']:.0f} s" for r in runs]
  lines += [f"    {sweeps[label]['command']}    # the materialize sweep, {label}" for label in ("before", "after")
            if label in sweeps]
  lines += [""]
  with open(out_path, "w") as f:
    f.write("\n".join(lines))


def _commit(code: str) -> str:
  proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True, text=True)
  dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=code, capture_output=True,
                         text=True).stdout.strip()
  return (proc.stdout.strip() or "unknown") + (" (with uncommitted changes)" if dirty else "")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--python", default=sys.executable, help="the Python with libtpu (default: this one)")
  p.add_argument("--out", default=os.path.join(ROOT, "docs", "scale.md"))
  p.add_argument("--only", default=None, help="only rows whose kind (pretrain, control), model variant, topology "
                 "or flags contain this; "
                 "they replace the same rows of the saved runs")
  p.add_argument("--timeout", type=int, default=900, help="seconds per dry run")
  p.add_argument("--render", default=None, metavar="RUNS_JSON",
                 help="only rewrite the document from the runs a previous invocation saved")
  p.add_argument("--materialize-sweep", default=None, choices=("before", "after"),
                 help="compile the materialize step of every target on every slice of the sweep with the "
                      "weit_jax of --code, save it as this column, rewrite the document")
  p.add_argument("--code", default=ROOT, help="the checkout whose weit_jax the sweep runs (default: this one)")
  p.add_argument("--sweep-slice", default=None, help=argparse.SUPPRESS)  # internal: one slice of the sweep
  args = p.parse_args()
  if args.sweep_slice:
    sys.path.insert(0, os.path.abspath(args.code))
    print(json.dumps(sweep_slice(args.sweep_slice)))
    return
  runs_path = os.path.splitext(args.out)[0] + "_runs.json"
  saved = json.load(open(args.render or runs_path)) if os.path.exists(args.render or runs_path) else {}
  runs = saved.get("runs", [])
  for r in runs:
    r["row"] = tuple(r["row"])
  sweeps = saved.get("sweeps", {})
  if args.render:
    write(runs, sweeps, args.out, made=saved["machine"], date=saved["date"])
    print(f"wrote {args.out}")
    return
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  if args.materialize_sweep:
    code = os.path.abspath(args.code)
    rows = run_sweep(args.python, code, args.timeout)
    sweeps[args.materialize_sweep] = dict(date=date, commit=_commit(code), rows=rows,
                                          command=f"python benchmarks/scale_table.py --materialize-sweep="
                                                  f"{args.materialize_sweep}" + (" --code=CHECKOUT" if code != ROOT else ""))
  else:
    rows = [r for r in ROWS if not args.only or any(args.only in x for x in (r[0], r[1], r[2], *r[3]))]
    fresh = []
    for row in rows:
      print(f"{row[0]} {row[1]} on {row[2]} {' '.join(row[3])} ...", flush=True)
      fresh.append(run_row(args.python, row, args.timeout))
      print(f"  {fresh[-1]['status']} in {fresh[-1]['wall_s']:.0f} s", flush=True)
    keys = {json.dumps(r["row"]) for r in fresh}
    kept = [r for r in runs if args.only and json.dumps(r["row"]) not in keys and tuple(r["row"]) in ROWS]
    order = {json.dumps(row): i for i, row in enumerate(ROWS)}
    runs = sorted(kept + fresh, key=lambda r: order[json.dumps(r["row"])])
  with open(runs_path, "w") as f:
    json.dump(dict(date=date, machine=machine(), runs=runs, sweeps=sweeps), f, indent=1)
  write(runs, sweeps, args.out, made=machine(), date=date)
  print(f"wrote {args.out} and {runs_path}")


if __name__ == "__main__":
  main()
