"""Compare two Orbax checkpoints leaf by leaf (tree, shapes, dtypes, values).

  python tools/compare_checkpoints.py A B [--atol 0] [--rtol 0]

For checking that two ways of producing a merge agree: streaming vs in-memory, several
processes vs one, a converted round trip. Prints the leaves that differ with their
largest absolute and relative differences. Exit status: 0 equal within tolerance, 1
different, 2 unreadable input. Reads only; sharding at save time does not matter.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def compare(a: dict, b: dict, atol: float = 0.0, rtol: float = 0.0) -> list[str]:
  """Lines describing every difference beyond tolerance (empty when the trees agree)."""
  import jax
  import numpy as np
  from recycle_jax.models.partitioning import path_str
  fa = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(a)[0]}
  fb = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(b)[0]}
  out = [f"{k}: only in the {'first' if k in fa else 'second'}" for k in sorted(set(fa) ^ set(fb))]
  for k in sorted(set(fa) & set(fb)):
    x, y = fa[k], fb[k]
    if x.shape != y.shape or x.dtype != y.dtype:
      out.append(f"{k}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
      continue
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    diff = np.abs(x64 - y64)
    same = (diff <= atol + rtol * np.abs(y64)) | (x64 == y64) | (np.isnan(x64) & np.isnan(y64))
    if not np.all(same):
      ok = np.isfinite(diff)
      rel = diff[ok] / np.maximum(np.abs(y64[ok]), np.finfo(np.float32).tiny)
      out.append(f"{k}: max |a - b| {float(diff[ok].max(initial=0)):.3g}, max relative "
                 f"{float(rel.max(initial=0)):.3g}, {int((~ok & ~same).sum())} NaN/Inf mismatches")
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("a")
  p.add_argument("b")
  p.add_argument("--atol", type=float, default=0.0)
  p.add_argument("--rtol", type=float, default=0.0)
  args = p.parse_args(argv)
  from recycle_jax.checkpoint_io import checkpoints
  from recycle_jax.runtime.errors import UserError
  try:
    a, _ = checkpoints.restore_local(args.a)
    b, _ = checkpoints.restore_local(args.b)
  except UserError as e:
    print(f"error: {e.message}", file=sys.stderr)
    return 2
  diffs = compare(a, b, args.atol, args.rtol)
  for line in diffs:
    print(line)
  print(f"{'different' if diffs else 'equal'} (atol {args.atol:g}, rtol {args.rtol:g})")
  return 1 if diffs else 0


if __name__ == "__main__":
  sys.exit(main())
