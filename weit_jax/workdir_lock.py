"""One live run per workdir: a lock record in ``WORKDIR/lock.json`` while a program writes there.

The record says who holds the workdir (host, process id, program, command, start time) and carries
a heartbeat that a background thread refreshes every ``HEARTBEAT_S`` seconds. A second run on the
workdir is refused before it writes anything. A lock is stale, and is taken over with one log line,
when its process no longer exists on this host (a SIGKILLed run), or, from any host, when its
heartbeat is older than ``STALE_AFTER_S`` (a lost VM; a ``gs://`` workdir shared by machines).

Every change of the record is a compare-and-swap on its storage generation (tensorstore's key-value
store: lock files on a local disk, ``ifGenerationMatch`` preconditions on Cloud Storage), so of two
runs that start together, or that both find the same stale lock, exactly one wins, and a holder
never deletes or refreshes a record another run has taken over.

On multi-host runs process 0 holds the lock for the job; the others learn its outcome.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
import uuid

import jax
import numpy as np

from weit_jax import metrics

LOCK_NAME = "lock.json"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0  # ten missed heartbeats


class WorkdirInUse(ValueError):
  """Another live run holds the workdir (a ValueError: main.py prints it as one ``error:`` line)."""


def _store(workdir: str):
  import tensorstore as ts
  url = workdir if "://" in workdir else "file://" + os.path.abspath(workdir)
  return ts.KvStore.open(url.rstrip("/") + "/").result()


def _iso(t: float) -> str:
  return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def process_exists(pid: int) -> bool:
  """Whether ``pid`` names a live process on this host (a zombie, killed but not yet reaped, is not)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process: it exists
    return True
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except (OSError, IndexError):
    return True


def stale_reason(holder: dict, *, now: float, host: str, stale_after_s: float = STALE_AFTER_S) -> str | None:
  """Why ``holder``'s lock may be taken over, or None while it belongs to a live run."""
  if holder.get("host") == host and not process_exists(int(holder.get("pid", -1))):
    return f"its process {holder.get('pid')} no longer exists on this host"
  age = now - float(holder.get("heartbeat", 0))
  if age > stale_after_s:
    return f"its last heartbeat was {age:.0f} s ago (a lock is stale after {stale_after_s:.0f} s)"
  return None


def describe(holder: dict, now: float) -> str:
  return (f"host {holder.get('host')}, pid {holder.get('pid')}, program {holder.get('program')}, since "
          f"{_iso(float(holder.get('started', 0)))}, last heartbeat {now - float(holder.get('heartbeat', 0)):.0f} s ago "
          f"(command: {holder.get('command')})")


class Lock:
  """The record this run holds; ``acquire`` makes one, ``beat`` refreshes it, ``release`` removes it."""

  def __init__(self, store, workdir: str, record: dict, generation: bytes):
    self._store, self.workdir, self.record, self._generation = store, workdir, record, generation
    self.lost = False

  @classmethod
  def acquire(cls, workdir: str, program: str, *, now: float | None = None, host: str | None = None,
              pid: int | None = None, command: str | None = None, stale_after_s: float = STALE_AFTER_S,
              log=print) -> "Lock":
    """Writes this run's record, taking over a stale one; raises ``WorkdirInUse`` naming a live holder."""
    store = _store(workdir)
    now = time.time() if now is None else now
    host = host or socket.gethostname()
    record = dict(host=host, pid=os.getpid() if pid is None else int(pid), program=program,
                  command=command if command is not None else shlex.join([sys.executable] + sys.argv),
                  started=now, heartbeat=now, token=uuid.uuid4().hex)
    for _ in range(5):  # only a race with another starting run loops
      found = store.read(LOCK_NAME).result()
      if found.state == "value":
        try:
          holder = json.loads(found.value)
          reason = stale_reason(holder, now=now, host=host, stale_after_s=stale_after_s)
        except (ValueError, TypeError, AttributeError):
          holder, reason = {}, "its record is unreadable"
        if reason is None:
          raise WorkdirInUse(
              f"workdir {workdir} is in use by another run: {describe(holder, now)}. Wait for that run to "
              f"end or stop it (kill {holder.get('pid')} on {holder.get('host')}), or use another --workdir. "
              f"If it is gone, rerun this command: a lock is taken over once its process no longer exists "
              f"on this host or its heartbeat is older than {stale_after_s:.0f} s.")
      written = store.write(LOCK_NAME, json.dumps(record).encode(), if_equal=found.stamp.generation).result()
      if written.generation:  # empty: the record changed since it was read; read it again
        if found.state == "value" and log:
          log(f"Took over the lock of {workdir} from {describe(holder, now)}: {reason}.")
        return cls(store, workdir, record, written.generation)
    raise WorkdirInUse(f"workdir {workdir}: other runs keep changing its lock ({LOCK_NAME}); start one run at a time.")

  def beat(self, now: float | None = None) -> bool:
    """Refreshes the heartbeat; False (and ``lost``) once another run has taken the lock over."""
    if self.lost:
      return False
    record = dict(self.record, heartbeat=time.time() if now is None else now)
    written = self._store.write(LOCK_NAME, json.dumps(record).encode(), if_equal=self._generation).result()
    if not written.generation:
      self.lost = True
      return False
    self.record, self._generation = record, written.generation
    return True

  def release(self) -> None:
    """Removes the record, unless another run has taken it over (then it is theirs)."""
    if not self.lost:
      self._store.write(LOCK_NAME, None, if_equal=self._generation).result()


class _Heartbeat(threading.Thread):

  def __init__(self, lock: Lock, every_s: float, log):
    super().__init__(name="workdir-lock-heartbeat", daemon=True)
    self.lock, self.every_s, self.log = lock, every_s, log
    self.stopped = threading.Event()

  def run(self):
    while not self.stopped.wait(self.every_s):
      try:
        if not self.lock.beat():
          self.log(f"warning: another run took over the lock of {self.lock.workdir}; this run no longer "
                   "holds it and should be stopped.")
          return
      except Exception as e:  # a storage hiccup: the next beat tries again
        self.log(f"warning: could not refresh the lock of {self.lock.workdir}: {e}")

  def stop(self):
    self.stopped.set()
    self.join()


def _raise_exit(signum, frame):
  raise SystemExit(128 + signum)


@contextlib.contextmanager
def hold(workdir: str, program: str):
  """Holds ``workdir`` while the block runs (call it after the config is validated: it is a run's
  first write). Released at a normal or error exit and at SIGTERM (turned into ``SystemExit(143)``
  here; the training loop's own handler saves a checkpoint first)."""
  lock, refusal = None, None
  if jax.process_index() == 0:
    try:
      lock = Lock.acquire(workdir, program, log=metrics.log)
    except WorkdirInUse as e:
      refusal = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refusal is not None)))
    if refused and refusal is None:
      refusal = WorkdirInUse(f"workdir {workdir} is in use by another run (process 0 says who).")
  if refusal is not None:
    raise refusal
  beat = _Heartbeat(lock, HEARTBEAT_S, metrics.log) if lock else None
  installed, previous = False, None
  try:
    previous, installed = signal.signal(signal.SIGTERM, _raise_exit), True
  except ValueError:  # not the main thread: nothing to install
    pass
  try:
    if beat:
      beat.start()
    yield lock
  finally:
    if installed:
      signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    if beat:
      beat.stop()
    if lock:
      lock.release()
