"""Multi-host on one machine: two JAX processes x 4 CPU devices (gloo collectives) pre-train a tiny
model through ``main.py``; the same steps in 1 process x 8 devices give the same losses; the checkpoint and an export they write restore on 8, 4 (another mesh) and 1 device(s);
and training continues in one process from the data position the two processes reached. The
control task's PPO pre-training runs the same way (each process stepping its own environments),
stopped and resumed in one process.

Run as a script (``python tests/test_multihost.py FLAGS...``), this file is one of the workers:
it runs ``main.py``'s program, then exports the materialized auxiliary model from the workdir, as
every process of a pod would.
"""
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, MORE_STEPS = 6, 9  # 2 processes train 6 steps, 1 process 9; the 2-process run then resumes to 9
# Losses of 2 processes x 4 devices vs 1 process x 8 devices: the same global batches and the same
# per-device program (the workers compile with this test process's code-generation flags); the
# cross-process all-reduce (gloo) may sum in another order. Observed: at most 2e-7,
# relative. Consecutive batches' losses differ by
# ~3e-4 here (steps 3 on; at steps 1-2 the zero-initialized head predicts uniformly), so a batch
# out of place would show.
RTOL, ATOL = 1e-5, 1e-6
PROCESS_TIMEOUT_S = 300
# A worker's flags: this process's (conftest.py), on 4 devices instead of 8.
WORKER_XLA_FLAGS = os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=4")


def overrides(idx_dir: str, data_dir: str) -> dict:
  """The runlocal pre-training config made tiny (flattened ``--config.`` paths)."""
  return {
      "model.variant": "mu/4", "weit.tiles.embed": 8, "weit.tiles.mlp": 8, "weit.tiles.kv": 8,
      "weit.num_templates": 3, "batch_size": 32, "total_steps": STEPS, "checkpoint_every": 3,
      "log_every": 1, "eval_every": 0, "optim.warmup_steps": 2,
      "optim.schedule": "constant",  # after warmup: the run length does not change the steps
      # A small learning rate: Adam moves every weight by about +-lr per step whatever the size of
      # its gradient, so where a gradient is near zero, rounding noise (sums in another order)
      # picks the sign, and the runs drift apart. With lr 2e-3 their losses differed by 1e-5
      # (relative) at step 6 and growing; with 1e-4 by 2e-7.
      "optim.lr": 1e-4,
      "data.idx_dir": idx_dir, "data.data_dir": data_dir, "data.read_threads": 2,
      "data.prefetch_buffer_size": 16, "data.flip": False, "data.crop_padding": 0,
  }


def apply(config, values: dict):
  for path, value in values.items():
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


# --- the worker ------------------------------------------------------------------------------------

def _worker(argv):
  """``main.py``'s program with these flags, then an export of the auxiliary model's parameters,
  materialized inside jit straight onto a mesh that spans both processes."""
  sys.path.insert(0, ROOT)
  import main as entry
  from absl import flags
  flags.FLAGS(["main.py", *argv])
  entry.main([])
  import jax
  print(f"worker {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local devices, "
        "trained", flush=True)
  if not os.environ.get("WEIT_TEST_EXPORT"):
    return
  from weit_jax import exports, sharding
  from weit_jax.programs import pretrain
  config, setup, params, step = pretrain.restore_templates(flags.FLAGS.workdir)
  gen = setup.gen
  mesh = sharding.make_mesh({"fsdp": -1})
  out = sharding.shardings(gen.param_shapes(), gen.param_axes(), mesh)
  plain = jax.jit(gen.materialize, out_shardings=out)(params["templates"], params["scalers"])
  exports.write(os.path.join(flags.FLAGS.workdir, "export"), plain,
                dict(model=dataclasses.asdict(setup.model_config), step=step))
  print(f"worker {jax.process_index()} of {jax.process_count()}: exported", flush=True)


if __name__ == "__main__":
  _worker(sys.argv[1:])
  sys.exit(0)


# --- the tests -------------------------------------------------------------------------------------

import chex  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from configs import vit_pretrain  # noqa: E402
from weit_jax import checkpoint, exports, sharding, train_loop # noqa: E402
from weit_jax.programs import pretrain  # noqa: E402


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(learnable_data):
  """The tiny learnable dataset, built once here so the workers never race to build it."""
  c = learnable_data(ml_collections.ConfigDict(vit_pretrain.get_config("runlocal").to_dict()))
  return c.data.idx_dir, c.data.data_dir


