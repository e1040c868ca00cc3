#!/usr/bin/env python3
"""Create, set up, run on and delete Cloud TPU VM pod slices with gcloud.

    python3 launch/tpu.py create [--queued] ...
    python3 launch/tpu.py setup  [--repo-url URL [--ref REF]] [--fashion-mnist] ...
    python3 launch/tpu.py run    ... -- python main.py --config=configs/vit_pretrain.py
    python3 launch/tpu.py delete [--queued] ...

Every subcommand takes --dry-run: it prints the exact commands (shell-quoted, one per line) and
runs nothing. Parameters may come from environment variables (WEIT_PROJECT, WEIT_ZONE, WEIT_NAME,
WEIT_ACCELERATOR_TYPE, WEIT_RUNTIME_VERSION, WEIT_BUCKET); a flag wins over its variable.
Standard library only, so it runs on any machine with Python 3 and gcloud. docs/tpu_pods.md walks
through a whole run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Flag -> environment variable that supplies its default.
ENV = {
    "project": "WEIT_PROJECT",
    "zone": "WEIT_ZONE",
    "name": "WEIT_NAME",
    "accelerator_type": "WEIT_ACCELERATOR_TYPE",
    "runtime_version": "WEIT_RUNTIME_VERSION",
    "bucket": "WEIT_BUCKET",
}

ACCELERATOR_RE = re.compile(r"^v[0-9][a-z]*-[0-9]+$")
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
ZONE_RE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")

# Runtime (software) versions for JAX, per TPU generation, from Cloud TPU's "TPU software
# versions" page: v6e -> v2-alpha-tpuv6e, v5p -> v2-alpha-tpuv5, v5e -> v2-alpha-tpuv5-lite,
# v4 and older -> tpu-ubuntu2204-base. Keys are the accelerator-type prefix before the dash.
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}

GCLOUD_HELP = (
    "gcloud (the Google Cloud CLI) is not on PATH. Install it (see "
    "https://cloud.google.com/sdk/docs/install), then authenticate and pick a project:\n"
    "  gcloud auth login\n"
    "  gcloud config set project PROJECT\n"
    "  gcloud services enable tpu.googleapis.com\n"
    "or pass --dry-run to only print the commands."
)


class UsageError(Exception):
  """Bad input: reported as 'tpu.py: error: ...' with exit status 2, no traceback."""


class CommandFailed(Exception):
  """A command exited non-zero: reported with the command, exit status 1."""


# ----------------------------------------------------------------------------------------------
# Parsing and validation.
# ----------------------------------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser, *, accelerator: bool = True) -> None:
  p.add_argument("--project", help=f"Google Cloud project (env {ENV['project']}).")
  p.add_argument("--zone", help=f"zone, e.g. us-central2-b (env {ENV['zone']}).")
  p.add_argument("--name", help=f"TPU VM (node) name, also the queued-resource id (env {ENV['name']}).")
  if accelerator:
    p.add_argument(
        "--accelerator-type",
        help=f"e.g. v4-32, v5litepod-256, v5p-128, v6e-64 (env {ENV['accelerator_type']}).")
  p.add_argument("--dry-run", action="store_true",
                 help="print the exact commands, one per line, and run nothing.")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="tpu.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Run 'tpu.py SUBCOMMAND --help' for the flags of each subcommand.")
  sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
  sub.required = True

  p = sub.add_parser("create", help="create a TPU VM slice (or a queued resource).")
  _add_common(p)
  p.add_argument("--runtime-version",
                 help=f"TPU software version (env {ENV['runtime_version']}); default by generation: "
                 + ", ".join(f"{k}: {v}" for k, v in RUNTIME_VERSIONS.items()) + ".")
  p.add_argument("--queued", action="store_true",
                 help="request a queued resource (waits for capacity) instead of creating now.")
  p.add_argument("--spot", action="store_true", help="Spot TPU VMs (preemptible, cheaper).")
  p.add_argument("--preemptible", action="store_true",
                 help="legacy preemptible TPU (not with --queued; use --spot there).")
  p.add_argument("--best-effort", action="store_true",
                 help="queued resource with best-effort capacity (uses 'gcloud alpha').")
  p.add_argument("--network", help="VPC network (passed through).")
  p.add_argument("--subnetwork", help="VPC subnetwork (passed through).")

  p = sub.add_parser("setup", help="copy or clone the repo to every worker; venv; pip install.")
  _add_common(p, accelerator=False)
  p.add_argument("--repo-url", help="clone this git URL on the workers instead of copying "
                 "'git archive HEAD' of the local checkout.")
  p.add_argument("--ref", help="branch, tag or commit to check out with --repo-url "
                 "(default: the remote's default branch).")
  p.add_argument("--remote-dir", default="weit_jax",
                 help="repo directory on the workers, relative to the home directory.")
  p.add_argument("--python", default="python3.11",
                 help="interpreter for the venv on the workers (>= 3.11); installed with apt "
                 "if missing.")
  p.add_argument("--fashion-mnist", action="store_true",
                 help="also 'apt-get install -y dataset-fashion-mnist' on every worker.")
  p.add_argument("--tarball", default=None,
                 help="where to write the local 'git archive' tarball (default: a fixed file "
                 "in the temp directory).")

  p = sub.add_parser(
      "run", help="run a command on all workers, in the repo dir and venv; one log per worker.",
      description="Run COMMAND on every worker in parallel (one 'gcloud ... ssh --worker=i' per "
      "worker), inside the repo dir with the venv active and TFDS_DATA_DIR exported. Each "
      "worker's output goes to LOG_DIR/worker-i.log; the exit status is non-zero if any worker "
      "fails. Several arguments after '--' are shell-quoted and joined; a single argument is "
      "used as a shell snippet as-is.")
  _add_common(p)
  p.add_argument("--bucket", help=f"gs:// bucket (or gs://bucket/prefix) for data and workdirs "
                 f"(env {ENV['bucket']}); exported on the workers as WEIT_BUCKET.")
  p.add_argument("--tfds-data-dir",
                 help="TFDS_DATA_DIR on the workers (default: BUCKET/tensorflow_datasets).")
  p.add_argument("--run-name", help="append --workdir=BUCKET/runs/RUN_NAME to the command.")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="extra environment variable for the workers (repeatable).")
  p.add_argument("--remote-dir", default="weit_jax", help="repo directory on the workers.")
  p.add_argument("--num-workers", type=int,
                 help="number of TPU VM workers (default: asked from 'gcloud ... describe'; "
                 "in --dry-run, derived from --accelerator-type).")
  p.add_argument("--log-dir", help="local directory for worker-N.log "
                 "(default: workdirs/tpu-logs/NAME in the repo).")
  p.add_argument("--stream", choices=("0", "all", "none"), default="0",
                 help="which workers' output to echo here as it arrives (default: worker 0).")
  p.add_argument("command", nargs=argparse.REMAINDER, help="the command to run (after '--').")

  p = sub.add_parser("delete", help="delete the slice (or the queued resource) without asking.")
  _add_common(p, accelerator=False)
  p.add_argument("--queued", action="store_true",
                 help="delete the queued resource (and its TPU VMs, with --force).")
  return parser


def _resolve(args: argparse.Namespace, field: str, *, required: bool) -> str | None:
  value = getattr(args, field, None)
  if value in (None, "") and field in ENV:
    value = os.environ.get(ENV[field]) or None
  if required and not value:
    flag = "--" + field.replace("_", "-")
    raise UsageError(f"missing {flag}: pass {flag}=... or set {ENV[field]}")
  if value is not None:
    setattr(args, field, value)
  return value


def accelerator_generation(accelerator_type: str) -> str:
  return accelerator_type.split("-", 1)[0]


def default_runtime_version(accelerator_type: str) -> str:
  gen = accelerator_generation(accelerator_type)
  if gen not in RUNTIME_VERSIONS:
    raise UsageError(
        f"no default runtime version for {accelerator_type!r} (known generations: "
        f"{', '.join(RUNTIME_VERSIONS)}); pass --runtime-version or set {ENV['runtime_version']}")
  return RUNTIME_VERSIONS[gen]


def default_num_workers(accelerator_type: str) -> int | None:
  """TPU VM hosts of a slice, from its accelerator type (used by --dry-run only).

  v2/v3/v4/v5p count TensorCores (8 per host); v5e/v6e count chips (one host up to 8 chips,
  4 chips per host in multi-host slices). A real run asks gcloud instead.
  """
  gen = accelerator_generation(accelerator_type)
  n = int(accelerator_type.rsplit("-", 1)[1])
  if gen in ("v2", "v3", "v4", "v5p"):
    return max(1, n // 8)
  if gen in ("v5litepod", "v5e", "v6e"):
    return 1 if n <= 8 else n // 4
  return None


def validate(args: argparse.Namespace) -> None:
  """Fills defaults from the environment and checks everything before anything is printed."""
  _resolve(args, "project", required=True)
  zone = _resolve(args, "zone", required=True)
  name = _resolve(args, "name", required=True)
  if not ZONE_RE.match(zone):
    raise UsageError(f"--zone {zone!r} does not look like a zone (e.g. us-central2-b)")
  if not NAME_RE.match(name):
    raise UsageError(f"--name {name!r} is not a valid TPU name: lowercase letters, digits and "
                     "hyphens, starting with a letter, at most 63 characters")

  if hasattr(args, "accelerator_type"):
    acc = _resolve(args, "accelerator_type", required=args.subcommand == "create")
    if acc is not None and not ACCELERATOR_RE.match(acc):
      raise UsageError(
          f"--accelerator-type {acc!r} is not valid: expected v<generation>-<count> matching "
          f"{ACCELERATOR_RE.pattern}, e.g. v4-32, v5litepod-256, v5p-128, v6e-64")

  if args.subcommand == "create":
    if not _resolve(args, "runtime_version", required=False):
      args.runtime_version = default_runtime_version(args.accelerator_type)
    if args.spot and args.preemptible:
      raise UsageError("--spot and --preemptible exclude each other")
    if args.best_effort and not args.queued:
      raise UsageError("--best-effort applies to queued resources only: add --queued")
    if args.best_effort and (args.spot or args.preemptible):
      raise UsageError("--best-effort excludes --spot and --preemptible")
    if args.queued and args.preemptible:
      raise UsageError("queued resources have no --preemptible; use --spot")

  if args.subcommand == "setup":
    if args.ref and not args.repo_url:
      raise UsageError("--ref needs --repo-url (without it the local 'git archive HEAD' is copied)")
    _check_remote_dir(args.remote_dir)
    if not re.match(r"^[A-Za-z0-9._/-]+$", args.python):
      raise UsageError(f"--python {args.python!r} is not a plain interpreter name or path")

  if args.subcommand == "run":
    bucket = _resolve(args, "bucket", required=True)
    if not bucket.startswith("gs://") or len(bucket.rstrip("/")) <= len("gs://") or re.search(
        r"\s", bucket):
      raise UsageError(f"--bucket {bucket!r} must be a Cloud Storage URL: gs://BUCKET[/PREFIX]")
    args.bucket = bucket.rstrip("/")
    if args.tfds_data_dir is None:
      args.tfds_data_dir = args.bucket + "/tensorflow_datasets"
    _check_remote_dir(args.remote_dir)
    command = list(args.command)
    if command and command[0] == "--":
      command = command[1:]
    if not command or not "".join(command).strip():
      raise UsageError("no command to run: add it after '--', e.g. "
                       "run -- python main.py --config=configs/vit_pretrain.py")
    args.command = command
    for item in args.env:
      key, sep, _ = item.partition("=")
      if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
        raise UsageError(f"--env {item!r} must be KEY=VALUE with a shell variable name as KEY")
    if args.run_name is not None:
      if not re.match(r"^[A-Za-z0-9._/-]+$", args.run_name):
        raise UsageError(f"--run-name {args.run_name!r}: use letters, digits, '.', '_', '-', '/'")
      if re.search(r"(^|\s)['\"]?--workdir([=\s]|$)", " ".join(command)):
        raise UsageError("--run-name sets --workdir; the command already has one")
    if args.num_workers is not None and args.num_workers < 1:
      raise UsageError("--num-workers must be at least 1")
    if args.num_workers is None and args.dry_run:
      n = default_num_workers(args.accelerator_type) if args.accelerator_type else None
      if n is None:
        raise UsageError("--dry-run of 'run' needs the number of workers: pass --num-workers or "
                         f"--accelerator-type (or set {ENV['accelerator_type']})")
    if args.log_dir is None:
      args.log_dir = os.path.join(REPO_ROOT, "workdirs", "tpu-logs", args.name)


def _check_remote_dir(path: str) -> None:
  if not re.match(r"^[A-Za-z0-9._-][A-Za-z0-9._/-]*$", path) or ".." in path.split("/"):
    raise UsageError(f"--remote-dir {path!r} must be a plain path relative to the home directory")


# ----------------------------------------------------------------------------------------------
# Commands. Pure functions of the validated arguments.
# ----------------------------------------------------------------------------------------------


def _where(args) -> list[str]:
  return [f"--zone={args.zone}", f"--project={args.project}"]


def create_commands(args) -> list[list[str]]:
  if args.queued:
    base = ["gcloud"] + (["alpha"] if args.best_effort else [])
    cmd = base + ["compute", "tpus", "queued-resources", "create", args.name,
                  f"--node-id={args.name}", *_where(args),
                  f"--accelerator-type={args.accelerator_type}",
                  f"--runtime-version={args.runtime_version}"]
    if args.spot:
      cmd.append("--spot")
    if args.best_effort:
      cmd.append("--best-effort")
  else:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_where(args),
           f"--accelerator-type={args.accelerator_type}", f"--version={args.runtime_version}"]
    if args.spot:
      cmd.append("--spot")
    if args.preemptible:
      cmd.append("--preemptible")
  if args.network:
    cmd.append(f"--network={args.network}")
  if args.subnetwork:
    cmd.append(f"--subnetwork={args.subnetwork}")
  return [cmd]


def _ssh(args, command: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, f"--worker={worker}",
          *_where(args), f"--command={command}"]


def setup_script(args) -> str:
  """The shell script that every worker runs during setup (POSIX sh, one line)."""
  d = shlex.quote(args.remote_dir)
  py = shlex.quote(args.python)
  apt = []
  if args.fashion_mnist:
    apt = ["sudo apt-get update -q", "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
           "dataset-fashion-mnist"]
  steps = ["set -eu", *apt,
           # TPU VM images are Ubuntu 22.04 (Python 3.10); the package needs 3.11 or newer.
           f"if ! command -v {py} >/dev/null 2>&1; then sudo apt-get update -q && "
           f"sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q {py} {py}-venv; fi"]
  if args.repo_url:
    url = shlex.quote(args.repo_url)
    ref = shlex.quote(args.ref or "HEAD")
    steps += [
        f"if [ ! -d {d}/.git ]; then rm -rf {d} && git init -q {d}; fi",
        # Braces: inside an '&&' chain a bare '|| ...' would also swallow earlier failures.
        f"{{ git -C {d} remote set-url origin {url} 2>/dev/null || "
        f"git -C {d} remote add origin {url}; }}",
        f"git -C {d} fetch -q origin {ref}",
        f"git -C {d} checkout -q --detach FETCH_HEAD",
        # Drop stale files of an earlier checkout but keep the venv (re-setup stays fast).
        f"git -C {d} clean -q -f -d -x -e .venv",
    ]
  else:
    tar = shlex.quote(args.remote_dir.rstrip("/") + ".tar.gz")
    steps += [
        f"mkdir -p {d}",
        # Replace the code, keep the venv (re-setup after a code change stays fast).
        f"find {d} -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {{}} +",
        f"tar -xzf {tar} -C {d}",
    ]
  steps += [
      f"cd {d}",
      f"if [ ! -x .venv/bin/python ]; then {py} -m venv .venv; fi",
      ".venv/bin/python -m pip install -q --upgrade pip",
      ".venv/bin/python -m pip install -q -e '.[tpu]'",
      ".venv/bin/python -c 'import jax, weit_jax; print(\"jax\", jax.__version__, \"ok\")'",
  ]
  return steps[0] + "; " + " && ".join(steps[1:])


def default_tarball(args) -> str:
  return args.tarball or os.path.join(tempfile.gettempdir(), f"weit_jax-{args.name}.tar.gz")


def setup_commands(args) -> list[list[str]]:
  cmds = []
  if not args.repo_url:
    tarball = default_tarball(args)
    cmds.append(["git", "-C", REPO_ROOT, "archive", "--format=tar.gz", f"--output={tarball}",
                 "HEAD"])
    cmds.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                 f"{args.name}:{args.remote_dir.rstrip('/')}.tar.gz", "--worker=all",
                 *_where(args)])
  cmds.append(_ssh(args, setup_script(args)))
  return cmds


def user_command(args) -> str:
  cmd = args.command[0] if len(args.command) == 1 else shlex.join(args.command)
  if args.run_name is not None:
    cmd += " " + shlex.quote(f"--workdir={args.bucket}/runs/{args.run_name}")
  return cmd


def run_script(args) -> str:
  """What each worker runs: cd into the repo, activate the venv, export, then the command."""
  env = [f"TFDS_DATA_DIR={args.tfds_data_dir}", f"WEIT_BUCKET={args.bucket}",
         "PYTHONUNBUFFERED=1", *args.env]
  exports = " ".join(
      k + "=" + shlex.quote(v) for k, _, v in (e.partition("=") for e in env))
  return (f"cd {shlex.quote(args.remote_dir)} && . .venv/bin/activate && export {exports} && "
          f"{user_command(args)}")


def describe_command(args) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "describe", args.name, *_where(args),
          "--format=json"]


def run_commands(args, num_workers: int) -> list[list[str]]:
  script = run_script(args)
  return [_ssh(args, script, worker=str(i)) for i in range(num_workers)]


def delete_commands(args) -> list[list[str]]:
  if args.queued:
    return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *_where(args),
             "--force", "--quiet"]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_where(args), "--quiet"]]


# ----------------------------------------------------------------------------------------------
# Execution.
# ----------------------------------------------------------------------------------------------


def require_gcloud() -> None:
  if shutil.which("gcloud") is None:
    raise CommandFailed(GCLOUD_HELP)


def run_sequence(cmds: list[list[str]]) -> None:
  """Runs commands one after another with output streamed; stops at the first failure."""
  for cmd in cmds:
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
      raise CommandFailed(f"command failed with exit status {rc}: {shlex.join(cmd)}")


def count_workers(args) -> int:
  cmd = describe_command(args)
  print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
  if proc.returncode != 0:
    raise CommandFailed(f"command failed with exit status {proc.returncode}: {shlex.join(cmd)}")
  try:
    node = json.loads(proc.stdout)
    endpoints = node.get("networkEndpoints") or []
    # Like gcloud's own --worker parsing: with several networks, each VM lists one endpoint per
    # network and the first of each group is the VM's primary one.
    endpoints = endpoints[::max(1, len(node.get("networkConfigs") or []))]
  except (ValueError, AttributeError) as e:
    raise CommandFailed(f"could not read the worker count from {shlex.join(cmd)}: {e}") from None
  if not endpoints:
    raise CommandFailed(f"{args.name} has no workers yet (is it READY? for a queued resource, "
                        f"is it ACTIVE?); {shlex.join(cmd)} listed no networkEndpoints")
  return len(endpoints)


def run_parallel(cmds: list[list[str]], log_dir: str, stream: str) -> int:
  """Runs one command per worker at once; worker i's output goes to log_dir/worker-i.log."""
  os.makedirs(log_dir, exist_ok=True)
  lock = threading.Lock()
  procs, threads = [], []

  def pump(i: int, proc: subprocess.Popen, path: str) -> None:
    echo = stream == "all" or (stream == "0" and i == 0)
    with open(path, "w", encoding="utf-8", errors="replace") as log:
      for line in proc.stdout:
        log.write(line)
        log.flush()
        if echo:
          with lock:
            sys.stdout.write(f"[worker {i}] {line}")
            sys.stdout.flush()

  for i, cmd in enumerate(cmds):
    print(f"+ [worker {i}] " + shlex.join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", stdin=subprocess.DEVNULL)
    procs.append(proc)
    t = threading.Thread(target=pump, args=(i, proc, os.path.join(log_dir, f"worker-{i}.log")),
                         daemon=True)
    t.start()
    threads.append(t)

  try:
    pending = dict(enumerate(procs))
    rcs = {}
    while pending:
      for i, proc in list(pending.items()):
        try:
          rc = proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
          continue
        rcs[i] = rc
        del pending[i]
        if rc != 0:
          with lock:
            print(f"worker {i} failed with exit status {rc}; its log: "
                  f"{os.path.join(log_dir, f'worker-{i}.log')}", file=sys.stderr, flush=True)
  except KeyboardInterrupt:
    for proc in procs:
      if proc.poll() is None:
        proc.terminate()
    print("interrupted: stopped the local ssh sessions; processes may still run on the workers",
          file=sys.stderr)
    return 130
  for t in threads:
    t.join(timeout=5)
  failed = sorted(i for i, rc in rcs.items() if rc != 0)
  if failed:
    print(f"error: {len(failed)} of {len(cmds)} workers failed: "
          + ", ".join(f"worker {i} (exit {rcs[i]})" for i in failed)
          + f"; logs in {log_dir}", file=sys.stderr)
    return 1
  print(f"all {len(cmds)} workers succeeded; logs in {log_dir}", file=sys.stderr)
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    validate(args)
    if args.subcommand == "create":
      cmds = create_commands(args)
    elif args.subcommand == "setup":
      cmds = setup_commands(args)
    elif args.subcommand == "delete":
      cmds = delete_commands(args)
    else:  # run
      if args.dry_run:
        n = args.num_workers or default_num_workers(args.accelerator_type)
        if args.num_workers is None:
          print(f"# {n} workers assumed from {args.accelerator_type}; a real run asks: "
                + shlex.join(describe_command(args)), file=sys.stderr)
        cmds = run_commands(args, n)
      else:
        require_gcloud()
        n = args.num_workers or count_workers(args)
        return run_parallel(run_commands(args, n), args.log_dir, args.stream)

    if args.dry_run:
      for cmd in cmds:
        print(shlex.join(cmd))
      return 0
    require_gcloud()
    if args.subcommand == "setup" and not args.repo_url:
      if shutil.which("git") is None:
        raise CommandFailed("git is not on PATH; it is needed for 'git archive HEAD' "
                            "(or use --repo-url to clone on the workers)")
      _warn_if_dirty()
    run_sequence(cmds)
    if args.subcommand == "create" and args.queued:
      print(f"queued resource {args.name} requested; wait until its state is ACTIVE:\n  "
            + shlex.join(["gcloud", "compute", "tpus", "queued-resources", "describe", args.name,
                          *_where(args), "--format=value(state.state)"]), file=sys.stderr)
    return 0
  except UsageError as e:
    parser.exit(2, f"{parser.prog}: error: {e}\n")
  except CommandFailed as e:
    print(f"{parser.prog}: error: {e}", file=sys.stderr)
    return 1


def _warn_if_dirty() -> None:
  proc = subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"],
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  if proc.returncode == 0 and proc.stdout.strip():
    print("warning: uncommitted changes are not copied: 'git archive HEAD' sends the last commit",
          file=sys.stderr)


if __name__ == "__main__":
  sys.exit(main())
