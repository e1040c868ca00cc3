"""launch/tpu.py: dry runs print exact gcloud commands; bad input fails readably; the real path runs
commands in order, stops at the first failure and collects one log per worker (a fake gcloud on
PATH stands in for the real one: no network, no TPU)."""
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "tpu.py")

_spec = importlib.util.spec_from_file_location("weit_launch_tpu", SCRIPT)
tpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tpu)

WHERE = ["--project=proj-1", "--zone=us-central2-b", "--name=weit-pod"]
ENV_VARS = ("WEIT_PROJECT", "WEIT_ZONE", "WEIT_NAME", "WEIT_ACCELERATOR_TYPE",
            "WEIT_RUNTIME_VERSION", "WEIT_BUCKET")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path_factory):
  for var in ENV_VARS:
    monkeypatch.delenv(var, raising=False)
  # A real gcloud may be installed: shadow it so that no test can ever reach a real project.
  guard = tmp_path_factory.mktemp("guard")
  (guard / "gcloud").write_text("#!/bin/sh\necho 'a test reached gcloud' >&2\nexit 99\n")
  (guard / "gcloud").chmod(0o755)
  monkeypatch.setenv("PATH", f"{guard}{os.pathsep}{os.environ['PATH']}")


def call(argv):
  """Runs main(argv) in-process; returns the exit status (SystemExit included)."""
  try:
    return tpu.main(argv)
  except SystemExit as e:
    return e.code


def dry(argv, capsys):
  """Dry-run argv; returns the printed commands, each split back into its arguments."""
  rc = call(argv[:1] + ["--dry-run"] + argv[1:])  # before any '--' that starts the command
  out, err = capsys.readouterr()
  assert rc == 0, err
  return [shlex.split(line) for line in out.splitlines()]


def flag(cmd, name):
  """The value of --name=VALUE in cmd (exactly one occurrence)."""
  values = [a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, cmd)
  return values[0]


def remote(cmd):
  return flag(cmd, "command")


# ----------------------------------------------------------------------------------------------
# create / delete
# ----------------------------------------------------------------------------------------------


def test_create_prints_exact_tpu_vm_command(capsys):
  cmds = dry(["create", *WHERE, "--accelerator-type=v4-32"], capsys)
  assert cmds == [[
      "gcloud", "compute", "tpus", "tpu-vm", "create", "weit-pod", "--zone=us-central2-b",
      "--project=proj-1", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]]


@pytest.mark.parametrize("acc, version", [
    ("v2-32", "tpu-ubuntu2204-base"),
    ("v4-8", "tpu-ubuntu2204-base"),
    ("v5litepod-256", "v2-alpha-tpuv5-lite"),
    ("v5p-128", "v2-alpha-tpuv5"),
    ("v6e-64", "v2-alpha-tpuv6e"),
])
def test_create_runtime_version_default_per_generation(acc, version, capsys):
  (cmd,) = dry(["create", *WHERE, f"--accelerator-type={acc}"], capsys)
  assert flag(cmd, "version") == version
  assert flag(cmd, "accelerator-type") == acc


def test_create_explicit_runtime_version_and_pass_throughs(capsys):
  (cmd,) = dry(["create", *WHERE, "--accelerator-type=v5p-8", "--runtime-version=custom-rt",
                "--spot", "--network=net-a", "--subnetwork=sub-b"], capsys)
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "weit-pod"]
  assert flag(cmd, "version") == "custom-rt"
  assert flag(cmd, "network") == "net-a"
  assert flag(cmd, "subnetwork") == "sub-b"
  assert "--spot" in cmd and "--preemptible" not in cmd


def test_create_preemptible(capsys):
  (cmd,) = dry(["create", *WHERE, "--accelerator-type=v4-8", "--preemptible"], capsys)
  assert "--preemptible" in cmd and "--spot" not in cmd


def test_create_queued_resource(capsys):
  (cmd,) = dry(["create", *WHERE, "--accelerator-type=v5litepod-256", "--queued", "--spot"],
               capsys)
  assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "weit-pod"]
  assert flag(cmd, "node-id") == "weit-pod"
  assert flag(cmd, "runtime-version") == "v2-alpha-tpuv5-lite"  # queued resources say --runtime-version
  assert not any(a.startswith("--version=") for a in cmd)
  assert flag(cmd, "zone") == "us-central2-b" and flag(cmd, "project") == "proj-1"
  assert "--spot" in cmd


