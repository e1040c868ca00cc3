"""The workdir lock (``weit_jax/workdir_lock.py``) on its own: who may take a lock over, and the
compare-and-swap that makes exactly one of several starting runs win. Times are passed in, never
slept on; the programs' use of the lock (refusal of a second ``main.py``, takeover after SIGKILL, no
lock left after a normal run, an error or SIGTERM) is tested with real runs in test_reliability.py."""
import json
import os
import subprocess
import sys
import threading

import pytest

from weit_jax import workdir_lock
from weit_jax.workdir_lock import Lock, WorkdirInUse

T0 = 1_800_000_000.0  # a fixed "now"


def record(workdir):
  with open(os.path.join(workdir, workdir_lock.LOCK_NAME)) as f:
    return json.load(f)


def dead_pid() -> int:
  """The pid of a process that has exited and been reaped."""
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_a_lock_records_its_holder_and_is_removed_at_release(tmp_path):
  wd = str(tmp_path / "wd")
  lock = Lock.acquire(wd, "pretrain", now=T0, host="vm-a", command="python main.py --workdir=wd", log=None)
  r = record(wd)
  assert (r["host"], r["pid"], r["program"], r["started"], r["heartbeat"], r["command"]) == (
      "vm-a", os.getpid(), "pretrain", T0, T0, "python main.py --workdir=wd")
  assert lock.beat(now=T0 + 60) and record(wd)["heartbeat"] == T0 + 60 and record(wd)["started"] == T0
  lock.release()
  assert not os.path.exists(os.path.join(wd, workdir_lock.LOCK_NAME))
  Lock.acquire(wd, "train", now=T0 + 61, host="vm-a", log=None).release()  # free again


@pytest.mark.parametrize("host, age", [("vm-a", 0.0), ("vm-a", 599.0), ("vm-b", 0.0), ("vm-b", 599.0)])
def test_a_live_holder_is_named_in_the_refusal(tmp_path, host, age):
  """Live: its process exists on this host (this test's own pid), or, on another host, its heartbeat
  is within the limit."""
  wd = str(tmp_path / "wd")
  Lock.acquire(wd, "init", now=T0, host=host, pid=os.getpid(), command="python main.py X", log=None)
  before = record(wd)
  with pytest.raises(WorkdirInUse) as e:
    Lock.acquire(wd, "init", now=T0 + age, host="vm-a", log=None)
  message = str(e.value)
  for part in (f"host {host}", f"pid {os.getpid()}", "program init", "since 2027-01-15 08:00:00 UTC",
               f"last heartbeat {age:.0f} s ago", "python main.py X", f"kill {os.getpid()} on {host}"):
    assert part in message, (part, message)
  assert record(wd) == before  # untouched


def test_the_lock_of_a_process_gone_from_this_host_is_taken_over_with_one_line(tmp_path):
  wd = str(tmp_path / "wd")
  pid = dead_pid()
  Lock.acquire(wd, "pretrain", now=T0, host="vm-a", pid=pid, log=None)
  lines = []
  lock = Lock.acquire(wd, "pretrain", now=T0 + 1, host="vm-a", log=lines.append)
  assert record(wd)["pid"] == os.getpid() and record(wd)["token"] == lock.record["token"]
  assert len(lines) == 1 and f"pid {pid}" in lines[0] and f"its process {pid} no longer exists" in lines[0]


def test_a_stale_heartbeat_from_another_host_is_taken_over(tmp_path):
  """Another host's process cannot be looked up: only the heartbeat's age counts."""
  wd = str(tmp_path / "wd")
  Lock.acquire(wd, "train", now=T0, host="vm-b", pid=os.getpid(), log=None)
  lines = []
  Lock.acquire(wd, "train", now=T0 + 601, host="vm-a", log=lines.append)
  assert record(wd)["host"] == "vm-a"
  assert len(lines) == 1 and "host vm-b" in lines[0] and "last heartbeat was 601 s ago" in lines[0]


def test_an_unreadable_record_is_taken_over(tmp_path):
  wd = tmp_path / "wd"
  wd.mkdir()
  (wd / workdir_lock.LOCK_NAME).write_text("{not json")
  lines = []
  Lock.acquire(str(wd), "train", now=T0, host="vm-a", log=lines.append)
  assert record(str(wd))["host"] == "vm-a" and "unreadable" in lines[0]


def test_a_holder_that_was_taken_over_neither_refreshes_nor_removes_the_new_record(tmp_path):
  wd = str(tmp_path / "wd")
  old = Lock.acquire(wd, "pretrain", now=T0, host="vm-b", pid=12345, log=None)
  new = Lock.acquire(wd, "pretrain", now=T0 + 601, host="vm-a", log=None)
  assert not old.beat(now=T0 + 602) and old.lost
  old.release()
  assert record(wd)["token"] == new.record["token"] and record(wd)["heartbeat"] == T0 + 601
  new.release()
  assert not os.path.exists(os.path.join(wd, workdir_lock.LOCK_NAME))


def test_of_runs_starting_together_exactly_one_holds_the_lock(tmp_path):
  """Eight threads race for an empty workdir (each as another host, so none is stale to the others):
  whatever the interleaving, the compare-and-swap lets exactly one write its record."""
  wd = str(tmp_path / "wd")
  won, refused, start = [], [], threading.Barrier(8)

  def contend(i):
    start.wait()
    try:
      won.append(Lock.acquire(wd, "pretrain", now=T0, host=f"vm-{i}", log=None))
    except WorkdirInUse:
      refused.append(i)

  threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(won) == 1 and len(refused) == 7
  assert record(wd)["token"] == won[0].record["token"]


def test_cloud_storage_workdirs_use_the_gcs_store_with_generation_preconditions():
  """Opening a ``gs://`` store touches no network; its writes carry ``if_equal`` generations, which
  the gcs driver sends as ``ifGenerationMatch`` preconditions."""
  spec = workdir_lock._store("gs://my-bucket/runs/vit/").spec().to_json()
  assert (spec["driver"], spec["bucket"], spec["path"]) == ("gcs", "my-bucket", "runs/vit/")


def test_hold_releases_at_an_error_exit(tmp_path):
  wd = str(tmp_path / "wd")
  with pytest.raises(RuntimeError):
    with workdir_lock.hold(wd, "train") as lock:
      assert record(wd)["token"] == lock.record["token"]
      raise RuntimeError("a failing run")
  assert not os.path.exists(os.path.join(wd, workdir_lock.LOCK_NAME))
  with workdir_lock.hold(wd, "train"):
    with pytest.raises(WorkdirInUse, match="in use by another run"):
      with workdir_lock.hold(wd, "train"):
        pass
  assert not os.path.exists(os.path.join(wd, workdir_lock.LOCK_NAME))