def make_config(data, **changes):
  c = ml_collections.ConfigDict(vit_pretrain.get_config("runlocal").to_dict())
  apply(c, overrides(*data))
  c.update(changes)
  return c


def read_losses(workdir) -> dict[int, float]:
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if "loss" in r:
        assert r["step"] not in out, f"step {r['step']} logged twice: more than one process writes metrics"
        out[r["step"]] = r["loss"]
  return out


def worker_env(coordinator: str, i: int, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  for var in ("WEIT_COORDINATOR", "WEIT_NUM_PROCESSES", "WEIT_PROCESS_ID"):
    env.pop(var, None)
  return dict(env, XLA_FLAGS=WORKER_XLA_FLAGS, WEIT_COORDINATOR=coordinator, WEIT_NUM_PROCESSES="2",
              WEIT_PROCESS_ID=str(i), WEIT_INIT_TIMEOUT_S="60", **extra)


VIT = "--config=configs/vit_pretrain.py:runlocal"


def launch(jobs, logdir) -> list[tuple[int, str]]:
  """Starts every ``(name, workdir, flags, env)`` job through main.py at once (``flags`` with the
  ``--config``); waits for them (bounded), kills what is left; returns each one's exit code and output."""
  logs, procs = [], []
  t0 = time.time()
  try:
    for name, workdir, extra, env in jobs:
      logs.append(open(os.path.join(logdir, f"{name}.log"), "w+"))
      argv = [f"--workdir={workdir}", *extra]
      procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], cwd=ROOT, env=env,
                                    stdout=logs[-1], stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    for p in procs:
      p.wait(timeout=max(1.0, PROCESS_TIMEOUT_S - (time.time() - t0)))
    outputs = []
    for f in logs:
      f.seek(0)
      outputs.append(f.read())
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=30)
    for f in logs:
      f.close()
  return [(p.returncode, out) for p, out in zip(procs, outputs)]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
  """Two workers (2 processes x 4 devices, 6 steps) through main.py, then one process x 8 devices
  (9 steps): this one, whose 8 fake devices and XLA flags are a 1-process worker's (the same
  program; ``test_training_continues_in_one_process_where_two_stopped`` reuses its compile)."""
  two = str(tmp_path_factory.mktemp("two_processes"))
  one = str(tmp_path_factory.mktemp("one_process"))
  flags = [VIT] + [f"--config.{k}={v}" for k, v in overrides(*data).items()]
  coordinator = f"127.0.0.1:{free_port()}"
  jobs = [(f"worker{i}", two, flags, worker_env(coordinator, i, WEIT_TEST_EXPORT="1")) for i in range(2)]
  results = launch(jobs, two)
  for (name, *_), (code, out) in zip(jobs, results):
    assert code == 0, f"{name} exited {code}:\n{out[-3000:]}"
  pretrain.run(make_config(data, total_steps=MORE_STEPS), one)
  return dict(two=two, one=one, outputs=[out for _, out in results])


def test_two_processes_match_one_process(runs):
  two, one = read_losses(runs["two"]), read_losses(runs["one"])
  steps = list(range(1, STEPS + 1))
  assert sorted(two) == steps and sorted(one) == list(range(1, MORE_STEPS + 1))
  np.testing.assert_allclose([two[s] for s in steps], [one[s] for s in steps], rtol=RTOL, atol=ATOL)
  assert len({round(v, 4) for v in two.values()}) > 2  # the steps differ: it trains
  # Both workers ran 4 devices each as one 8-device job; only process 0 printed progress lines.
  assert "worker 0 of 2: 4 local devices, trained" in runs["outputs"][0]
  assert "worker 1 of 2: 4 local devices, trained" in runs["outputs"][1]
  assert "step 6/6" in runs["outputs"][0] and "step 6/6" not in runs["outputs"][1]
  data_files = os.listdir(os.path.join(runs["two"], "checkpoints", str(STEPS), "data"))
  assert sorted(f for f in data_files if f.endswith(".json")) == ["process_0-of-2.json", "process_1-of-2.json"]
  assert not os.path.exists(os.path.join(runs["two"], "lock.json"))  # process 0 held it, and released it