def test_create_queued_best_effort_uses_alpha(capsys):
  (cmd,) = dry(["create", *WHERE, "--accelerator-type=v6e-16", "--queued", "--best-effort"],
               capsys)
  assert cmd[:7] == ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create",
                     "weit-pod"]
  assert "--best-effort" in cmd and "--spot" not in cmd


def test_delete_node_and_queued_resource(capsys):
  (cmd,) = dry(["delete", *WHERE], capsys)
  assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "weit-pod",
                 "--zone=us-central2-b", "--project=proj-1", "--quiet"]
  (cmd,) = dry(["delete", *WHERE, "--queued"], capsys)
  assert cmd == ["gcloud", "compute", "tpus", "queued-resources", "delete", "weit-pod",
                 "--zone=us-central2-b", "--project=proj-1", "--force", "--quiet"]


def test_environment_variables_supply_defaults_and_flags_win(monkeypatch, capsys):
  monkeypatch.setenv("WEIT_PROJECT", "env-proj")
  monkeypatch.setenv("WEIT_ZONE", "europe-west4-a")
  monkeypatch.setenv("WEIT_NAME", "env-pod")
  monkeypatch.setenv("WEIT_ACCELERATOR_TYPE", "v5p-16")
  (cmd,) = dry(["create"], capsys)
  assert cmd[5] == "env-pod"
  assert flag(cmd, "project") == "env-proj"
  assert flag(cmd, "zone") == "europe-west4-a"
  assert flag(cmd, "accelerator-type") == "v5p-16"
  assert flag(cmd, "version") == "v2-alpha-tpuv5"
  monkeypatch.setenv("WEIT_RUNTIME_VERSION", "rt-from-env")
  (cmd,) = dry(["create", "--project=flag-proj", "--accelerator-type=v4-16"], capsys)
  assert flag(cmd, "project") == "flag-proj"
  assert flag(cmd, "accelerator-type") == "v4-16"
  assert flag(cmd, "version") == "rt-from-env"


# ----------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------


def test_setup_copies_git_archive_to_all_workers_and_installs(capsys, tmp_path):
  tarball = str(tmp_path / "code.tar.gz")
  cmds = dry(["setup", *WHERE, f"--tarball={tarball}"], capsys)
  assert len(cmds) == 3
  archive, scp, ssh = cmds
  assert archive == ["git", "-C", REPO, "archive", "--format=tar.gz", f"--output={tarball}",
                     "HEAD"]
  assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball]
  assert scp[6] == "weit-pod:weit_jax.tar.gz"
  assert "--worker=all" in scp and flag(scp, "zone") == "us-central2-b"
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "weit-pod"]
  assert "--worker=all" in ssh
  script = remote(ssh)
  assert "tar -xzf weit_jax.tar.gz -C weit_jax" in script
  assert "python3.11 -m venv .venv" in script
  assert ".venv/bin/python -m pip install -q -e '.[tpu]'" in script
  assert "dataset-fashion-mnist" not in script
  # The order matters: unpack, enter, make the venv, install.
  order = [script.index(s) for s in ("tar -xzf", "cd weit_jax", "-m venv", "install -q -e")]
  assert order == sorted(order)


def test_setup_fashion_mnist_and_python_choice(capsys):
  (*_, ssh) = dry(["setup", *WHERE, "--fashion-mnist", "--python=python3.12"], capsys)
  script = remote(ssh)
  assert "apt-get install -y -q dataset-fashion-mnist" in script
  assert "python3.12 -m venv .venv" in script
  assert "python3.11" not in script


def test_setup_clone_from_repo_url(capsys):
  cmds = dry(["setup", *WHERE, "--repo-url=https://example.org/weit_jax.git", "--ref=v0.1"],
             capsys)
  assert len(cmds) == 1  # no archive, no scp
  (ssh,) = cmds
  assert "--worker=all" in ssh
  script = remote(ssh)
  assert "git -C weit_jax fetch -q origin v0.1" in script
  assert "https://example.org/weit_jax.git" in script
  assert "git -C weit_jax checkout -q --detach FETCH_HEAD" in script
  assert ".venv/bin/python -m pip install -q -e '.[tpu]'" in script


