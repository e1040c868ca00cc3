"""Compile-only dry runs (weit_jax/dry_run.py): the real pre-training and materialize steps compiled
for a slice, memory and FLOPs read back. Here on the CPU compiler with this process's 8 fake
devices (``cpu:N``); with libtpu installed (the ``tpu`` extra, in its own environment) also for a
real TPU topology."""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from configs import vit_pretrain
from weit_jax import dry_run
from weit_jax.models import vit

TINY = {"model.variant": "mu/4", "weit.tiles": dict(embed=8, mlp=8, heads=1, kv=8), "weit.num_templates": 3,
        "batch_size": 64, "optim.warmup_steps": 2}


def tiny_config(topology="cpu:8", **dry):
  c = ml_collections.ConfigDict(vit_pretrain.get_config("runlocal").to_dict())
  for path, value in TINY.items():
    *parents, leaf = path.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  c.dry_run.topology = topology
  c.dry_run.update(dry)
  return c


def test_parse_topology():
  t = dry_run.parse_topology("v5e:16x16")
  assert (t.chip.generation, t.shape, t.num_chips, t.chip.hbm_gib, t.chip.peak_tflops) == ("v5e", (16, 16), 256, 16, 197)
  assert dry_run.parse_topology("v4:2x2x4").num_chips == 16
  assert dry_run.parse_topology("v5p:4x4x4").chip.libtpu_name == "v5"
  for bad in ("v5e:4x4x4", "v7:4x4", "v5e", "v4:2x2"):
    with pytest.raises(ValueError, match="dry_run.topology"):
      dry_run.parse_topology(bad)
  with pytest.raises(ValueError, match="xla_force_host_platform_device_count=16"):
    dry_run.topology_devices(dry_run.parse_topology("cpu:16"))


def test_hlo_flops_count_loop_bodies_as_often_as_they_run():
  """XLA's cost analysis counts a scan's body once; the HLO count multiplies by the trip count."""
  def f(x, w):
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=7)[0]
  x, w = jnp.ones((32, 64)), jnp.ones((64, 64))
  compiled = jax.jit(f).lower(x, w).compile()
  flops, notes = dry_run.hlo_matmul_flops(compiled.as_text())
  assert notes == []
  assert flops == 7 * 2 * 32 * 64 * 64


# A TPU-style module (shapes from the ViT-B/16 step compiled for v5e): a batched dot written as a
# convolution whose window spans the batch dimensions with lhs dilation, inside a scanned loop.
TPU_HLO = """
HloModule jit_step

%fused_computation.1 (param_0: bf16[16,197,12,64], param_1: bf16[16,197,12,64]) -> bf16[16,12,197,197] {
  %param_0 = bf16[16,197,12,64]{3,2,1,0} parameter(0)
  %param_1 = bf16[16,197,12,64]{3,2,1,0} parameter(1)
  ROOT %convolution.1 = bf16[16,12,197,197]{3,2,1,0} convolution(%param_0, %param_1), window={size=16x12 stride=15x11 lhs_dilate=16x12}, dim_labels=0b1f_0o1i->01bf
}

%cond (p: (s32[], bf16[16,197,12,64])) -> pred[] {
  %p = (s32[], bf16[16,197,12,64]{3,2,1,0}) parameter(0)
  %constant.9 = s32[] constant(12)
  %gte = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%gte, %constant.9), direction=LT
}

%body (p: (s32[], bf16[16,197,12,64])) -> (s32[], bf16[16,197,12,64]) {
  %p = (s32[], bf16[16,197,12,64]{3,2,1,0}) parameter(0)
  %x = bf16[16,197,12,64]{3,2,1,0} get-tuple-element(%p), index=1
  %fusion.1 = bf16[16,12,197,197]{3,2,1,0} fusion(%x, %x), kind=kOutput, calls=%fused_computation.1
  %patches = bf16[16,14,14,768]{3,2,1,0} parameter(1)
  %kernel = bf16[16,16,3,768]{3,2,1,0} parameter(2)
  %image = bf16[16,224,224,3]{3,2,1,0} parameter(3)
  %convolution.2 = bf16[16,14,14,768]{3,2,1,0} convolution(%image, %kernel), window={size=16x16 stride=16x16}, dim_labels=b01f_01io->b01f
  ROOT %t = (s32[], bf16[16,197,12,64]{3,2,1,0}) tuple(%gte, %x)
}

ENTRY %main (a: bf16[16,197,12,64]) -> (s32[], bf16[16,197,12,64]) {
  %a = bf16[16,197,12,64]{3,2,1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[16,197,12,64]{3,2,1,0}) tuple(%zero, %a)
  ROOT %while.1 = (s32[], bf16[16,197,12,64]{3,2,1,0}) while(%init), condition=%cond, body=%body
}
"""


