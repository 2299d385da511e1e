"""One writer per workdir: a lock file beside it, holding the writer's host and pid.

`WORKDIR.lock` is created exclusively (O_EXCL) before the workdir is checked or touched,
so of two searches started together exactly one proceeds; the other is refused with one
line naming the holder. The lock is released on exit (normal, error, Ctrl-C, SIGTERM);
after a crash (SIGKILL, power) it is stale: a lock whose pid is gone on this host is
taken over, one from another host is reported (its holder cannot be checked from here).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from typing import Iterator

from recycle_jax.runtime.errors import UserError

SUFFIX = ".lock"


def lock_path(workdir: str) -> str:
  return os.path.abspath(workdir).rstrip(os.sep) + SUFFIX


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def process_start(pid: int) -> int | None:
  """The process's start time (clock ticks since boot, /proc/PID/stat field 22): with the
  pid, it names one process (a pid reused by a later process has another start)."""
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      stat = f.read()
    return int(stat[stat.rindex(b")") + 2:].split()[19])
  except (OSError, ValueError, IndexError):
    return None


def host_key() -> str:
  """This host, as 8 hex digits (names of temp siblings carry it)."""
  return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def owner_alive(host: str, pid: int, start: int | None) -> bool:
  """Whether the process that wrote a record is still running. One on another host
  cannot be checked from here: counted alive."""
  if host not in (socket.gethostname(), host_key()):
    return True
  if not _alive(pid):
    return False
  now = process_start(pid)
  return not start or now is None or now == start


def _holder(path: str) -> dict | None:
  """The lock's {host, pid, ...}, or None when unreadable (a writer between create and
  write, or garbage: treated as held, briefly, then as stale)."""
  try:
    with open(path, encoding="utf-8") as f:
      h = json.load(f)
    return h if isinstance(h, dict) and isinstance(h.get("pid"), int) else None
  except (OSError, ValueError):
    return None


def _stale(path: str, holder: dict | None) -> bool:
  if holder is None:  # unreadable: stale once older than a writer needs to fill it
    try:
      return time.time() - os.path.getmtime(path) > 5.0
    except OSError:
      return True
  return not owner_alive(str(holder.get("host")), holder["pid"], holder.get("start"))


def acquire(workdir: str, flag: str = "--workdir", what: str = "workdir") -> str:
  """Takes the lock of `workdir` (or of an output: `what`) or raises UserError naming its
  holder; returns its path."""
  path = lock_path(workdir)
  me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
        "start": process_start(os.getpid())}
  for _ in range(3):  # a stale lock is removed, then taken like a fresh one
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      holder = _holder(path)
      if holder and holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
        raise UserError(f"{what} {workdir} is already locked by this process", flag) from None
      if _stale(path, holder):
        with contextlib.suppress(FileNotFoundError):
          os.remove(path)
        continue
      who = (f"pid {holder['pid']} on host {holder.get('host')}" if holder
             else "another process")
      raise UserError(f"{what} {workdir} is in use by {who}", f"{flag}, lock file {path}",
                      f"wait for it to finish, or use another {what} (if that process is "
                      "gone, delete the lock file)") from None
    except OSError as e:  # read-only or missing parent: reported by the writer's checks
      raise UserError(f"cannot create the lock file: {e.strerror}", path,
                      "choose a workdir in a writable directory") from None
    try:
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(me, f)
    except OSError as e:  # a full disk: no half-written lock left
      with contextlib.suppress(OSError):
        os.remove(path)
      raise UserError(f"cannot write the lock file: {e.strerror}", path,
                      "free some space or choose another workdir") from None
    return path
  raise UserError(f"could not take the lock of {workdir}", path, "try again")


def release(path: str) -> None:
  """Removes the lock if it is still this process's."""
  holder = _holder(path)
  if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
    with contextlib.suppress(OSError):
      os.remove(path)


def make_parents(path: str) -> list[str]:
  """Creates the missing directories above `path` (as `mkdir -p` of its parent would);
  returns them, outermost first, so a command that fails can remove them again."""
  missing, parent = [], os.path.dirname(os.path.abspath(path))
  while parent and not os.path.lexists(parent):
    missing.append(parent)
    parent = os.path.dirname(parent)
  for d in reversed(missing):
    try:
      os.mkdir(d)
    except OSError as e:  # a file in the way, read-only: the lock's own line reports it
      remove_empty(missing[missing.index(d) + 1:][::-1])
      raise UserError(f"cannot create the directory {d}: {e.strerror}", path,
                      "choose a workdir in a writable directory") from None
  return missing[::-1]


def remove_empty(dirs: list[str]) -> None:
  """Removes those of `dirs` (outermost first) that are still empty, innermost first."""
  for d in reversed(dirs):
    with contextlib.suppress(OSError):
      os.rmdir(d)


@contextlib.contextmanager
def workdir_lock(workdir: str, flag: str = "--workdir") -> Iterator[str | None]:
  """The workdir's lock for the block. Missing directories above the workdir are created
  (runs/ on a fresh checkout) and removed again if the command leaves them empty. In a
  multi-process run (jax.distributed) the processes share one workdir: process 0 holds
  the lock for all of them."""
  import jax  # already imported by every command that locks
  if jax.process_count() > 1 and jax.process_index() != 0:
    yield None
    return
  created = make_parents(lock_path(workdir))
  try:
    path = acquire(workdir, flag)
    try:
      yield path
    finally:
      release(path)
  finally:
    remove_empty(created)


# ----------------------------------------------------------------------------- outputs

def holder_of(path: str) -> dict | None:
  """The live holder of the lock of `path` other than this process, or None."""
  lock = lock_path(path)
  if not os.path.lexists(lock):
    return None
  holder = _holder(lock)
  if holder is None:
    return None if _stale(lock, holder) else {"pid": "?", "host": "?"}
  mine = holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid()
  return None if mine or _stale(lock, holder) else holder


@contextlib.contextmanager
def output_lock(path: str, flag: str = "--output") -> Iterator[str]:
  """The lock of the output `path` (`PATH.lock`) for the block: a second writer of the
  same path is refused naming this one. A `path` inside (or at) a workdir another process
  has locked, a running search's, is refused first: the search would replace it."""
  path = os.path.abspath(path)
  d = path
  while True:
    holder = holder_of(d)
    if holder is not None and d != path:
      raise UserError(f"output {path} lies inside the workdir {d}, in use by pid "
                      f"{holder.get('pid')} on host {holder.get('host')}", f"{flag}, lock "
                      f"file {lock_path(d)}", "write it outside that workdir (the run there "
                      "would replace it), or wait for the run to finish")
    parent = os.path.dirname(d)
    if parent == d:
      break
    d = parent
  os.makedirs(os.path.dirname(path), exist_ok=True)
  lock = acquire(path, flag, what="output")
  try:
    yield lock
  finally:
    release(lock)