@pytest.mark.parametrize("extra", [[], ["--fashion-mnist"], ["--repo-url=/srv/r.git"]])
def test_setup_scripts_parse_as_sh(extra, capsys):
  (*_, ssh) = dry(["setup", *WHERE, *extra], capsys)
  proc = subprocess.run(["sh", "-n", "-c", remote(ssh)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


def test_setup_script_unpacks_and_keeps_venv_on_rerun(tmp_path, capsys):
  """Runs the worker-side script for real in a fake home, with pip stubbed out (no network)."""
  home = tmp_path / "home"
  home.mkdir()
  subprocess.run(["git", "-C", REPO, "archive", "--format=tar.gz",
                  f"--output={home / 'weit_jax.tar.gz'}", "HEAD"], check=True)
  (*_, ssh) = dry(["setup", *WHERE, f"--python={os.path.basename(sys.executable)}"], capsys)
  script = remote(ssh)
  script = script.replace(".venv/bin/python -m pip install -q --upgrade pip", "true")
  script = script.replace(".venv/bin/python -m pip install -q -e '.[tpu]'", "echo installed")
  script = script.split(" && .venv/bin/python -c ")[0]
  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  (home / "weit_jax").mkdir()
  (home / "weit_jax" / "stale.txt").write_text("old")
  for _ in range(2):
    proc = subprocess.run(["sh", "-c", script], cwd=home, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "installed"
  assert (home / "weit_jax" / "setup.cfg").is_file()
  assert (home / "weit_jax" / ".venv" / "bin" / "python").exists()
  assert not (home / "weit_jax" / "stale.txt").exists()


# ----------------------------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------------------------

RUN = ["run", *WHERE, "--bucket=gs://my-bucket"]


def test_run_one_ssh_per_worker_in_repo_dir_and_venv(capsys):
  cmds = dry([*RUN, "--accelerator-type=v4-32", "--", "python", "main.py",
              "--config=configs/vit_pretrain.py", "--workdir=gs://my-bucket/runs/pretrain"], capsys)
  assert len(cmds) == 4  # v4-32: 16 chips, 4 hosts
  for i, cmd in enumerate(cmds):
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "weit-pod"]
    assert flag(cmd, "worker") == str(i)
    assert flag(cmd, "zone") == "us-central2-b" and flag(cmd, "project") == "proj-1"
  script = remote(cmds[0])
  assert all(remote(c) == script for c in cmds)
  parts = [p.strip() for p in script.split("&&")]
  assert parts[0] == "cd weit_jax"
  assert parts[1] == ". .venv/bin/activate"
  exports = shlex.split(parts[2])
  assert exports[0] == "export"
  assert "TFDS_DATA_DIR=gs://my-bucket/tensorflow_datasets" in exports
  assert "WEIT_BUCKET=gs://my-bucket" in exports
  assert shlex.split(parts[3]) == ["python", "main.py", "--config=configs/vit_pretrain.py",
                                   "--workdir=gs://my-bucket/runs/pretrain"]


def test_run_quotes_arguments_and_derives_workdir(capsys):
  targets = "--config.targets=S/16;Ti/16;depth=7,width=320,heads=5"
  cmds = dry([*RUN, "--num-workers=2", "--run-name=init", "--tfds-data-dir=/mnt/tfds",
              "--env=JAX_TRACEBACK_FILTERING=off", "--", "python", "main.py",
              "--config=configs/vit_init.py", "--config.templates=gs://my-bucket/runs/pretrain",
              targets], capsys)
  assert [flag(c, "worker") for c in cmds] == ["0", "1"]
  script = remote(cmds[0])
  exports = shlex.split(script.split("&&")[2])
  assert "TFDS_DATA_DIR=/mnt/tfds" in exports
  assert "JAX_TRACEBACK_FILTERING=off" in exports
  user = shlex.split(script.split("&&", 3)[3])
  assert user == ["python", "main.py", "--config=configs/vit_init.py",
                  "--config.templates=gs://my-bucket/runs/pretrain", targets,
                  "--workdir=gs://my-bucket/runs/init"]


def test_run_script_executes_in_repo_dir_with_venv_and_exports(tmp_path, capsys):
  """Runs the worker-side command for real in a fake home with a stub venv."""
  venv_bin = tmp_path / "weit_jax" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "activate").write_text("VENV_ACTIVE=yes\n")
  (cmd,) = dry([*RUN, "--num-workers=1", "--",
                'echo "$PWD|$VENV_ACTIVE|$TFDS_DATA_DIR|$WEIT_BUCKET|$PYTHONUNBUFFERED"'], capsys)
  proc = subprocess.run(["sh", "-c", remote(cmd)], cwd=tmp_path, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  cwd, venv, data_dir, bucket, unbuffered = proc.stdout.strip().split("|")
  assert os.path.realpath(cwd) == os.path.realpath(tmp_path / "weit_jax")
  assert (venv, data_dir, bucket, unbuffered) == (
      "yes", "gs://my-bucket/tensorflow_datasets", "gs://my-bucket", "1")


@pytest.mark.parametrize("acc, n", [("v4-8", 1), ("v4-32", 4), ("v3-128", 16), ("v5p-256", 32),
                                    ("v5litepod-8", 1), ("v5litepod-16", 4),
                                    ("v5litepod-256", 64), ("v6e-64", 16)])
def test_worker_count_in_dry_run(acc, n, capsys):
  cmds = dry([*RUN, f"--accelerator-type={acc}", "--", "hostname"], capsys)
  assert [flag(c, "worker") for c in cmds] == [str(i) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Bad input: non-zero exit, readable message, no traceback, nothing printed on stdout.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["create", "--zone=us-central2-b", "--name=a", "--accelerator-type=v4-8"],
     "missing --project: pass --project=... or set WEIT_PROJECT"),
    (["delete", "--project=p", "--name=a"], "set WEIT_ZONE"),
    (["setup", "--project=p", "--zone=us-central2-b"], "set WEIT_NAME"),
    (["create", *WHERE], "missing --accelerator-type"),
    (["create", *WHERE, "--accelerator-type=v4"], "v[0-9][a-z]*-[0-9]+"),
    (["create", *WHERE, "--accelerator-type=tpu-v4-32"], "is not valid"),
    (["create", *WHERE, "--accelerator-type=v4-32x"], "is not valid"),
    (["create", *WHERE, "--accelerator-type=v9x-8"], "pass --runtime-version"),
    (["create", *WHERE, "--accelerator-type=v4-8", "--spot", "--preemptible"], "exclude"),
    (["create", *WHERE, "--accelerator-type=v4-8", "--best-effort"], "add --queued"),
    (["create", *WHERE, "--accelerator-type=v4-8", "--queued", "--preemptible"], "use --spot"),
    (["create", "--project=p", "--zone=us-central2-b", "--name=Bad_Name",
      "--accelerator-type=v4-8"], "not a valid TPU name"),
    (["create", "--project=p", "--zone=central", "--name=a", "--accelerator-type=v4-8"],
     "does not look like a zone"),
    (["setup", *WHERE, "--ref=main"], "--ref needs --repo-url"),
    (["setup", *WHERE, "--remote-dir=../x"], "relative to the home directory"),
    (["run", *WHERE, "--num-workers=1", "--", "ls"], "missing --bucket"),
    (["run", *WHERE, "--bucket=my-bucket", "--num-workers=1", "--", "ls"],
     "must be a Cloud Storage URL: gs://"),
    (["run", *WHERE, "--bucket=s3://b", "--num-workers=1", "--", "ls"], "gs://BUCKET"),
    (["run", *WHERE, "--bucket=gs://b", "--num-workers=1"], "no command to run"),
    (["run", *WHERE, "--bucket=gs://b", "--", "ls"], "pass --num-workers or --accelerator-type"),
    (["run", *WHERE, "--bucket=gs://b", "--num-workers=1", "--env=1X=2", "--", "ls"],
     "KEY=VALUE"),
    (["run", *WHERE, "--bucket=gs://b", "--num-workers=1", "--run-name=r", "--",
      "python", "main.py", "--workdir=gs://b/x"], "already has one"),
])
def test_bad_input_is_refused_with_a_message(argv, message, capsys):
  rc = call(argv[:1] + ["--dry-run"] + argv[1:])
  out, err = capsys.readouterr()
  assert rc == 2
  assert message in err
  assert "Traceback" not in err
  assert out == ""