def test_hlo_flops_of_tpu_style_batched_dots_and_patch_convolutions():
  flops, notes = dry_run.hlo_matmul_flops(TPU_HLO)
  assert notes == []
  scores = 2 * 16 * 12 * 197 * 197 * 64  # batch 16 x heads 12 of (197 x 64) @ (64 x 197)
  patches = 2 * 16 * 14 * 14 * 768 * (16 * 16 * 3)
  assert flops == 12 * (scores + patches)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("dry"))
  c = tiny_config(materialize="depth=3,width=48,heads=3")
  c.mesh = dict(data=2, fsdp=2, model=2)
  return dry_run.run(c, workdir), workdir


def test_dry_run_compiles_the_real_steps_and_reports_memory_and_flops(report):
  results, workdir = report
  assert json.loads(open(os.path.join(workdir, "dry_run.json")).read())["steps"].keys() == {"pretrain_step",
                                                                                           "materialize"}
  assert results["chips"] == 8 and results["mesh"] == {"data": 2, "fsdp": 2, "model": 2}
  step = results["steps"]["pretrain_step"]
  assert step["fits"] and step["per_chip_batch"] == 16  # 64 over data x fsdp; model splits the work
  assert 0 < step["argument_bytes"] and 0 < step["temp_bytes"] < step["total_bytes"] < step["hbm_bytes"]
  # The state (templates, scalers, Adam moments: float32; templates sharded along their tile axes
  # over fsdp and model) is an argument, donated to the outputs.
  full = 4 * (3 * step["template_params"] + 3 * step["scaler_params"])
  assert full / 4 < step["argument_bytes"] < full + 16 * 28 * 28 * 4 + 16 * 10 * 4 + 4096
  assert step["alias_bytes"] > 0.9 * (step["argument_bytes"] - 16 * 28 * 28 * 4 - 16 * 10 * 4 - 4096)
  # FLOPs: the plain ViT's model FLOPs plus materializing the weights, per chip; the scan over
  # layers makes XLA's own count smaller.
  cfg = vit.make_config("mu/4", image_size=28, channels=1, num_classes=10)
  assert step["model_flops_per_chip"] == pytest.approx(vit.train_flops(cfg, 64) / 8)
  assert step["model_flops_per_chip"] < step["flops_per_chip"] < 3 * step["model_flops_per_chip"]
  assert step["xla_cost_flops"] < step["flops_per_chip"]
  assert 0.3 < step["mfu_bound"] < 1
  assert step["step_time_at_peak_s"] == pytest.approx(step["flops_per_chip"] / 1e12)
  mat = results["steps"]["materialize"]
  assert mat["model"] == "d3-w48-h3-m96-p4" and mat["fits"] and mat["note"] is None
  # On the init program's default mesh (fsdp over all 8 chips, not the pre-training mesh above),
  # float32 weights written straight into their shardings: every chip holds about an eighth (more
  # where a dimension does not split), and computes no more than that.
  assert mat["mesh"] == {"data": 1, "fsdp": 8, "model": 1}
  assert 4 * mat["materialized_params"] / 8 <= mat["output_bytes"] < 0.2 * 4 * mat["materialized_params"]
  assert mat["temp_bytes"] <= mat["output_bytes"]
  assert mat["flops_per_chip"] > 0