def test_a_locked_workdir_refuses_every_process_of_a_job(data, tmp_path):
  """A live lock of another host: process 0 is refused with the holder's name, and process 1 with it
  (no process is left waiting in a collective); nothing else is written."""
  from weit_jax import workdir_lock
  workdir = str(tmp_path / "wd")
  workdir_lock.Lock.acquire(workdir, "pretrain", host="another-vm", pid=4242, command="python main.py X", log=None)
  before = sorted(os.listdir(workdir))
  flags = [VIT] + [f"--config.{k}={v}" for k, v in overrides(*data).items()]
  coordinator = f"127.0.0.1:{free_port()}"
  results = launch([(f"worker{i}", workdir, flags, worker_env(coordinator, i)) for i in range(2)], str(tmp_path))
  for i, (code, out) in enumerate(results):
    assert code != 0 and "WorkdirInUse" in out and "trained" not in out, (i, out[-3000:])
  assert "in use by another run: host another-vm, pid 4242" in results[0][1]
  assert "process 0 says who" in results[1][1]
  assert sorted(os.listdir(workdir)) == before


_TASKS = {}


def restore_state(workdir, config, mesh, step=STEPS):
  """Step ``step`` of ``workdir`` restored onto ``mesh`` (the task is built once per config)."""
  key = config.to_json()
  if key not in _TASKS:
    _TASKS[key] = pretrain.make_task(config, pretrain.build(config))
  abstract, shardings = train_loop.state_shardings(_TASKS[key], mesh)
  ckpt = checkpoint.Checkpointer(workdir, every=1)
  try:
    return ckpt.restore(step, checkpoint.abstract_with_shardings(abstract, shardings), None)
  finally:
    ckpt.close()


@pytest.fixture(scope="module")
def meshes():
  devices = jax.devices()
  return {"8 devices": sharding.make_mesh({"fsdp": 8}),
          "4 devices, another mesh": sharding.make_mesh({"fsdp": 2, "model": 2}, devices=devices[:4]),
          "1 device": sharding.make_mesh({"data": 1}, devices=devices[:1])}


def test_checkpoints_restore_on_other_device_counts_and_meshes(runs, data, meshes):
  """Step 6 of the 2-process run (saved from 2 x 4 devices) and of the 1-process run (1 x 8)
  restores onto 8 devices, 4 devices with another mesh, and 1 device, with the same values."""
  config = make_config(data)
  restored = {}
  for run in ("two", "one"):
    for name, mesh in meshes.items():
      state = restore_state(runs[run], config, mesh)
      leaves = jax.tree_util.tree_leaves(state["params"])
      assert {len(x.sharding.device_set) for x in leaves} == {mesh.size}, name
      assert int(state["step"]) == STEPS
      if name == "4 devices, another mesh":  # a tiled template, sharded as asked (mlp tile 8 over model=2)
        kernel = state["params"]["templates"]["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
        assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "model")
      restored[run, name] = jax.device_get(state)
  for run in ("two", "one"):
    for name in meshes:
      chex.assert_trees_all_equal(restored[run, name], restored[run, "8 devices"])
  # The two runs agree up to float sums in another order, which Adam amplifies where a gradient is
  # near zero (there an update is about +-lr whatever the gradient's size). Measured against how far
  # the weights moved in steps 3 -> 6: observed 0.17 (two 1-process runs on different meshes of the
  # same 8 devices differ as much: 0.23); the optimizer state: 5e-6.
  two, one = restored["two", "1 device"], restored["one", "1 device"]
  one_at_3 = jax.device_get(restore_state(runs["one"], config, meshes["1 device"], step=3))
  for part, bound in (("params", 0.5), ("opt_state", 1e-3)):
    assert l2(diff(two[part], one[part])) < bound * l2(diff(one[part], one_at_3[part])), part


def l2(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree_util.tree_leaves(tree))))


def diff(a, b):
  return jax.tree_util.tree_map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)