def test_bad_input_from_the_command_line_has_no_traceback():
  env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
  proc = subprocess.run([sys.executable, SCRIPT, "create", *WHERE, "--accelerator-type=v5x",
                         "--dry-run"], capture_output=True, text=True, env=env)
  assert proc.returncode == 2
  assert proc.stdout == ""
  assert "Traceback" not in proc.stderr
  assert "tpu.py: error: --accelerator-type 'v5x' is not valid" in proc.stderr


def test_command_line_dry_run_matches_in_process(monkeypatch, capsys):
  env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
  env["WEIT_BUCKET"] = "gs://env-bucket"
  argv = ["run", *WHERE, "--accelerator-type=v5litepod-16", "--", "python", "main.py",
          "--config=configs/vit_pretrain.py"]
  proc = subprocess.run([sys.executable, SCRIPT, argv[0], "--dry-run", *argv[1:]], capture_output=True,
                        text=True, env=env)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert len(lines) == 4
  assert "export TFDS_DATA_DIR=gs://env-bucket/tensorflow_datasets" in remote(shlex.split(lines[3]))
  monkeypatch.setenv("WEIT_BUCKET", "gs://env-bucket")
  assert dry(argv, capsys) == [shlex.split(line) for line in lines]


# ----------------------------------------------------------------------------------------------
# The real path, with gcloud missing or replaced by a fake.
# ----------------------------------------------------------------------------------------------


