"""Device benchmark: the population program (merge, score, generate P candidates in one
compiled program) against a per-candidate peer on the same device (each merge loaded into
transformers, then `generate`), on whatever backend JAX finds.

  python benchmarks/accelerator.py           # 8 random ~1.1B Llama-shaped checkpoints
                                             # (TinyLlama's shape, bf16), and Gemma 3 270M
                                             # when benchmarks/gemma_folder.py cached it
  python benchmarks/accelerator.py --tiny    # tiny shapes on CPU (CI)

Prints, per pool: compile time, merges/s (the linear merge alone), candidates/s of the
whole program, decode tokens/s (a merge-and-generate program: prefill included), model
FLOP utilisation against `runtime.accelerators`' datasheet peak (2 x parameters x tokens;
none on CPU), peak device memory (`memory_stats`; none on CPU), and the peer's
candidates/s and decode tokens/s. Random weights decode to `max_new` tokens every row on
both sides (no stop matches), so both do the same work.

Imports neither TensorFlow nor seqio (the device machines have neither): its tasks are
synthetic splits (`plan.synthetic_split`), scored by the same kinds a search uses.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from recycle_jax import plan  # noqa: E402
from recycle_jax.evaluation import scorers  # noqa: E402
from recycle_jax.merging import kernels  # noqa: E402
from recycle_jax.models import families, partitioning, transformer  # noqa: E402
from recycle_jax.runtime import accelerators, backend  # noqa: E402
from recycle_jax.search import population  # noqa: E402

GEMMA = os.path.join(os.path.expanduser("~"), ".cache", "recycle_jax", "gemma-3-270m")
# TinyLlama 1.1B's shape (Llama 2 architecture, vocabulary 32,000), in bfloat16.
LLAMA_1B = transformer.ModelConfig(family="llama", vocab_size=32000, d_model=2048,
                                   d_ff=5632, num_layers=22, num_heads=32, num_kv_heads=4,
                                   tie_embeddings=False, dtype="bfloat16")
TINY = transformer.ModelConfig(family="llama", vocab_size=512, d_model=64, d_ff=128,
                               num_layers=2, num_heads=4, num_kv_heads=2,
                               tie_embeddings=False)


@dataclasses.dataclass(frozen=True)
class Shapes:
  n: int = 8  # pool size
  population: int = 8
  choice: plan.TaskShape = plan.TaskShape("choice", 64, 128, 4)
  generate: plan.TaskShape = plan.TaskShape("generate", 32, 64, max_new=64)
  repeats: int = 3
  peer_candidates: int = 2


FULL = Shapes()
SMALL = Shapes(n=4, population=4, choice=plan.TaskShape("choice", 8, 16, 2),
               generate=plan.TaskShape("generate", 4, 8, max_new=8), repeats=1,
               peer_candidates=1)


def random_pool(cfg: transformer.ModelConfig, n: int, base=None) -> tuple:
  """n checkpoints on the default device: random inits, or `base` plus small noise (a
  fine-tuned pool's spread around its base)."""
  def one(key):
    if base is None:
      return transformer.init_params(cfg, key)
    leaves, tree = jax.tree.flatten(base)
    keys = jax.random.split(key, len(leaves))
    return tree.unflatten([x + (0.01 * jax.random.normal(k, x.shape)).astype(x.dtype)
                           for x, k in zip(leaves, keys)])
  make = jax.jit(one)
  return tuple(jax.block_until_ready(make(k)) for k in jax.random.split(jax.random.key(0), n))


def timed(fn, *args, repeats: int) -> float:
  """Seconds per call, after one warm-up call."""
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - t0) / repeats


def model_flops(cfg: transformer.ModelConfig, params, s: Shapes) -> float:
  """2 x non-embedding parameters x tokens a candidate runs (the packed choice rows as
  scored, then the generate task's prompts and new tokens), plus the merge (2N per
  parameter): the usual inference count, attention's score matmuls left out."""
  total = sum(x.size for x in jax.tree.leaves(params))
  dense = total - cfg.vocab_size * cfg.d_model  # the embedding lookup is no matmul
  packed = plan.synthetic_split(s.choice, cfg.vocab_size).packed
  tokens = (sum(p.tokens.size for p in packed)
            + s.generate.examples * (s.generate.length + s.generate.max_new))
  return 2.0 * dense * tokens + 2.0 * s.n * total


