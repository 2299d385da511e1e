"""Untrusted programs run contained, and their verdicts are decided out of their reach.

One run = two interpreters (see docs/sandbox.md for the threat model and measurements):
  - the harness (`_harness.py`, trusted) enters the jail (`_jail.py`): fresh mount, pid,
    network, IPC and UTS namespaces; a read-only root holding only the shared libraries
    and the interpreter's standard library (no home, project, site-packages, /proc,
    shell); a private noexec tmpfs of `Limits.disk_mb` as the working directory; an
    unprivileged uid of its own when the caller is root (else a user namespace without
    capabilities); no_new_privs and a seccomp filter. It is pid 1 there: when it ends,
    the kernel kills everything the program started.
  - the program (`_child.py`) runs in a second interpreter under the kernel limits
    (`Limits`: address space, CPU, file size, open files, processes). With tests, the
    tests run in the harness, calling the program's functions through pipes with plain
    values (`_child.encode`), so the program can neither see nor change what decides its
    verdict. The verdict comes back on a pipe only the harness holds.
The caller waits on the process with a deadline (`Limits.timeout_s`), never on a pipe,
reads at most `output_bytes` of stdout/stderr (the rest is drained and dropped, so a
program may print any amount) and kills the process group at the deadline.

Where namespaces cannot be made (a container without them, a kernel that forbids
unprivileged user namespaces), code tasks refuse to run (`require()`: one line saying
what to enable), unless `allow_unsandboxed(True)` (the CLI's `--allow_unsandboxed_code`)
accepts running the same two interpreters without the jail.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import glob
import json
import marshal
import os
import selectors
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time
from typing import Sequence

from recycle_jax.runtime.errors import UserError

_HERE = os.path.dirname(os.path.abspath(__file__))
_HARNESS, _CHILD = os.path.join(_HERE, "_harness.py"), os.path.join(_HERE, "_child.py")
UID_BASE = 2_000_000_000  # unprivileged uids for programs when the caller is root
# Extension modules hidden from programs: native code, interpreters without the harness.
DENIED_MODULES = ("_ctypes", "_ctypes_test", "_xxsubinterpreters", "_xxinterpchannels",
                  "_testcapi", "_testinternalcapi", "_testbuffer", "_testmultiphase",
                  "_testclinic", "_testimportmultiple", "_testsinglephase", "_xxtestfuzz")


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-program limits. memory_mb bounds each process's address space (RLIMIT_AS),
  file_mb one file (RLIMIT_FSIZE), disk_mb the private /tmp, processes the program's
  processes (RLIMIT_NPROC of its own uid)."""
  timeout_s: float = 10.0
  cpu_s: int = 10
  memory_mb: int = 1024
  file_mb: int = 16
  disk_mb: int = 32
  open_files: int = 64
  processes: int = 16
  output_bytes: int = 1 << 16  # stdout/stderr kept at most


@dataclasses.dataclass(frozen=True)
class Program:
  """source: what runs (the prompt and the completion). tests: run by the harness
  against the program's definitions (None: the program passes by running to its end).
  trusted: the task's own prefix of `source` (its prompt), run by the harness too so the
  tests use the prompt's helpers, not the program's versions of them."""
  source: str
  tests: str | None = None
  trusted: str = ""


@dataclasses.dataclass(frozen=True)
class Outcome:
  """passed: the program ran to its end (and its tests passed). status: 'passed',
  'failed' (an exception, a failed test or a non-zero exit), 'exited' (SystemExit or
  os._exit before the end), 'timeout', 'killed' (a signal: memory, CPU or file-size
  limit) or 'error' (the sandbox could not run it). detail: why, in a few words."""
  passed: bool
  status: str
  stdout: str = ""
  stderr: str = ""
  returncode: int | None = None
  detail: str = ""


# ----------------------------------------------------------------------------- policy
_ALLOW_UNSANDBOXED = False


def allow_unsandboxed(allow: bool) -> None:
  """Accept running programs without the jail where it cannot be made (explicit opt-in,
  lm-eval's `confirm_run_unsafe_code`)."""
  global _ALLOW_UNSANDBOXED
  _ALLOW_UNSANDBOXED = bool(allow)


def jail_problem() -> str | None:
  """None when the jail works here, else what failed (one line). Measured once per
  effective uid (a caller that switched its euid gets its own answer)."""
  return _jail_problem(os.geteuid())


@functools.lru_cache(None)
def _jail_problem(euid: int) -> str | None:
  del euid  # the cache key
  if not sys.platform.startswith("linux"):
    return f"Linux namespaces are needed; this is {sys.platform}"
  out = _run(Program("print('ok')"), Limits(timeout_s=30), jail=True)
  if out.passed and out.stdout.strip() == "ok":
    return None
  lines = [l for l in (out.detail + "\n" + out.stderr).splitlines() if l.strip()]
  return lines[-1] if lines else out.status