def test_missing_gcloud_fails_clearly(monkeypatch, tmp_path, capsys):
  monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no gcloud
  rc = call(["delete", *WHERE])
  out, err = capsys.readouterr()
  assert rc == 1
  assert "gcloud (the Google Cloud CLI) is not on PATH" in err
  assert "gcloud auth login" in err and "install" in err
  assert "Traceback" not in err and out == ""


def test_missing_gcloud_fails_clearly_for_run_from_the_command_line(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
  env["PATH"] = str(tmp_path)
  proc = subprocess.run([sys.executable, SCRIPT, "run", *WHERE, "--bucket=gs://b", "--", "ls"],
                        capture_output=True, text=True, env=env)
  assert proc.returncode == 1
  assert "gcloud (the Google Cloud CLI) is not on PATH" in proc.stderr
  assert "Traceback" not in proc.stderr


FAKE_GCLOUD = r"""#!/bin/sh
# Records its arguments (one per line) in a file of its own, named by the time it started: the
# launcher runs one ssh per worker at once, and appends to one shared file interleave. Imitates the
# few gcloud answers we need.
record="$FAKE_LOG/$(date +%s%N)-$$"
for a in "$@"; do printf '%s\n' "$a"; done > "$record.tmp" && mv "$record.tmp" "$record"
case " $* " in
  *" $FAKE_FAIL "*) echo "fake failure" >&2; exit 7 ;;
esac
case "$*" in
  *"tpu-vm describe"*) printf '%s\n' "$FAKE_DESCRIBE" ;;
  *"tpu-vm ssh"*)
    for a in "$@"; do case "$a" in --worker=*) w="${a#--worker=}" ;; esac; done
    echo "hello from worker $w"
    echo "second line $w"
    [ "$w" = "$FAKE_FAIL_WORKER" ] && exit 3
    ;;
esac
exit 0
"""


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
  bindir = tmp_path / "bin"
  bindir.mkdir()
  gcloud = bindir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD)
  gcloud.chmod(0o755)
  log = tmp_path / "gcloud-calls"
  log.mkdir()
  monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_LOG", str(log))
  monkeypatch.setenv("FAKE_FAIL", "no-such-word")
  monkeypatch.setenv("FAKE_FAIL_WORKER", "none")
  monkeypatch.setenv("FAKE_DESCRIBE", json.dumps(
      {"networkEndpoints": [{"ipAddress": f"10.0.0.{i}"} for i in range(3)]}))

  def calls():
    """Every call's arguments, in the order the calls started."""
    records = sorted((p for p in log.iterdir() if not p.name.endswith(".tmp")),
                     key=lambda p: tuple(map(int, p.name.split("-"))))
    return [p.read_text().splitlines() for p in records]
  return calls


def test_real_create_runs_the_dry_run_command(fake_gcloud, capsys):
  argv = ["create", *WHERE, "--accelerator-type=v5litepod-16", "--queued", "--spot"]
  expected = dry(argv, capsys)
  assert call(argv) == 0
  assert fake_gcloud() == [cmd[1:] for cmd in expected]


