"""Outputs that cost nothing: no input is ever overwritten, an earlier result is replaced
only once the new one is complete, and a failed write leaves nothing behind.

Every writer follows one protocol: `check` before any work (overlap with inputs,
existence, a writable place with room), then `staged`: the output is written to a
sibling `PATH.partial-TOKEN`, renamed onto PATH when complete (an old PATH is renamed
away first and deleted last), and the sibling is removed on any failure, ENOSPC and
EROFS included.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import uuid
from typing import Callable, Iterator, Sequence

from recycle_jax.runtime import locking
from recycle_jax.runtime.errors import UserError
from recycle_jax.runtime.errors import check as require

HEADROOM = 1 << 20  # bytes beyond the estimate: metadata, filesystem blocks
MIN_INODES = 8  # files and directories: a lock, a temp sibling, an output's few files


def real(path: str) -> str:
  return os.path.realpath(os.path.abspath(path))


def inside(path: str, parent: str) -> bool:
  """Whether path is parent or lies under it (symlinks resolved)."""
  path, parent = real(path), real(parent)
  return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def overlaps(a: str, b: str) -> bool:
  return inside(a, b) or inside(b, a)


def _existing_ancestor(path: str) -> str:
  p = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(p):
    p = os.path.dirname(p)
  return p


def check(path: str, inputs: Sequence[str] = (), overwrite: bool = False,
          flag: str = "--output", kind: str = "dir", nbytes: int = 0) -> None:
  """Refuses, before any work, an output that would cost an input or an earlier result,
  or that cannot be written: one that is, contains or is inside an input (with or
  without --overwrite), exists (without --overwrite), lies under a file, is of the other
  kind than `kind` ('dir' or 'file'), or whose filesystem is read-only, not writable by
  this user, or short of `nbytes` (+ headroom)."""
  require(bool(path), "empty output path", flag, "pass a path")
  for src in inputs:
    require(not overlaps(path, src), f"output {path} overlaps input {src}", flag,
           "write the result somewhere else; inputs are never modified")
  if os.path.lexists(path):
    require(overwrite, f"output {path} already exists", flag,
           "pass --overwrite to replace it, or choose another path")
    want_dir = kind == "dir"
    require(os.path.isdir(path) == want_dir or kind == "any",
           f"output {path} is {'a file' if want_dir else 'a directory'}", flag,
           f"pass a {'directory' if want_dir else 'file'} path")
    check_replaceable(path, flag)
  parent = _existing_ancestor(path)
  require(os.path.isdir(parent), f"output {path} lies under the file {parent}", flag,
         "choose a path in a directory")
  try:
    st = os.statvfs(parent)
  except OSError as e:
    raise UserError(f"cannot use {parent}: {e.strerror}", flag) from None
  require(not st.f_flag & os.ST_RDONLY, f"{parent} is on a read-only filesystem", flag,
         "write somewhere writable")
  require(os.access(parent, os.W_OK | os.X_OK,
                    effective_ids=os.access in os.supports_effective_ids),
          f"no permission to write in {parent}", flag,
         "write somewhere this user may write, or change its permissions")
  free = st.f_bavail * st.f_frsize
  need = nbytes + HEADROOM if nbytes else 1
  require(free >= need, f"not enough space in {parent}: {_mb(need)} needed, {_mb(free)} free",
         flag, "free some space or write elsewhere")
  # Files too (inodes): a filesystem that counts them (f_files > 0) with fewer left than
  # one output needs fails its writes after the work; refused before it.
  require(not st.f_files or st.f_favail >= MIN_INODES, f"{parent} is out of inodes "
          f"({st.f_favail} files can be created, an output needs {MIN_INODES} or more)", flag,
          "delete some files there or write elsewhere")


def check_replaceable(path: str, flag: str) -> None:
  """An existing output is replaced by renames in its directory (the new one is written
  beside it, so every rename stays on one filesystem): one that is the root of another
  filesystem (a mount point) cannot be renamed, so it is refused before any work."""
  require(not os.path.ismount(path), f"output {path} is a mount point (the root of another "
          "filesystem), which cannot be replaced by a rename", flag,
          "write into a new path inside it")


def _mb(n: int) -> str:
  return f"{n / 2**20:.1f} MiB"


def temp_name(path: str, token: str | None = None) -> str:
  return f"{os.path.abspath(path)}.partial-{token or uuid.uuid4().hex[:8]}"


def remove(path: str) -> None:
  """Deletes a file or a tree if present; never raises (it runs on error paths)."""
  try:
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
      os.remove(path)
  except OSError:
    pass


def replace(tmp: str, path: str, overwrite: bool) -> None:
  """Moves the complete `tmp` onto `path`; an old `path` is kept until then."""
  if not os.path.lexists(path):
    os.rename(tmp, path)
    return
  require(overwrite, f"output {path} already exists", "", "pass --overwrite")
  old = f"{os.path.abspath(path)}.old-{uuid.uuid4().hex[:8]}"
  os.rename(path, old)
  try:
    os.rename(tmp, path)
  except BaseException:
    os.rename(old, path)  # put the old result back
    raise
  remove(old)


@contextlib.contextmanager
def set_aside(path: str, active: bool = True) -> Iterator[None]:
  """For a block that writes a new `path` in place (a workdir filled as a search runs): an
  existing `path` is moved to a sibling first, deleted when the block ends normally and
  put back, the new one removed, when it fails. Nothing is lost either way."""
  if not active or not os.path.lexists(path) or (os.path.isdir(path) and
                                                  not os.listdir(path)):
    yield  # nothing to keep
    return
  old = f"{os.path.abspath(path)}.old-{uuid.uuid4().hex[:8]}"
  os.rename(path, old)
  try:
    yield
  except BaseException as e:
    remove(path)
    os.rename(old, path)
    e.put_back = path  # an interrupted search: its state went too (the error line says)
    raise
  remove(old)


@contextlib.contextmanager
def removed_if_empty(path: str) -> Iterator[None]:
  """For a block that creates the directory `path`: when it fails (a full disk, out of
  inodes, a signal) and leaves `path` new and empty, `path` is removed (nothing left)."""
  existed = os.path.lexists(path)
  try:
    yield
  except BaseException:
    if not existed:
      with contextlib.suppress(OSError):
        os.rmdir(path)
    raise


@contextlib.contextmanager
def staged(path: str, overwrite: bool = False, token: str | None = None,
           commit: bool = True) -> Iterator[str]:
  """Yields a temp sibling to write `path` into; renames it onto `path` when the block
  ends normally (unless not `commit`: the caller renames), removes it otherwise."""
  tmp = temp_name(path, token)
  try:
    yield tmp
    if commit:
      replace(tmp, path, overwrite)
  except BaseException:
    remove(tmp)
    raise


def write_text(path: str, text: str, overwrite: bool = True) -> None:
  """A small text file, whole or not at all."""
  with staged(path, overwrite) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)


# ----------------------------------------------------------------------------- checkpoint directories
# Written by every process of a multi-host run into one temporary sibling, renamed by process 0.
# One writer per output: process 0 holds `PATH.lock` from before the sibling is made until
# the output is committed and read back (a second writer is refused naming the holder), and
# a sibling's name records its owner (pid, process start, host), so a sweep removes only
# siblings whose writer is gone.

_OWNED = re.compile(r"\.partial-(\d+)-(\d+)-([0-9a-f]{8})-[0-9a-f]{8}")


def check_output(path: str, inputs: Sequence[str] = (), overwrite: bool = False,
                 flag: str = "--output", nbytes: int = 0) -> None:
  """Refuses an output that is, contains or is inside an input, exists without overwrite,
  or cannot be written (see outputs.check)."""
  check(path, inputs, overwrite, flag, kind="any", nbytes=nbytes)


def temp_sibling(path: str) -> str:
  """A fresh `PATH.partial-PID-START-HOST-RANDOM` to write into (one name on every
  process), after removing the siblings whose writer is gone (killed: SIGKILL, power)."""
  import jax
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if jax.process_index() == 0:
    for sibling in glob.glob(f"{glob.escape(path)}.partial-*"):
      if not _owner_alive(sibling[len(path):]):
        remove(sibling)
  return f"{path}.partial-{_run_token()}"


def _owner_alive(suffix: str) -> bool:
  """Whether the writer named in a sibling's suffix still runs (a sibling of an older
  version, which names none, counts as gone: as before, it is swept)."""
  m = _OWNED.match(suffix)
  return bool(m) and locking.owner_alive(m[3], int(m[1]), int(m[2]))


@contextlib.contextmanager
def writing(path: str, overwrite: bool, verify: Callable[[str], None] | None = None,
            flag: str = "--output") -> Iterator[str]:
  """Yields the temporary sibling to write the directory `path` into (every process);
  when the block ends normally, `verify(sibling)` reads it back (process 0: raises when it
  is not a complete output), it is renamed onto `path` and read back there. On any
  failure the sibling, and whatever a library left beside it, is removed. Process 0 holds
  the output's lock throughout: another writer of `path` is refused naming this one, and
  a `path` inside a workdir another process has locked (a running search) is refused."""
  import jax
  path = os.path.abspath(path)
  lead = jax.process_index() == 0
  with (locking.output_lock(path, flag) if lead else contextlib.nullcontext()):
    tmp = temp_sibling(path)
    try:
      yield tmp
      if lead and verify is not None:
        verify(tmp)
      commit(tmp, path, overwrite)
      if lead and verify is not None:
        verify(path)
    except BaseException:
      if lead:
        for left in glob.glob(f"{glob.escape(tmp)}*"):  # (Orbax's .orbax-checkpoint-tmp too)
          remove(left)
      raise


def commit(tmp: str, path: str, overwrite: bool) -> None:
  """Renames a finished temp dir onto `path` (process 0), then waits for every process."""
  import jax
  if jax.process_index() == 0:
    replace(tmp, path, overwrite)
  _sync("recycle_jax_save")


def _run_token() -> str:
  """PID-START-HOST-RANDOM of process 0: the same on every process of a multi-host run, so
  all of them write one directory; it names its writer for the sweep."""
  from recycle_jax.runtime import multihost  # jax: only where a checkpoint is written
  pid = os.getpid()
  token = (f"{pid}-{locking.process_start(pid) or 0}-{locking.host_key()}-"
           f"{uuid.uuid4().hex[:8]}")
  return multihost.broadcast("run_token", token)


def _sync(name: str) -> None:
  from recycle_jax.runtime import multihost
  multihost.barrier(name)