def require() -> bool:
  """True if programs run jailed; False if unjailed by explicit consent; else UserError."""
  problem = jail_problem()
  if problem is None:
    return True
  if _ALLOW_UNSANDBOXED:
    return False
  raise UserError(
      f"model-written code needs the sandbox, which cannot start here ({problem})",
      "code verifier",
      "run as root or enable unprivileged user namespaces (sysctl user.max_user_namespaces="
      "15000 kernel.unprivileged_userns_clone=1; in Docker: --privileged or a seccomp "
      "profile allowing unshare), or pass --allow_unsandboxed_code to run it unconfined")


# ----------------------------------------------------------------------------- the view
def base_python() -> str:
  """The interpreter programs run with: the base installation's, not a virtual
  environment's (whose pyvenv.cfg, outside the view, it would need to find its library)."""
  return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


@functools.lru_cache(None)
def view() -> dict:
  """What the jail's root shows, read-only (see _jail._build_root)."""
  prefix = os.path.realpath(sys.base_prefix)
  python = base_python()
  tops = ("/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/lib32")
  links = {d: os.readlink(d) for d in tops if os.path.islink(d)}
  dirs = [d for d in tops if os.path.isdir(d) and d not in links]
  if not any(prefix == d or prefix.startswith(d + "/") for d in dirs):
    dirs = [d for d in dirs if not d.startswith(prefix + "/")] + [prefix]  # /usr: whole
  files = [f for f in ("/etc/ld.so.cache",) if os.path.isfile(f)]
  if not any(python.startswith(d + "/") for d in dirs):
    files.append(python)
  inside = lambda p: any(p == d or p.startswith(d + "/") for d in dirs)
  packages = site.getsitepackages([prefix]) + glob.glob("/usr/lib/python3*/*-packages") + \
      glob.glob("/usr/local/lib/python3*/*-packages") + [site.getusersitepackages()]
  hidden_dirs = sorted({os.path.realpath(p) for p in packages if os.path.isdir(p)
                        and inside(os.path.realpath(p))})
  dynload = {os.path.realpath(p) for p in sys.path if p.endswith("lib-dynload")}
  hidden_files = sorted(os.path.join(d, f) for d in dynload if os.path.isdir(d)
                        for f in os.listdir(d) if f.split(".")[0] in DENIED_MODULES)
  return {"dirs": dirs, "files": files, "links": links, "hidden_dirs": hidden_dirs,
          "hidden_files": hidden_files}


# ----------------------------------------------------------------------------- uids
def _mapped(path: str) -> list[tuple[int, int]]:
  """(first id, count) ranges of an /proc/self/{uid,gid}_map."""
  try:
    with open(path) as f:
      return [(int(r[0]), int(r[2])) for r in (line.split() for line in f) if len(r) == 3]
  except (OSError, ValueError):
    return []


@functools.lru_cache(None)
def _uid_block() -> tuple[int, int] | None:
  """(first, count) of the uids programs run as when the caller is root: UID_BASE on a
  host (every id is mapped), the top of the largest mapped range in a rootless container
  (which maps fewer), None if only root is mapped (the jail then drops capabilities)."""
  uids, gids = _mapped("/proc/self/uid_map"), _mapped("/proc/self/gid_map")
  first = UID_BASE + (os.getpid() % 100_000) * 1000
  if any(a <= first and first + 1000 <= a + n for a, n in uids) and any(
      a <= first and first + 1000 <= a + n for a, n in gids):
    return first, 1000
  common = [(a, n) for a, n in uids if (a, n) in gids and a + n - 1 > 0]
  if not common:
    return None
  a, n = max(common, key=lambda r: r[1])
  count = min(1000, n - 1 if a == 0 else n)
  return (a + n - count, count) if count > 0 else None


_uid_lock = threading.Lock()
_uids_free: list[int] = []
_uids_used = [0]


def _take_uid() -> int | None:
  """A uid no other running program of this process has (RLIMIT_NPROC is per uid)."""
  block = _uid_block()
  if block is None:
    return None
  with _uid_lock:
    if _uids_free:
      return _uids_free.pop()
    _uids_used[0] += 1
    return block[0] + (_uids_used[0] - 1) % block[1]


def _give_uid(uid: int) -> None:
  with _uid_lock:
    _uids_free.append(uid)


# ----------------------------------------------------------------------------- one run
def _rlimits(limits: Limits) -> str:
  mb = 1 << 20
  return json.dumps({"RLIMIT_AS": limits.memory_mb * mb, "RLIMIT_CPU": limits.cpu_s,
                     "RLIMIT_FSIZE": limits.file_mb * mb, "RLIMIT_NOFILE": limits.open_files,
                     "RLIMIT_CORE": 0, "RLIMIT_NPROC": limits.processes})