def population_figures(cfg, pool, s: Shapes) -> dict:
  mesh = partitioning.make_mesh(1, 1, jax.devices()[:1])
  rep = partitioning.replicated(mesh)
  points = jnp.full((s.population, s.n), 1.0 / s.n, jnp.float32)
  score = scorers.make_scorer(transformer.Decoder(cfg), "teacher_forced", 0)
  out = {}
  for name, tasks in (("all", (s.choice, s.generate)), ("generate", (s.generate,))):
    datas = jax.device_put(tuple(plan.synthetic_split(t, cfg.vocab_size, i)
                                 for i, t in enumerate(tasks)), rep)
    fn = jax.jit(population.make_population_fn(score, "map", kernels.linear))
    t0 = time.perf_counter()
    program = fn.lower(points, pool, datas).compile()
    out[f"compile_s_{name}"] = time.perf_counter() - t0
    out[f"s_per_generation_{name}"] = timed(program, points, pool, datas, repeats=s.repeats)
  merge = jax.jit(kernels.linear)
  out["merges_per_s"] = 1.0 / timed(merge, points[0], pool, repeats=s.repeats)
  out["candidates_per_s"] = s.population / out["s_per_generation_all"]
  g = s.generate
  out["decode_tokens_per_s"] = (s.population * g.examples * g.max_new
                                / out["s_per_generation_generate"])
  flops = model_flops(cfg, pool[0], s) * out["candidates_per_s"]
  acc = accelerators.of_device_kind(jax.devices()[0].device_kind)
  out["mfu"] = flops / acc.peak_flops if acc else None
  stats = jax.devices()[0].memory_stats() or {}
  out["peak_device_bytes"] = stats.get("peak_bytes_in_use")
  return out


def peer_figures(cfg, pool, s: Shapes) -> dict | None:
  """Each candidate merged (the same jitted linear merge), copied into a transformers
  model on the same device, then `generate` on the generate task's prompts."""
  try:
    import torch
    import transformers
  except ImportError as e:
    return {"skipped": f"{e}"}
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = getattr(torch, cfg.dtype)
  hf = families.to_hf_config(cfg)
  config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
  g = s.generate
  prompts = plan.synthetic_split(g, cfg.vocab_size, 1).prompts
  ids = torch.as_tensor(np.asarray(prompts), device=device)
  merge = jax.jit(kernels.linear)
  weights = jnp.full((s.n,), 1.0 / s.n, jnp.float32)
  maps = families.tensor_map(cfg)

  def one() -> None:
    merged = jax.device_get(merge(weights, pool))
    state = {t.hf_name: torch.from_numpy(np.array(  # a writable float32 copy
        t.to_hf(families.get_path(merged, t.path)), np.float32)).to(device, dtype)
        for t in maps}
    model.load_state_dict(state, strict=False)  # (tied or rotary buffers are not weights)
    with torch.no_grad():
      model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=g.max_new,
                     min_new_tokens=g.max_new, do_sample=False, pad_token_id=0)
    if device == "cuda":
      torch.cuda.synchronize()

  one()  # warm-up
  t0 = time.perf_counter()
  for _ in range(s.peer_candidates):
    one()
  per = (time.perf_counter() - t0) / s.peer_candidates
  return {"device": device, "candidates_per_s": 1.0 / per,
          "decode_tokens_per_s": g.examples * g.max_new / per}


def run(tiny: bool, gemma: str | None, peer: bool = True) -> list[dict]:
  s = SMALL if tiny else FULL
  rows = []
  pools = [("tiny Llama" if tiny else "8 x Llama 1.1B (random)", TINY if tiny else LLAMA_1B,
            None)]
  if gemma and os.path.isfile(os.path.join(gemma, "config.json")):
    pools.append(("Gemma 3 270M (+ noise)", None, gemma))
  for name, cfg, folder in pools:
    base = None
    if folder:
      from recycle_jax.checkpoint_io import checkpoints, hf_folder
      meta = checkpoints.read_metadata(folder)
      cfg = families.stored_config(meta.model_config, folder)
      base = hf_folder.restore(folder, meta.abstract)
    pool = random_pool(cfg, s.n, base)
    params = sum(x.size for x in jax.tree.leaves(pool[0]))
    row = {"pool": name, "n": s.n, "params": params, "population": s.population,
           **population_figures(cfg, pool, s)}
    row["peer"] = peer_figures(cfg, pool, s) if peer else None
    rows.append(row)
    del pool
  return rows


def _fmt(v, spec: str = ".3g") -> str:
  return "n/a" if v is None else format(v, spec)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU, CI)")
  p.add_argument("--gemma", default=GEMMA, help="a Gemma 3 270M folder ('' skips it)")
  p.add_argument("--no_peer", action="store_true", help="skip the transformers peer")
  p.add_argument("--json", default=None, help="also write the rows here")
  args = p.parse_args(argv)
  hw = backend.describe()
  print(f"device: {backend.summary(hw)}")
  rows = run(args.tiny, None if args.tiny else args.gemma, not args.no_peer)
  print("| pool | params | compile s | merges/s | candidates/s | decode tok/s | MFU | "
        "peak device memory | peer candidates/s | peer decode tok/s |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    peer = r["peer"] or {}
    mem = r["peak_device_bytes"]
    print(f"| {r['pool']} | {r['params'] / 1e6:.1f}M | {r['compile_s_all']:.1f} | "
          f"{r['merges_per_s']:.3g} | {r['candidates_per_s']:.3g} | "
          f"{r['decode_tokens_per_s']:.4g} | {_fmt(r['mfu'], '.1%')} | "
          f"{'n/a' if mem is None else f'{mem / 2**30:.1f} GiB'} | "
          f"{_fmt(peer.get('candidates_per_s'))} | {_fmt(peer.get('decode_tokens_per_s'), '.4g')} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device": hw, "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
