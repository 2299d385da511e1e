"""Untrusted programs run contained: one subprocess each, run by a pool of workers.

Each program runs as `python -I -S` (no environment variables, no script directory on
sys.path, no site-packages: the standard library only, which also starts in ~60 ms instead
of ~500 ms; `Limits.site_packages` allows the environment's packages) in a fresh temporary working directory that is removed afterwards,
in its own process group (killed whole at the wall-clock limit and after it ends), with
kernel limits set before the program runs (`resource.setrlimit`): address space, CPU seconds,
file size (a program cannot fill the disk), open files, and processes (for a non-root
user; the kernel does not apply it to root, where the audit hook's refusal of fork, exec
and spawn is what stops a fork bomb). Where unprivileged namespaces work (`unshare -rn`)
it has no network at all; in every case the child's audit hook (`_child.py`) refuses
sockets, subprocesses, native code and writes outside its directory. stdout and stderr go
to files in that directory (bounded by the file-size limit), never to the parent's
memory. A program that hangs, forks, exits early, raises, writes huge files or tries to
escape loses its sample (`Outcome.passed` False, `Outcome.status` says why) and nothing
else: the other programs and the caller are unaffected.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Sequence

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_child.py")


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-program limits. memory_mb bounds the address space (RLIMIT_AS)."""
  timeout_s: float = 10.0
  cpu_s: int = 10
  memory_mb: int = 1024
  file_mb: int = 16
  open_files: int = 64
  processes: int = 16
  output_bytes: int = 1 << 16  # stdout/stderr read back at most
  site_packages: bool = False


@dataclasses.dataclass(frozen=True)
class Outcome:
  """passed: the program ran to its end. status: 'passed', 'failed' (an exception or a
  non-zero exit), 'exited' (SystemExit or os._exit before the end), 'timeout', 'killed'
  (a signal: memory, CPU or file-size limit) or 'error' (the sandbox could not run it)."""
  passed: bool
  status: str
  stdout: str = ""
  stderr: str = ""
  returncode: int | None = None


@functools.lru_cache(None)
def _unshare_prefix() -> tuple[str, ...]:
  """('unshare', '-rn', '--') when a user + network namespace can be made here, else ()."""
  exe = shutil.which("unshare")
  if not exe:
    return ()
  try:
    ok = subprocess.run([exe, "-rn", "--", sys.executable, "-I", "-S", "-c", "pass"],
                        capture_output=True, timeout=30).returncode == 0
  except (OSError, subprocess.SubprocessError):
    ok = False
  return (exe, "-rn", "--") if ok else ()


def _rlimits(limits: Limits) -> str:
  """The kernel limits as _child.py sets them on itself: JSON {RLIMIT name: value}."""
  mb = 1 << 20
  return json.dumps({"RLIMIT_AS": limits.memory_mb * mb, "RLIMIT_CPU": limits.cpu_s,
                     "RLIMIT_FSIZE": limits.file_mb * mb, "RLIMIT_NOFILE": limits.open_files,
                     "RLIMIT_CORE": 0, "RLIMIT_NPROC": limits.processes})


def _read(path: str, limit: int) -> str:
  try:
    with open(path, "rb") as f:
      return f.read(limit).decode("utf-8", "replace")
  except OSError:
    return ""


def _kill_group(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
  """Runs one program contained; see the module docstring."""
  work = tempfile.mkdtemp(prefix="rj_sandbox_")
  try:
    program = os.path.join(work, "program.py")
    with open(program, "w", encoding="utf-8") as f:
      f.write(source)
    out_path, err_path = os.path.join(work, ".stdout"), os.path.join(work, ".stderr")
    token = secrets.token_hex(16).encode()
    read_end, write_end = os.pipe()
    cmd = [*_unshare_prefix(), sys.executable, "-I",
           *(() if limits.site_packages else ("-S",)), _CHILD, program, str(write_end),
           _rlimits(limits)]
    env = {"PATH": os.defpath, "HOME": work, "LANG": "C.UTF-8", "TMPDIR": work}
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
      try:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.PIPE, stdout=out,
                                stderr=err, pass_fds=(write_end,), start_new_session=True)
      except OSError as e:
        os.close(read_end)
        os.close(write_end)
        return Outcome(False, "error", stderr=f"sandbox: cannot start: {e}")
      os.close(write_end)
      try:
        proc.stdin.write(token + b"\n")
        proc.stdin.close()
      except OSError:
        pass  # it died before reading: its exit status says why
      try:
        code = proc.wait(timeout=limits.timeout_s)
        status = None
      except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        code, status = proc.wait(), "timeout"
      _kill_group(proc.pid)  # anything it left running
    with os.fdopen(read_end, "rb") as r:
      result = r.read(64).strip()
    stdout = _read(out_path, limits.output_bytes)
    stderr = _read(err_path, limits.output_bytes)
    if status is None:
      if code == 0 and result == token:
        status = "passed"
      elif code < 0:
        status = "killed"
      elif code == 3 or (code == 0 and result != token):
        status = "exited"
      else:
        status = "failed"
    return Outcome(status == "passed", status, stdout, stderr, code)
  finally:
    shutil.rmtree(work, ignore_errors=True)


def run_programs(sources: Sequence[str], limits: Limits = Limits(),
                 workers: int | None = None) -> list[Outcome]:
  """Outcomes of many programs, in order, `workers` at a time (default: the CPU count).
  Threads only wait on subprocesses, so they run in parallel despite the GIL."""
  workers = workers or os.cpu_count() or 1
  if len(sources) <= 1 or workers == 1:
    return [run_program(s, limits) for s in sources]
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(lambda s: run_program(s, limits), sources))
