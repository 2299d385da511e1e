"""Writes a pool of Hugging Face folders whose config.json and safetensors headers are real
and whose tensor data is a hole (sparse files): what `recycle-jax plan` and `inspect`
read, at any model size, without the weights.

  python tools/header_only_pool.py --preset=llama3-8b --n=16 --out=/tmp/pool_8b

The files report their full size (a read would return zeros) and take no disk space.
config.json and the tensor names come from the family's own mapping (`families`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recycle_jax.checkpoint_io import safetensors_io  # noqa: E402
from recycle_jax.models import families, transformer  # noqa: E402

# Meta's Llama 3 configs (vocabulary 128,256, GQA with 8 KV heads, RoPE theta 500,000).
_LLAMA3 = dict(family="llama", vocab_size=128256, num_kv_heads=8, rope_theta=500000.0,
               norm_eps=1e-5, tie_embeddings=False, dtype="bfloat16",
               max_position_embeddings=8192)
PRESETS = {
    "llama3-8b": transformer.ModelConfig(**_LLAMA3, d_model=4096, d_ff=14336,
                                         num_layers=32, num_heads=32),
    "llama3-70b": transformer.ModelConfig(**_LLAMA3, d_model=8192, d_ff=28672,
                                          num_layers=80, num_heads=64),
}


def write_folder(path: str, cfg: transformer.ModelConfig) -> None:
  """config.json + sparse safetensors shards (5 GB each, as transformers writes them)."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(families.to_hf_config(cfg), f, indent=1)
  shapes = families.param_shapes(cfg)
  specs = []
  for t in families.tensor_map(cfg):
    x = families.get_path(shapes, t.path)
    specs.append((t.hf_name, x.dtype, t.hf_shape(x.shape)))
  safetensors_io.Writer(path, specs).close(fsync=False)  # headers only: nothing written


def write_pool(out: str, cfg: transformer.ModelConfig, n: int) -> str:
  """n folders and their pool.json; returns the manifest's path."""
  names = [f"m{i:02d}" for i in range(n)]
  for name in names:
    write_folder(os.path.join(out, name), cfg)
  manifest = os.path.join(out, "pool.json")
  with open(manifest, "w") as f:
    json.dump({"checkpoints": [{"name": m, "path": m} for m in names]}, f, indent=1)
  return manifest


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", choices=sorted(PRESETS), required=True)
  p.add_argument("--n", type=int, default=16)
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  print(write_pool(args.out, PRESETS[args.preset], args.n))
  return 0


if __name__ == "__main__":
  sys.exit(main())
