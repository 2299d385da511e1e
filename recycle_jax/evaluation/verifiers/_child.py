"""Runs one untrusted program inside the sandbox's subprocess (see sandbox.py).

Started as `python -I -S _child.py PROGRAM RESULT_FD LIMITS` with a one-time token on
stdin: the kernel limits (LIMITS, JSON {RLIMIT name: value}) are set on this process (so
on everything it starts; set here rather than in a preexec_fn, which is unsafe in the
multithreaded parent and forbids its fast vfork path), the token is read and stdin
replaced by /dev/null, the program's source is read, an audit hook is installed, then the
program runs in a fresh namespace. Only if it returns normally (no
exception, no SystemExit, no os._exit) is the token written back on RESULT_FD, so a
program that exits early cannot pass. The hook refuses, with PermissionError: sockets,
new processes (fork, exec, spawn, system, subprocess), signals to other processes, ctypes
and native-code loading, and any file write, removal, rename or mode change outside the
working directory (a fresh temporary directory). It complements the kernel limits (memory,
CPU time, file size, processes) and the network namespace.
"""
import json
import os
import resource
import sys


def _guard(root: str):
  root = os.path.realpath(root) + os.sep
  denied = ("socket.", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
            "os.system", "os.kill", "os.killpg", "subprocess.", "ctypes.", "pty.",
            "signal.pthread_kill", "os.setuid", "os.setgid", "resource.setrlimit",
            "resource.prlimit", "sys.addaudithook", "_posixsubprocess", "sys.remote_exec")
  path_events = {"os.remove": 0, "os.rmdir": 0, "os.rename": (0, 1), "os.link": (0, 1),
                 "os.symlink": (0, 1), "os.chmod": 0, "os.chown": 0, "os.truncate": 0,
                 "os.mkdir": 0, "os.utime": 0, "shutil.rmtree": 0, "shutil.copyfile": 1,
                 "shutil.move": (0, 1), "os.chdir": None, "os.chroot": None}
  native = ("ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "cffi", "_cffi_backend")
  realpath, fsdecode = os.path.realpath, os.fsdecode  # bound before the program runs
  inside = lambda p: isinstance(p, (str, bytes, os.PathLike)) and (
      realpath(fsdecode(p)) + os.sep).startswith(root)

  def hook(event, args):
    if event.startswith(denied):
      raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args[0].split(".")[0] in native:
      raise PermissionError(f"sandbox: import {args[0]} is not allowed")
    if event == "open":
      path, mode, flags = args
      writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
          isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
      if writes and not isinstance(path, int) and not inside(path):
        raise PermissionError(f"sandbox: writing {path} is not allowed")
    elif event in path_events:
      which = path_events[event]
      if which is None:
        raise PermissionError(f"sandbox: {event} is not allowed")
      for i in (which if isinstance(which, tuple) else (which,)):
        if i < len(args) and not isinstance(args[i], int) and not inside(args[i]):
          raise PermissionError(f"sandbox: {event} outside the working directory")
  return hook


def main() -> None:
  program, result_fd = sys.argv[1], int(sys.argv[2])
  for name, value in json.loads(sys.argv[3]).items():
    resource.setrlimit(getattr(resource, name), (value, value))
  with open(program, encoding="utf-8") as f:
    source = f.read()
  token = sys.stdin.buffer.readline().strip()
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  os.close(null)
  write, close = os.write, os.close
  sys.argv = [program]
  sys.addaudithook(_guard(os.getcwd()))
  code = compile(source, program, "exec")
  namespace = {"__name__": "__main__", "__builtins__": __builtins__}
  try:
    exec(code, namespace)  # noqa: S102 - contained: limits, namespace, audit hook
  except SystemExit as e:
    print(f"sandbox: the program exited ({e.code!r}) before finishing", file=sys.stderr)
    raise SystemExit(3) from None
  sys.stdout.flush()
  write(result_fd, token)
  close(result_fd)


if __name__ == "__main__":
  main()
