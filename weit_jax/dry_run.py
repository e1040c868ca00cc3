r"""Compile-only dry runs: the real pre-training step (and the init program's materialize step)
compiled for a TPU pod slice on any machine, with its per-chip memory and FLOPs (docs/design.md section 5).
For the control task the step is PPO's (a rollout of ``batch_size`` environments split over the
batch axes, then the updates), and the report adds environments and environment steps per chip.

With ``libtpu`` installed (the ``tpu`` extra; keep it in its own virtual environment),
``jax.experimental.topologies.get_topology_desc`` describes the chips of a slice without any TPU
attached; the step is lowered with abstract arguments (``jax.ShapeDtypeStruct`` with the run's
shardings on a mesh of those chips) and compiled by the TPU compiler. No data is read and nothing
is allocated on an accelerator.

  JAX_PLATFORMS=cpu .venv-tpu/bin/python main.py --config=configs/vit_pretrain.py \
      --config.dry_run.topology=v5e:16x16 --config.dry_run.materialize=H/14 --workdir=/tmp/dry

Topologies: ``v5e:AxB``, ``v6e:AxB``, ``v4:AxBxC``, ``v5p:AxBxC`` (chips per dimension), and
``cpu:N`` (N CPU devices of this machine, e.g. with ``--xla_force_host_platform_device_count``:
the same path on the CPU compiler, for tests; its HBM and peak FLOP/s are nominal).

Prints one report per compiled step and writes them to ``WORKDIR/dry_run.json``. Exits with
status 2 and one line on stderr when the step does not fit in the chip's memory.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from weit_jax import config_checks, generator, models, sharding, train_loop
from weit_jax.programs import pretrain

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One JAX device of a slice: a chip (v4 and v5p: both TensorCores as one 'megacore' device)."""
  generation: str
  libtpu_name: str  # the generation as libtpu's topology names spell it
  chip_config: str  # 'default' (one TensorCore per chip) or 'megacore'
  dims: int  # 2 (v5e, v6e: a 2D torus) or 3 (v4, v5p)
  hbm_gib: float  # HBM per chip
  peak_tflops: float  # dense bf16 per chip
  device_kind: str  # what jax reports, as a check
  accelerator_type: str  # Cloud TPU's name for an N-chip slice, {n} = chips, {c} = cores


# Public Cloud TPU specifications (per chip).
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "v4", "megacore", 3, 32, 275, "TPU v4", "v4-{c}"),
    "v5e": Chip("v5e", "v5e", "default", 2, 16, 197, "TPU v5 lite", "v5litepod-{n}"),
    "v5p": Chip("v5p", "v5", "megacore", 3, 95, 459, "TPU v5", "v5p-{c}"),
    "v6e": Chip("v6e", "v6e", "default", 2, 32, 918, "TPU v6 lite", "v6e-{n}"),
    # This machine's CPU devices: the same compile path on the CPU compiler (tests). Nominal numbers.
    "cpu": Chip("cpu", "", "", 1, 16, 1, "cpu", "cpu-{n}"),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as given, e.g. 'v5e:16x16'
  chip: Chip
  shape: tuple[int, ...]

  @property
  def num_chips(self) -> int:
    return math.prod(self.shape)


def parse_topology(name: str) -> Topology:
  m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", (name or "").strip().lower())
  forms = "v5e:4x4, v5e:16x16, v6e:8x8, v4:2x2x4, v5p:4x4x4, cpu:8"
  if not m or m.group(1) not in CHIPS:
    raise ValueError(f"dry_run.topology={name!r}: use GENERATION:SHAPE with GENERATION one of "
                     f"{sorted(CHIPS)}, e.g. {forms}.")
  chip = CHIPS[m.group(1)]
  shape = tuple(int(s) for s in m.group(2).split("x"))
  if len(shape) != chip.dims or min(shape) < 1:
    raise ValueError(f"dry_run.topology={name!r}: {chip.generation} slices have {chip.dims} dimension(s) of "
                     f"chips, e.g. {forms}.")
  return Topology(name, chip, shape)