def _kill_group(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _exchange(proc: subprocess.Popen, job: bytes, verdict_fd: int, deadline: float,
              keep: int) -> tuple[dict[int, bytearray], bool]:
  """Writes `job` to stdin and reads stdout, stderr and the verdict (at most `keep`
  bytes each; the rest is dropped) until they close or the process has exited and left
  nothing to read, or the deadline. Returns ({fd: bytes}, timed out)."""
  sel = selectors.DefaultSelector()
  out = {}
  for f in (proc.stdout.fileno(), proc.stderr.fileno(), verdict_fd):
    os.set_blocking(f, False)
    sel.register(f, selectors.EVENT_READ)
    out[f] = bytearray()
  stdin = proc.stdin.fileno()
  os.set_blocking(stdin, False)
  sel.register(stdin, selectors.EVENT_WRITE)
  pending = memoryview(job)
  try:
    while sel.get_map():
      now = time.monotonic()
      if now >= deadline:
        return out, True
      exited = proc.poll() is not None
      events = sel.select(0 if exited else min(deadline - now, 0.5))
      if exited and not events:
        break  # ended; whatever still holds a pipe is not its output any more
      for key, _ in events:
        f = key.fd
        if f == stdin:
          try:
            pending = pending[os.write(f, pending[:1 << 16]):]
          except BlockingIOError:
            continue
          except BrokenPipeError:  # it died before reading: its status says why
            pending = pending[:0]
          if not pending:
            sel.unregister(f)
            proc.stdin.close()
          continue
        try:
          chunk = os.read(f, 1 << 16)
        except BlockingIOError:
          continue
        if not chunk:
          sel.unregister(f)
        elif len(out[f]) < keep:
          out[f] += chunk[:keep - len(out[f])]
    return out, False
  finally:
    sel.close()


def _status(verdict: dict | None, code: int | None, timed_out: bool) -> tuple[str, str]:
  if timed_out:
    return "timeout", "past the time limit"
  if verdict is not None:
    return str(verdict.get("status")), str(verdict.get("detail", ""))
  if code is not None and (code < 0 or code >= 128):
    return "killed", f"the sandbox ended by signal {abs(code) % 128}"
  return "error", "the sandbox gave no verdict"


def _run(program: Program, limits: Limits, jail: bool) -> Outcome:
  work = None if jail else tempfile.mkdtemp(prefix="rj_sandbox_")
  root = jail and os.geteuid() == 0
  uid = _take_uid() if root else None
  verdict_r, verdict_w = os.pipe()
  try:
    config = {"jail": jail, "view": view() if jail else None, "uid": uid,
              "tmp_bytes": limits.disk_mb << 20, "python": base_python(),
              "child": _CHILD, "rlimits": _rlimits(limits), "verdict_fd": verdict_w}
    home = "/tmp" if jail else work
    env = {"PATH": os.defpath, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}
    job = marshal.dumps((config, {"source": program.source, "tests": program.tests,
                                  "trusted": program.trusted}))
    deadline = time.monotonic() + limits.timeout_s
    try:
      proc = subprocess.Popen([sys.executable, "-I", "-S", _HARNESS],
                              cwd=work or "/", env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              pass_fds=(verdict_w,), start_new_session=True)
    except OSError as e:
      return Outcome(False, "error", stderr=f"sandbox: cannot start: {e}", detail=str(e))
    os.close(verdict_w)
    verdict_w = None
    stdout, stderr = proc.stdout.fileno(), proc.stderr.fileno()
    try:
      out, timed_out = _exchange(proc, job, verdict_r, deadline, limits.output_bytes)
    finally:
      _kill_group(proc.pid)  # at the deadline, or anything an unjailed run left
      code = proc.wait()
      proc.stdout.close()
      proc.stderr.close()
    try:
      verdict = json.loads(bytes(out[verdict_r])) if out[verdict_r] else None
    except ValueError:
      verdict = None
    status, detail = _status(verdict, code, timed_out)
    text = lambda b: bytes(b).decode("utf-8", "replace")
    return Outcome(status == "passed", status, text(out[stdout]), text(out[stderr]), code,
                   detail)
  finally:
    for f in (verdict_r, verdict_w):
      if f is not None:
        os.close(f)
    if uid is not None:
      _give_uid(uid)
    if work:
      shutil.rmtree(work, ignore_errors=True)


def run_program(program: Program | str, limits: Limits = Limits()) -> Outcome:
  """Runs one program contained (see the module docstring); a str is a program
  without tests."""
  if isinstance(program, str):
    program = Program(program)
  return _run(program, limits, jail=require())


def run_programs(programs: Sequence[Program | str], limits: Limits = Limits(),
                 workers: int | None = None) -> list[Outcome]:
  """Outcomes of many programs, in order, `workers` at a time (default: the CPU count).
  Threads only wait on subprocesses, so they run in parallel despite the GIL."""
  jail = require() if programs else True
  programs = [Program(p) if isinstance(p, str) else p for p in programs]
  workers = workers or os.cpu_count() or 1
  if len(programs) <= 1 or workers == 1:
    return [_run(p, limits, jail) for p in programs]
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(lambda p: _run(p, limits, jail), programs))
