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
    # Materializing ViT-H/14 with its weights sharded over all chips (fsdp), as an init run would.
    + [("materialize", "B/16", t, ["--config.mesh.data=1", "--config.mesh.fsdp=-1"], "H/14")
       for t in ("v5e:4x4", "v5e:16x16", "v4:2x2x4")]
)


def command(python: str, variant: str, topology: str, extra: list[str], materialize: str | None,
            workdir: str) -> list[str]:
  cmd = [python, "main.py", "--config=configs/vit_pretrain.py", f"--config.model.variant={variant}",
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
  cmd = command(python, variant, topology, extra, materialize, workdir)
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


def _batch(extra) -> int:
  for flag in extra:
    if flag.startswith("--config.batch_size="):
      return int(flag.split("=", 1)[1])
  return 4096


def _refusal(error: str) -> str:
  import re
  m = re.search(r"temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", error)
  if m:
    return f"needs {m.group(1)} GiB of temporaries, {m.group(2)} GiB available"
  return error.split(":", 1)[-1].strip()[:100]


def _g(b):
  return f"{b / GIB:.2f}"


def pretrain_table(runs) -> list[str]:
  out = ["| model | slice | chips | global batch (per chip) | args / temps / total per chip, GiB | HBM GiB | fits "
         "| FLOPs per chip (HLO) | XLA cost analysis | step time at peak | model FLOPs per chip | MFU bound |",
         "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
  for r in runs:
    kind, variant, topology, _, _ = r["row"]
    if kind != "pretrain":
      continue
    res = r["result"] or {}
    s = res.get("steps", {}).get("pretrain_step")
    if s is None:
      out.append(f"| ViT-{variant} | {topology} | | | | | {r['status']} | | | | | |")
      continue
    if "argument_bytes" not in s:  # the compiler refused it
      b = _batch(r["row"][3])
      out.append(f"| ViT-{variant} | {topology} | {res['chips']} | {b} ({b // res['chips']}) | "
                 f"compiler: {_refusal(s.get('error', ''))} | {res['hbm_gib']:g} | **no** | | | | | |")
      continue
    out.append(
        f"| ViT-{variant} | {topology} | {res['chips']} | {s['batch_size']} ({s['per_chip_batch']:g}) | "
        f"{_g(s['argument_bytes'])} / {_g(s['temp_bytes'])} / {_g(s['total_bytes'])} | {res['hbm_gib']:g} | "
        f"{'yes' if s['fits'] else '**no**'} | {s['flops_per_chip']:.3g} | {s['xla_cost_flops']:.3g} | "
        f"{1e3 * s['step_time_at_peak_s']:.1f} ms | {s['model_flops_per_chip']:.3g} | {100 * s['mfu_bound']:.1f}% |")
  return out


def materialize_table(runs) -> list[str]:
  out = ["| target | slice | chips | mesh | args / outputs / temps / total per chip, GiB | HBM GiB | fits "
         "| FLOPs per chip | time at peak |",
         "| --- | --- | ---: | --- | ---: | ---: | --- | ---: | ---: |"]
  for r in runs:
    res = r["result"] or {}
    s = res.get("steps", {}).get("materialize")
    if s is None:
      continue
    mesh = ", ".join(f"{k}={v}" for k, v in res["mesh"].items() if v > 1) or "1 chip"
    if "argument_bytes" not in s:
      out.append(f"| ViT-{r['row'][4]} | {res['topology']} | {res['chips']} | {mesh} | "
                 f"compiler: {_refusal(s.get('error', ''))} | {res['hbm_gib']:g} | **no** | | |")
      continue
    out.append(f"| ViT-{r['row'][4]} ({s['materialized_params'] / 1e6:.0f}M weights) | {res['topology']} | "
               f"{res['chips']} | {mesh} | {_g(s['argument_bytes'])} / {_g(s['output_bytes'])} / "
               f"{_g(s['temp_bytes'])} / {_g(s['total_bytes'])} | {res['hbm_gib']:g} | "
               f"{'yes' if s['fits'] else '**no**'} | {s['flops_per_chip']:.3g} | "
               f"{1e6 * s['step_time_at_peak_s']:.0f} us |")
  return out


def findings(runs) -> list[str]:
  """A few sentences computed from the rows (so they stay true when the table is regenerated)."""
  out = ["## Reading the numbers", ""]
  pre = [(r, r["result"]["steps"]["pretrain_step"]) for r in runs
         if r["row"][0] == "pretrain" and r["result"] and "pretrain_step" in r["result"]["steps"]]
  for variant in sorted({r["row"][1] for r, _ in pre}):
    rows = [(r, s) for r, s in pre if r["row"][1] == variant and _batch(r["row"][3]) == 4096]
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
        f"pass, no rematerialization): {tight[1]['temp_bytes'] / GIB:.1f} GiB at "
        f"{tight[1]['per_chip_batch']:g} images per chip on {tight[0]['row'][2]}.")
    for r, s in fit:
      if r["row"][2] == "v5e:16x16":
        out.append(f"  On v5e:16x16: {s['flops_per_chip']:.3g} FLOPs per chip per step, at least "
                   f"{1e3 * s['step_time_at_peak_s']:.1f} ms per step at peak, i.e. at most "
                   f"{4096 / s['step_time_at_peak_s'] / 1e3:.0f}k images/s for the slice.")
  mfu = [s["mfu_bound"] for _, s in pre if s.get("mfu_bound")]
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


def write(runs, out_path, header_note, *, made: str, date: str):
  lines = INTRO.rstrip().splitlines()
  lines += ["", f"Generated {date} by `benchmarks/scale_table.py` on: {made}.", ""]
  if header_note:
    lines += [header_note, ""]
  lines += ["## Pre-training (the default config: auxiliary ViT, global batch 4096, bf16 compute, "
            "tiles embed/mlp 64, kv 16, N = 4, AdamW; mesh data = all chips)", ""]
  lines += pretrain_table(runs)
  lines += ["", "## Materializing ViT-H/14 (the init program's export step)", ""]
  lines += materialize_table(runs)
  lines += [""] + findings(runs)
  lines += ["", "## Commands", "", "Each row, as run (with `JAX_PLATFORMS=cpu`, in the environment that has "
            "libtpu):", ""]
  lines += [f"    {r['command']}    # {r['status']}, {r['wall_s']:.0f} s" for r in runs]
  lines += [""]
  with open(out_path, "w") as f:
    f.write("\n".join(lines))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--python", default=sys.executable, help="the Python with libtpu (default: this one)")
  p.add_argument("--out", default=os.path.join(ROOT, "docs", "scale.md"))
  p.add_argument("--only", default=None, help="only rows whose model variant or topology contains this")
  p.add_argument("--timeout", type=int, default=900, help="seconds per dry run")
  p.add_argument("--render", default=None, metavar="RUNS_JSON",
                 help="only rewrite the document from the runs a previous invocation saved")
  args = p.parse_args()
  runs_path = os.path.splitext(args.out)[0] + "_runs.json"
  if args.render:
    saved = json.load(open(args.render))
    runs = saved["runs"]
    for r in runs:
      r["row"] = tuple(r["row"])
    write(runs, args.out, None, made=saved["machine"], date=saved["date"])
    print(f"wrote {args.out}")
    return
  rows = [r for r in ROWS if not args.only or args.only in r[1] or args.only in r[2]]
  runs = []
  for row in rows:
    print(f"{row[0]} {row[1]} on {row[2]} {' '.join(row[3])} ...", flush=True)
    runs.append(run_row(args.python, row, args.timeout))
    print(f"  {runs[-1]['status']} in {runs[-1]['wall_s']:.0f} s", flush=True)
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  with open(runs_path, "w") as f:
    json.dump(dict(date=date, machine=machine(), runs=runs), f, indent=1)
  write(runs, args.out, None, made=machine(), date=date)
  print(f"wrote {args.out} and {runs_path}")


if __name__ == "__main__":
  main()