def topology_devices(topo: Topology) -> list:
  """The devices of the slice: compile-only TPU devices from libtpu, or this machine's CPUs."""
  if topo.chip.generation == "cpu":
    devices = jax.devices("cpu")
    if topo.num_chips > len(devices):
      raise ValueError(f"dry_run.topology={topo.name}: this process has {len(devices)} CPU device(s); set "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={topo.num_chips} before starting it.")
    return devices[:topo.num_chips]
  from jax.experimental import topologies
  chip, shape = topo.chip, topo.shape
  full = shape + (1,) * (3 - len(shape))
  host = tuple(min(b, s) for b, s in zip((2, 2, 1), full))  # 4 chips per host (2x2x1)
  if chip.dims == 2:  # v5e/v6e: a full 16-chip dimension wraps around (maxtext's system table)
    wrap = tuple(s == 16 for s in shape) + (False,)
  else:  # v4/v5p: slices of 4x4x4 and up are tori
    wrap = (min(shape) >= 4,) * 3
  # libtpu looks for a TPU VM's environment first; these only quiet its warnings here.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", chip.accelerator_type.format(n=topo.num_chips, c=2 * topo.num_chips))
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_ID", "0")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  libtpu_name = f"{chip.libtpu_name}:{'x'.join(map(str, shape))}"
  try:
    desc = topologies.get_topology_desc(libtpu_name, "tpu", chip_config_name=chip.chip_config,
                                        chips_per_host_bounds=host, num_slices=1, wrap=wrap)
  except RuntimeError as e:
    if "TPU support not installed" in str(e) or "libtpu" in str(e).lower():
      raise ValueError(
          "compile-only TPU dry runs need libtpu: install the 'tpu' extra into its own virtual "
          "environment (python3 -m venv .venv-tpu && .venv-tpu/bin/pip install -e '.[tpu]') and run "
          "main.py with that Python; `--config.dry_run.topology=cpu:8` runs the same path on CPU devices.") from e
    raise ValueError(f"libtpu rejected topology {libtpu_name!r}: {str(e).splitlines()[0]}") from e
  devices = list(desc.devices)
  if len(devices) != topo.num_chips:
    raise ValueError(f"libtpu describes {len(devices)} devices for {topo.name}, expected {topo.num_chips}.")
  return devices


# --- what is compiled ----------------------------------------------------------------------------

def _abstract(tree, shardings):
  return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def compile_pretrain_step(config, mesh, setup=None):
  """The pre-training step exactly as ``train_loop.run`` jits it, lowered with abstract state, a
  batch of ``config.batch_size`` (none for a task that collects its own: control's rollouts) and the
  step key. Returns (compiled, task, seconds)."""
  setup = setup or pretrain.build(config)
  task = pretrain.make_task(config, setup)  # a distillation teacher is not modelled (see run())
  abstract, shardings = train_loop.state_shardings(task, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  step = train_loop.make_train_step(task, shardings, batch_sh, mesh)
  cfg, b = setup.model_config, int(config.batch_size)
  if task.experience is not None:  # the step collects its own batch (rollouts of batch_size environments)
    batch = None
  else:
    batch = {"image": jax.ShapeDtypeStruct((b, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32,
                                           sharding=batch_sh),
             "labels": jax.ShapeDtypeStruct((b, cfg.num_classes), jnp.float32, sharding=batch_sh)}
  key = jax.eval_shape(jax.random.key, 0)
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
  t0 = time.time()
  compiled = step.lower(_abstract(abstract, shardings), batch, key).compile()
  return compiled, task, time.time() - t0


def compile_materialize(config, setup, target: str, mesh):
  """The init program's materialize step for ``target`` (e.g. 'H/14'): templates and scalers, sharded
  by the rules, -> the plain parameters, straight into the target's shardings. Returns (compiled,
  the target's model config, a note when the pre-training config's templates cannot feed it, seconds)."""
  fields = models.parse_targets(target, models.family_of(setup.model_config))
  if len(fields) != 1:
    raise ValueError(f"dry_run.materialize={target!r}: give one target size.")
  cfg = models.target_config(fields[0], setup.model_config)
  gen = generator.WeightGenerator.from_model(models.build(cfg), *models.dummy_inputs(cfg), tiles=dict(config.weit.tiles),
                                             num_templates=int(config.weit.num_templates),
                                             whole=setup.gen.whole_shapes())
  note = None
  try:
    gen.check_templates(setup.gen.template_shapes())
  except ValueError as e:
    note = (f"the templates of this pre-training config ({setup.model_config.short_name()}) cannot feed "
            f"{cfg.short_name()} ({e}); compiled with templates of the target's own tile shapes, as a "
            "pre-training run with its patch size would make.")
  t_sh = sharding.shardings(gen.template_shapes(), gen.template_axes(), mesh)
  s_sh = sharding.shardings(gen.scaler_shapes(), gen.scaler_axes(), mesh)
  out_sh = sharding.shardings(gen.param_shapes(), gen.param_axes(), mesh)
  fn = jax.jit(functools.partial(gen.materialize, shardings=out_sh), in_shardings=(t_sh, s_sh),
               out_shardings=out_sh)
  t0 = time.time()
  compiled = fn.lower(_abstract(gen.template_shapes(), t_sh), _abstract(gen.scaler_shapes(), s_sh)).compile()
  return compiled, cfg, gen, note, time.time() - t0


# --- what is reported ----------------------------------------------------------------------------

def analyze(compiled, chip: Chip, hbm_gib: float) -> dict[str, Any]:
  """Per-chip memory (XLA's buffer assignment) and FLOPs of a compiled step (its per-chip SPMD
  program): ``flops_per_chip`` counts the dots and convolutions of the optimized HLO with every loop
  body counted as often as it runs (``hlo_matmul_flops``); ``xla_cost_flops`` is XLA's own
  ``cost_analysis()``, which includes elementwise work but counts a loop body once."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  args, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
  alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
  code = int(mem.generated_code_size_in_bytes)
  total = args + out - alias + temp + code
  flops, notes = hlo_matmul_flops(compiled.as_text())
  peak = chip.peak_tflops * 1e12
  return dict(argument_bytes=args, output_bytes=out, alias_bytes=alias, temp_bytes=temp, code_bytes=code,
              total_bytes=total, hbm_bytes=int(hbm_gib * GIB), fits=total <= hbm_gib * GIB,
              flops_per_chip=flops, xla_cost_flops=float(cost.get("flops", 0.0)) if cost else 0.0,
              flops_notes=notes, peak_flops_per_chip=peak, step_time_at_peak_s=flops / peak)


_COMP_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\][^ ]*\s+([\w\-]+)\((.*)$")
_WHILE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\(.*\)\S*\s+while\((.*)$")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")


def _conv_fma(lhs: list[int], rhs: list[int], out: list[int], attrs: str) -> float:
  """Multiply-adds of an HLO convolution, counting only kernel positions that meet real (not
  padding, not dilation-hole) input, as XLA's own cost analysis does: TPU HLO writes batched dots as
  convolutions whose window spans the batch dimensions with lhs dilation, so most window positions
  are empty."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
  if not labels or not (len(labels.group(1)) == len(lhs) and len(labels.group(2)) == len(rhs)
                        and len(labels.group(3)) == len(out)):
    return 0.0
  l_lab, r_lab, o_lab = labels.groups()
  spatial = sorted(c for c in r_lab if c.isdigit())
  window = re.search(r"window=\{([^}]*)\}", attrs)
  fields = dict(kv.split("=", 1) for kv in window.group(1).split()) if window else {}

  def per_dim(key, default):
    if key not in fields:
      return [default] * len(spatial)
    return [tuple(int(v) for v in x.split("_")) if "_" in x else int(x) for x in fields[key].split("x")]

  strides, pads = per_dim("stride", 1), per_dim("pad", (0, 0))
  lhs_dil, rhs_dil = per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)
  valid = 1
  for j, d in enumerate(spatial):
    size_in, size_k, size_out = lhs[l_lab.index(d)], rhs[r_lab.index(d)], out[o_lab.index(d)]
    dilated = (size_in - 1) * lhs_dil[j] + 1
    count = 0
    for o in range(size_out):
      for k in range(size_k):
        pos = o * strides[j] + k * rhs_dil[j] - pads[j][0]
        if 0 <= pos < dilated and pos % lhs_dil[j] == 0:
          count += 1
    valid *= count
  return float(rhs[r_lab.index("i")] * rhs[r_lab.index("o")] * out[o_lab.index("b")] * valid)


def hlo_matmul_flops(hlo_text: str) -> tuple[float, list[str]]:
  """FLOPs of the dots and convolutions of an (optimized, per-device) HLO module, with every
  while loop's body counted as often as the loop runs.

  XLA's ``cost_analysis()`` counts a loop body once, so for a model whose layers are a ``scan``
  (the ViT's encoder) it undercounts by about the depth. Here the trip count comes from XLA's
  ``known_trip_count`` where the compiler records it, else from the loop condition (``i < N``
  against a constant, as ``lax.scan`` emits). Multiply-add = 2 FLOPs;
  padding of convolutions is ignored (exact for dots written as convolutions). Returns (FLOPs,
  notes about loops whose trip count could not be read).
  """
  comps: dict[str, list[str]] = {}
  entry, name = None, None
  for line in hlo_text.splitlines():
    if name is None:
      m = _COMP_HEADER.match(line)
      if m and line.rstrip().endswith("{"):
        name = m.group(1)
        comps[name] = []
        if line.startswith("ENTRY"):
          entry = name
      continue
    if line.startswith("}"):
      name = None
      continue
    comps[name].append(line)
  notes: list[str] = []

  def trip_count(loop: str, cond: str) -> int | None:
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop)
    if known:  # XLA's own analysis (the CPU compiler records it)
      return int(known.group(1))
    # Else the condition ``i < N`` as lax.scan emits it (the compare may sit in a fusion): its
    # one integer constant.
    consts = set()
    for line in comps.get(cond, ()):
      m = _INSTR.match(line)
      if m and m.group(4) == "constant" and m.group(2) in ("s32", "s64", "u32", "u64") and not m.group(3):
        c = re.match(r"\s*(-?\d+)\)", m.group(5))
        if c:
          consts.add(int(c.group(1)))
    return consts.pop() if len(consts) == 1 and min(consts) > 0 else None

  memo: dict[str, float] = {}

  def flops(comp: str) -> float:
    if comp in memo:
      return memo[comp]
    memo[comp] = 0.0  # no recursion in HLO; guards against surprises
    shapes: dict[str, list[int]] = {}
    total = 0.0
    for line in comps.get(comp, ()):
      w = _WHILE.match(line)
      if w:  # a tuple-shaped instruction: the loop
        iname, rest = w.groups()
        body = re.search(r"body=%?([\w.\-]+)", rest)
        cond = re.search(r"condition=%?([\w.\-]+)", rest)
        n = trip_count(rest, cond.group(1)) if cond else None
        if n is None:
          notes.append(f"while loop {iname}: trip count unknown, its body is counted once")
          n = 1
        if body:
          total += n * flops(body.group(1))
        continue
      m = _INSTR.match(line)
      if not m:
        for kind, callee in _CALLEE.findall(line):  # other tuple-shaped calls (fusions, calls)
          if kind in ("calls", "to_apply"):
            total += flops(callee)
        continue
      iname, _, dims, op, rest = m.groups()
      shape = [int(d) for d in dims.split(",") if d]
      shapes[iname] = shape
      operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
      out = math.prod(shape)
      if op == "dot" and operands and operands[0] in shapes:
        c = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        lhs = shapes[operands[0]]
        k = math.prod(lhs[int(i)] for i in c.group(1).split(",") if i) if c else 1
        total += 2.0 * out * k
      elif op == "convolution" and len(operands) > 1 and operands[0] in shapes and operands[1] in shapes:
        total += 2.0 * _conv_fma(shapes[operands[0]], shapes[operands[1]], shape, rest)
      for kind, callee in _CALLEE.findall(rest):
        if kind in ("calls", "to_apply"):
          total += flops(callee)
      for group in _BRANCHES.findall(rest):
        branches = re.findall(r"%?([\w.\-]+)", group)
        if branches:  # a conditional runs one branch: count the largest
          total += max(flops(b) for b in branches)
    memo[comp] = total
    return total

  if entry is None:
    return 0.0, ["no ENTRY computation in the HLO text"]
  return flops(entry), notes


def _gib(b: float) -> str:
  for unit, size in (("GiB", GIB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if b >= 0.1 * size or unit == "KiB":
      return f"{b / size:.2f} {unit}"
  return f"{b} B"


def format_report(title: str, r: dict[str, Any]) -> str:
  lines = [title,
           f"  per chip: arguments {_gib(r['argument_bytes'])}, outputs {_gib(r['output_bytes'])} "
           f"(of which aliased to arguments {_gib(r['alias_bytes'])}), temporaries {_gib(r['temp_bytes'])}, "
           f"code {_gib(r['code_bytes'])}",
           f"  per chip total {_gib(r['total_bytes'])} of {_gib(r['hbm_bytes'])} HBM "
           f"({100 * r['total_bytes'] / r['hbm_bytes']:.0f}%): {'fits' if r['fits'] else 'DOES NOT FIT'}",
           f"  FLOPs per chip {r['flops_per_chip']:.3e} (dots and convolutions of the compiled HLO, loops "
           f"unrolled; XLA's cost analysis, which counts a loop body once: {r['xla_cost_flops']:.3e})",
           f"  -> at least {1e3 * r['step_time_at_peak_s']:.2f} ms per step at the peak "
           f"{r['peak_flops_per_chip'] / 1e12:g} TFLOP/s (bf16)"]
  lines += [f"  note: {n}" for n in r.get("flops_notes", ())]
  if r.get("env_steps_per_step_per_chip"):
    lines.append(f"  {r['environments_per_chip']:g} environments per chip, {r['env_steps_per_step_per_chip']:g} "
                 f"environment steps per chip per step: at most {r['env_steps_per_s_at_peak']:.3g} environment "
                 "steps/s per chip at that bound (it counts the policy's dots; the simulator's elementwise "
                 "physics is not in it, so the real rate is lower)")
  if r.get("model_flops_per_chip"):
    lines.append(f"  model FLOPs per chip {r['model_flops_per_chip']:.3e} (the plain model's matmuls, convolutions and attention, "
                 f"forward and backward): MFU at most {100 * r['mfu_bound']:.1f}% (the rest of the compiled FLOPs: "
                 "materializing the weights from templates, recomputation)")
  lines.append(f"  compiled in {r['compile_s']:.1f} s")
  return "\n".join(lines)


def run(config, workdir: str | None = None) -> dict[str, Any]:
  """The dry run ``config.dry_run`` describes; prints its reports, writes ``WORKDIR/dry_run.json``.
  Raises SystemExit(2) after one line on stderr when a step does not fit."""
  if config.program != "pretrain":
    raise ValueError(f"dry runs compile the pre-training step (config.program={config.program!r}); use "
                     "configs/vit_pretrain.py, with --config.dry_run.materialize=TARGET for the init "
                     "program's materialize step.")
  config_checks.check_ranges(config)
  dry = config.dry_run
  target = dry.get("materialize")
  if not target and not dry.get("pretrain_step", True):
    raise ValueError("dry_run.pretrain_step=False leaves nothing to compile; give --config.dry_run.materialize=TARGET.")
  topo = parse_topology(dry.topology)
  hbm = float(dry.get("hbm_gib") or topo.chip.hbm_gib)
  devices = topology_devices(topo)
  mesh = sharding.make_mesh(dict(config.mesh), devices=devices)
  kind = devices[0].device_kind
  print(f"Dry run on {topo.name}: {len(devices)} x {kind} ({hbm:g} GiB HBM, {topo.chip.peak_tflops:g} TFLOP/s "
        f"bf16 each); mesh {dict(mesh.shape)}; nothing is allocated, no data is read.", flush=True)
  if config.get("distill") and config.distill.get("teacher"):
    print("  note: the distillation teacher is not part of the compiled step (its memory is not counted).")
  results: dict[str, Any] = dict(topology=topo.name, chips=len(devices), device_kind=kind, hbm_gib=hbm,
                                 peak_tflops=topo.chip.peak_tflops, mesh=dict(mesh.shape),
                                 jax_version=jax.__version__, steps={})
  failures = []

  def record(name, title, compiled_fn):
    try:
      out = compiled_fn()
    except Exception as e:  # the TPU compiler refuses programs that exceed HBM
      text = str(e)
      if "RESOURCE_EXHAUSTED" in text or "ran out of memory" in text.lower():
        first = next((l for l in text.splitlines() if l.strip()), text)[:300]
        failures.append(f"{name} does not fit on {topo.name} ({kind}, {hbm:g} GiB HBM): {first}")
        results["steps"][name] = dict(fits=False, error=first)
        print(f"{title}\n  compilation failed: {first}", flush=True)
        return None
      raise
    compiled, extra, seconds = out
    r = dict(analyze(compiled, topo.chip, hbm), compile_s=round(seconds, 1), **extra)
    if r.get("env_steps_per_step_per_chip") and r["step_time_at_peak_s"]:
      r["env_steps_per_s_at_peak"] = r["env_steps_per_step_per_chip"] / r["step_time_at_peak_s"]
    if r.get("model_flops_per_chip") and r["flops_per_chip"]:
      r["mfu_bound"] = r["model_flops_per_chip"] / r["flops_per_chip"]
    results["steps"][name] = r
    print(format_report(title, r), flush=True)
    if not r["fits"]:
      failures.append(f"{name} does not fit on {topo.name}: {_gib(r['total_bytes'])} per chip "
                      f"> {_gib(r['hbm_bytes'])} HBM ({kind}); use more chips, fsdp/model sharding "
                      "(--config.mesh.fsdp=N), or a smaller batch")
    return r

  setup = pretrain.build(config)

  def pretrain_step():
    compiled, task, seconds = compile_pretrain_step(config, mesh, setup)
    cfg, b = setup.model_config, int(config.batch_size)
    # train_flops counts one pass over b examples; a PPO step (control) makes unroll x b of them and
    # passes over those epochs times: no model-FLOPs bound is claimed for it.
    train_flops = models.family_of(cfg).train_flops if task.experience is None else None
    model_flops = train_flops(cfg, b) / len(devices) if train_flops else None
    counts = setup.gen.counts()
    batch_ways = sharding.batch_ways(mesh)  # the batch's shards (model: split work)
    extra = dict(model=cfg.short_name(), batch_size=b, per_chip_batch=b / batch_ways,
                 model_flops_per_chip=model_flops,
                 template_params=counts["templates"], scaler_params=counts["scalers"],
                 materialized_params=counts["materialized"])
    if task.experience is not None:  # control: b environments, each chip steps its own
      extra.update(environments_per_chip=b / batch_ways,
                   env_steps_per_step_per_chip=task.experience.env_steps_per_update / batch_ways)
    return compiled, extra, seconds

  variant = config.model.get("variant")
  if dry.get("pretrain_step", True):
    record("pretrain_step", f"Pre-training step, auxiliary {config.model.get('family', 'vit')} {variant or ''} "
           f"(global batch {config.batch_size}):",
           pretrain_step)

  if target:
    # The init program's mesh (by default fsdp over every chip), not the pre-training one.
    init_mesh = sharding.make_mesh(dict(dry.get("materialize_mesh") or sharding.FSDP_ALL), devices=devices)

    def materialize_step():
      compiled, cfg, gen, note, seconds = compile_materialize(config, setup, target, init_mesh)
      advice = sharding.split_advice(gen.param_shapes(), gen.param_axes(), init_mesh,
                                     flag="--config.dry_run.materialize_mesh")
      for line in filter(None, (note, advice)):
        print(f"  note: {line}")
      counts = gen.counts()
      return compiled, dict(model=cfg.short_name(), mesh=dict(init_mesh.shape),
                            materialized_params=counts["materialized"],
                            template_params=counts["templates"], scaler_params=counts["scalers"],
                            note=note, split_advice=advice), seconds
    record("materialize", f"Materialize step of the init program, target {target}, mesh "
           f"{dict(init_mesh.shape)}:", materialize_step)

  if workdir:
    from etils import epath
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "dry_run.json").write_text(json.dumps(results, indent=2, default=str))
  if failures:
    print(f"error: {failures[0]}", file=sys.stderr, flush=True)
    raise SystemExit(2)
  return results
