"""Decoding cost when output lengths vary: tokens/s and wall time of `decoding.generate`.

A byte-level model (d_model 256, 4 layers, random weights sharpened so outputs vary with
the prompt) continues 64 random prompts for at most 256 tokens; the stop sequence is the
byte whose first appearance in the unstopped outputs is spread most evenly over rows, so
rows finish anywhere from the first steps to never (their output lengths are printed).
Useful tokens are each row's tokens up to its stop; tokens/s = useful tokens / wall time
of one generate call (compiled beforehand; median of --repeats).

`--code=DIR` runs the package found at DIR (e.g. a checkout of an older commit, flat or
current layout) instead of this one, so two versions are compared in one run:

  python benchmarks/long_generation.py --compare=/tmp/old_checkout   # interleaved rounds
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules():
  try:  # the current layout
    from recycle_jax.models import decoding, transformer
  except ImportError:  # a flat checkout (recycle_jax.models was a module)
    from recycle_jax import decoding, models as transformer
  return decoding, transformer


def measure(rows: int, max_new: int, repeats: int) -> dict:
  import jax
  import numpy as np
  decoding, transformer = _modules()
  cfg = transformer.ModelConfig(d_model=256, num_layers=4, num_heads=4, num_kv_heads=2,
                                d_ff=704)
  dec = transformer.Decoder(cfg)
  params = jax.tree.map(lambda x: x * 3.0, transformer.init_params(cfg, jax.random.key(0)))
  rng = np.random.default_rng(0)
  lens = rng.integers(8, 33, rows).astype(np.int32)
  prompts = np.zeros((rows, 32), np.int32)
  for i, n in enumerate(lens):
    prompts[i, :n] = rng.integers(35, 126, n) + 3  # printable bytes
  gen = jax.jit(decoding.generate, static_argnums=0)
  eos = decoding.stop_ids([], transformer.EOS_ID)
  full = np.asarray(gen(dec, params, decoding.Prompts(prompts, lens, eos, max_new)))

  def first(row, tok):
    hits = np.flatnonzero(row == tok)
    return int(hits[0]) + 1 if hits.size else max_new
  # The stop byte whose first hits are spread most: largest spread of lengths per row.
  cands = sorted({int(t) for t in full[:, :8].ravel() if t > 2})
  best = max(cands, key=lambda t: np.std([first(r, t) for r in full]))
  stops = decoding.stop_ids([[best]], transformer.EOS_ID)
  g = decoding.Prompts(prompts, lens, stops, max_new)
  out = np.asarray(gen(dec, params, g))  # compiles
  lengths = [int(np.sum(r >= 0)) for r in out]
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(gen(dec, params, g))
    times.append(time.perf_counter() - t0)
  wall = float(np.median(times))
  return {"stop_byte": best, "useful_tokens": sum(lengths), "rows": rows, "max_new": max_new,
          "lengths_min_median_max": [min(lengths), int(np.median(lengths)), max(lengths)],
          "wall_s": round(wall, 3), "tokens_per_s": round(sum(lengths) / wall, 1),
          "outputs_digest": int(np.sum(out.astype(np.int64) * np.arange(out.size).reshape(
              out.shape) % 1000003))}


def run_child(code: str, args) -> dict:
  env = {**os.environ, "PYTHONPATH": code, "TF_CPP_MIN_LOG_LEVEL": "3"}
  out = subprocess.run([sys.executable, __file__, "--child", f"--rows={args.rows}",
                        f"--max_new={args.max_new}", f"--repeats={args.repeats}"],
                       capture_output=True, text=True, env=env, cwd="/")
  if out.returncode:
    raise SystemExit(out.stderr[-3000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", type=int, default=64)
  p.add_argument("--max_new", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--compare", default="", help="another checkout to run beside this one")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print(json.dumps(measure(args.rows, args.max_new, args.repeats)))
    return
  codes = {"this": ROOT, **({"compare": args.compare} if args.compare else {})}
  results = {name: [] for name in codes}
  for r in range(args.rounds):
    for name in (list(codes) if r % 2 == 0 else list(codes)[::-1]):
      res = run_child(codes[name], args)
      results[name].append(res)
      print(f"round {r} {name:8s}: {json.dumps(res)}", flush=True)
  for name, rs in results.items():
    walls = sorted(x["wall_s"] for x in rs)
    print(f"{name:8s} wall {walls} s, tokens/s {[x['tokens_per_s'] for x in rs]}")


if __name__ == "__main__":
  main()
