"""Restore time and peak RSS: a pool of 8 Hugging Face safetensors folders read in place
against the same pool converted to Orbax (same bytes), each restored onto the mesh by
`placed_pool.place` in its own process.

  python benchmarks/hf_pool_restore.py [--hidden=512 --layers=4 --vocab=8192 --n=8]

Prints, per format: seconds from `load_pool` to every array ready, peak RSS of the process
and RSS before the restore (imports and runtime). The files are written just before, so
both are read from the page cache (one run each, the same conditions for both).
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def measure(manifest: str) -> None:
  import jax
  from recycle_jax import placed_pool
  before = rss_mb()
  t = time.perf_counter()
  loaded = placed_pool.place(manifest)
  jax.block_until_ready(loaded.params)
  seconds = time.perf_counter() - t
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  nbytes = sum(x.nbytes for p in loaded.params for x in jax.tree.leaves(p))
  print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mb": round(peak),
                    "rss_before_mb": round(before), "pool_mb": round(nbytes / 2**20)}))


def build(root: str, args) -> tuple[str, str]:
  import torch
  import transformers
  from recycle_jax import convert
  hf, ob = [], []
  for i in range(args.n):
    torch.manual_seed(i)
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
        tie_word_embeddings=False)
    path = os.path.join(root, "hf", f"m{i}")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    convert.convert(path, os.path.join(root, "orbax", f"m{i}"))
    hf.append({"name": f"m{i}", "path": path})
    ob.append({"name": f"m{i}", "path": os.path.join(root, "orbax", f"m{i}")})
  out = []
  for name, entries in (("hf", hf), ("orbax", ob)):
    with open(os.path.join(root, f"{name}.json"), "w") as f:
      json.dump({"checkpoints": entries}, f)
    out.append(os.path.join(root, f"{name}.json"))
  return out[0], out[1]


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--measure", default=None, help=argparse.SUPPRESS)
  p.add_argument("--n", type=int, default=8)
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--vocab", type=int, default=8192)
  args = p.parse_args()
  if args.measure:
    return measure(args.measure)
  root = tempfile.mkdtemp(prefix="hf_restore_")
  try:
    hf, ob = build(root, args)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(
        os.path.join(root, "hf")) for f in fs if f.endswith(".safetensors"))
    print(f"pool: {args.n} Llama folders, {size / 2**20:.0f} MiB of safetensors in all")
    env = {**os.environ, "PYTHONPATH": ROOT}
    for name, manifest in (("safetensors folders", hf), ("orbax (converted)", ob)):
      out = subprocess.run([sys.executable, __file__, f"--measure={manifest}"], env=env,
                           capture_output=True, text=True, check=True)
      r = json.loads(out.stdout.strip().splitlines()[-1])
      print(f"{name:22s} restore {r['seconds']:6.2f} s   peak RSS {r['peak_rss_mb']:5d} MB "
            f"(before restore {r['rss_before_mb']} MB; pool {r['pool_mb']} MB)")
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