def test_real_setup_stops_at_the_first_failing_command(fake_gcloud, monkeypatch, tmp_path,
                                                        capsys):
  monkeypatch.setenv("FAKE_FAIL", "scp")
  tarball = tmp_path / "code.tar.gz"
  rc = call(["setup", *WHERE, f"--tarball={tarball}"])
  err = capsys.readouterr().err
  assert rc == 1
  calls = fake_gcloud()
  assert len(calls) == 1 and calls[0][:4] == ["compute", "tpus", "tpu-vm", "scp"]  # ssh never ran
  assert "command failed with exit status 7: gcloud compute tpus tpu-vm scp" in err
  assert "Traceback" not in err
  with tarfile.open(tarball) as tar:  # the git archive step ran before it
    assert "setup.cfg" in tar.getnames()


def test_real_setup_runs_all_commands_in_order(fake_gcloud, tmp_path, capsys):
  argv = ["setup", *WHERE, f"--tarball={tmp_path / 'c.tar.gz'}"]
  expected = dry(argv, capsys)
  assert call(argv) == 0
  assert fake_gcloud() == [cmd[1:] for cmd in expected[1:]]  # expected[0] is git, not gcloud


def test_real_run_collects_one_log_per_worker(fake_gcloud, tmp_path, capsys):
  log_dir = tmp_path / "logs"
  rc = call([*RUN, f"--log-dir={log_dir}", "--", "python", "main.py"])
  out, err = capsys.readouterr()
  assert rc == 0, err
  calls = fake_gcloud()
  assert calls[0][:5] == ["compute", "tpus", "tpu-vm", "describe", "weit-pod"]
  ssh = calls[1:]
  assert sorted(flag(c, "worker") for c in ssh) == ["0", "1", "2"]  # 3 endpoints described
  for i in range(3):
    assert (log_dir / f"worker-{i}.log").read_text() == (
        f"hello from worker {i}\nsecond line {i}\n")
  assert "[worker 0] hello from worker 0" in out  # worker 0 is echoed by default
  assert "[worker 1]" not in out
  assert "all 3 workers succeeded" in err


def test_real_run_fails_if_any_worker_fails(fake_gcloud, monkeypatch, tmp_path, capsys):
  monkeypatch.setenv("FAKE_FAIL_WORKER", "1")
  log_dir = tmp_path / "logs"
  rc = call([*RUN, f"--log-dir={log_dir}", "--num-workers=2", "--stream=all", "--", "true"])
  out, err = capsys.readouterr()
  assert rc == 1
  assert len(fake_gcloud()) == 2  # --num-workers skips describe
  assert "1 of 2 workers failed: worker 1 (exit 3)" in err
  assert "[worker 1] hello from worker 1" in out
  assert (log_dir / "worker-1.log").read_text().startswith("hello from worker 1")


def test_real_run_reports_a_failing_describe(fake_gcloud, monkeypatch, tmp_path, capsys):
  monkeypatch.setenv("FAKE_FAIL", "describe")
  rc = call([*RUN, f"--log-dir={tmp_path}", "--", "true"])
  err = capsys.readouterr().err
  assert rc == 1
  assert "command failed with exit status 7: gcloud compute tpus tpu-vm describe weit-pod" in err
  assert len(fake_gcloud()) == 1



def test_real_run_counts_vms_not_endpoints_with_several_networks(fake_gcloud, monkeypatch,
                                                                 tmp_path, capsys):
  # Two VMs on two networks: four endpoints, two workers (gcloud's own --worker rule).
  monkeypatch.setenv("FAKE_DESCRIBE", json.dumps({
      "networkConfigs": [{"network": "a"}, {"network": "b"}],
      "networkEndpoints": [{"ipAddress": ip} for ip in ("1", "2", "3", "4")]}))
  rc = call([*RUN, f"--log-dir={tmp_path}", "--", "true"])
  capsys.readouterr()
  assert rc == 0
  assert sorted(flag(c, "worker") for c in fake_gcloud()[1:]) == ["0", "1"]


def test_real_run_refuses_a_node_without_workers(fake_gcloud, monkeypatch, tmp_path, capsys):
  monkeypatch.setenv("FAKE_DESCRIBE", json.dumps({"state": "CREATING"}))
  rc = call([*RUN, f"--log-dir={tmp_path}", "--", "true"])
  err = capsys.readouterr().err
  assert rc == 1
  assert "has no workers yet" in err
  assert len(fake_gcloud()) == 1  # no ssh attempted
