"""Compiled search loop vs per-candidate loops, and the evaluation's achieved FLOP/s.

Measures, in this one run (loops interleaved round by round, best round of each kept,
so a shared machine's load drift hits every loop alike):
  * merges evaluated per second by the compiled generation (ask -> merge every candidate
    -> evaluate every task -> tell, one XLA program), population vmapped and lax.map-ed;
  * the per-candidate loop with the SAME scorer: merge on the host with numpy, then one
    jitted evaluation per candidate. compiled / this is the like-for-like ratio: it can
    only show what compiling the loop removes (dispatch, host merge, transfers);
  * a peer-style per-candidate loop (what mergekit + an eval harness do): host merge,
    then greedy generation with a KV cache for generation tasks and one forward pass per
    (prompt, choice) row, rows length-sorted into buckets, for choice tasks (the prompt is
    recomputed for every choice). Exact match and rank classification give the same hits
    as our scorer; the work differs (its FLOPs are printed);
  * the evaluation's FLOP/s (XLA cost analysis of one candidate's scorer x candidates /
    wall time) against this machine's measured f32 matmul peak, in the compiled loop and
    for one candidate alone.

  python benchmarks/search_throughput.py                      # a built-in random pool
  python benchmarks/search_throughput.py --pool=runs/pool/pool.json   # a real pool

Throughput does not depend on what the checkpoints learned, so with no --pool it builds
16 checkpoints of the demo model config (gin_configs/pools/demo.gin: d_model 128, 2
layers, 4 heads / 2 kv heads, d_ff 352): one random init, each member perturbed by
independent noise, saved with checkpoints.save into a temporary directory.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from recycle_jax.checkpoint_io import checkpoints
from recycle_jax.checkpoint_io import pool_manifest
from recycle_jax.evaluation import task_data
from recycle_jax.evaluation import kinds
from recycle_jax.evaluation import task_splits
from recycle_jax.evaluation import scorers
from recycle_jax import placed_pool
from recycle_jax.models import transformer
from recycle_jax.search import population, loop
from recycle_jax.merging import spaces
from recycle_jax.evaluation import vocabularies

DEMO = transformer.ModelConfig(d_model=128, num_layers=2, num_heads=4, num_kv_heads=2,
                          d_ff=352)


def build_random_pool(workdir: str, n: int = 16, cfg: transformer.ModelConfig = DEMO,
                      seed: int = 0, noise: float = 0.01) -> str:
  """pool.json of n checkpoints: one random init plus independent N(0, noise) each."""
  base = transformer.init_params(cfg, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(base)
  entries = []
  for i in range(n):
    keys = jax.random.split(jax.random.key(seed + 1 + i), len(leaves))
    params = jax.tree.unflatten(tree, [x + noise * jax.random.normal(k, x.shape, x.dtype)
                                       for x, k in zip(leaves, keys)])
    path = os.path.join(workdir, "checkpoints", f"random_{i:02d}")
    checkpoints.save(path, params, {"model": cfg.to_dict()})
    entries.append(pool_manifest.Entry(f"random_{i:02d}", path))
  manifest = os.path.join(workdir, "pool.json")
  pool_manifest.write_manifest(manifest, pool_manifest.make_pool(entries, manifest))
  return manifest


def cost_flops(fn, *args) -> float:
  c = jax.jit(fn).lower(*args).compile().cost_analysis()
  return float((c[0] if isinstance(c, list) else c).get("flops", float("nan")))


def _peer_choice_rows(d: task_data.TaskData):
  """A choice split as a harness batches it: every (prompt, choice) its own row, rows
  sorted by length into buckets (the same bucketing as ours), each trimmed to its longest
  row. Returns [(row indices into E*C, tokens [R, L], target mask [R, L])]."""
  e, c, l = d.tokens.shape
  tokens = np.asarray(d.tokens).reshape(e * c, l)
  mask = np.asarray(d.target_mask).reshape(e * c, l)
  lengths = np.array([int(np.flatnonzero(m).max()) + 1 for m in mask])
  out, lo = [], 0
  for hi in task_data._buckets(lengths, 4, 128):
    idx = np.flatnonzero((lengths > lo) & (lengths <= hi))
    lo = hi
    if idx.size:
      out.append((idx, tokens[idx, :hi], mask[idx, :hi]))
  return out


def peer_scorer(decoder: transformer.Decoder, datas):
  """score(params, datas) -> [T] as a peer harness (lm-eval style) computes it: greedy
  generation with a KV cache, all prompts in one batch, checked by exact match; rank
  classification with one forward per (prompt, choice) row, length-sorted and bucketed,
  the prompt recomputed for every choice. Same hits as our scorer, more work."""
  layouts = {d.name: _peer_choice_rows(d) for d in datas if d.kind == "choice"}

  def score(params, datas):
    out = []
    for d in datas:
      if d.kind != "choice":
        hits = kinds.greedy_exact_match(decoder.greedy_decode, params,
                                             d.replace(packed=None))
        out.append(100.0 * jnp.mean(hits))
        continue
      e, c, _ = d.tokens.shape
      lp = jnp.zeros(e * c)
      for idx, toks, mask in layouts[d.name]:
        logp = transformer.token_logprobs(decoder.apply(params, toks), toks)
        lp = lp.at[idx].set(jnp.sum(logp * mask, -1) / np.maximum(mask.sum(-1), 1))
      hits = jnp.argmax(lp.reshape(e, c), -1) == d.labels
      out.append(100.0 * jnp.mean(hits.astype(jnp.float32)))
    return jnp.stack(out)
  return score


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--pool", default="",
                 help="pool.json of a real pool; default: build 16 random checkpoints")
  p.add_argument("--tasks", default="rj_code,rj_reasoning")
  p.add_argument("--rounds", type=int, default=3, help="timed rounds (best is kept)")
  p.add_argument("--peer_candidates", type=int, default=3,
                 help="candidates timed per round in the (slow) peer-style loop")
  p.add_argument("--skip_peer", action="store_true")
  args = p.parse_args()

  tmp = None
  if not args.pool:
    tmp = tempfile.mkdtemp(prefix="search_throughput_pool_")
    t = time.perf_counter()
    args.pool = build_random_pool(tmp)
    print(f"built a random 16-checkpoint pool of the demo config in {tmp} "
          f"({time.perf_counter() - t:.0f} s)")
  try:
    run(args)
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)


def run(args) -> None:
  import gin
  gin.clear_config()
  loaded = placed_pool.place(args.pool)
  n = len(loaded.pool)
  names = args.tasks.split(",")
  dev = task_splits.load_split(names, "dev", None, vocabularies.for_evaluation(
      loaded.tokenizer, loaded.model_cfg.vocab_size, args.pool))
  decoder = transformer.Decoder(loaded.model_cfg)
  score = scorers.make_scorer(decoder)
  cfg = loop.SearchConfig()

  loops = {}  # name -> (fn running one unit, candidates per unit)
  # Compiled: one program per generation; only [P, N+T] numbers leave the device.
  for mode in ("vmap", "map"):
    srch = loop.Search(cfg, n, population.make_population_fn(score, mode))
    state = [srch.init()]

    def compiled(srch=srch, state=state):
      # A host copy of the state in, as loop.run does: one program for every generation.
      state[0], out = srch.generation(jax.device_get(state[0]), loaded.params, dev)
      return out
    loops[f"compiled generation, population {mode}"] = (compiled, srch.pop)
  pop = srch.pop

  host_pool = [jax.tree.map(np.asarray, q) for q in loaded.params]
  alphas = np.asarray(spaces.relu_normalize(
      jax.random.normal(jax.random.key(1), (pop, n)) + 1.0 / n))

  def host_merge(a):
    return jax.tree.map(lambda *xs: sum(w * x for w, x in zip(a, xs)), *host_pool)

  def per_candidate(fn, rows):
    return lambda: [jax.device_get(fn(host_merge(a), dev)) for a in rows]
  loops["per candidate, same scorer"] = (per_candidate(jax.jit(score), alphas), pop)
  if not args.skip_peer:
    k = min(args.peer_candidates, pop)
    loops["per candidate, peer-style scorer"] = (
        per_candidate(jax.jit(peer_scorer(decoder, dev)), alphas[:k]), k)

  mm_n = 1024
  mm_a = jax.random.normal(jax.random.key(0), (mm_n, mm_n), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  one = jax.jit(score)
  units = dict(loops)
  units["matmul 1024^3"] = (lambda: mm(mm_a), 1)
  units["one candidate's evaluation"] = (lambda: one(loaded.params[0], dev), 1)

  for name, (fn, _) in units.items():  # compile + warm up
    t = time.perf_counter()
    jax.block_until_ready(fn())
    print(f"  warm-up {name}: {time.perf_counter() - t:.1f} s", flush=True)
  best = {name: float("inf") for name in units}
  for _ in range(args.rounds):
    for name, (fn, _) in units.items():
      reps = 10 if name.startswith("matmul") else 1
      t = time.perf_counter()
      for _ in range(reps):
        jax.block_until_ready(fn())
      best[name] = min(best[name], (time.perf_counter() - t) / reps)
  rate = {name: k / best[name] for name, (_, k) in loops.items()}

  flops_one = cost_flops(score, loaded.params[0], dev)
  flops_peer = cost_flops(peer_scorer(decoder, dev), loaded.params[0], dev)
  peak = 2 * mm_n ** 3 / best["matmul 1024^3"]
  same = rate["per candidate, same scorer"]
  fastest = max((k for k in rate if k.startswith("compiled")), key=rate.get)

  print(f"\npool: {n} checkpoints ({args.pool}), population {pop}, tasks {args.tasks} "
        f"(dev), {jax.device_count()} device(s), {os.cpu_count()} cores, "
        f"best of {args.rounds} interleaved rounds")
  print(f"evaluation work per candidate (XLA cost analysis): {flops_one / 1e9:.2f} GFLOP "
        f"(peer-style scorer: {flops_peer / 1e9:.2f} GFLOP)")
  for name, r in rate.items():
    print(f"  {name:38s} {r:7.2f} merges/s")
  print(f"like-for-like ratio, compiled ({fastest.rsplit(' ', 1)[-1]}) / per candidate "
        f"with the same scorer: {rate[fastest] / same:.2f}x")
  if "per candidate, peer-style scorer" in rate:
    print(f"vs the peer-style loop (different scorer work; see docstring):       "
          f"{rate[fastest] / rate['per candidate, peer-style scorer']:.2f}x")
  in_loop = flops_one * rate[fastest]
  alone = flops_one / best["one candidate's evaluation"]
  print(f"matmul peak {peak / 1e9:.1f} GFLOP/s; evaluation in the compiled loop "
        f"{in_loop / 1e9:.1f} GFLOP/s = {in_loop / peak:.2f} of peak; one candidate alone "
        f"{alone / 1e9:.1f} GFLOP/s = {alone / peak:.2f}")


if __name__ == "__main__":
  main()