def test_export_of_two_processes_loads_on_any_mesh(runs, data, meshes):
  export = os.path.join(runs["two"], "export")
  one_device = exports.load_params(export)
  four = exports.load_params(export, mesh=meshes["4 devices, another mesh"])
  eight = exports.load_params(export, mesh=sharding.make_mesh({"data": 2, "fsdp": 4}))
  kernel = four["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "model")
  assert len(one_device["head"]["kernel"].sharding.device_set) == 1
  chex.assert_trees_all_equal(jax.device_get(four), jax.device_get(one_device))
  chex.assert_trees_all_equal(jax.device_get(eight), jax.device_get(one_device))
  # It is the model of step 6: the run's own step-6 templates compose to the same weights here.
  config = make_config(data)
  params = restore_state(runs["two"], config, meshes["1 device"])["params"]
  want = jax.device_get(pretrain.build(config).gen.materialize(params["templates"], params["scalers"]))
  chex.assert_trees_all_close(jax.device_get(one_device), want, rtol=1e-5, atol=1e-6)


def test_training_continues_in_one_process_where_two_stopped(runs, data, capsys):
  """Same workdir, more steps: the 2-process run resumes here (1 process); its data continues at
  global batch 6, so steps 7-9 equal those of the 1-process run that trained 9 steps in one go."""
  resumed = pretrain.run(make_config(data, total_steps=MORE_STEPS), runs["two"])
  out = capsys.readouterr().out
  assert "Resuming from step 6" in out
  assert "saved by 2 process(es), this run has 1: the data resumes at global batch 6" in out
  assert resumed["resumed_from"] == STEPS and resumed["final_step"] == MORE_STEPS
  two, one = read_losses(runs["two"]), read_losses(runs["one"])
  more = list(range(STEPS + 1, MORE_STEPS + 1))
  # Consecutive batches' losses differ by ~3e-4 here, so another data position would show.
  # (Checked: with the data restarting at batch 0 instead, this fails.)
  np.testing.assert_allclose([two[s] for s in more], [one[s] for s in more], rtol=RTOL, atol=ATOL)


# The control task's tiny PPO pre-training (tests/test_control_programs.py's): 8 environments, one
# per device of the 2 x 4.
CONTROL = ["--config=configs/policy_pretrain.py:runlocal", "--config.model.variant=mu", "--config.model.width=16",
           "--config.model.depth=2", "--config.weit.tiles.hidden=8", "--config.weit.tiles.hidden_in=8",
           "--config.weit.num_templates=2", "--config.env=inverted_pendulum", "--config.batch_size=8",
           "--config.ppo.unroll_length=4", "--config.ppo.num_minibatches=2", "--config.ppo.epochs=1",
           "--config.episode_length=20", "--config.eval_episodes=2", "--config.checkpoint_every=2",
           "--config.eval_every=0", "--config.log_every=1"]


@pytest.mark.slow  # 75 CPU-s: the suite's 7 minutes do not hold it; WEIT_TEST_SLOW=1 runs it
def test_control_on_two_processes_each_stepping_its_own_environments(tmp_path):
  """PPO pre-training as one job of 2 processes x 4 devices (the 8 environments split one per
  device: each process steps its own 4), stopped after 4 steps, resumed here on 1 process x 8
  devices to step 6: every logged loss, return and gradient norm equals a 1-process run's of 6
  steps, to float tolerance (the workers compile with less LLVM optimization; sums over devices in
  another order; observed 1.6e-7)."""
  from helpers import parse_main
  two, one = str(tmp_path / "two"), str(tmp_path / "one")
  coordinator = f"127.0.0.1:{free_port()}"
  results = launch([(f"worker{i}", two, CONTROL + ["--config.total_steps=4"], worker_env(coordinator, i))
                    for i in range(2)], str(tmp_path))
  for i, (code, out) in enumerate(results):
    assert code == 0 and f"worker {i} of 2: 4 local devices, trained" in out, out[-3000:]
  config, _ = parse_main(CONTROL + ["--config.total_steps=6"], two)
  resumed = pretrain.run(config, two)
  assert resumed["resumed_from"] == 4 and resumed["final_step"] == 6
  reference, _ = parse_main(CONTROL + ["--config.total_steps=6"], one)
  pretrain.run(reference, one)
  logged = {}
  for run in (two, one):
    with open(os.path.join(run, "metrics.jsonl")) as f:
      logged[run] = {r["step"]: r for r in map(json.loads, f) if "loss" in r}  # one writer: each step once
  assert sorted(logged[two]) == sorted(logged[one]) == list(range(1, 7))
  for step in range(1, 7):
    np.testing.assert_allclose([logged[two][step][k] for k in ("loss", "episode_return", "grad_norm")],
                               [logged[one][step][k] for k in ("loss", "episode_return", "grad_norm")],
                               rtol=RTOL, atol=ATOL, err_msg=f"step {step}")