def test_the_control_step_compiles_with_its_environments_split(tmp_path):
  """The PPO step of the control task (a rollout of batch_size brax environments, then the updates)
  compiled for the 8 CPU devices: each chip holds and steps batch_size / 8 environments; the
  environment-step bound is the chip's share of a step's environment steps over the step's time at
  peak."""
  from configs import policy_pretrain
  c = ml_collections.ConfigDict(policy_pretrain.get_config("runlocal").to_dict())
  c.model.update(dict(variant="mu", width=16, depth=2))
  c.weit.update(dict(tiles=dict(hidden=8, hidden_in=8), num_templates=2))
  c.update(dict(env="inverted_pendulum", batch_size=16, episode_length=20, eval_episodes=2))
  c.ppo.update(dict(unroll_length=4, num_minibatches=2, epochs=1))
  c.dry_run.topology = "cpu:8"
  step = dry_run.run(c, str(tmp_path))["steps"]["pretrain_step"]
  assert step["fits"] and step["environments_per_chip"] == 2 and step["env_steps_per_step_per_chip"] == 8
  assert step["model_flops_per_chip"] is None and "mfu_bound" not in step  # no one-pass model FLOPs for PPO
  assert step["flops_per_chip"] > 0
  assert step["env_steps_per_s_at_peak"] == pytest.approx(8 / (step["flops_per_chip"] / 1e12))


def test_only_the_materialize_step_on_a_mesh_of_choice(tmp_path):
  c = tiny_config(materialize="depth=2,width=64,heads=4", pretrain_step=False)
  c.dry_run.materialize_mesh = dict(data=2, fsdp=4, model=1)
  results = dry_run.run(c, str(tmp_path))
  assert results["steps"].keys() == {"materialize"}
  assert results["steps"]["materialize"]["mesh"] == {"data": 2, "fsdp": 4, "model": 1}
  assert results["steps"]["materialize"]["split_advice"] is None  # no weight of 2^22+ elements per chip
  with pytest.raises(ValueError, match="pretrain_step=False leaves nothing to compile"):
    dry_run.run(tiny_config(pretrain_step=False), str(tmp_path))


def test_a_template_set_that_cannot_feed_the_target_is_noted():
  from weit_jax import sharding
  from weit_jax.programs import pretrain
  c = tiny_config()
  mesh = sharding.make_mesh({"fsdp": 2}, devices=jax.devices()[:2])
  _, cfg, _, note, _ = dry_run.compile_materialize(c, pretrain.build(c), "mu/2", mesh)
  assert cfg.patch_size == 2 and "cannot feed d2-w32-h2-m64-p2" in note


def test_a_step_that_does_not_fit_is_refused_with_the_report_written(tmp_path, capsys):
  """In process, on the report's config and mesh (the session's compilation cache has its step once
  the report fixture has run): exit 2 after one ``error:`` line, the last on stderr; the table says
  so, and the report is on disk."""
  c = tiny_config(hbm_gib=0.0001)
  c.mesh = dict(data=2, fsdp=2, model=2)
  with pytest.raises(SystemExit) as stopped:
    dry_run.run(c, str(tmp_path))
  out, err = capsys.readouterr()
  lines = [l for l in err.splitlines() if l.strip()]
  assert stopped.value.code == 2 and lines[-1].startswith("error: pretrain_step does not fit on cpu:8:"), err
  assert sum(l.startswith("error:") for l in lines) == 1
  assert "DOES NOT FIT" in out
  assert json.loads((tmp_path / "dry_run.json").read_text())["steps"]["pretrain_step"]["fits"] is False


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu (the 'tpu' extra; see docs/scale.md)")
def test_tpu_topology_compiles_without_a_tpu(tmp_path):
  c = tiny_config("v5e:2x2")
  results = dry_run.run(c, str(tmp_path))
  assert results["device_kind"] == "TPU v5 lite" and results["chips"] == 4
  step = results["steps"]["pretrain_step"]
  assert step["fits"] and step["hbm_bytes"] == 16 * 2 ** 30
  assert step["model_flops_per_chip"] <= step["flops_per_chip"] < 3 * step["model_flops_per_chip"]
