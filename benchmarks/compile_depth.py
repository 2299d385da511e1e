"""Compile time against depth: the transformer's blocks unrolled (default) or under
nn.scan (`ModelConfig.scan_layers`), at 4, 16 and 32 layers.

For each depth and mode, in a fresh process (so no compilation cache is shared):
  compile    jax.jit(...).lower(...).compile() of the generation program
             (`decoding.generate`: prefill, KV cache, stop matching, halving stages) and,
             separately, of packed scoring (`Decoder.score_packed`);
  first      wall time of the first generation call (compile included) on a fresh jit,
             i.e. what the first generation of a search waits for.
Shapes: a Llama-shaped model, d_model 256, 4 heads (2 kv), vocabulary 32000, batch 8,
prompts of 32 tokens, 32 new tokens.

  python benchmarks/compile_depth.py                  # ~3-6 minutes on 2 cores
  python benchmarks/compile_depth.py --layers=4,16 --json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(layers: int, scan: bool) -> dict:
  """One depth and mode, in this process."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from recycle_jax.models import decoding, transformer
  cfg = transformer.ModelConfig(vocab_size=32000, d_model=256, num_layers=layers,
                                num_heads=4, num_kv_heads=2, d_ff=704, tie_embeddings=False,
                                scan_layers=scan)
  dec = transformer.Decoder(cfg)
  params = jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.key(0)))
  b, lp, new = 8, 32, 32
  prompts = jax.ShapeDtypeStruct((b, lp), jnp.int32)
  g = decoding.Prompts(prompts, jax.ShapeDtypeStruct((b,), jnp.int32),
                       jax.ShapeDtypeStruct((1, 1), jnp.int32), new)
  gen = jax.jit(decoding.generate, static_argnums=0)
  t0 = time.perf_counter()
  gen.lower(dec, params, g).compile()
  compile_gen = time.perf_counter() - t0
  score = jax.jit(dec.score_packed)
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
  t0 = time.perf_counter()
  score.lower(params, i32(b, 64), i32(b, 64), i32(b, 64), i32(b, 16), i32(b, 16)).compile()
  compile_score = time.perf_counter() - t0
  real = transformer.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  args = decoding.Prompts(rng.integers(3, cfg.vocab_size, (b, lp)).astype(np.int32),
                          np.full(b, lp, np.int32),
                          decoding.stop_ids([], transformer.EOS_ID), new)
  jax.clear_caches()  # the first call compiles again, as a search's first generation does
  fresh = jax.jit(decoding.generate, static_argnums=0)
  t0 = time.perf_counter()
  jax.block_until_ready(fresh(dec, real, args))
  first = time.perf_counter() - t0
  return {"layers": layers, "scan": scan, "compile_generate_s": round(compile_gen, 2),
          "compile_score_s": round(compile_score, 2), "first_generation_s": round(first, 2)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", default="4,16,32")
  p.add_argument("--json", action="store_true")
  p.add_argument("--one", default="", help=argparse.SUPPRESS)  # LAYERS:SCAN, in a child
  args = p.parse_args()
  if args.one:
    layers, scan = args.one.split(":")
    print(json.dumps(measure(int(layers), scan == "1")))
    return
  rows = []
  for layers in [int(x) for x in args.layers.split(",")]:
    for scan in (False, True):
      out = subprocess.run([sys.executable, __file__, f"--one={layers}:{int(scan)}"],
                           capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"})
      rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
      print(json.dumps(rows[-1]) if args.json else
            f"{layers:3d} layers {'scanned ' if scan else 'unrolled'}: compile generate "
            f"{rows[-1]['compile_generate_s']:6.2f} s, score {rows[-1]['compile_score_s']:6.2f}"
            f" s; first generation {rows[-1]['first_generation_s']:6.2f} s", flush=True)


if __name__ == "__main__":
  main()
