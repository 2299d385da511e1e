"""Runs a sweep of `recycle-jax search` trials as local processes; writes sweep.md/json.

  .venv/bin/python experiments/sweep.py --sweep=NAME_OR_FILE --workdir=W [--parallel=2]

Trial k writes W/trial_k (log: W/trial_k.log); finished trials are skipped on a re-run.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recycle_jax import sweeps  # noqa: E402
from recycle_jax.runtime.errors import UserError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sweep", required=True, help="experiments/sweeps/NAME.py, or a file")
  p.add_argument("--workdir", required=True)
  p.add_argument("--parallel", type=int, default=1, help="trials run at once")
  p.add_argument("--gin_bindings", action="append", default=[],
                 help="extra bindings for every trial (e.g. the pool)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    spec = sweeps.load_spec(args.sweep, args.gin_bindings)
    print(f"sweep {args.sweep}: {len(spec.trials)} trials, {args.parallel} at a time")
    status = sweeps.run_local(spec, args.workdir, args.parallel)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  sweeps.write_summary(spec, args.workdir, status)
  for k, s in sorted(status.items()):
    print(f"trial_{k}: {s}")
  print(f"summary: {os.path.join(args.workdir, 'sweep.md')}")
  return 0 if all(s.startswith("done") for s in status.values()) else 1


if __name__ == "__main__":
  sys.exit(main())
