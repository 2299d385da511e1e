"""Compiled search loop vs a per-candidate loop, and the evaluation's achieved FLOP/s.

Prints, measured in this one run on the demo pool (built first if absent):
  * evaluated merges per second of the compiled generation (ask -> vmapped merge ->
    evaluate every task -> tell, one XLA program per generation),
  * the same for the loop peers use: merge on the host with numpy, then one jitted
    evaluation per candidate; and their ratio (goal >= 5x),
  * the evaluation's FLOP/s (XLA cost analysis / wall time) as a fraction of this
    machine's measured f32 matmul peak (goal >= 0.4).

  python benchmarks/search_throughput.py [--pool=runs/pool/pool.json] [--generations=3]
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from recycle_jax import (checkpoints, evaluation, experiment, merging, models,  # noqa: E402
                         population, search)


def _timed(fn, repeats: int) -> float:
  """Best of `repeats` after a warm-up call: the least disturbed run on a shared machine."""
  jax.block_until_ready(fn())  # compile + warm up
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t)
  return best


def matmul_peak(n: int = 1024) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return 2 * n ** 3 / _timed(lambda: f(a), 10)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--pool", default=os.path.join(ROOT, "runs/pool/pool.json"))
  p.add_argument("--tasks", default="rj_code,rj_reasoning")
  p.add_argument("--generations", type=int, default=3)
  args = p.parse_args()
  if not os.path.exists(args.pool):
    from recycle_jax import cli
    cli.main(["make-pool", f"--gin_file={ROOT}/gin_configs/pools/demo.gin",
              f"--workdir={os.path.dirname(args.pool)}"])
  import gin
  gin.clear_config()
  loaded = experiment.load_pool(args.pool)
  n = len(loaded.pool)
  dev = evaluation.load_split(args.tasks.split(","), "dev")
  score = evaluation.make_scorer(models.Decoder(loaded.model_cfg))
  cfg = search.SearchConfig()
  # Compiled: one program per generation, nothing leaves the device but [P, N+T] numbers.
  # Both population modes: vmap (all P merged models at once) and map (one at a time).
  rates = {}
  for mode in ("vmap", "map"):
    srch = search.Search(cfg, n, population.make_population_fn(score, mode))
    state = srch.init()
    def compiled():
      nonlocal state
      state, out = srch.generation(state, loaded.params, dev)
      return out
    rates[mode] = srch.pop / _timed(compiled, args.generations)
  pop = srch.pop
  best_mode = max(rates, key=rates.get)
  pop_fn = population.make_population_fn(score, best_mode)

  # Per candidate: numpy merge on the host, then one jitted evaluation.
  host_pool = [jax.tree.map(np.asarray, p) for p in loaded.params]
  eval_one = jax.jit(score)
  alphas = np.asarray(merging.relu_normalize(
      jax.random.normal(jax.random.key(1), (pop, n)) + 1.0 / n))
  def per_candidate():
    out = []
    for a in alphas:
      merged = jax.tree.map(lambda *xs: sum(w * x for w, x in zip(a, xs)), *host_pool)
      out.append(eval_one(merged, dev))
    return out
  t_loop = _timed(per_candidate, args.generations)
  loop_rate = pop / t_loop

  # Achieved FLOP/s of the evaluation inside the compiled population program.
  fn = jax.jit(pop_fn)
  a = jnp.asarray(alphas)
  flops = fn.lower(a, loaded.params, dev).compile().cost_analysis()
  flops = (flops[0] if isinstance(flops, list) else flops).get("flops", float("nan"))
  t_eval = _timed(lambda: fn(a, loaded.params, dev), args.generations)
  peak = matmul_peak()

  print(f"pool: {n} checkpoints, population {pop}, tasks {args.tasks}, "
        f"{jax.device_count()} device(s)")
  for mode, rate in rates.items():
    print(f"compiled loop ({mode:4s}): {rate:8.2f} merges/s ({pop / rate:.3f} s/generation)")
  print(f"per-candidate loop:  {loop_rate:8.2f} merges/s ({t_loop:.3f} s/generation)")
  print(f"speedup (goal >= 5): {rates[best_mode] / loop_rate:8.2f}x (compiled {best_mode})")
  print(f"evaluation:          {flops / t_eval / 1e9:8.2f} GFLOP/s; matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s; fraction {flops / t_eval / peak:.2f} (goal >= 0.4)")


if __name__ == "__main__":
  main()
