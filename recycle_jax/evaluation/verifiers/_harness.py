"""The trusted half of one sandboxed run: decides the verdict where the program cannot reach.

Started by sandbox.py as `python -I -S _harness.py`, with its configuration and the job
(source, tests, trusted prefix) on stdin (marshal) and the verdict pipe's descriptor in
the configuration. It reads both, enters the jail (_jail.py: it becomes pid 1 of fresh
namespaces, unprivileged, seccomp-filtered; skipped only with "jail": false, the
explicitly unsandboxed mode), then starts the program in a second interpreter
(_child.py) and talks to it over two pipes.

Without tests, the program passes when it runs to its end. With tests, the tests run
HERE, in this interpreter, which the program cannot reach: it cannot signal pid 1 (the
kernel ignores signals to a pid namespace's init from inside), ptrace it, read its memory
or take its descriptors (seccomp, no /proc), or rebind its builtins and modules. The
tests' namespace is what the trusted prefix (the task's prompt: its imports and helper
functions) makes when run here; each name the program defines that the prefix does not
define (or leaves for the completion: a stub, or its last definition) becomes a proxy:
calling it sends plain arguments to the program and decodes the plain value it returns
into a fresh object (`_child.encode`/`decode`), so `==` is always the builtin types'
own. The verdict ({"status", "detail"}) is written on the verdict pipe by this process
only.
"""
import builtins
import importlib
import marshal
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _child  # noqa: E402  (the codec and framing, shared with the program's side)
import _jail  # noqa: E402

class ProgramError(Exception):
  """The program's side failed a call in a way that is not one of its exceptions."""


def _trusted(prefix: str) -> tuple[dict, set]:
  """(the namespace the task's prefix makes when run here, the names in it the program
  completes: functions with no body but a docstring or `pass`, and the prefix's last
  definition, which a completion continues)."""
  import ast
  try:
    tree = ast.parse(prefix)
  except SyntaxError:
    return {"__name__": "__main__"}, set()
  defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
  open_names = {node.name for node in tree.body if isinstance(node, defs) and all(
      isinstance(s, ast.Pass) or isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
      for s in node.body)}
  if tree.body and isinstance(tree.body[-1], defs):
    open_names.add(tree.body[-1].name)
  ns = {"__name__": "__main__"}
  try:
    exec(compile(tree, "prompt.py", "exec"), ns)  # noqa: S102 - the task's own prompt
  except Exception:  # noqa: BLE001 - a prefix that needs the completion to run
    return {"__name__": "__main__"}, set()
  return ns, open_names


class _Program:
  """The running program: a subprocess with request/reply pipes."""

  def __init__(self, python: str, child_code: str, rlimits: str, source: str, serve: bool):
    req_r, self.req = os.pipe()
    self.rep, rep_w = os.pipe()
    # posix_spawn, not subprocess: this starts once per program and subprocess's import
    # costs as much as the spawn. The child sees only fds 0-4 (os.pipe's are CLOEXEC).
    self.pid = os.posix_spawn(
        python, [python, "-I", "-S", "-c", child_code, rlimits, "3", "4"], os.environ,
        file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                      (os.POSIX_SPAWN_DUP2, req_r, 3), (os.POSIX_SPAWN_DUP2, rep_w, 4)])
    os.close(req_r)
    os.close(rep_w)
    _child.send(self.req, {"source": source, "serve": serve})

  def receive(self):
    """The program's next message; None if it ended or sent something malformed."""
    try:
      reply = _child.receive(self.rep)
    except (ValueError, RecursionError, MemoryError):
      return None
    return reply if isinstance(reply, list) and reply and isinstance(reply[0], str) else None

  def ask(self, message):
    try:
      _child.send(self.req, message)
    except OSError:
      raise ProgramError("the program ended while answering") from None
    reply = self.receive()
    if reply is None:
      raise ProgramError("the program ended while answering")
    if reply[0] == "ret":
      return _child.decode(reply[1])
    if reply[0] == "raise":
      kind = getattr(builtins, str(reply[1]), None)
      if isinstance(kind, type) and issubclass(kind, Exception):
        raise kind(reply[2])
      raise ProgramError(f"{reply[1]}: {reply[2]}")
    raise ProgramError(f"the program {reply[0]}" + (f" ({reply[1]})" if len(reply) > 1 else ""))

  def proxy(self, name: str):
    def call(*args, **kwargs):
      return self.ask(["call", name, _child.encode(args), _child.encode(kwargs)])
    call.__name__ = call.__qualname__ = name
    return call

  def close(self, grace_s: float = 1.0) -> int | None:
    """Ends the conversation; the program's exit status, or None if it had not ended
    within `grace_s` (a thread it left running) and was killed: its verdict is decided."""
    os.close(self.req)
    deadline = time.monotonic() + grace_s
    while (done := os.waitpid(self.pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
      time.sleep(0.002)
    if done[0] == 0:
      os.kill(self.pid, 9)
      os.waitpid(self.pid, 0)
    os.close(self.rep)
    return os.waitstatus_to_exitcode(done[1]) if done[0] else None


def _names_used(tests: str) -> set:
  import ast
  try:
    return {n.id for n in ast.walk(ast.parse(tests)) if isinstance(n, ast.Name)}
  except SyntaxError:
    return set()


def run(job: dict, config: dict) -> dict:
  tests, prefix = job.get("tests"), job.get("trusted", "")
  program = _Program(config["python"], config["child_code"], config["rlimits"],
                     job["source"], tests is not None)
  first = program.receive()
  if first is None or first[0] != "ready" or len(first) < 2 or not isinstance(first[1], dict):
    code = program.close()
    if first is None or len(first) < 2:
      status = "failed" if code is None else "killed" if code < 0 else \
          "exited" if code in (0, 3) else "failed"
      return {"status": status, "detail": f"exit status {code}"}
    return {"status": "exited" if first[0] == "exited" else "failed", "detail": str(first[1])}
  verdict = {"status": "passed", "detail": ""}
  if tests is not None:
    ns, open_names = _trusted(prefix)
    used = _names_used(tests)
    try:
      for name, kind in first[1].items():
        if not isinstance(name, str) or not isinstance(kind, str):
          continue
        if name in ns and name not in open_names:
          continue  # the prompt's own definition, not the program's version of it
        if kind == "callable":
          ns[name] = program.proxy(name)
        elif kind.startswith("module:") and name in used:
          module = kind[len("module:"):]  # the harness's own copy, if the stdlib has it
          if module.split(".")[0] in sys.stdlib_module_names:
            ns[name] = importlib.import_module(module)
        elif kind == "value" and name in used:
          ns[name] = program.ask(["value", name])
      exec(compile(tests, "tests.py", "exec"), ns)  # noqa: S102 - the task's own tests
    except BaseException as e:  # noqa: BLE001 - any failure of the tests is the verdict
      status = "exited" if isinstance(e, ProgramError) and "exited" in str(e) else "failed"
      verdict = {"status": status, "detail": f"{type(e).__name__}: {str(e)[:500]}"}
  # With tests the verdict is decided: the program's exit (handlers, output) cannot change
  # it, so it is killed at once; without, it may still print until it ends.
  code = program.close(grace_s=0.0 if tests is not None else 1.0)
  if verdict["status"] == "passed" and code is not None and code < 0:
    verdict = {"status": "killed", "detail": f"signal {-code}"}
  return verdict


def main() -> None:
  config, job = marshal.loads(sys.stdin.buffer.read())  # from the verifier: trusted
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  os.close(null)
  with open(config["child"], encoding="utf-8") as f:
    config["child_code"] = f.read()
  if config["jail"]:
    _jail.enter(config["view"], config["tmp_bytes"], config["uid"])
  try:
    verdict = run(job, config)
  except BaseException as e:  # noqa: BLE001 - whatever went wrong, the sample fails
    verdict = {"status": "failed", "detail": f"harness: {type(e).__name__}: {e}"[:500]}
  os.write(config["verdict_fd"], _child.dumps(verdict))


if __name__ == "__main__":
  main()
